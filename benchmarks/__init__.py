"""Side-by-side benchmarks of rlcsd_jax against HF transformers (PyTorch) on the same device.

One entry point: ``python -m benchmarks.run --suite cpu|gpu [--model ...] [--quick]``.
Modules: ``suites`` (model configs, shapes, inputs), ``flops`` (FLOP counts, MFU, matmul peak),
``jax_side`` / ``hf_side`` (the three measurements for each framework), ``measure`` (timing and
memory helpers), ``phases`` (per-model order: HF then JAX, guarded measurements, largest-B
search), ``report`` (markdown rendering, RESULTS.md), ``run`` (CLI).
See benchmarks/README.md.
"""
