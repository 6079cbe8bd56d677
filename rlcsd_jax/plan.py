"""Will it fit, and how fast: compile every program of a run for a TPU slice, on any machine.

    python -m rlcsd_jax.plan --config=configs/qwen3_1p7b.py --topology=v5p-16 \
        [--config.KEY=VALUE ...] [--mean_response_len=N] [--json=OUT]

No TPU is needed: libtpu's compiler (the `tpu` extra) compiles the trainer's own jitted programs
(the rollout engine's prefill and decode, old log-probs, teacher scoring, the update,
evaluation) at the config's largest shapes for the slice's devices, from abstract shapes only.
For each program it prints per-device memory against the chip's HBM, FLOPs and bytes (loops
counted by their trip counts), a roofline time, tokens/s and MFU; then one training step's
estimated time by phase.

--topology takes gcloud accelerator types: v4-N and v5p-N count TensorCores (v5p-16 = 8 chips),
v5e-N (or v5litepod-N) and v6e-N count chips.  libtpu's compiler models a v4 chip as two devices
of 16 GiB (one per TensorCore); v5p, v5e and v6e chips are one device each.

Exit status: 0 when every program fits, 1 when one does not (the report names it, its need, the
budget and what would shrink it), 2 on a compile error of another kind.
"""

from __future__ import annotations

import os

from rlcsd_jax.planner import topology

topology.ensure_compile_only_env()
# Only the compiler is used: never take the TPU a training job on this VM may hold.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402



def _flags(argv: list[str]):
    """Flags on a private FlagValues: importing this module (the tests do, beside evaluate.py
    and train.py) never collides with their global --config."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Path to a config file.", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string(
        "topology", None, "TPU slice as gcloud names it: v4-N / v5p-N (N TensorCores, 2 per "
        "chip), v5e-N / v5litepod-N / v6e-N (N chips). Example: v5p-16 (8 chips).",
        flag_values=fv)
    flags.DEFINE_integer(
        "mean_response_len", 0, "Mean response length for the step-time estimate (default: "
        "half the response cap).", flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.",
                        flag_values=fv)
    return fv


def run_setup_for(cfg, mesh):
    """Vocabulary and stop ids as the run will have them, without loading any weights (a run
    without a tokenizer folder builds the tiny tokenizer: so does the planner, in a temporary folder
    removed once the ids are read)."""
    import json as json_lib
    import tempfile

    from rlcsd_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
    from rlcsd_jax.trainer import programs, setup

    tok_dir = os.path.expanduser(cfg.tokenizer or cfg.model.checkpoint)
    vocab, eos, pad = None, (), 0
    with tempfile.TemporaryDirectory(prefix="rlcsd_plan_tok_") as scratch:
        if not tok_dir:
            tok_dir = build_tiny_tokenizer(scratch, vocab_size=cfg.tiny_tokenizer_vocab)
        if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            tok = load_tokenizer(tok_dir)
            vocab, eos, pad = len(tok), setup.stop_ids(cfg, tok, tok_dir), setup.pad_id(tok)
    mcfg = setup.model_config(cfg, vocab)
    if not eos:                                # a checkpoint that is not on this machine
        extra = json_lib.loads(mcfg.hf_extra).get("eos_token_id", 0)
        eos = tuple(extra) if isinstance(extra, list) else (extra,)
    return programs.run_setup(cfg, mesh, eos_ids=eos, pad_id=pad, model_config=mcfg)


def plan(cfg, topology_name: str, mean_response_len: int | None = None):
    """(title, table rows, step estimate, measured programs) for `cfg` on the named slice."""
    from rlcsd_jax.distributed import sharding
    from rlcsd_jax.planner import compile as compile_lib, report
    from rlcsd_jax.trainer import setup

    setup.check_config(cfg)
    sl = topology.get_slice(topology_name)
    mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor,
                              devices=sl.devices)
    rs = run_setup_for(cfg, mesh)
    budget = topology.hbm_budget(sl)
    measured = compile_lib.compile_programs(rs, budget=budget,
                                            mean_response_len=mean_response_len)
    table = report.rows(measured, sl.chip, mesh.devices.size)
    estimate = report.step_estimate(table)
    title = (f"{sl.describe()}; mesh {dict(mesh.shape)}; model "
             f"{rs.model_config.model_type} d={rs.model_config.hidden_size} "
             f"L={rs.model_config.num_layers}; method {cfg.method}; compute {cfg.model.dtype}, "
             f"params {cfg.model.param_dtype}, remat {cfg.model.remat_policy}, attention "
             f"{cfg.model.attention_impl}; peak {sl.chip.peak_flops / 1e12:.0f} TFLOP/s and "
             f"{sl.chip.hbm_bandwidth / 1e9:.0f} GB/s per device")
    return title, table, estimate, measured


def main(argv: list[str] | None = None) -> int:
    """CLI entry: 0 when every program fits, 1 when one does not, 2 on bad usage or a compile
    error of another kind."""
    from rlcsd_jax import cli

    argv = list(sys.argv if argv is None else argv)
    fv = _flags(argv)
    status = cli.parse_flags(fv, argv, __doc__, required=("config", "topology"))
    if status is not None:
        return status
    cfg = fv.config
    from rlcsd_jax.planner import report

    mean_len = fv.mean_response_len or max(cfg.rollout.max_new_tokens // 2, 1)
    title, table, estimate, _ = plan(cfg, fv.topology, mean_len)
    print(report.format_table(title, table, estimate, mean_len), flush=True)
    if fv.json:
        import dataclasses

        with open(fv.json, "w") as f:
            json.dump({"title": title, "topology": fv.topology, "mean_response_len": mean_len,
                       "programs": [dataclasses.asdict(r) for r in table],
                       "step_seconds": estimate}, f, indent=2)
    if any(r.fits is None for r in table):
        return 2
    return 1 if any(r.fits is False for r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
