"""The KV page pool: its device array, its size from a memory budget, and the host allocator.

Device: one array [L, P, page_size, 2 * KV, D] in the compute dtype for every layer (k and v of
head h at 2h / 2h + 1, `paged_attention`), pages sharded over the mesh batch axes
('data', 'fsdp'): batch shard d holds pages [d * P/D, (d+1) * P/D) and the slots that use them,
and every page index the programs see is local to its shard.

Host: `PageAllocator` keeps one free list and one reference count per page per shard.  The G
samples of a prompt hold references to the prompt's full pages (shared, never written again);
a partially filled last prompt page is copied for every sample but the last one admitted
(copy-on-write: the samples write their own tokens into its free offsets).  A page returns to
the free list when its last reference goes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlcsd_jax.inference import paged_attention


def pool_shape(cfg, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (cfg.num_layers, num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)


def kv_bytes_per_token(cfg, dtype=None) -> int:
    """Bytes of K and V of one token over all layers and kv heads."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def batch_shards(mesh) -> int:
    """Number of batch shards ('data' x 'fsdp') of a mesh; 1 without one."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in paged_attention.batch_axes(mesh))


def kv_budget_tokens_for_bytes(cfg, bytes_per_device: int, mesh=None, dtype=None) -> int:
    """The global KV token budget that `bytes_per_device` of pool per device holds.

    A device holds the pages of its batch shard, with the kv heads split over 'tensor' when
    they divide it, so the budget is (bytes / per-token bytes on one device) x batch shards.
    The trainer passes the device's free memory after weights and activations.
    """
    per_token = kv_bytes_per_token(cfg, dtype)
    if mesh is not None and paged_attention.head_axis(mesh, cfg.num_kv_heads):
        per_token //= mesh.shape["tensor"]
    return int(bytes_per_device // per_token) * batch_shards(mesh)


def pages_per_shard(kv_budget_tokens: int, page_size: int, shards: int) -> int:
    return int(kv_budget_tokens) // int(page_size) // int(shards)


def init_pool(cfg, num_pages: int, page_size: int, mesh=None, dtype=None) -> jax.Array:
    """A zeroed pool [L, P, ps, 2KV, D], pages over the batch axes of `mesh`."""
    shape = pool_shape(cfg, num_pages, page_size)
    dtype = jnp.dtype(dtype or cfg.dtype)
    if mesh is None:
        return jnp.zeros(shape, dtype)
    sharding = jax.sharding.NamedSharding(mesh, paged_attention.pool_spec(mesh, cfg.num_kv_heads))
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


class PageAllocator:
    """Free lists and reference counts of `pages` pages on each of `shards` batch shards."""

    def __init__(self, shards: int, pages: int):
        self.shards, self.pages = shards, pages
        # Pop from the end: pages are handed out in increasing order, deterministically.
        self._free = [list(range(pages - 1, -1, -1)) for _ in range(shards)]
        self._refs = np.zeros((shards, pages), np.int32)

    def free(self, shard: int) -> int:
        return len(self._free[shard])

    def in_use(self) -> int:
        return self.shards * self.pages - sum(len(f) for f in self._free)

    def free_list(self, shard: int) -> list[int]:
        """The free pages of `shard` in the order `alloc` hands them out (the decode program
        takes pages from the front of this list, the host then `alloc`s the same ones)."""
        return self._free[shard][::-1]

    def alloc(self, shard: int, n: int) -> list[int]:
        """n fresh pages (reference count 1) on `shard`; the caller checked `free`."""
        if n > len(self._free[shard]):
            raise RuntimeError(f"page allocator: {n} pages asked on shard {shard}, "
                               f"{len(self._free[shard])} free")
        out = [self._free[shard].pop() for _ in range(n)]
        self._refs[shard, out] = 1
        return out

    def ref(self, shard: int, pages) -> None:
        for p in pages:
            assert self._refs[shard, p] > 0, f"ref of free page {p} on shard {shard}"
            self._refs[shard, p] += 1

    def release(self, shard: int, pages) -> None:
        for p in pages:
            assert self._refs[shard, p] > 0, f"double release of page {p} on shard {shard}"
            self._refs[shard, p] -= 1
            if self._refs[shard, p] == 0:
                self._free[shard].append(p)
