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

Scoring is RLCSD_SPEC §5 through `Trainer.evaluate()`: `config.eval.num_samples` samples per
problem (<0: 12 for math, 1 for logic) at `config.eval.temperature` (0.6), mean@k per data
source (pass@1 when k = 1), and the unweighted mean over sources.  DIR/results.json holds the
scores and settings; DIR/results.md a paper-style table in percent (math sources amc23 / aime24 /
aime25 -> "Math Avg", K&K kk_4to8_test / kk_9 / kk_10 / kk_11 -> "Logic Avg").  `--append_to`
adds (or replaces, by row name) this checkpoint's row in another markdown table.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

from absl import app, flags
from ml_collections import config_flags

from rlcsd_jax.trainer import checkpoint_lookup

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

log = logging.getLogger(__name__)

# Checkpoint lookup lives in checkpoint_lookup (shared with `convert --to_hf --src WORKDIR`).
Target = checkpoint_lookup.Target
resolve_checkpoint = checkpoint_lookup.resolve_checkpoint
_read_only_checkpointer = checkpoint_lookup.read_only_checkpointer
_saved_config = checkpoint_lookup.saved_config

# Paper table groups (RLCSD_SPEC §5): column order, then the group's unweighted mean.
GROUPS: dict[str, tuple[str, ...]] = {
    "Math Avg": ("amc23", "aime24", "aime25"),
    "Logic Avg": ("kk_4to8_test", "kk_9", "kk_10", "kk_11"),
}
AVG_COLUMN = "Avg"
NAME_HEADER = "Checkpoint"
MISSING = "-"


# ---------------------------------------------------------------------------------------------
# pure formatting (unit-tested)
# ---------------------------------------------------------------------------------------------

def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def aggregate_columns(scores: Mapping[str, float]) -> dict[str, float]:
    """Source scores (fractions) -> every table column: the sources, "Math Avg" / "Logic Avg"
    over the group's sources that are present, and "Avg" over all sources (= `eval/avg`)."""
    cells = dict(scores)
    for avg_name, members in GROUPS.items():
        present = [scores[s] for s in members if s in scores]
        if present:
            cells[avg_name] = _mean(present)
    if scores:
        cells[AVG_COLUMN] = _mean(scores.values())
    return cells


def table_columns(sources: Iterable[str]) -> list[str]:
    """Column order: each known group's sources then its avg, other sources sorted, then "Avg"
    (left out when every source belongs to one group, whose avg is then the average)."""
    srcs = set(sources)
    cols: list[str] = []
    for avg_name, members in GROUPS.items():
        present = [s for s in members if s in srcs]
        if present:
            cols += present + [avg_name]
    known = {s for members in GROUPS.values() for s in members}
    cols += sorted(srcs - known)
    if srcs and not any(srcs <= set(members) for members in GROUPS.values()):
        cols.append(AVG_COLUMN)
    return cols


def percent(x: float) -> str:
    return f"{100.0 * float(x):.1f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Mapping]) -> str:
    """A markdown table, one row per checkpoint, values in percent with one decimal.

    A row is {"name": str, "scores": {source: fraction}} (scores as in results.json), or
    {"name": str, "cells": {column: text}} (a row read back by `parse_table`, kept verbatim).
    Columns are the union over rows; a row without a column shows "-".
    """
    sources: set[str] = set()
    rendered, kept_aggregates = [], []
    aggregates = set(GROUPS) | {AVG_COLUMN}
    for row in rows:
        if "scores" in row:
            cells = {k: percent(v) for k, v in aggregate_columns(row["scores"]).items()}
            sources |= set(row["scores"])
        else:
            cells = dict(row["cells"])
            sources |= set(cells) - aggregates
            kept_aggregates += [c for c in cells if c in aggregates]
        rendered.append((row["name"], cells))
    cols = table_columns(sources)
    cols += [c for c in dict.fromkeys(kept_aggregates) if c not in cols]  # an old table's own
    lines = ["| " + " | ".join([NAME_HEADER] + [_escape(c) for c in cols]) + " |",
             "|" + "|".join([":---"] + ["---:"] * len(cols)) + "|"]
    for row_name, cells in rendered:
        values = [_escape(row_name)] + [_escape(cells.get(c, MISSING)) for c in cols]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _split_row(line: str) -> list[str]:
    parts = _CELL_SPLIT.split(line.strip())
    if parts and parts[0].strip() == "":
        parts = parts[1:]
    if parts and parts[-1].strip() == "":
        parts = parts[:-1]
    return [p.strip().replace("\\|", "|") for p in parts]


def parse_table(text: str) -> tuple[str, list[dict], str]:
    """(text before, rows as {"name", "cells"}, text after) of the first markdown table in
    `text`; no table -> (text, [], "")."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
    if start is None:
        return text, [], ""
    end = start
    while end < len(lines) and lines[end].lstrip().startswith("|"):
        end += 1
    header = _split_row(lines[start])
    rows = []
    for line in lines[start + 1:end]:
        cells = _split_row(line)
        if all(re.fullmatch(r":?-+:?", c) for c in cells):   # the alignment row
            continue
        cells += [""] * (len(header) - len(cells))
        rows.append({"name": cells[0],
                     "cells": {h: c for h, c in zip(header[1:], cells[1:]) if c != MISSING}})
    return "".join(lines[:start]), rows, "".join(lines[end:])


def append_row(existing: str, row: Mapping) -> str:
    """`existing` markdown with `row` added to its first table (a row of the same name is
    replaced); text around the table is kept."""
    before, rows, after = parse_table(existing)
    rows = [r for r in rows if r["name"] != row["name"]] + [row]
    if before and not before.endswith("\n"):
        before += "\n"
    return before + format_table(rows) + after


def results_dict(eval_metrics: Mapping[str, float], *, num_problems: Mapping[str, int],
                 num_samples: int, sampling: Mapping, checkpoint: str, step: int | None,
                 name: str, date: str | None = None, extra: Mapping | None = None) -> dict:
    """The results.json content from `Trainer.evaluate()`'s output (`eval/<source>`,
    `eval/avg`, ...); `num_problems` ({source: count}) names the sources."""
    scores = {s: float(eval_metrics[f"eval/{s}"]) for s in sorted(num_problems)}
    cells = aggregate_columns(scores)
    named = {f"eval/{s}" for s in scores} | {"eval/avg"}
    out = {
        "name": name,
        "checkpoint": checkpoint,
        "step": step,
        "date": date or datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"),
        "metric": "pass@1" if num_samples == 1 else f"mean@{num_samples}",
        "k": int(num_samples),
        "sampling": dict(sampling),
        "scores": scores,
        "avg": float(eval_metrics.get("eval/avg", cells.get(AVG_COLUMN, float("nan")))),
        "group_avgs": {g: cells[g] for g in GROUPS if g in cells},
        "num_problems": {s: int(num_problems[s]) for s in sorted(num_problems)},
        "other_metrics": {k: float(v) for k, v in sorted(eval_metrics.items())
                          if k not in named},
    }
    out.update(extra or {})
    return out


def table_row(results: Mapping) -> dict:
    return {"name": results["name"], "scores": dict(results["scores"])}


# ---------------------------------------------------------------------------------------------
# checkpoint resolution and restore
# ---------------------------------------------------------------------------------------------

def restore_params(trainer, target: Target) -> int:
    """Load the train state of `target` into `trainer.state`; returns the restored step."""
    from rlcsd_jax.trainer import checkpointing

    ckpt = _read_only_checkpointer(target.path)
    abstract = checkpointing.abstract_like(trainer.state)
    try:
        if target.step is None:
            restored = ckpt.restore_latest(abstract)
            if restored is None:
                raise FileNotFoundError(f"no checkpoint step in {target.path}")
            step, state, _ = restored
        else:
            if target.step not in ckpt.all_steps():
                raise FileNotFoundError(f"step {target.step} is not in {target.path}; saved "
                                        f"steps: {ckpt.all_steps()}")
            step = target.step
            state, _ = ckpt.restore(step, abstract)
    except checkpointing.CheckpointMismatchError as e:
        saved = _saved_config(target.path, target.step or ckpt.latest_step())
        hint = ""
        if saved:
            model = saved.get("model", {})
            hint = (f" This run was trained with --config.method={saved.get('method')} and "
                    f"model.preset={model.get('preset')!r} / "
                    f"model.checkpoint={model.get('checkpoint')!r}.")
        raise checkpointing.CheckpointMismatchError(
            f"{e}\nEvaluate with the config the run was trained with (same model and "
            "--config.method: the teacher and reference weights are part of the saved "
            f"state).{hint}") from None
    finally:
        ckpt.close()
    trainer.state = state
    return int(step)


def _has_tokenizer(folder: str) -> bool:
    from rlcsd_jax.data import storage

    return any(storage.exists(storage.join(folder, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def default_name(target: Target, step: int | None) -> str:
    if target.kind == "model":
        return os.path.basename(target.path.rstrip("/"))
    return f"{os.path.basename(target.workdir.rstrip('/'))} (step {step})"


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def evaluate_checkpoint(cfg, checkpoint: str, *, step: int | None = None,
                        name: str | None = None, config_path: str | None = None) -> dict:
    """Build the Trainer for `checkpoint`, evaluate it; returns the results.json dict."""
    import jax

    from rlcsd_jax.trainer import setup as setup_lib
    from rlcsd_jax.trainer.rl_trainer import Trainer

    if not cfg.data.eval:
        raise ValueError("config.data.eval is empty: nothing to evaluate")
    target = resolve_checkpoint(checkpoint, step)
    if target.kind == "model":
        if not cfg.tokenizer and not _has_tokenizer(target.path):
            raise ValueError(f"{target.path} has no tokenizer files; set --config.tokenizer")
        cfg.model.checkpoint = target.path
        trainer = Trainer(cfg, target.path)
        restored_step = None
    else:
        trainer = Trainer(cfg, target.workdir)
        restored_step = restore_params(trainer, target)
    records = trainer.eval_records
    if cfg.eval.max_examples > 0:            # what Trainer.evaluate() scores
        records = records[:cfg.eval.max_examples]
    if not records:
        raise ValueError(f"config.data.eval={cfg.data.eval!r} gave no problems (all longer than "
                         f"max_prompt_len={cfg.data.max_prompt_len}?)")
    num_samples = setup_lib.eval_samples(cfg)
    log.info("evaluating %s (%s, step %s) on %d problems, %d samples each", target.path,
                 target.kind, restored_step, len(records), num_samples)
    metrics = trainer.evaluate()
    sampling = {"temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p,
                "top_k": cfg.eval.top_k, "max_new_tokens": cfg.eval.max_new_tokens,
                "num_samples": num_samples, "seed": cfg.seed}
    extra = {"kind": target.kind, "config": config_path, "method": cfg.method,
             "eval_set": cfg.data.eval, "max_examples": cfg.eval.max_examples,
             "enable_thinking": cfg.data.enable_thinking,
             "num_devices": jax.device_count()}
    return results_dict(metrics, num_problems=collections.Counter(r.data_source for r in records),
                        num_samples=num_samples, sampling=sampling, checkpoint=target.path,
                        step=restored_step, name=name or default_name(target, restored_step),
                        extra=extra)


def write_results(results: Mapping, out_dir: str, append_to: str | None = None) -> None:
    from etils import epath

    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(format_table([table_row(results)]))
    if append_to:
        target = epath.Path(append_to)
        existing = target.read_text() if target.exists() else ""
        target.write_text(append_row(existing, table_row(results)))


def format_summary(results: Mapping) -> str:
    total = sum(results["num_problems"].values())
    lines = [f"{results['name']}: {results['metric']} over {total} problems"]
    for s, v in results["scores"].items():
        lines.append(f"  {s:<16} {percent(v):>6}  ({results['num_problems'][s]} problems)")
    for g, v in results["group_avgs"].items():
        lines.append(f"  {g:<16} {percent(v):>6}")
    lines.append(f"  {'avg':<16} {percent(results['avg']):>6}")
    return "\n".join(lines)


def main(argv) -> int:
    del argv
    cfg = _CONFIG.value
    if cfg is None or not _CHECKPOINT.value or not _OUT.value:
        raise app.UsageError("--config, --checkpoint and --out are required")
    logging.getLogger().setLevel(logging.INFO)
    from rlcsd_jax.distributed import multihost

    multihost.initialize(cfg.distributed)   # before any JAX computation
    import jax

    results = evaluate_checkpoint(cfg, _CHECKPOINT.value, step=_STEP.value, name=_NAME.value,
                                  config_path=config_flags.get_config_filename(
                                      flags.FLAGS["config"]))
    if jax.process_index() == 0:
        write_results(results, _OUT.value, _APPEND_TO.value)
        print(format_summary(results), flush=True)
        print(f"wrote {os.path.join(_OUT.value, 'results.json')} and results.md", flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
