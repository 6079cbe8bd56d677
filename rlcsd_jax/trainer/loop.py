"""A whole run: resume or start, warm start, evaluate, train, checkpoint, summarise.

Resumption is exact: the train state, the data-iterator position and the step counter are
checkpointed together, and all randomness is derived from (seed, step), so a run killed after a
checkpoint and restarted ends bitwise equal to an uninterrupted one (with the same code and
libraries: `provenance` records them in the workdir and warns on a resume that differs).

Checkpoints are saved every `checkpoint.every` steps and when `checkpoint.every_minutes` have
passed since the last save.  SIGTERM (preemption) is checked after each step and after each
step's sampling phase (the longest one, before any update): the run saves the last completed
step and exits 0 (docs/tpu.md, "Preemption").  Every file goes through `rlcsd_jax.data.storage`,
so the workdir may be gs://...
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from rlcsd_jax.trainer import checkpointing, metrics as metrics_lib, provenance
from rlcsd_jax.distributed import libtpu_flags, multihost
from rlcsd_jax.data import storage
from rlcsd_jax.trainer.rl_trainer import Preempted, Trainer


def _host_state(tr: Trainer, extra: dict) -> dict:
    return {"step": tr.step, "iterator": tr.iterator.get_state(),
            "config": tr.cfg.to_json_best_effort(), **extra}


def _wandb_options(cfg, workdir: str) -> dict | None:
    if not cfg.log.get("wandb", False):
        return None
    return dict(project=cfg.log.wandb_project, entity=cfg.log.wandb_entity,
                name=cfg.log.wandb_name or os.path.basename(workdir.rstrip("/")),
                config=cfg.to_dict())


class _SaveClock:
    """`checkpoint.every_minutes`: due once that long has passed since the last save.  All
    processes agree (any process due -> all save), since a save is collective."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.seconds <= 0:
            return False
        return bool(multihost.global_max(int(time.monotonic() - self.last >= self.seconds)))

    def saved(self) -> None:
        self.last = time.monotonic()


def run(cfg, workdir: str, *, diagnose=None) -> dict:
    """Train according to `cfg`; returns the final summary dict (also written to the workdir).

    diagnose: optional `fn(trainer) -> dict`, called after the warm start and evaluation and
    again after the last step; its results are the summary's `diagnostics_before` /
    `diagnostics_after` (e.g. `analysis.role_tokens.diagnose`, which sits in a higher layer).

    The libtpu compiler flags are set here too (`libtpu_flags.apply`), for callers such as a
    notebook that start here; they take effect only if no JAX computation has run yet."""
    libtpu_flags.apply()
    storage.makedirs(workdir)
    t_start = time.perf_counter()
    is_host0 = jax.process_index() == 0
    if is_host0:
        print("resolved config (override any key with --config.KEY=VALUE):\n" + str(cfg),
              flush=True)
    tr = Trainer(cfg, workdir)
    logger = metrics_lib.MetricsLogger(workdir, is_host0=is_host0,
                                       total_steps=cfg.train.num_steps,
                                       wandb=_wandb_options(cfg, workdir))
    ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"),
                                      save_every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                                      keep_best_metric="eval/avg" if cfg.eval.every else None)
    watcher = checkpointing.PreemptionWatcher()
    tr.should_stop = watcher.should_stop          # checked right after sampling (no sync point)
    clock = _SaveClock(cfg.checkpoint.every_minutes)
    summary = {"config": cfg.method}
    restored = ckpt.restore_latest(checkpointing.abstract_like(tr.state))
    provenance.record(workdir, resumed_from_step=None if restored is None else restored[0],
                      is_host0=is_host0)
    logger.write_hparams(cfg.to_dict())
    if restored is not None:
        _, tr.state, host = restored
        tr.step = host["step"]
        tr.iterator.set_state(host["iterator"])
        summary.update(host.get("summary", {}))
        logging.info("resumed from step %d", tr.step)
    else:
        if cfg.warm_start.steps > 0:
            tr.warm_start()
        if cfg.eval.before_train and tr.eval_records:
            ev = tr.evaluate()
            logger.write(0, ev)
            summary["eval_before"] = ev
        if diagnose is not None:
            summary["diagnostics_before"] = diagnose(tr)
        summary["reward_first"] = None

    def save(step, metrics=None, force=False) -> bool:
        saved = ckpt.maybe_save(step, tr.state, _host_state(tr, {"summary": summary}),
                                metrics=metrics, force=force)
        if saved:
            clock.saved()
            logger.flush()       # metrics up to this step reach a gs:// workdir with it
        return saved

    def stop(reason: str) -> dict:
        ckpt.wait()
        logging.warning("%s: the last completed step (%d) is saved; exiting", reason, tr.step)
        summary["preempted_at"] = tr.step
        logger.close()
        ckpt.close()
        watcher.close()
        return summary

    rewards, tokens, t_train = [], 0, time.perf_counter()
    while tr.step < cfg.train.num_steps:
        position = tr.iterator.get_state()
        records = next(tr.iterator)
        try:
            metrics = tr.train_step(records)
        except Preempted:
            tr.iterator.set_state(position)   # this step's batch is drawn again on resume
            save(tr.step, force=True)
            return stop("preemption during the step")
        step = tr.step
        rewards.append(metrics["train/reward_mean"])
        if summary.get("reward_first") is None:
            summary["reward_first"] = metrics["train/reward_mean"]
        tokens += metrics["perf/tokens_per_s"] * metrics["time/step"]
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.num_steps:
            metrics.update(tr.evaluate())
        logger.write(step, metrics)
        logger.on_step(step)
        preempted = watcher.should_stop(step)
        save(step, metrics={k: v for k, v in metrics.items() if k.startswith("eval/")},
             force=preempted or clock.due())
        if preempted:
            return stop("preemption")
    save(tr.step, force=True)
    if cfg.eval.at_end and tr.eval_records:
        ev = tr.evaluate()
        logger.write(tr.step, ev)
        summary["eval_after"] = ev
    if diagnose is not None:
        summary["diagnostics_after"] = diagnose(tr)
    ckpt.wait()
    summary.update(steps=tr.step, reward_last=rewards[-1] if rewards else None,
                   reward_mean_last5=float(np.mean(rewards[-5:])) if rewards else None,
                   tokens_per_s=tokens / max(time.perf_counter() - t_train, 1e-9),
                   wall_time_s=time.perf_counter() - t_start)
    if is_host0:
        storage.write_text(storage.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    logger.close()
    ckpt.close()
    watcher.close()
    return summary


def format_summary(s: dict) -> str:
    def acc(d):
        if not d:
            return "n/a"
        se = d.get("eval/avg_stderr")
        return f"{d.get('eval/avg', float('nan')):.3f}" + ("" if se is None else f" ± {se:.3f}")

    before, after = s.get("eval_before"), s.get("eval_after")
    change = []
    if before and after and "eval/avg_stderr" in before and "eval/avg_stderr" in after:
        # Unpaired standard error of the difference: conservative for the same problems.
        se = (before["eval/avg_stderr"] ** 2 + after["eval/avg_stderr"] ** 2) ** 0.5
        change = [f"held-out change: {after['eval/avg'] - before['eval/avg']:+.3f} "
                  f"(± {se:.3f} standard error)"]

    lines = ["", "=" * 72, "rlcsd_jax run summary", "-" * 72,
             f"steps: {s.get('steps')}    wall time: {s.get('wall_time_s', 0):.0f}s    "
             f"tokens/s (rollout): {s.get('tokens_per_s', 0):.0f}",
             f"train reward: {s.get('reward_first')} (first step) -> "
             f"{s.get('reward_mean_last5')} (mean of last 5 steps)",
             f"held-out accuracy (eval/avg): {acc(before)} (before RL) -> "
             f"{acc(after)} (after RL)", *change,
             *[f"{when} RL: {s[key]['line']}" for when, key in
               (("before", "diagnostics_before"), ("after", "diagnostics_after"))
               if isinstance(s.get(key), dict) and "line" in s[key]],
             "=" * 72]
    return "\n".join(lines)
