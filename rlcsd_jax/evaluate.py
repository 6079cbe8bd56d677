"""Evaluate one checkpoint on a config's eval set and write results.json + a results.md table.

    python -m rlcsd_jax.evaluate --config=configs/qwen3_1p7b.py --checkpoint=PATH --out=DIR \
        [--step=N] [--append_to=compare.md] [--name=ROW] [--config.eval.num_samples=12 ...]

PATH is one of
  * a model folder: an HF folder (config.json + safetensors) or a converted folder (`params/`),
    anything `models.load` accepts.  The tokenizer comes from `config.tokenizer` or that folder;
  * a training workdir, its `checkpoints/` folder, or one step folder `checkpoints/<N>`: the
    train state of the latest step (or `--step N`) is restored and its params evaluated.  Use
    the training config (same model and `--config.method`: the state's layout depends on them).
    The checkpoint folder is opened read-only, so a run that is still training is not disturbed.

Scoring (`analysis.checkpoint_eval`, algorithm.md §5) runs `Trainer.evaluate()`:
`config.eval.num_samples` samples per problem (<0: 12 for math, 1 for logic) at
`config.eval.temperature` (0.6), mean@k per data source (pass@1 when k = 1), and the unweighted
mean over sources.  DIR/results.json holds the
scores and settings; DIR/results.md a paper-style table in percent (math sources amc23 / aime24 /
aime25 -> "Math Avg", K&K kk_4to8_test / kk_9 / kk_10 / kk_11 -> "Logic Avg").  `--append_to`
adds (or replaces, by row name) this checkpoint's row in another markdown table.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Model folder (HF or converted), training workdir, its checkpoints/ "
    "folder, or one step folder.")
_OUT = flags.DEFINE_string("out", None, "Output folder for results.json and results.md.")
_STEP = flags.DEFINE_integer("step", None, "Train-state step to restore (default: latest).")
_APPEND_TO = flags.DEFINE_string(
    "append_to", None, "Markdown file whose table gets this checkpoint's row (created if "
    "missing; a row with the same name is replaced).")
_NAME = flags.DEFINE_string("name", None, "Row name in the tables (default: from the path).")


def main(argv) -> int:
    del argv
    cfg = _CONFIG.value
    if cfg is None or not _CHECKPOINT.value or not _OUT.value:
        raise app.UsageError("--config, --checkpoint and --out are required")
    logging.getLogger().setLevel(logging.INFO)
    from rlcsd_jax.distributed import multihost

    multihost.initialize(cfg.distributed)   # before any JAX computation
    import jax

    from rlcsd_jax.analysis import checkpoint_eval

    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    results = checkpoint_eval.evaluate_checkpoint(cfg, _CHECKPOINT.value, step=_STEP.value,
                                                  name=_NAME.value, config_path=config_path)
    if jax.process_index() == 0:
        checkpoint_eval.write_results(results, _OUT.value, _APPEND_TO.value)
        print(checkpoint_eval.format_summary(results), flush=True)
        print(f"wrote {os.path.join(_OUT.value, 'results.json')} and results.md", flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
