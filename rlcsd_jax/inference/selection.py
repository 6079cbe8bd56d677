"""Token selection: temperature / top-k / top-p, fp32 full-vocabulary log-probs, and the
per-request random streams of the rollout engine.

Log-probs are those of the sampled token under softmax(logits / T) over the FULL vocabulary in
fp32 (the "old" log-prob of the algorithm, not the top-k / top-p renormalised one); with
temperature 0 (greedy) the log-softmax of the raw logits.

The engine draws token j of request r with the key fold_in(fold_in(key, r), j): a row's tokens
depend only on (key, r, j), never on the slot, the decode step or the batch it ran in, so a
preempted and restarted request reproduces its tokens and the results do not change with the
number of slots or the page size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 = greedy; top_k 0 and top_p 1.0 disable the filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling options {self}")


def filtered_logits(logits: jax.Array, opts: SamplingOptions):
    """Temperature, then top-k, then top-p on fp32 logits [B, V].

    Returns (candidate logits [B, C] with -inf outside the support, candidate ids [B, C]).
    With top-k the nucleus is computed inside the k candidates (already sorted by lax.top_k), so
    no full-vocabulary sort is needed; without top-k the whole vocabulary is sorted.
    """
    scaled = logits.astype(jnp.float32) / opts.temperature
    if opts.top_k > 0:
        vals, ids = jax.lax.top_k(scaled, min(opts.top_k, scaled.shape[-1]))
    elif opts.top_p < 1.0:
        ids = jnp.argsort(-scaled, axis=-1)
        vals = jnp.take_along_axis(scaled, ids, axis=-1)
    else:
        return scaled, None
    if opts.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        vals = jnp.where(mass_before < opts.top_p, vals, -jnp.inf)
    return vals, ids


def select_tokens(logits: jax.Array, key: jax.Array, opts: SamplingOptions):
    """logits [B, V] fp32 -> (tokens [B] int32, logprobs [B] fp32 under softmax(logits / T))."""
    logits = logits.astype(jnp.float32)
    if opts.temperature == 0:
        tokens = jnp.argmax(logits, axis=-1)
        scaled = logits
    else:
        vals, ids = filtered_logits(logits, opts)
        choice = jax.random.categorical(key, vals, axis=-1)
        tokens = choice if ids is None else jnp.take_along_axis(ids, choice[:, None], -1)[:, 0]
        scaled = logits / opts.temperature
    picked = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    logprobs = picked - jax.nn.logsumexp(scaled, axis=-1)
    return tokens.astype(jnp.int32), logprobs


def request_keys(key: jax.Array, requests: jax.Array, token_index: jax.Array) -> jax.Array:
    """Keys of token `token_index` [N] of requests `requests` [N] (global row ids) -> [N]."""
    return jax.vmap(lambda r, j: jax.random.fold_in(jax.random.fold_in(key, r), j))(
        requests, token_index)


def select_rows(logits: jax.Array, keys: jax.Array, opts: SamplingOptions):
    """`select_tokens` with one key per row: logits [N, V], keys [N] -> tokens [N], logprobs
    [N].  Row i's draw depends only on its logits and keys[i]."""
    tokens, logprobs = jax.vmap(lambda row, k: select_tokens(row[None], k, opts))(logits, keys)
    return tokens[:, 0], logprobs[:, 0]
