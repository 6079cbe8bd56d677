"""Decode attention over a paged KV pool, and the in-place token writes into it.

Pool layout (`pages.py`): one array [L, P, page_size, 2 * KV, D] for every layer, k and
v of kv head h interleaved at 2h / 2h + 1 (the layout TPU `ragged_paged_attention` reads, so the
kernel gets a layer's pages without any repacking).  A slot's page table [W] lists the pool
pages holding its positions 0, 1, ... in order (page i holds positions i*ps .. i*ps + ps - 1).

Two attention implementations, same rule as `models.attention_impls` (key j visible to the
query at position q when j <= q and j > q - window):

    gather  portable: gathers each slot's W table pages (pool[layer, table]) and runs a masked
            fp32 softmax; the CPU / GPU path and the numerical reference;
    pallas  TPU `jax.experimental.pallas.ops.tpu.ragged_paged_attention`: reads only the live
            pages of each slot (kv_len), explicit block sizes (no device query, so it lowers for
            a TPU slice on a CPU host).  Its interpret mode cannot run this kernel in jax 0.10,
            so the CPU tests check the arguments we build against the kernel module's own
            reference (`ref_ragged_paged_attention`) and compile the kernel for TPU (AOT).

Sliding layers (Olmo-3) read only the pages that hold the window: the table is shifted to start
at the window's first page, so both implementations touch ceil(window / ps) + 1 pages.

On a mesh, slots and pages are both sharded over the batch axes ('data', 'fsdp') and a slot's
page indices are local to its shard, so the write and the attention run per shard under
`jax.shard_map` (the mesh is the tracing context's, `jax.set_mesh`, as in `models.splash`) with
no cross-device traffic; kv heads (and q heads) go over 'tensor' when they divide it.

The planner prices the kernel (XLA's cost analysis cannot see inside a Pallas call) from the
named scope around each call, `SCOPE` below, formatted with per-shard values: b slots, h q
heads, kv kv heads, d head dim, p page size, pps table pages per slot given to the kernel (the
window's pages on sliding layers), w the window (0 = full attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from rlcsd_jax.distributed.sharding import BATCH_AXES, target_platform

SCOPE = "ragged_paged_b{b}_h{h}_kv{kv}_d{d}_p{p}_pps{pps}_w{w}"
# Finite "minus infinity" (a padding slot sees nothing and must not produce NaN).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def interleave(k: jax.Array, v: jax.Array) -> jax.Array:
    """k, v [..., KV, D] -> [..., 2 * KV, D] with k of head h at 2h and v at 2h + 1."""
    both = jnp.stack([k, v], axis=-2)
    return both.reshape(*k.shape[:-2], 2 * k.shape[-2], k.shape[-1])


def resolve(attention: str, head_dim: int | None = None) -> str:
    """'auto' -> 'pallas' on TPU, 'gather' elsewhere (CPU and GPU) and for heads the TPU kernel
    does not tile (head_dim not a multiple of 128, e.g. the tiny test models)."""
    if attention == "auto":
        tiles = head_dim is None or head_dim % 128 == 0
        return "pallas" if target_platform() == "tpu" and tiles else "gather"
    if attention not in ("gather", "pallas"):
        raise ValueError(f"paged attention {attention!r}; allowed: auto, gather, pallas")
    return attention


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def batch_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def head_axis(mesh, kv_heads: int) -> str | None:
    """'tensor' when it splits the kv heads (then also the q heads, a multiple), else None."""
    if mesh is None or "tensor" not in mesh.axis_names:
        return None
    t = mesh.shape["tensor"]
    return "tensor" if t > 1 and kv_heads % t == 0 else None


def pool_spec(mesh, kv_heads: int) -> P:
    """[L, P, ps, 2KV, D]: pages over the batch axes, combined heads over 'tensor' when they
    divide it (a contiguous chunk of 2KV is whole heads' k and v, so heads stay local)."""
    if mesh is None:
        return P()
    return P(None, batch_axes(mesh), None, head_axis(mesh, kv_heads), None)


def _run_local(fn, args, in_specs, out_specs):
    """fn on each shard's slots and pages (shard_map) or directly without a multi-device mesh."""
    mesh = _mesh()
    if mesh is None:
        return fn(*args)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)


# ----------------------------------------------------------------------------------------------
# Writes
# ----------------------------------------------------------------------------------------------


def write(pool, layer, new, page, offset, valid):
    """Write tokens into one layer's pages with a single scatter (in place on a donated pool).

    pool [L, P, ps, 2KV, D]; layer: int32 scalar; new [B, ..., 2KV, D]; page / offset / valid
    [B, ...] (page local to the row's shard).  Invalid rows go to page P, out of bounds, which
    the scatter drops.
    """
    mesh = _mesh()
    kvh = pool.shape[3] // 2

    def local(pool, layer, new, page, offset, valid):
        n = int(np.prod(page.shape))
        page = jnp.where(valid, page, pool.shape[1]).reshape(n)
        new = new.reshape(n, *new.shape[-2:]).astype(pool.dtype)
        return pool.at[layer, page, offset.reshape(n)].set(new, mode="drop")

    if mesh is None:
        return local(pool, layer, new, page, offset, valid)
    rows, extra = batch_axes(mesh), [None] * (page.ndim - 1)
    row_spec = P(rows, *extra)
    new_spec = P(rows, *extra, head_axis(mesh, kvh), None)
    spec = pool_spec(mesh, kvh)
    return _run_local(local, (pool, layer, new, page, offset, valid),
                      (spec, P(), new_spec, row_spec, row_spec, row_spec), spec)


def copy_pages(pool, src, dst, valid):
    """pool[:, dst[i]] = pool[:, src[i]] for valid i (copy-on-write of a shared partial prompt
    page): src / dst / valid [C], sharded like the pages, indices local to their shard."""
    mesh = _mesh()

    def local(pool, src, dst, valid):
        dst = jnp.where(valid, dst, pool.shape[1])
        return pool.at[:, dst].set(pool[:, src], mode="drop")

    if mesh is None:
        return local(pool, src, dst, valid)
    rows = P(batch_axes(mesh))
    spec = pool_spec(mesh, pool.shape[3] // 2)
    return _run_local(local, (pool, src, dst, valid), (spec, rows, rows, rows), spec)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def window_table(table, q_pos, window: int, page_size: int):
    """The pages holding positions (q - window, q] of each slot.

    table [S, W], q_pos [S] -> (table [S, Ww], first position of that table [S]) where
    Ww = min(W, pages any `window` consecutive positions can span).
    """
    width = table.shape[1]
    span = min(width, (window + page_size - 2) // page_size + 1)
    first = jnp.clip((q_pos - window + 1) // page_size, 0, width - span)
    idx = first[:, None] + jnp.arange(span, dtype=jnp.int32)[None]
    return jnp.take_along_axis(table, idx, axis=1), first * page_size


def gather_attention(pool, layer, q, table, q_pos, window: int | None):
    """Portable reference: q [S, H, D] over the slot's table pages -> [S, H, D].

    Reads S x W pages (the table width, not only the live ones); the attention is a masked
    fp32 softmax with grouped-query heads never repeated.
    """
    s, h, d = q.shape
    page_size, kvh = pool.shape[2], pool.shape[3] // 2
    base = jnp.zeros_like(q_pos)
    if window is not None:
        table, base = window_table(table, q_pos, window, page_size)
    kv = pool[layer, table]                                   # [S, W, ps, 2KV, D]
    kv = kv.reshape(s, -1, 2 * kvh, d)
    k, v = kv[:, :, 0::2].astype(q.dtype), kv[:, :, 1::2].astype(q.dtype)
    k_pos = base[:, None] + jnp.arange(k.shape[1], dtype=jnp.int32)[None]
    visible = k_pos <= q_pos[:, None]
    if window is not None:
        visible &= k_pos > (q_pos - window)[:, None]
    qg = q.reshape(s, kvh, h // kvh, d)
    scores = jnp.einsum("skgd,stkd->skgt", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None], scores * (d ** -0.5), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("skgt,stkd->skgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(s, h, d).astype(q.dtype)


def kernel_inputs(pool, layer, q, table, q_pos, window: int | None):
    """The ragged paged attention kernel's arguments for one query per slot.

    The layer's pages are addressed inside the flat [L * P, ...] view of the pool (a free
    reshape of this shard's buffer) by offsetting the table with layer * P; sliding layers get
    the window's pages, with kv_lens counted from their first position (the kernel masks by
    index relative to kv_len, so shifting both keeps the causal and window masks exact).
    Returns ((q, pages, kv_lens, page_indices, cu_q_lens, num_seqs), table width).
    """
    s, d = q.shape[0], q.shape[2]
    n_layers, n_pages, page_size, combined, _ = pool.shape
    base = jnp.zeros_like(q_pos)
    if window is not None:
        table, base = window_table(table, q_pos, window, page_size)
    flat = pool.reshape(n_layers * n_pages, page_size, combined, d)
    indices = (table + layer * n_pages).astype(jnp.int32)
    kv_lens = (q_pos + 1 - base).astype(jnp.int32)
    cu_q_lens = jnp.arange(s + 1, dtype=jnp.int32)
    num_seqs = jnp.asarray([s], jnp.int32)
    return (q, flat, kv_lens, indices, cu_q_lens, num_seqs), table.shape[1]


def pallas_attention(pool, layer, q, table, q_pos, window: int | None, blocks):
    """TPU ragged paged attention (`kernel_inputs`), one query per slot: q [S, H, D] ->
    [S, H, D]; blocks = (kv pages per block, queries per block, vmem limit bytes)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    if target_platform() != "tpu":
        raise ValueError("paged attention 'pallas' runs on TPU only (this kernel has no "
                         "working interpret mode); use 'gather' or 'auto'")
    args, width = kernel_inputs(pool, layer, q, table, q_pos, window)
    s, h, d = q.shape
    kv_pages_per_block, queries_per_block, vmem_limit_bytes = blocks
    scope = SCOPE.format(b=s, h=h, kv=pool.shape[3] // 2, d=d, p=pool.shape[2], pps=width,
                         w=window or 0)
    with jax.named_scope(scope):
        return ragged_paged_attention(
            *args, sm_scale=d ** -0.5, sliding_window=window,
            num_kv_pages_per_block=min(kv_pages_per_block, width),
            num_queries_per_block=min(queries_per_block, s), vmem_limit_bytes=vmem_limit_bytes)


def attend(pool, layer, q, table, q_pos, *, window: int | None, attention: str, blocks):
    """One layer's decode attention on every shard: q [S, H, D], table [S, W], q_pos [S]
    (position of the query, whose k/v is already written) -> [S, H, D]."""
    mesh = _mesh()
    kvh = pool.shape[3] // 2
    impl = resolve(attention)

    def local(pool, layer, q, table, q_pos):
        if impl == "pallas":
            return pallas_attention(pool, layer, q, table, q_pos, window, blocks)
        return gather_attention(pool, layer, q, table, q_pos, window)

    if mesh is None:
        return local(pool, layer, q, table, q_pos)
    rows = batch_axes(mesh)
    q_spec = P(rows, head_axis(mesh, kvh), None)
    return _run_local(local, (pool, layer, q, table, q_pos),
                      (pool_spec(mesh, kvh), P(), q_spec, P(rows, None), P(rows)), q_spec)
