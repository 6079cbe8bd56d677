"""Will it fit, and how fast: compile a run's programs for a TPU slice on any machine.

`python -m rlcsd_jax.plan` is the command; this package holds its pieces:

- `topology`: gcloud accelerator names -> the compiler's device list, per-chip public figures;
- `hlo_cost`: FLOPs and bytes of a compiled program with every loop counted by its trip count;
- `roofline`: time, tokens/s and MFU from those numbers;
- `report`: the per-program table, the step-time estimate and the advice when a program does
  not fit.

The programs themselves (the trainer's own jitted functions at their largest shapes) are built by
`rlcsd_jax.trainer.programs`, which the trainer also uses for its start-up memory check.
"""
