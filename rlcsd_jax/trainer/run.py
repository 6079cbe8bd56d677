"""A whole run: resume or start, warm start, evaluate, train, checkpoint, summarise.

Resumption is exact: the train state, the data-iterator position and the step counter are
checkpointed together, and all randomness is derived from (seed, step), so a run killed after a
checkpoint and restarted ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from rlcsd_jax import checkpointing, metrics as metrics_lib
from rlcsd_jax.trainer.loop import Trainer


def _host_state(tr: Trainer, extra: dict) -> dict:
    return {"step": tr.step, "iterator": tr.iterator.get_state(),
            "config": tr.cfg.to_json_best_effort(), **extra}


def run(cfg, workdir: str) -> dict:
    """Train according to `cfg`; returns the final summary dict (also written to the workdir)."""
    if "://" not in workdir:  # gs:// workdirs are created by the writers themselves
        os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    tr = Trainer(cfg, workdir)
    is_host0 = jax.process_index() == 0
    logger = metrics_lib.MetricsLogger(workdir, is_host0=is_host0,
                                       total_steps=cfg.train.num_steps)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      save_every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                                      keep_best_metric="eval/avg" if cfg.eval.every else None)
    watcher = checkpointing.PreemptionWatcher()
    summary = {"config": cfg.method}
    restored = ckpt.restore_latest(checkpointing.abstract_like(tr.state))
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
        summary["reward_first"] = None

    rewards, tokens, t_train = [], 0, time.perf_counter()
    while tr.step < cfg.train.num_steps:
        records = next(tr.iterator)
        m = tr.train_step(records)
        step = tr.step
        rewards.append(m["train/reward_mean"])
        if summary.get("reward_first") is None:
            summary["reward_first"] = m["train/reward_mean"]
        tokens += m["perf/tokens_per_s"] * m["time/step"]
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.num_steps:
            m.update(tr.evaluate())
        logger.write(step, m)
        logger.on_step(step)
        stop = watcher.should_stop(step)
        ckpt.maybe_save(step, tr.state, _host_state(tr, {"summary": summary}),
                        metrics={k: v for k, v in m.items() if k.startswith("eval/")},
                        force=stop)
        if stop:
            ckpt.wait()
            logging.warning("preemption: saved step %d, exiting", step)
            summary["preempted_at"] = step
            return summary
    ckpt.maybe_save(tr.step, tr.state, _host_state(tr, {"summary": summary}), force=True)
    if cfg.eval.at_end and tr.eval_records:
        ev = tr.evaluate()
        logger.write(tr.step, ev)
        summary["eval_after"] = ev
    ckpt.wait()
    summary.update(steps=tr.step, reward_last=rewards[-1] if rewards else None,
                   reward_mean_last5=float(np.mean(rewards[-5:])) if rewards else None,
                   tokens_per_s=tokens / max(time.perf_counter() - t_train, 1e-9),
                   wall_time_s=time.perf_counter() - t_start)
    if is_host0 and "://" not in workdir:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logger.close()
    ckpt.close()
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
             f"{acc(after)} (after RL)", *change, "=" * 72]
    return "\n".join(lines)
