"""How every training metric reduces when parts are combined into one value.

A step's update runs as mini-batches of micro-batches; its metrics are combined micro-batch ->
mini-batch (`update.combine_metrics`) and mini-batch -> step (`evaluation.update_metrics`).  Each
metric name declares how (as a Marin/Levanter loss says how its metrics reduce):

* ``sum``: counts, sums and times add up (a step's selected tokens = the sum over its
  mini-batches);
* ``max`` / ``min``: the largest / smallest;
* ``mean`` with a weight: a mean weighted by its denominator, another metric of the same parts
  (a token mean by its token count, a fraction of groups by their count), so the result is the
  pooled mean over every part's units whatever their sizes;
* ``mean`` without a weight: the plain mean, where each part counts once (each mini-batch's
  loss and gradient norm belongs to one optimizer update) or every part has the same size.

The loss functions' metrics reduce as `rlcsd_jax.losses.reductions` declares: its means are
over the loss's unit (response tokens, or live rollouts under per-rollout aggregation) and
weigh by `LOSS_UNITS`, the units of each micro-batch (`update._loss`), summed along with them
and dropped from the logged step.  A weight named with ``{dir}`` is relative to the metric's
prefix (``{dir}/group_count`` for ``rlcsd/aborted_ratio`` is ``rlcsd/group_count``).  A name
no pattern declares is an error (`reduction_of`), never silently averaged; the tests check that
every metric a training step emits is declared.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence

import numpy as np

from rlcsd_jax.losses import reductions as loss_reductions

SUM, MAX, MIN, MEAN = "sum", "max", "min", "mean"
# How many units (response tokens, or live rollouts under per-rollout aggregation) the loss
# metrics' means of a micro-batch are over; private (not logged).
LOSS_UNITS = "_weight"


@dataclasses.dataclass(frozen=True)
class Reduction:
    kind: str                    # sum | max | min | mean
    weight: str | None = None    # mean: the metric holding each part's denominator


def _mean(weight=None):
    return Reduction(MEAN, weight)


_ENGINE_COUNTERS = ("decode_steps", "busy_slot_steps", "total_slot_steps", "decode_calls",
                    "prefill_calls", "prefill_rows", "preemptions")

# (name pattern, reduction); the first match wins, then the loss metrics' patterns.
PATTERNS: tuple[tuple[str, Reduction], ...] = (
    (LOSS_UNITS, Reduction(SUM)),
    # The step's rollouts (`evaluation.rollout_metrics`), over the global batch: every step
    # samples the same number of rollouts, so a plain mean over steps is their pooled mean.
    ("train/reward_mean", _mean()), ("train/response_length_mean", _mean()),
    ("train/truncation_ratio", _mean()), ("train/kept_ratio", _mean()), ("train/acc/*", _mean()),
    ("train/response_length_max", Reduction(MAX)),
    # Hint / drop statistics (`hints.merge_stats`, under the method's name; their *_count and
    # *_sum below).
    ("*/valid_group_ratio", _mean("{dir}/group_count")),
    ("*/aborted_ratio", _mean("{dir}/group_count")),
    ("*/kept_ratio", _mean("{dir}/sample_count")),
    ("*/correct_pool_size_mean", _mean("{dir}/valid_sample_count")),
    ("*/wrong_pool_size_mean", _mean("{dir}/valid_sample_count")),
    ("*/k_mean", _mean("{dir}/valid_sample_count")),
    # One optimizer update per mini-batch: its loss (the sum of its micro-batches' shares,
    # `update.combine_metrics`), gradient norm and learning rate.
    ("loss", _mean()), ("grad_norm", _mean()), ("lr", _mean()),
    ("micro_batches", Reduction(SUM)), ("teacher_prompt_truncated_tokens", Reduction(SUM)),
    # Token means of the student's scoring (`rl_trainer._token_means`).
    ("entropy", _mean("response_token_count")),
    ("sampler_logp_abs_diff", _mean("response_token_count")),
    # The step as a whole.
    ("student/tokens_*", Reduction(SUM)), ("teacher/tokens_*", Reduction(SUM)),
    ("train/num_updates", Reduction(SUM)),
    ("train/skipped_steps", Reduction(MAX)),          # a running total
    ("time/*", Reduction(SUM)), ("perf/tokens_per_s", _mean("time/step")),
    # The rollout engine's counters of one generation job (`rl_trainer.engine_metrics`), of a
    # training step (engine/) or an evaluation (eval/engine/).
    *((f"{p}engine/{k}", Reduction(SUM)) for p in ("", "eval/") for k in _ENGINE_COUNTERS),
    *((f"{p}engine/{k}", Reduction(MAX)) for p in ("", "eval/")
      for k in ("peak_kv_tokens", "live_kv_tokens_at_peak")),
    *((f"{p}engine/busy_slot_fraction", _mean("{dir}/total_slot_steps"))
      for p in ("", "eval/")),
    # Evaluation (`evaluation.evaluate`: each over every eval problem's samples).
    ("eval/*", _mean()),
)

_FROM_LOSS = {loss_reductions.SUM: Reduction(SUM), loss_reductions.MAX: Reduction(MAX),
              loss_reductions.MEAN: _mean(LOSS_UNITS)}


def step_name(key: str) -> str:
    """The logged name of a mini-batch metric: un-prefixed names go under train/."""
    return key if "/" in key else f"train/{key}"


def _lookup(name: str, *, losses: bool = True) -> Reduction | None:
    for pattern, reduction in PATTERNS:
        if fnmatch.fnmatchcase(name, pattern):
            return reduction
    kind = loss_reductions.reduction(name) if losses else None
    return None if kind is None else _FROM_LOSS[kind]


def reduction_of(name: str) -> Reduction:
    """The declared reduction of metric `name` (a mini-batch key or its logged name `train/x`),
    its weight resolved to a metric name of the same level.  Raises KeyError if undeclared."""
    key, found = name, _lookup(name, losses=False)
    inner = name[len("train/"):] if name.startswith("train/") else ""
    if found is None and inner and "/" not in inner:    # train/x: the mini-batch metric x
        key, found = inner, _lookup(inner)
    if found is None:
        key, found = name, _lookup(name)
    if found is None:
        raise KeyError(f"metric {name!r} has no declared reduction; declare it in "
                       "rlcsd_jax/trainer/reductions.py (a loss metric: "
                       "rlcsd_jax/losses/reductions.py)")
    if found.weight is None:
        return found
    weight = found.weight.replace("{dir}", key.rpartition("/")[0])
    return Reduction(found.kind, step_name(weight) if key != name else weight)


def reduce(parts: Sequence[Mapping]) -> dict[str, float]:
    """One dict of metrics from per-part dicts with the same keys (micro-batches, mini-batches),
    each metric reduced as declared; a weighted mean weighs each part's value by that part's
    denominator (a part with weight 0 adds nothing; all 0: the plain mean)."""
    if not parts:
        return {}
    keys = list(parts[0])
    for part in parts[1:]:
        if set(part) != set(keys):
            raise ValueError(f"the parts hold different metrics: {sorted(set(part) ^ set(keys))}")
    values = {k: np.asarray([float(np.asarray(p[k])) for p in parts], np.float64) for k in keys}
    out = {}
    for key in keys:
        r, v = reduction_of(key), values[key]
        if r.kind == SUM:
            out[key] = float(v.sum())
        elif r.kind == MAX:
            out[key] = float(v.max())
        elif r.kind == MIN:
            out[key] = float(v.min())
        elif r.weight is None:
            out[key] = float(v.mean())
        else:
            if r.weight not in values:
                raise KeyError(f"metric {key!r} is a mean weighted by {r.weight!r}, which the "
                               "parts do not hold")
            w = values[r.weight]
            total = w.sum()
            out[key] = float(np.sum(np.where(w > 0, v, 0.0) * w) / total if total > 0
                             else v.mean())
    return out
