"""Attention implementations, chosen by `ModelConfig.attention_impl`, and the rule they share.

Every implementation takes q [B, T, H, D], k / v [B, S, KV, D] (grouped-query: H a multiple of
KV, k/v never repeated), per-token positions q_pos [B, T] / k_pos [B, S] and segment ids
q_seg [B, T] / k_seg [B, S] (0 = padding; a row may pack several sequences), and returns
[B, T, H, D].  Key j is visible to query i when

    k_seg[j] == q_seg[i] != 0   and   k_pos[j] <= q_pos[i]   and   k_pos[j] > q_pos[i] - window

(`window` None = full attention; Olmo-3's sliding layers keep `window` keys including the
current one).  Padding queries see nothing; their output is unspecified but finite.  No
implementation but the `xla` reference builds a [B, T, S] mask.

    xla        einsum reference with a dense mask: short sequences, parity tests;
    blockwise  flash attention in plain JAX (`flash.py`): any backend, any layout, linear memory;
    splash     TPU Pallas splash attention (`splash.py`), under shard_map on the mesh;
    cudnn      GPU cuDNN flash attention via `jax.nn.dot_product_attention`: rows must be right
               padded with positions 0..n-1 (the layout of every scoring / training row); any
               other call falls back to blockwise, logged once;
    auto       splash on TPU, cudnn on GPU, blockwise on CPU (on this project's 2-core CPU
               blockwise is as fast as xla at 128 tokens and 17x faster at 8,192, with 1% of
               its memory: `python -m benchmarks.attention`, benchmarks/RESULTS.md).

Shared-prefix rows (`shared_prefix_attention`): a row packs groups [prefix | r1 | r2 | ...] in
which every response sees its group's prefix and itself, not the other responses.  One segment
id per token cannot say that, so the layer runs two passes over the same keys and merges them
by log-sum-exp (`merge`): pass 1 with each prefix and each response its own segment, pass 2
with each response's queries tagged by its group and only the prefix keys tagged (every
response position is past every prefix position, so the position rule holds in both).  Only
`xla`, `blockwise` and `splash` give the log-sum-exp; both passes skip the tiles no query of
theirs needs (`flash._needed`, `splash._skip_by_segments`).  Splash's window is by index, which
is the position distance inside a segment but not from a response back to its prefix: on
sliding layers the second pass runs blockwise.  Forward only (scoring).

`right_padded=True` is the caller's promise that each row is [real tokens | padding] with
positions 0..n-1 and no cache (T == S): what cuDNN's sequence-length masking needs.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlcsd_jax.distributed.sharding import target_platform
from rlcsd_jax.models import flash

# Finite "minus infinity" for masked scores: a fully masked row (a padding query) then gives a
# uniform, finite softmax instead of NaN, and its output is ignored by the caller.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_logged: set = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logging.warning(message)


def visible(q_pos, k_pos, q_seg, k_seg, window: int | None) -> jax.Array:
    """The visibility rule as a dense [B, T, S] boolean (reference and tests only)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k_seg[:, None, :] == q_seg[:, :, None]) & (q_seg[:, :, None] != 0) & (kp <= qp)
    if window is not None:
        mask &= kp > qp - window
    return mask


def _xla(q, k, v, q_pos, k_pos, q_seg, k_seg, window):
    """Dense reference: fp32 scores [B, KV, G, T, S], masked softmax -> (out, lse [B, T, H])."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    mask = visible(q_pos, k_pos, q_seg, k_seg, window)
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * (d ** -0.5), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    lse = jnp.where(jnp.any(mask, -1)[:, None, None], jax.nn.logsumexp(scores, axis=-1),
                    flash.EMPTY_LSE)                                   # [B, KV, G, T]
    return (out.reshape(b, t, h, d).astype(q.dtype),
            lse.transpose(0, 3, 1, 2).reshape(b, t, h))


def xla_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False):
    """Dense reference: fp32 scores [B, KV, G, T, S], masked softmax."""
    del right_padded
    return _xla(q, k, v, q_pos, k_pos, q_seg, k_seg, window)[0]


def blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False):
    del right_padded
    return flash.blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window)


def splash_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False):
    from rlcsd_jax.models import splash

    t, s = q.shape[1], k.shape[1]
    if not (t == s and splash.supports(t, s)):
        _log_once(f"attention: splash needs self-attention over multiples of 128 tokens (got "
                  f"T={t}, S={s}); using blockwise for this call")
        return blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window)
    return splash.splash_attention(q, k, v, q_seg, k_seg, window=window)


def cudnn_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False,
                    implementation: str | None = "cudnn"):
    """cuDNN flash attention for right-padded rows: causal + per-row lengths (+ the window).

    `implementation` is `jax.nn.dot_product_attention`'s: tests run the same masking with
    "xla" on CPU."""
    if not right_padded or q.shape[1] != k.shape[1]:
        _log_once("attention: cudnn needs right-padded rows without a cache; using blockwise "
                  "for this call")
        return blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window)
    lengths = jnp.sum((q_seg != 0).astype(jnp.int32), axis=-1)
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)


def auto_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False):
    platform = target_platform()
    if platform == "tpu":
        impl = splash_attention
    elif platform == "gpu" or platform == "cuda":
        impl = cudnn_attention
    else:
        impl = blockwise_attention
    return impl(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, right_padded=right_padded)


ATTENTION_IMPLS: dict[str, Callable] = {
    "xla": xla_attention,
    "blockwise": blockwise_attention,
    "splash": splash_attention,
    "cudnn": cudnn_attention,
    "auto": auto_attention,
}


def merge(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from each set's (out [B, T, H, D],
    lse [B, T, H]): the softmax weights of each pass rescaled by its share of the total mass."""
    m = jnp.maximum(lse_a, lse_b)
    wa, wb = jnp.exp(lse_a - m)[..., None], jnp.exp(lse_b - m)[..., None]

    def term(out, w):   # a pass whose tiles were all skipped may leave 0 / 0 where w == 0
        return jnp.where(w > 0, out.astype(jnp.float32) * w, 0.0)

    out = (term(out_a, wa) + term(out_b, wb)) / jnp.maximum(wa + wb, 1e-30)
    return out.astype(out_a.dtype)


def _with_lse(name: str, window, tile_density=None, index_window: bool = True) -> Callable:
    """The (out, lse) form of implementation `name` for self-attention rows (T == S).
    index_window: the pass's visible keys lie within `window` tokens of the query by index as
    well as by position (true inside one segment, false from a response to its prefix)."""
    if name == "auto":
        name = "splash" if target_platform() == "tpu" else "blockwise"
    if name == "splash":
        from rlcsd_jax.models import splash

        # The kernel's window is an index mask (`models.splash`): exact where the index
        # distance is the position distance, not from a response back to its prefix.
        if window is None or index_window:
            def attend(q, k, v, qp, kp, qs, ks):
                if not splash.supports(q.shape[1]):
                    return flash.blockwise_attention_lse(q, k, v, qp, kp, qs, ks, window=window)
                return splash.splash_attention(q, k, v, qs, ks, window=window, with_lse=True,
                                               tile_density=tile_density)
            return attend
        _log_once("attention: splash cannot window a response's view of its prefix; that "
                  "pass of sliding layers uses blockwise")
        name = "blockwise"
    if name == "cudnn":
        _log_once("attention: cudnn returns no log-sum-exp; shared-prefix rows use blockwise")
        name = "blockwise"
    if name == "xla":
        return lambda *a: _xla(*a, window)
    return lambda *a: flash.blockwise_attention_lse(*a, window=window)


def shared_prefix_attention(name: str, q, k, v, q_pos, k_pos, q_seg, k_seg, prefix_q_seg,
                            prefix_k_seg, *, window=None, tile_density=None):
    """Attention of a shared-prefix row (module doc): pass 1 over (q_seg, k_seg), pass 2 over
    (prefix_q_seg, prefix_k_seg), merged.  All [B, T] / [B, S] int32, T == S.  tile_density:
    the share of tiles each pass computes, for the planner's pricing of splash (None: the
    causal triangle's)."""
    own = _with_lse(name, window, tile_density)
    over_prefix = _with_lse(name, window, tile_density, index_window=False)
    out_a, lse_a = own(q, k, v, q_pos, k_pos, q_seg, k_seg)
    out_b, lse_b = over_prefix(q, k, v, q_pos, k_pos, prefix_q_seg, prefix_k_seg)
    return merge(out_a, lse_a, out_b, lse_b)


def get(name: str) -> Callable:
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={name!r}; available: {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[name]
