"""`python -m rlcsd_jax.train` with the role-token diagnostics in the run summary.

    python -m benchmarks.tiny_hints_train --config=configs/tiny_hints.py --workdir=/tmp/th

The diagnostics (`rlcsd_jax.analysis.role_tokens`, `warm_start.hint_diagnostics` held-out
prompts before and after RL) sit in the analysis layer, above the trainer, so the trainer's
own entry point does not run them; this one passes them to `trainer.loop.run` as its hook.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (local path or gs://).")


def main(argv) -> int:
    del argv
    cfg = _CONFIG.value
    if cfg is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    logging.getLogger().setLevel(logging.INFO)
    from rlcsd_jax import train
    from rlcsd_jax.analysis import role_tokens
    from rlcsd_jax.trainer import loop

    train.quiet_library_logs()
    summary = role_tokens.run(cfg, _WORKDIR.value)
    print(loop.format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
