"""Loss registry, per-method defaults, per-rollout and micro-batch aggregation (RLCSD_SPEC §4.0,
§4.9; issue 20).

``get(name)`` returns a pure function ``(**arrays, **hparams) -> (scalar_loss, metrics)``.
``DEFAULTS[name]`` holds its hyper-parameter defaults (the shipped CONFIG values of §4.0, read
off the function signature, so there is one source of truth) and ``INPUTS[name]`` the arrays it
requires. ``METHODS[name]`` records the non-loss settings of §3/§4.0/§4.9 a trainer needs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Callable

import jax
import jax.numpy as jnp

from rlcsd_jax.losses import distill, policy_gradient

_LOSSES: dict[str, Callable] = {
    "grpo": policy_gradient.grpo,
    "opsd": distill.opsd,
    "sdpo": distill.sdpo,
    "srpo": distill.srpo,
    "rlsd": policy_gradient.rlsd,
    "rlcsd": policy_gradient.rlcsd,
    "opsd_ectr": distill.opsd_ectr,
    "rlsd_ectr": policy_gradient.rlsd_ectr,
}

# Optional arrays every loss accepts; not hyper-parameters.
_OPTIONAL_ARRAYS = ("ref_logp", "is_weights", "logp")


def names() -> tuple[str, ...]:
    return tuple(_LOSSES)


def get(name: str) -> Callable:
    """The loss function registered under ``name`` (one of :func:`names`)."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; allowed: {', '.join(_LOSSES)}") from None


def _signature_split(fn):
    required, hparams = [], {}
    for p in inspect.signature(fn).parameters.values():
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        elif p.name not in _OPTIONAL_ARRAYS:
            hparams[p.name] = p.default
    return tuple(required), types.MappingProxyType(hparams)


INPUTS = types.MappingProxyType({n: _signature_split(f)[0] for n, f in _LOSSES.items()})
DEFAULTS = types.MappingProxyType({n: _signature_split(f)[1] for n, f in _LOSSES.items()})


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    """Non-loss per-method settings from the spec (§3 table, §4.0, §4.9, §5)."""

    teacher_mode: str | None  # "fixed" (live θ), "ema", "snapshot"; None = no teacher
    teacher_context: str | None  # "gt_solution" (§2.2) or "self_rollout" (§2.3, filtered)
    single_wrong: bool  # one wrong hint (opsd_ectr, rlsd_ectr) vs up to k_max (rlcsd)
    grad_clip: float
    # "per_rollout", "batch" (§4.9) or "reference_micro_batch" (the reference's token-budget
    # micro-batches, each normalised on its own: `trainer.microbatch.ReferenceRule`).  sdpo and
    # srpo default to the reference's: their normalisation spans the several rollouts of a
    # reference micro-batch (srpo's entropy weights and shared denominator, sdpo's token-mean;
    # issue 20).  The other distillation methods default to per-rollout.  A reference
    # micro-batch of the ECTR variants or rlcsd (several teacher rows per rollout) mostly holds
    # one rollout; opsd's and rlsd's hold 1 to 3, like sdpo's (docs/reference_differences.md).
    aggregation: str
    # The batch-aggregated loss is ONE token-mean (a micro-batch's share of it is exact): false
    # for rlcsd (two paths, each normalised by its own token count) and srpo (entropy weights
    # normalised over the batch).
    token_mean_loss: bool = True


METHODS = types.MappingProxyType({
    "grpo": MethodSettings(None, None, False, 1.0, "batch"),
    "opsd": MethodSettings("fixed", "gt_solution", False, 0.1, "per_rollout"),
    "sdpo": MethodSettings("ema", "gt_solution", False, 1.0, "reference_micro_batch"),
    "srpo": MethodSettings("ema", "gt_solution", False, 1.0, "reference_micro_batch", False),
    "rlsd": MethodSettings("snapshot", "gt_solution", False, 1.0, "per_rollout"),
    "rlcsd": MethodSettings("snapshot", "self_rollout", False, 1.0, "per_rollout", False),
    "opsd_ectr": MethodSettings("fixed", "self_rollout", True, 0.1, "per_rollout"),
    "rlsd_ectr": MethodSettings("snapshot", "self_rollout", True, 1.0, "per_rollout"),
})


def _is_batched(x) -> bool:
    return x is not None and hasattr(x, "ndim") and getattr(x, "ndim", 0) >= 1


def per_rollout(loss_fn: Callable) -> Callable:
    """Per-rollout aggregation (§4.9): the loss of each row on its own, then averaged.

    The returned function takes the same keyword arguments as ``loss_fn``. Arguments that are
    arrays with ``ndim >= 1`` are batched over their leading axis B (each row is passed with a
    leading axis of 1, so token-means and rlcsd's two-path normalisation become per-rollout);
    scalars (hyper-parameters) are shared. Extra keyword ``rollout_denominator`` (default B)
    divides the sum of per-row losses: pass the nominal mini-batch size to reproduce the
    reference's "divide by nominal 128" scale when fewer rows survive. Metrics are averaged over
    rows that hold at least one response token (zero-mask padding rows are excluded).
    """

    @functools.wraps(loss_fn)
    def wrapped(*, rollout_denominator=None, **kwargs):
        batched = {k: v for k, v in kwargs.items() if _is_batched(v)}
        shared = {k: v for k, v in kwargs.items() if k not in batched}
        if "mask" not in batched:
            raise ValueError("per_rollout: needs a batched `mask` [B, T].")

        def one(row):
            row = jax.tree_util.tree_map(lambda x: x[None], row)
            return loss_fn(**row, **shared)

        losses, metrics = jax.vmap(one)(batched)
        n_rows = losses.shape[0]
        denom = n_rows if rollout_denominator is None else rollout_denominator
        loss = jnp.sum(losses) / denom
        live = jnp.any(batched["mask"] > 0, axis=-1).astype(losses.dtype)
        n_live = jnp.maximum(jnp.sum(live), 1.0)
        metrics = {k: jnp.sum(v * live) / n_live for k, v in metrics.items()}
        return loss, metrics

    return wrapped


def micro_batch(loss_fn: Callable) -> Callable:
    """reference_micro_batch aggregation: the loss of the micro-batch as a whole (normalised
    over all of its rows, as the reference's loss functions normalise a micro-batch), times its
    live rollouts / ``rollout_denominator`` (the nominal mini-batch M).

    This is the reference's ``loss_scale_factor = n_mb / ppo_mini_batch_size`` (n_mb / 16 on
    each of its 8 GPUs, whose gradients are averaged: n_mb / 128 = n_mb / M), so the
    micro-batches of a mini-batch add up to its loss.  Rows whose mask is all zero (block
    padding) are not rollouts.  Metrics are the loss function's, over the micro-batch.
    """

    @functools.wraps(loss_fn)
    def wrapped(*, rollout_denominator, **kwargs):
        if not _is_batched(kwargs.get("mask")):
            raise ValueError("micro_batch: needs a batched `mask` [B, T].")
        loss, metrics = loss_fn(**kwargs)
        live = jnp.sum(jnp.any(kwargs["mask"] > 0, axis=-1).astype(loss.dtype))
        return loss * live / rollout_denominator, metrics

    return wrapped
