"""`python -m benchmarks.plan_scaling [--config qwen3_1p7b] [--topology v5p-16]`.

Memory against sequence length, by the TPU compiler (libtpu, no TPU needed): the trainer's
scoring forward (`update.old_logprobs`) and gradient (`update.accumulate_grads`) compiled for one
row per device at 8,192 and 32,768 tokens, with the config's attention.  Linear memory means
the 32k temporaries are about 4x the 8k ones; dense attention would be 16x.
"""

from __future__ import annotations

import argparse
import os

from rlcsd_jax.planner import topology

topology.ensure_compile_only_env()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def temporaries(cfg, slice_name: str, lengths=(8192, 32768), programs=("score/old_logprobs",)):
    """{(program, length): per-device temporary bytes} for one row per device of `length`."""
    import jax

    from rlcsd_jax import plan
    from rlcsd_jax.distributed import sharding
    from rlcsd_jax.planner import compile as compile_lib
    from rlcsd_jax.trainer import programs as programs_lib

    cfg = cfg.copy_and_resolve_references()
    cfg.train.share_teacher_prefixes = False    # whole rows: the forward at one row's length
    sl = topology.get_slice(slice_name)
    mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor,
                              devices=sl.devices)
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for length in lengths:
        base = programs_lib.step_shapes(cfg, devices)
        shape = programs_lib.MicroShape(devices, length, length, length // 2)
        shapes = base.__class__(**{**base.__dict__, "student_max": shape, "typical": shape,
                                   "teacher_max": shape})
        rs = plan.run_setup_for(cfg, mesh)
        built = programs_lib.build(rs, shapes=shapes)
        for p in built:
            if p.name in programs:
                m = compile_lib.measure(p, topology.hbm_budget(sl), with_cost=False)
                out[(p.name, length)] = (m.temp_bytes if m.refused_need_bytes is None
                                         else m.refused_need_bytes)
        jax.clear_caches()
    return out


def main(argv=None):
    from benchmarks.plan_table import load_config

    p = argparse.ArgumentParser(prog="python -m benchmarks.plan_scaling", description=__doc__)
    p.add_argument("--config", default="qwen3_1p7b")
    p.add_argument("--topology", default="v5p-16")
    p.add_argument("--programs", default="score/old_logprobs,update/grad")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    names = tuple(args.programs.split(","))
    temps = temporaries(cfg, args.topology, programs=names)
    for name in names:
        small, big = temps[(name, 8192)], temps[(name, 32768)]
        print(f"{args.config} on {args.topology}, {name}, one row per device: temporaries "
              f"{small / 2**30:.2f} GiB at 8,192 tokens, {big / 2**30:.2f} GiB at 32,768 "
              f"({big / small:.2f}x for 4x the tokens)")


if __name__ == "__main__":
    main()
