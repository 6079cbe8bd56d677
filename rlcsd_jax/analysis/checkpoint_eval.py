"""Evaluate one checkpoint (`python -m rlcsd_jax.evaluate`): resolve the path, restore its
weights into a `Trainer`, run `Trainer.evaluate()`, and write results.json + results.md.

Scoring is algorithm.md §5: `config.eval.num_samples` samples per problem at
`config.eval.temperature`, mean@k per data source (pass@1 when k = 1) and the unweighted mean
over sources.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
from collections.abc import Mapping

from rlcsd_jax.analysis.results_table import (AVG_COLUMN, GROUPS, aggregate_columns, append_row,
                                              format_table, percent, table_row)
from rlcsd_jax.data import storage
from rlcsd_jax.trainer import checkpoint_lookup
from rlcsd_jax.trainer import setup as setup_lib
from rlcsd_jax.trainer.checkpoint_lookup import Target, resolve_checkpoint

log = logging.getLogger(__name__)


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


def restore_params(trainer, target: Target) -> int:
    """Load the train state of `target` into `trainer.state`; returns the restored step."""
    from rlcsd_jax.trainer import checkpointing

    ckpt = checkpoint_lookup.read_only_checkpointer(target.path)
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
        saved = checkpoint_lookup.saved_config(target.path, target.step or ckpt.latest_step())
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
    return any(storage.exists(storage.join(folder, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def default_name(target: Target, step: int | None) -> str:
    if target.kind == "model":
        return os.path.basename(target.path.rstrip("/"))
    return f"{os.path.basename(target.workdir.rstrip('/'))} (step {step})"


def evaluate_checkpoint(cfg, checkpoint: str, *, step: int | None = None,
                        name: str | None = None, config_path: str | None = None) -> dict:
    """Build the Trainer for `checkpoint`, evaluate it; returns the results.json dict."""
    import jax

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
