"""Loss registry, per-method defaults, per-rollout and micro-batch aggregation (algorithm.md §4.0,
§4.9).

``get(name)`` returns a pure function ``(**arrays, **hparams) -> (scalar_loss, metrics)``.
``DEFAULTS[name]`` holds its hyper-parameter defaults (the shipped CONFIG values of §4.0, read
off the function signature, so there is one source of truth) and ``INPUTS[name]`` the arrays it
requires. ``METHODS[name]`` is the method's entry in the one method table
(:mod:`rlcsd_jax.losses.methods`): its loss and the settings of §3/§4.0/§4.9 a trainer needs.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import jax
import jax.numpy as jnp

from rlcsd_jax.losses import reductions
from rlcsd_jax.losses.methods import METHODS

_LOSSES: dict[str, Callable] = {name: spec.loss for name, spec in METHODS.items()}


def names() -> tuple[str, ...]:
    return tuple(_LOSSES)


def get(name: str) -> Callable:
    """The loss function registered under ``name`` (one of :func:`names`)."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; allowed: {', '.join(_LOSSES)}") from None


INPUTS = types.MappingProxyType({n: s.inputs for n, s in METHODS.items()})
DEFAULTS = types.MappingProxyType({n: s.defaults for n, s in METHODS.items()})


def _is_batched(x) -> bool:
    return x is not None and hasattr(x, "ndim") and getattr(x, "ndim", 0) >= 1


def per_rollout(loss_fn: Callable) -> Callable:
    """Per-rollout aggregation (§4.9): the loss of each row on its own, then averaged.

    The returned function takes the same keyword arguments as ``loss_fn``. Arguments that are
    arrays with ``ndim >= 1`` are batched over their leading axis B (each row is passed with a
    leading axis of 1, so token-means and rlcsd's two-path normalisation become per-rollout);
    scalars (hyper-parameters) are shared. Extra keyword ``rollout_denominator`` (default B)
    divides the sum of per-row losses: pass the nominal mini-batch size to reproduce the
    reference's "divide by nominal 128" scale when fewer rows survive. Metrics reduce over the
    rows as `reductions` declares: counts and sums add up, maxima take the largest, means are
    averaged over the rows that hold at least one response token (zero-mask padding rows are
    excluded).
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
        live = jnp.any(batched["mask"] > 0, axis=-1)
        return loss, reductions.reduce_rows(metrics, live)

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
