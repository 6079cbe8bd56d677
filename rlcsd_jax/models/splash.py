"""TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`).

For self-attention (T == S), or for T queries that are the LAST T of S keys (a continuation
scored over a cached prefix: query i sits at key index S - T + i).  The kernel's mask is static
and index based: causal, or local for Olmo-3's sliding layers (window W keeps W keys including
the current one), offset by S - T.  Padding and packed sequences are segment
ids.  That equals the position rule of `attention_impls` whenever positions advance by one per
token inside a segment, which holds for every row the trainer builds (right-padded scoring rows,
left-padded prompts).  Grouped-query attention runs natively (the kernel takes fewer k/v heads).

On a mesh the kernel runs under `shard_map` (Mosaic kernels cannot be partitioned
automatically): rows over ('data', 'fsdp'), heads over 'tensor' when they divide it.  The mesh
comes from the tracing context (`jax.set_mesh`), which the trainer and the planner set; off TPU
the kernel runs in Pallas interpret mode (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from rlcsd_jax.distributed.sharding import target_device
from rlcsd_jax.models import flash

# Preferred block sizes per TPU generation (device_kind prefix): larger tiles amortise the
# per-step overhead where VMEM allows (v5e and v6e have 128 MiB of VMEM per core, v5p 64 MiB).
_BLOCKS = {"TPU v6": 1024, "TPU v5 lite": 1024, "TPU v5": 512, "TPU v4": 512}
_MIN_BLOCK = 128


def supports(q_len: int, kv_len: int | None = None) -> bool:
    return q_len % _MIN_BLOCK == 0 and (kv_len or q_len) % _MIN_BLOCK == 0


def _block(length: int, kind: str) -> int:
    preferred = next((b for prefix, b in _BLOCKS.items() if kind.startswith(prefix)), 512)
    block = preferred
    while block > _MIN_BLOCK and length % block:
        block //= 2
    return min(block, length)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, q_len: int, kv_len: int, window: int | None, block_q: int,
            block_kv: int, interpret: bool, save_residuals: bool = False):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)

    shape, offset = (q_len, kv_len), kv_len - q_len
    one = (mask_lib.CausalMask(shape, offset=offset) if window is None
           else mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=offset))
    sizes = kernel_lib.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
        block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
        block_kv_dq=block_kv)
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([one] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret,
                                      save_residuals=save_residuals)


def _skip_by_segments(kernel, q_seg, k_seg, block_q: int, block_kv: int):
    """`kernel` (forward only) with the tiles whose query and key segment-id ranges do not
    intersect marked empty, for one row (q_seg [T], k_seg [S]).  The kernel's block mask is
    static (causal / local); this makes it data dependent, so a row packing many sequences
    computes about the tiles its sequences need instead of the whole causal triangle."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib)

    q_blocks, k_blocks = q_seg.reshape(-1, block_q), k_seg.reshape(-1, block_kv)
    q_lo, q_hi = flash.block_range(q_blocks, q_blocks != 0)              # [nq]
    k_lo, k_hi = flash.block_range(k_blocks, k_blocks != 0)              # [nk]
    info = kernel.fwd_mask_info
    # The grid's kv axis may be shrunk to the live tiles: data_next gives each step's kv block.
    kv_block = info.data_next.astype(jnp.int32)                           # [h, nq, grid_kv]
    rows = jnp.arange(kv_block.shape[1])[None, :, None]
    live = (k_lo[kv_block] <= q_hi[rows]) & (k_hi[kv_block] >= q_lo[rows])
    block_mask = jnp.where(live, info.block_mask, 0).astype(info.block_mask.dtype)
    return kernel_lib.SplashAttentionKernel(info._replace(block_mask=block_mask), None, None,
                                            **kernel.kwargs)


def block_density(q_len: int, block_q: int, window: int | None, kv_len: int | None = None,
                  block_kv: int | None = None) -> float:
    """Fraction of (q block, kv block) tiles the kernel computes for a causal (or local) mask,
    queries at the end of the keys: the kernel skips the empty tiles, so this is what its FLOPs
    scale with."""
    kv_len, block_kv = kv_len or q_len, block_kv or block_q
    offset = kv_len - q_len
    first_q = np.arange(q_len // block_q)[:, None] * block_q + offset     # key index of a tile's
    last_q = first_q + block_q - 1                                         # first / last query
    first_k = np.arange(kv_len // block_kv)[None, :] * block_kv
    last_k = first_k + block_kv - 1
    live = first_k <= last_q                       # some key at or before some query
    if window is not None:                         # ... and inside the window of some query
        live &= last_k > first_q - window
    return float(live.sum()) / live.size


# The planner prices the kernel from this scope name (XLA's cost analysis cannot see inside a
# Pallas call): local batch, heads, kv heads, length, head dim, tile density.
SCOPE = "splash_b{b}_h{h}_kv{kv}_t{t}_s{s}_d{d}_density{density:.6f}"


def splash_attention(q, k, v, q_seg, k_seg, *, window: int | None = None,
                     with_lse: bool = False, tile_density: float | None = None):
    """q [B, T, H, D], k / v [B, S, KV, D] (S >= T, queries the last T keys), segment ids
    [B, T] / [B, S] -> [B, T, H, D].

    with_lse=True (forward only: scoring two passes to merge, `attention_impls.merge`) returns
    (out, lse [B, T, H] fp32) and skips the tiles whose segment ranges do not meet; how many
    that leaves depends on the data, so the planner prices it at `tile_density` (its estimate
    of the share of tiles computed) instead of the static mask's."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds)

    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    platform, kind = target_device()
    block_q, block_kv = _block(t, kind), _block(s, kind)
    interpret = platform != "tpu"
    # [B, heads, T, D]; the kernel does not scale the scores.
    qt = (q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    q_seg, k_seg = q_seg.astype(jnp.int32), k_seg.astype(jnp.int32)

    mesh = jax.sharding.get_abstract_mesh()
    tensor = 1 if mesh.empty else mesh.shape.get("tensor", 1)
    head_axis = "tensor" if tensor > 1 and h % tensor == 0 and kvh % tensor == 0 else None

    def one_row(kernel, q_, k_, v_, s1, s2):
        if not with_lse:
            return kernel(q_, k_, v_, SegmentIds(s1, s2))
        # The kernel matches segment ids as they are: padding (0) must match nothing here,
        # where a query without keys has to come out empty (its pass gets no weight).
        ids = SegmentIds(jnp.where(s1 == 0, -1, s1), jnp.where(s2 == 0, -2, s2))
        out, (lse,) = _skip_by_segments(kernel, s1, s2, block_q, block_kv)(q_, k_, v_, ids)
        # A query block whose tiles were all skipped ends with l = 0: lse -inf, out 0 / 0.
        empty = ~jnp.isfinite(lse)
        return jnp.where(empty[..., None], 0, out), jnp.where(empty, flash.EMPTY_LSE, lse)

    def local(qt, kt, vt, qs, ks):
        kernel = _kernel(qt.shape[1], t, s, window, block_q, block_kv, interpret, with_lse)
        scope = SCOPE.format(b=qt.shape[0], h=qt.shape[1], kv=kt.shape[1], t=t, s=s, d=d,
                             density=tile_density if tile_density is not None else
                             block_density(t, block_q, window, s, block_kv))
        with jax.named_scope(scope):
            return jax.vmap(functools.partial(one_row, kernel))(qt, kt, vt, qs, ks)

    if mesh.empty or mesh.size == 1:
        out = local(qt, kt, vt, q_seg, k_seg)
    else:
        rows = ("data", "fsdp")
        heads = P(rows, head_axis, None, None)
        out_specs = (heads, P(rows, head_axis, None)) if with_lse else heads
        out = jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, P(rows, None),
                                                        P(rows, None)),
                            out_specs=out_specs, check_vma=False)(qt, kt, vt, q_seg, k_seg)
    if with_lse:
        out, lse = out                                      # [B, heads, T, D], [B, heads, T]
        return out.transpose(0, 2, 1, 3).astype(q.dtype), lse.transpose(0, 2, 1)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
