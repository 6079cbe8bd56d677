"""Scoring responses that share prefixes: each prefix's forward runs once, rows hold no padding.

A teacher context is a prefix (the teacher prompt with one sibling rollout as the hint) followed
by the student's response; within a group at most G prefixes serve every (rollout, context)
pair, and the student's G rollouts share one prompt.  A shared-prefix row packs groups back to
back, each group a prefix followed by every response scored under it:

    [ prefix a | response a1 | response a2 | prefix b | response b1 | ... | padding ]

Each response attends to its group's prefix and causally to itself, never to a sibling
response (`attention_impls.shared_prefix_attention`: two attention passes merged by
log-sum-exp).  Positions restart per group: prefix 0..P-1, every response of it P, P+1, ...
The log-probs, top-k and entropies equal full-row scoring's (fp32: to rounding).

The state predicting a response's first token is its prefix's last one; later tokens are
predicted by their predecessor in the same response.  `pred_index` [R, N] gives, for the N
scored tokens of a row (its responses, back to back), the row index of each one's predicting
state, and `targets` [R, N] the tokens: only those N positions go through the LM head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlcsd_jax import scoring


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "entropy", "temperature",
                                             "chunk", "tile_density"))
def shared_prefix_stats(graphdef, params, input_ids, positions, segment_ids, prefix_q_seg,
                        prefix_k_seg, pred_index, targets, at_ids=None, *, top_k: int = 0,
                        entropy: bool = False, temperature: float = 1.0,
                        chunk: int = scoring.DEFAULT_CHUNK,
                        tile_density: float | None = None) -> dict:
    """Statistics of the responses packed in shared-prefix rows.  Stop-gradient.

    input_ids / positions / segment_ids / prefix_q_seg / prefix_k_seg [R, W] (module doc and
    `CausalLM.hidden_states`' prefix_segments); pred_index / targets [R, N]; at_ids [R, N, k]
    optional.  Returns `scoring.head_stats`'s dict: logp [R, N] (+ topk_ids / topk_logp,
    at_ids_logp, entropy).  tile_density: the planner's estimate of the attention tiles the
    passes compute (pricing only, `models.splash`)."""
    model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    h, _ = model.hidden_states(input_ids, positions=positions, segment_ids=segment_ids,
                               prefix_segments=(prefix_q_seg, prefix_k_seg),
                               tile_density=tile_density)
    h_pred = jnp.take_along_axis(h, pred_index[..., None], axis=1)
    return scoring.head_stats(model, h_pred, targets, temperature=temperature, top_k=top_k,
                              at_ids=at_ids, entropy=entropy, chunk=chunk)
