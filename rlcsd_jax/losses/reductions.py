"""How each loss metric reduces over rollouts and micro-batches.

As a Marin/Levanter loss says how each of its metrics reduces (a count is summed, a mean is
weighted by its denominator), every metric a loss function returns (``(loss, metrics)``) has a
kind, given by the first pattern its name matches:

* ``"sum"``: counts and sums (``*_count``, ``*_sum``) add up;
* ``"max"``: maxima (``*_max``) take the largest;
* ``"mean"``: a mean over the loss's unit: the rows' response tokens (or a subset of them, or
  its rows) under batch and reference_micro_batch aggregation, the live rollouts under
  per-rollout aggregation (`per_rollout` averages each row's value over them).  Parts combine
  as a mean weighted by how many units each holds (`rlcsd_jax.trainer.reductions`).

A name that matches no pattern is an error, so a new metric has to say how it reduces rather
than being averaged silently.
"""

from __future__ import annotations

import fnmatch

import jax.numpy as jnp

SUM, MAX, MEAN = "sum", "max", "mean"

PATTERNS = (
    ("*_count", SUM), ("*_sum", SUM),
    ("*_max", MAX),
    # Means: token means (the loss's own terms, fractions of its tokens, per-path losses).
    ("*_mean", MEAN), ("*_ratio", MEAN), ("*_frac", MEAN), ("*clipfrac", MEAN),
    ("pg_clipfrac_lower", MEAN), ("pg_loss", MEAN), ("ppo_kl", MEAN), ("kl", MEAN),
    ("entropy_mc", MEAN), ("teacher_gap", MEAN), ("*/loss_selected", MEAN),
    ("*/loss_nonselected", MEAN), ("*/teacher_tail_mass", MEAN),
)


def reduction(name: str) -> str | None:
    """The kind ("sum" / "max" / "mean") of loss metric `name`, or None if it is undeclared."""
    for pattern, kind in PATTERNS:
        if fnmatch.fnmatchcase(name, pattern):
            return kind
    return None


def kind_of(name: str) -> str:
    """`reduction`, failing on an undeclared name."""
    kind = reduction(name)
    if kind is None:
        raise KeyError(f"loss metric {name!r} has no declared reduction; add its pattern to "
                       "rlcsd_jax/losses/reductions.py PATTERNS")
    return kind


def reduce_rows(metrics: dict, live) -> dict:
    """Per-rollout metrics (each ``[B]``, one value per row) -> one value each: the sum over
    the rows, the largest over the live rows, or the mean over the live rows (live: ``[B]``
    bool, the rows with at least one response token; zero-mask padding rows are not rollouts).
    """
    out = {}
    for key, value in metrics.items():
        kind = kind_of(key)
        kept = jnp.where(live, value, 0.0)
        if kind == SUM:
            out[key] = jnp.sum(kept)
        elif kind == MAX:
            out[key] = jnp.where(jnp.any(live), jnp.max(jnp.where(live, value, -jnp.inf)), 0.0)
        else:
            out[key] = jnp.sum(kept) / jnp.maximum(jnp.sum(live.astype(value.dtype)), 1.0)
    return out
