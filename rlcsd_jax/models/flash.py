"""Blockwise (flash) attention in plain JAX: memory O(T * block), forward and backward.

The portable attention: any backend, any row layout (left or right padding, packed segments, a
KV cache).  Scores are never materialised beyond one [q_block, kv_block] tile per kv head group:
an online softmax runs over key blocks, and a custom VJP recomputes the tiles in the backward
pass from the saved log-sum-exp (FlashAttention-2's recipe), so the backward's memory is linear
in the sequence length too.  A key block that no query of a query block can see (beyond the
causal frontier, outside the sliding window, or all padding) is skipped with `lax.cond`.

Visibility of key j to query i (the rule every attention implementation follows, see
`attention_impls.visible`): same non-zero segment id, k_pos[j] <= q_pos[i], and with a window W
k_pos[j] > q_pos[i] - W.  Queries with segment id 0 (padding) see nothing and return 0.

Shapes: q [B, T, H, D]; k, v [B, S, KV, D] (H a multiple of KV: grouped-query attention without
repeating k/v); positions and segment ids [B, T] / [B, S] int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NONE = jnp.iinfo(jnp.int32).max // 2      # "no window": farther than any position
# Log-sum-exp of a query that sees no key: finite (merging two passes of such a query gives a
# finite, ignored output) and far below any real one.
EMPTY_LSE = -1e30


def _pad_to(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def _tile_mask(qp, qs, kp, ks, window):
    """[B, bq] / [B, bk] positions and segments -> [B, bq, bk] visibility of one tile."""
    same = (ks[:, None, :] == qs[:, :, None]) & (qs[:, :, None] != 0)
    causal = kp[:, None, :] <= qp[:, :, None]
    inside = kp[:, None, :] > qp[:, :, None] - window
    return same & causal & inside


def block_range(x, real):
    """min / max of x over the real entries of each block: [..., b] -> two [...] (an empty
    block gives an empty range, min > max)."""
    big = jnp.iinfo(jnp.int32).max // 4
    return (jnp.min(jnp.where(real, x, big), axis=-1),
            jnp.max(jnp.where(real, x, -big), axis=-1))


def _needed(qp, qs, kp, ks, window):
    """[nq, nk] bool: does any query of block i see any key of block j (in any row)?

    qp, qs: [nq, B, bq]; kp, ks: [nk, B, bk].  Block-level bounds over the real tokens only:
    the position bounds (causal, window) and the segment-id ranges, which must intersect for
    a query and a key to share a segment (packed rows skip the tiles between sequences)."""
    q_lo, q_hi = block_range(qp, qs != 0)                              # [nq, B]
    k_lo, k_hi = block_range(kp, ks != 0)                              # [nk, B]
    qs_lo, qs_hi = block_range(qs, qs != 0)
    ks_lo, ks_hi = block_range(ks, ks != 0)
    ok = (k_lo[None, :, :] <= q_hi[:, None, :]) & (k_hi[None, :, :] > q_lo[:, None, :] - window)
    ok &= (ks_lo[None, :, :] <= qs_hi[:, None, :]) & (ks_hi[None, :, :] >= qs_lo[:, None, :])
    return jnp.any(ok, axis=-1)


def _blocks(x, n: int, axis: int):
    """Split `axis` into n blocks and move the block index to the front."""
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, bq, bk):
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    g = h // kvh
    # q [B, T, H, D] -> [nq, B, KV, G, bq, D]; k, v -> [nk, B, KV, bk, D]
    qq = _pad_to(q, 1, tp).reshape(b, tp, kvh, g, d).transpose(0, 2, 3, 1, 4)
    kk = _pad_to(k, 1, sp).transpose(0, 2, 1, 3)
    vv = _pad_to(v, 1, sp).transpose(0, 2, 1, 3)
    nq, nk = tp // bq, sp // bk
    return dict(
        q=_blocks(qq, nq, 3), k=_blocks(kk, nk, 2), v=_blocks(vv, nk, 2),
        qp=_blocks(_pad_to(q_pos, 1, tp), nq, 1), qs=_blocks(_pad_to(q_seg, 1, tp), nq, 1),
        kp=_blocks(_pad_to(k_pos, 1, sp), nk, 1), ks=_blocks(_pad_to(k_seg, 1, sp), nk, 1))


def _unblock_q(x, t):
    """[nq, B, KV, G, bq, D] -> [B, T, H, D]."""
    nq, b, kvh, g, bq, d = x.shape
    x = jnp.moveaxis(x, 0, 3).reshape(b, kvh, g, nq * bq, d)[:, :, :, :t]
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kvh * g, d)


def _unblock_lse(x, t):
    """[nq, B, KV, G, bq] -> [B, T, H]."""
    return _unblock_q(x[..., None], t)[..., 0]


def _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, bq, bk):
    """(out [B, T, H, D] in q's dtype, lse [nq, B, KV, G, bq] fp32, blocked inputs)."""
    blk = _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, bq, bk)
    scale = q.shape[-1] ** -0.5
    need = _needed(blk["qp"], blk["qs"], blk["kp"], blk["ks"], window)
    nk = blk["k"].shape[0]

    def one_q_block(args):
        qi, qp, qs, need_i = args
        b, kvh, g, bq_, d = qi.shape
        init = (jnp.full((b, kvh, g, bq_), -jnp.inf, jnp.float32),
                jnp.zeros((b, kvh, g, bq_), jnp.float32),
                jnp.zeros((b, kvh, g, bq_, d), jnp.float32))

        def tile(j, carry):
            m, l, acc = carry
            kj, vj = blk["k"][j], blk["v"][j]
            mask = _tile_mask(qp, qs, blk["kp"][j], blk["ks"][j], window)[:, None, None]
            s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32)
            s = jnp.where(mask, s * scale, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
            corr = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vj.dtype), vj,
                            preferred_element_type=jnp.float32)
            return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

        m, l, acc = jax.lax.fori_loop(
            0, nk, lambda j, c: jax.lax.cond(need_i[j], tile, lambda _, c: c, j, c), init)
        out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(
            jnp.where(l > 0, l, 1.0)), EMPTY_LSE)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(one_q_block, (blk["q"], blk["qp"], blk["qs"], need))
    return _unblock_q(out, q.shape[1]), lse, blk, need


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, window, bq, bk):
    return _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, bq, bk)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, bq, bk):
    out, lse, _, _ = _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, bq, bk)
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(window, bq, bk, res, d_out):
    q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = res
    t, s = q.shape[1], k.shape[1]
    blk = _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, bq, bk)
    dblk = _prepare(d_out, k, v, q_pos, k_pos, q_seg, k_seg, bq, bk)["q"]
    oblk = _prepare(out, k, v, q_pos, k_pos, q_seg, k_seg, bq, bk)["q"]
    scale = q.shape[-1] ** -0.5
    need = _needed(blk["qp"], blk["qs"], blk["kp"], blk["ks"], window)
    nk = blk["k"].shape[0]
    # D_i = rowsum(dO * O), the softmax-Jacobian term.
    delta = jnp.sum(dblk.astype(jnp.float32) * oblk.astype(jnp.float32), axis=-1)
    dk0 = jnp.zeros(blk["k"].shape, jnp.float32)
    dv0 = jnp.zeros(blk["v"].shape, jnp.float32)

    def one_q_block(carry, args):
        dk_all, dv_all = carry
        qi, doi, lse_i, delta_i, qp, qs, need_i = args

        def tile(j, c):
            dq, dk_all, dv_all = c
            kj, vj = blk["k"][j], blk["v"][j]
            mask = _tile_mask(qp, qs, blk["kp"][j], blk["ks"][j], window)[:, None, None]
            s_ = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32)
            p = jnp.where(mask, jnp.exp(s_ * scale - lse_i[..., None]), 0.0)
            dv_j = jnp.einsum("bkgqs,bkgqd->bksd", p, doi.astype(jnp.float32))
            dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None]) * scale
            dq = dq + jnp.einsum("bkgqs,bksd->bkgqd", ds, kj.astype(jnp.float32))
            dk_j = jnp.einsum("bkgqs,bkgqd->bksd", ds, qi.astype(jnp.float32))
            return dq, dk_all.at[j].add(dk_j), dv_all.at[j].add(dv_j)

        dq0 = jnp.zeros(qi.shape, jnp.float32)
        dq, dk_all, dv_all = jax.lax.fori_loop(
            0, nk, lambda j, c: jax.lax.cond(need_i[j], tile, lambda _, c: c, j, c),
            (dq0, dk_all, dv_all))
        return (dk_all, dv_all), dq

    (dk, dv), dq = jax.lax.scan(
        one_q_block, (dk0, dv0),
        (blk["q"], dblk, lse, delta, blk["qp"], blk["qs"], need))
    dq = _unblock_q(dq, t).astype(q.dtype)

    def unblock_kv(x, like):   # [nk, B, KV, bk, D] -> [B, S, KV, D]
        nk_, b, kvh, bk_, d = x.shape
        x = jnp.moveaxis(x, 0, 2).reshape(b, kvh, nk_ * bk_, d)[:, :, :s]
        return x.transpose(0, 2, 1, 3).astype(like.dtype)

    return (dq, unblock_kv(dk, k), unblock_kv(dv, v), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block(n: int, preferred: int) -> int:
    """The block size for a length-n axis: at most `preferred`, as even as possible (n split
    into ceil(n / preferred) blocks, rounded up to a multiple of 8) so padding stays small."""
    blocks = max(1, -(-n // preferred))
    return max(8, -(-(-(-n // blocks)) // 8) * 8)


def _arguments(q, k, v, q_pos, k_pos, q_seg, k_seg, window, q_block, kv_block):
    """The public arguments as `_forward` / `_flash` take them: int32 ids, the window as a
    distance, the block sizes for these lengths."""
    ids = (x.astype(jnp.int32) for x in (q_pos, k_pos, q_seg, k_seg))
    w = _NONE if window is None else int(window)
    return (q, k, v, *ids, w, _block(q.shape[1], q_block), _block(k.shape[1], kv_block))


def blockwise_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window: int | None = None,
                        q_block: int = 512, kv_block: int = 512):
    """Flash attention: q [B, T, H, D], k / v [B, S, KV, D] -> [B, T, H, D] (see module doc)."""
    return _flash(*_arguments(q, k, v, q_pos, k_pos, q_seg, k_seg, window, q_block, kv_block))


def blockwise_attention_lse(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window: int | None = None,
                            q_block: int = 512, kv_block: int = 512):
    """(out [B, T, H, D], lse [B, T, H] fp32): the attention and the log-sum-exp of each query's
    visible scaled scores (EMPTY_LSE where it sees nothing), for merging passes over disjoint
    key sets (`attention_impls.merge`).  Forward only: callers score, they do not differentiate."""
    out, lse, _, _ = _forward(*_arguments(q, k, v, q_pos, k_pos, q_seg, k_seg, window,
                                          q_block, kv_block))
    return out, _unblock_lse(lse, q.shape[1])
