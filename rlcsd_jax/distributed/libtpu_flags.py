"""The libtpu compiler flags every rlcsd_jax program is compiled with, on a TPU and in the
planner.

libtpu reads `LIBTPU_INIT_ARGS` once, when JAX starts its TPU backend, so `apply()` must run
before the first JAX computation: `multihost.initialize` (the entry points' first step),
`trainer.loop.run` and the planner's `topology.ensure_compile_only_env` call it, so a run and its
plan compile the same programs.  A flag already present in `LIBTPU_INIT_ARGS` is left as the
user set it.

Why each flag:

* `xla_tpu_enable_windowed_einsum_for_all_gather=false`.  With FSDP the weights are sharded on
  their input (contracting) dimension.  XLA's windowed einsum then computes each matmul as one
  partial product per weight shard while the next shard arrives, and adds each into an fp32
  accumulator of the whole output, which at tens of thousands of tokens per device lives in HBM:
  for Qwen3-1.7B's MLP at 36,864 tokens per device that is a 0.9 GB accumulator read and written
  once per shard.  Gathering the layer's weights (about 100 MB) and running one matmul moves
  a fifth of the bytes.  The planner on v5p-16 (qwen3_1p7b, `benchmarks/RESULTS.md`): the
  scoring programs read and write 1,180-1,260 GB per call with windowing and 261-262 GB
  without; student scoring goes from 0.426 to 0.339 s per call (memory- to compute-bound) and
  both scoring programs from 10.8 to 6.4 GiB per device; the update's gradient from 1,550 to
  889 GB per call and 18.7 to 17.3 GiB.  Rollout and evaluation programs compile the same.
  The gather can still overlap the previous layer's compute through XLA's asynchronous
  collectives (not measured on a TPU: these are the compiler's numbers).  MaxText's inference
  settings turn windowing off too.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

FLAGS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": "false",
}

ENV = "LIBTPU_INIT_ARGS"


def apply(environ: MutableMapping[str, str] = os.environ) -> str:
    """Append every flag of FLAGS that `environ[LIBTPU_INIT_ARGS]` does not set yet; returns the
    resulting value.  Idempotent."""
    current = environ.get(ENV, "").split()
    named = {arg.lstrip("-").split("=", 1)[0] for arg in current}
    added = [f"--{name}={value}" for name, value in FLAGS.items() if name not in named]
    value = " ".join(current + added)
    environ[ENV] = value
    return value
