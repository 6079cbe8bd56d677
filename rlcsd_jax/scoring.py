"""Per-token log-probs (and top-k, entropy) of response tokens under one or several contexts.

Alignment rule (algorithm.md §2.5): in a row whose response starts at index `start` (the prompt's
real length for right-padded rows, the padded prompt width for left-padded sampler rows), the
log-prob of response token j is read from the logits at index `start - 1 + j` of that same row,
at id `input_ids[start + j]`.  Nothing depends on the padded width or on other rows.

Memory: only the T response positions go through the LM head, in chunks under
`jax.checkpoint`, so neither the forward nor the backward holds [B, T, V] in fp32: a chunk holds
about `chunk` tokens per device (positions per chunk = chunk / rows per device), so the peak is
O(chunk * V) per device whatever the micro-batch's shape.

The student (with gradient, inside the loss) and every teacher (stop-gradient, teacher params)
use this same code; `score_contexts` runs it over a leading context axis C, one context at a
time, so teacher memory does not grow with the number of contexts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_CHUNK = 4096       # LM-head tokens per device per chunk


def positions_per_chunk(rows: int, length: int, chunk: int) -> int:
    """Response positions per LM-head chunk so one chunk is about `chunk` tokens per device
    (rows are split over the batch mesh axes of the tracing context's mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    per_device = max(1, rows // shards)
    return max(1, min(length, chunk // per_device))


def gather_response(h: jax.Array, input_ids: jax.Array, response_start: jax.Array, length: int):
    """h [B, S, d], ids [B, S], start [B] -> (predictor hidden [B, T, d], target ids [B, T])."""
    s = input_ids.shape[1]
    j = jnp.arange(length)[None, :]
    pred = jnp.clip(response_start[:, None] - 1 + j, 0, s - 1)
    tgt = jnp.clip(response_start[:, None] + j, 0, s - 1)
    h_resp = jnp.take_along_axis(h, pred[:, :, None], axis=1)
    return h_resp, jnp.take_along_axis(input_ids, tgt, axis=1)


def _chunk_stats(logits_fn, h, targets, at_ids, top_k: int, entropy: bool, temperature: float):
    """One chunk: h [B, c, d] -> dict of [B, c] / [B, c, k] fp32 statistics."""
    logits = logits_fn(h) / temperature                      # [B, c, V] fp32
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = {"logp": jnp.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse}
    if top_k:
        vals, ids = jax.lax.top_k(logits, top_k)
        out["topk_ids"] = ids.astype(jnp.int32)
        out["topk_logp"] = vals - lse[..., None]
    if at_ids is not None:
        out["at_ids_logp"] = jnp.take_along_axis(logits, at_ids, -1) - lse[..., None]
    if entropy:
        p = jax.nn.softmax(logits, axis=-1)
        out["entropy"] = lse - jnp.sum(p * logits, axis=-1)
    return out


def response_stats(model, input_ids, attention_mask, response_start, length: int, *,
                   temperature: float = 1.0, top_k: int = 0, at_ids=None, entropy: bool = False,
                   chunk: int = DEFAULT_CHUNK, right_padded: bool = False) -> dict:
    """Statistics of the `length` response tokens of every row.

    input_ids, attention_mask [B, S]; response_start [B].  Returns fp32 arrays:
      logp [B, T]                  log-prob of the response token (full-vocab log-softmax)
      topk_ids, topk_logp [B,T,k]  this context's own top-k (when top_k > 0)
      at_ids_logp [B, T, k]        log-probs at given ids `at_ids` [B, T, k]
      entropy [B, T]               full-vocabulary entropy (when entropy=True)
    Positions past a row's response length hold garbage; callers mask them.  right_padded: rows
    are [real | padding] (lets attention use length masks, see `models.attention_impls`).
    """
    h, _ = model.hidden_states(input_ids, attention_mask, right_padded=right_padded)
    h_resp, targets = gather_response(h, input_ids, response_start, length)
    return head_stats(model, h_resp, targets, temperature=temperature, top_k=top_k,
                      at_ids=at_ids, entropy=entropy, chunk=chunk)


def head_stats(model, h_resp, targets, *, temperature: float = 1.0, top_k: int = 0, at_ids=None,
               entropy: bool = False, chunk: int = DEFAULT_CHUNK) -> dict:
    """The LM head's statistics at given predictor states: h_resp [B, T, d] (the state before
    each target), targets [B, T] -> `response_stats`'s dict, in chunks under `jax.checkpoint`."""
    length = targets.shape[1]
    c = positions_per_chunk(targets.shape[0], length, chunk)
    n_chunks = -(-length // c)
    pad = n_chunks * c - length
    if pad:
        h_resp = jnp.pad(h_resp, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        at_ids = None if at_ids is None else jnp.pad(at_ids, ((0, 0), (0, pad), (0, 0)))

    def split(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], n_chunks, c, *x.shape[2:]), 1, 0)

    stats = jax.checkpoint(functools.partial(
        _chunk_stats, model.logits, top_k=top_k, entropy=entropy, temperature=temperature))
    xs = (split(h_resp), split(targets), None if at_ids is None else split(at_ids))
    out = jax.lax.map(lambda x: stats(*x), xs)

    def merge(x):  # [n, B, c, ...] -> [B, T, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], n_chunks * c, *x.shape[3:])[:, :length]

    return jax.tree.map(merge, out)


def score_contexts(model, input_ids, attention_mask, response_start, length: int, **kw) -> dict:
    """The same statistics for C contexts: inputs [C, B, S] / [C, B] -> [C, B, T, …], one
    context after the other (`lax.map`), so memory is that of one context.

    `at_ids` (if given) is shared by all contexts: [B, T, k].
    """
    at_ids = kw.pop("at_ids", None)

    def one(args):
        ids, mask, start = args
        return response_stats(model, ids, mask, start, length, at_ids=at_ids, **kw)

    return jax.lax.map(one, (input_ids, attention_mask, response_start))


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "top_k", "entropy",
                                             "temperature", "chunk", "right_padded"))
def score(graphdef, params, input_ids, attention_mask, response_start, at_ids=None, *,
          length: int, top_k: int = 0, entropy: bool = False, temperature: float = 1.0,
          chunk: int = DEFAULT_CHUNK, right_padded: bool = False) -> dict:
    """Jitted, stop-gradient multi-context scoring with `params` (e.g. teacher params).

    input_ids / attention_mask [C, B, S], response_start [C, B] -> dict of [C, B, T, …].
    """
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    return score_contexts(model, input_ids, attention_mask, response_start, length,
                          top_k=top_k, at_ids=at_ids, entropy=entropy, temperature=temperature,
                          chunk=chunk, right_padded=right_padded)


# Shared-prefix rows.
#
# Scoring responses that share prefixes: each prefix's forward runs once, rows hold no padding.
#
# A teacher context is a prefix (the teacher prompt with one sibling rollout as the hint) followed
# by the student's response; within a group at most G prefixes serve every (rollout, context)
# pair, and the student's G rollouts share one prompt.  A shared-prefix row packs groups back to
# back, each group a prefix followed by every response scored under it:
#
#     [ prefix a | response a1 | response a2 | prefix b | response b1 | ... | padding ]
#
# Each response attends to its group's prefix and causally to itself, never to a sibling
# response (`attention_impls.shared_prefix_attention`: two attention passes merged by
# log-sum-exp).  Positions restart per group: prefix 0..P-1, every response of it P, P+1, ...
# The log-probs, top-k and entropies equal full-row scoring's (fp32: to rounding).
#
# The state predicting a response's first token is its prefix's last one; later tokens are
# predicted by their predecessor in the same response.  `pred_index` [R, N] gives, for the N
# scored tokens of a row (its responses, back to back), the row index of each one's predicting
# state, and `targets` [R, N] the tokens: only those N positions go through the LM head.


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "entropy", "temperature",
                                             "chunk", "tile_density"))
def shared_prefix_stats(graphdef, params, input_ids, positions, segment_ids, prefix_q_seg,
                        prefix_k_seg, pred_index, targets, at_ids=None, *, top_k: int = 0,
                        entropy: bool = False, temperature: float = 1.0,
                        chunk: int = DEFAULT_CHUNK,
                        tile_density: float | None = None) -> dict:
    """Statistics of the responses packed in shared-prefix rows.  Stop-gradient.

    input_ids / positions / segment_ids / prefix_q_seg / prefix_k_seg [R, W] (module doc and
    `CausalLM.hidden_states`' prefix_segments); pred_index / targets [R, N]; at_ids [R, N, k]
    optional.  Returns `head_stats`'s dict: logp [R, N] (+ topk_ids / topk_logp,
    at_ids_logp, entropy).  tile_density: the planner's estimate of the attention tiles the
    passes compute (pricing only, `models.splash`)."""
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    h, _ = model.hidden_states(input_ids, positions=positions, segment_ids=segment_ids,
                               prefix_segments=(prefix_q_seg, prefix_k_seg),
                               tile_density=tile_density)
    h_pred = jnp.take_along_axis(h, pred_index[..., None], axis=1)
    return head_stats(model, h_pred, targets, temperature=temperature, top_k=top_k,
                              at_ids=at_ids, entropy=entropy, chunk=chunk)
