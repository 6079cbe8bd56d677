"""Scoring continuations over shared prefixes: each prefix's forward runs once.

A teacher context is a prefix (the teacher prompt with one sibling rollout as the hint) followed
by the student's response; within a group at most G prefixes serve every (rollout, context)
pair, and the student's G rollouts share one prompt.  Instead of forwarding every row whole,
`prefix_kv` runs each distinct prefix once and keeps its per-layer keys and values, and
`continuation_stats` runs each response over the cached keys of its prefix: the response tokens
attend to the prefix (all of it: it precedes them) and causally to themselves.  The log-probs,
top-k and entropies are those of full-row scoring (fp32: to rounding).

Layout: prefixes are LEFT padded to width P, so every prefix ends at column P - 1: the state that
predicts a response's first token is `last_hidden` of its prefix, the response's own states
predict the rest, and a continuation's keys are [prefix (padded) | response] with its queries at
the end (which lets TPU splash attention serve it, `models.splash`).  Rows and prefixes are split
into `shards` equal blocks, one per device of the batch mesh axes, and a row only uses a prefix
of its own block (`prefix_index` is local to the block), so gathering a row's prefix keys never
leaves the device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlcsd_jax import scoring
from rlcsd_jax.models.decoder import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixCache:
    """Cached prefixes: kv.layers k / v [L, N, P, KV, D], kv.positions / kv.valid [N, P];
    last_hidden [N, d]: the final-normed state at each prefix's last token."""

    kv: KVCache
    last_hidden: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef",))
def prefix_kv(graphdef, params, prefix_ids, prefix_mask) -> PrefixCache:
    """prefix_ids / prefix_mask [N, P] (left padded) -> their cache.  Stop-gradient."""
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    n, p = prefix_ids.shape
    cache = KVCache.init(model.config, n, p)
    h, cache = model.hidden_states(prefix_ids, prefix_mask, cache=cache)
    return PrefixCache(kv=cache, last_hidden=h[:, -1])


def _gather_rows(x, index, shards: int):
    """x [N, ...] (blocks of N / shards per device), index [R] local to its row's block ->
    x[block(r) * N / shards + index[r]] [R, ...], gathered inside each block."""
    n, r = x.shape[0], index.shape[0]
    blocks = x.reshape(shards, n // shards, *x.shape[1:])
    idx = index.reshape(shards, r // shards)
    out = jax.vmap(lambda b, i: jnp.take(b, i, axis=0))(blocks, idx)
    return out.reshape(r, *x.shape[1:])


@functools.partial(jax.jit, static_argnames=("graphdef", "shards", "top_k", "entropy",
                                             "temperature", "chunk"))
def continuation_stats(graphdef, params, cache: PrefixCache, prefix_index, input_ids,
                       attention_mask, at_ids=None, *, shards: int = 1, top_k: int = 0,
                       entropy: bool = False, temperature: float = 1.0,
                       chunk: int = scoring.DEFAULT_CHUNK) -> dict:
    """Statistics of each row's response over its cached prefix.  Stop-gradient.

    prefix_index [R] (local to the row's block of prefixes), input_ids / attention_mask [R, T]
    (the response, right padded), at_ids [R, T, k] optional.  Returns `scoring.response_stats`'s
    dict: logp [R, T] (+ topk_ids / topk_logp, at_ids_logp, entropy)."""
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    r, t = input_ids.shape
    kv = cache.kv

    def rows(x):
        return _gather_rows(x, prefix_index, shards)

    k = jax.vmap(rows)(kv.layers.k)                   # [L, R, P, KV, D]
    v = jax.vmap(rows)(kv.layers.v)
    pad = [(0, 0), (0, 0), (0, t), (0, 0), (0, 0)]
    valid = rows(kv.valid)                            # [R, P]
    prefix_len = jnp.sum(valid.astype(jnp.int32), axis=-1)
    row_cache = KVCache(
        layers=type(kv.layers)(k=jnp.pad(k, pad), v=jnp.pad(v, pad)),
        positions=jnp.pad(rows(kv.positions), [(0, 0), (0, t)]),
        valid=jnp.pad(valid, [(0, 0), (0, t)]), index=jnp.asarray(k.shape[2], jnp.int32))
    positions = prefix_len[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    h, _ = model.hidden_states(input_ids, attention_mask, positions=positions, cache=row_cache,
                               queries_at_end=True)
    # Response token 0 is predicted by the prefix's last state, token j by the response's j-1.
    h_resp = jnp.concatenate([rows(cache.last_hidden)[:, None].astype(h.dtype), h[:, :-1]], 1)
    return scoring.head_stats(model, h_resp, input_ids, temperature=temperature, top_k=top_k,
                              at_ids=at_ids, entropy=entropy, chunk=chunk)
