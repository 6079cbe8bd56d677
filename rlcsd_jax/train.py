"""Train with RLCSD or a baseline.

    python -m rlcsd_jax.train --config=configs/qwen3_1p7b.py --workdir=gs://bucket/run \
        [--config.method=grpo --config.rlcsd.tau=0.03 ...]

The workdir holds checkpoints (resumed automatically), metrics (TensorBoard, metrics.jsonl) and
summary.json.  With `--config.warm_start.hint_diagnostics=N` (configs/tiny_hints.py sets 16) the
role-token e_ctr / e_c diagnostics of `rlcsd_jax.analysis.role_tokens` on N held-out prompts,
before and after RL, go into the summary too.  On TPU pods every worker runs the same command;
`jax.distributed.initialize()` is called when `--config.distributed=True` or the environment
sets RLCSD_DISTRIBUTED=1 (off TPU, also set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES
and JAX_PROCESS_ID; see `rlcsd_jax.distributed.multihost.initialize`).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (local path or gs://).")


class _DropLibraryInfo(logging.Filter):
    """Keep INFO lines from rlcsd_jax; libraries (orbax logs every save) only WARNING and up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/rlcsd_jax/" in record.pathname


def quiet_library_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropLibraryInfo())


def main(argv) -> int:
    del argv
    cfg = _CONFIG.value
    if cfg is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    logging.getLogger().setLevel(logging.INFO)
    quiet_library_logs()
    from rlcsd_jax.distributed import multihost

    multihost.initialize(cfg.distributed)   # before any JAX computation
    from rlcsd_jax.analysis import role_tokens
    from rlcsd_jax.trainer import loop as run_lib

    summary = run_lib.run(cfg, _WORKDIR.value, diagnose=role_tokens.diagnose(cfg))
    print(run_lib.format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
