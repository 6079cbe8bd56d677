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

`right_padded=True` is the caller's promise that each row is [real tokens | padding] with
positions 0..n-1 and no cache (T == S): what cuDNN's sequence-length masking needs.
`queries_at_end=True` promises that the T queries are the last T of the S keys (a continuation
over a cached prefix), which lets the index-masked splash kernel serve T < S.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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


def xla_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False,
                  queries_at_end=False):
    """Dense reference: fp32 scores [B, KV, G, T, S], masked softmax."""
    del right_padded, queries_at_end
    b, t, h, d = q.shape
    kvh = k.shape[2]
    mask = visible(q_pos, k_pos, q_seg, k_seg, window)
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * (d ** -0.5), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False,
                        queries_at_end=False):
    del right_padded, queries_at_end
    return flash.blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window)


def splash_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False,
                     queries_at_end=False):
    from rlcsd_jax.models import splash

    t, s = q.shape[1], k.shape[1]
    if not ((t == s or queries_at_end) and splash.supports(t, s)):
        _log_once(f"attention: splash needs self-attention or queries at the end of the keys, "
                  f"over multiples of 128 tokens (got T={t}, S={s}); using blockwise for this "
                  "call")
        return blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window)
    return splash.splash_attention(q, k, v, q_seg, k_seg, window=window)


def cudnn_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False,
                    queries_at_end=False, implementation: str | None = "cudnn"):
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


def auto_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=None, right_padded=False,
                   queries_at_end=False):
    platform = jax.devices()[0].platform
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        platform = mesh.abstract_device.platform     # compiling for a TPU slice on a CPU host
    if platform == "tpu":
        impl = splash_attention
    elif platform == "gpu" or platform == "cuda":
        impl = cudnn_attention
    else:
        impl = blockwise_attention
    return impl(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, right_padded=right_padded,
                queries_at_end=queries_at_end)


ATTENTION_IMPLS: dict[str, Callable] = {
    "xla": xla_attention,
    "blockwise": blockwise_attention,
    "splash": splash_attention,
    "cudnn": cudnn_attention,
    "auto": auto_attention,
}


def get(name: str) -> Callable:
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={name!r}; available: {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[name]
