"""The two views of the page pool the model's attention layers see (`models.attention.PagedKV`).

`CausalLM.forward_paged` carries the pool through its layer scan and hands each layer
`view.at_layer(pool, layer)`; the layer writes its new k / v with `write` and, when decoding,
attends over the pages with `attend`.

    PagedDecode   one token per slot: written at the slot's (page, offset), then attention over
                  the slot's pages (`paged_attention.attend`);
    PagedPrefill  a right-padded prompt batch: every real token written at its (page, offset);
                  attention runs over the prompt itself with the model's usual implementation
                  (splash on TPU, cuDNN on GPU, xla / blockwise on CPU).
"""

from __future__ import annotations

import dataclasses

import jax

from rlcsd_jax.inference import paged_attention

_static = dict(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedDecode:
    """pool [L, P, ps, 2KV, D]; layer int32 scalar; table [S, W] local page ids; q_pos [S]
    position of the step's token; write_page / write_offset [S] where it goes; write_valid [S]
    (False for an idle slot: nothing is written).  attention: 'auto' | 'gather' | 'pallas';
    blocks: the Pallas kernel's (kv pages per block, queries per block, vmem limit bytes)."""

    pool: jax.Array
    layer: jax.Array
    table: jax.Array
    q_pos: jax.Array
    write_page: jax.Array
    write_offset: jax.Array
    write_valid: jax.Array
    attention: str = dataclasses.field(default="auto", **_static)
    blocks: tuple = dataclasses.field(default=(16, 32, 32 * 2**20), **_static)
    reads_pages = True

    def at_layer(self, pool, layer) -> "PagedDecode":
        return dataclasses.replace(self, pool=pool, layer=layer)

    def write(self, k, v) -> "PagedDecode":
        """k, v [S, 1, KV, D] -> the view with this step's token written in place."""
        new = paged_attention.interleave(k[:, 0], v[:, 0])
        pool = paged_attention.write(self.pool, self.layer, new, self.write_page,
                                     self.write_offset, self.write_valid)
        return dataclasses.replace(self, pool=pool)

    def attend(self, q, sliding, window):
        """q [S, 1, H, D] -> [S, 1, H, D]; `sliding` (traced) picks the window per layer."""
        def run(w):
            return paged_attention.attend(self.pool, self.layer, q[:, 0], self.table, self.q_pos,
                                          window=w, attention=self.attention, blocks=self.blocks)

        if window is None or sliding is None:
            return run(None)[:, None]
        return jax.lax.cond(sliding, lambda: run(window), lambda: run(None))[:, None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedPrefill:
    """pool [L, P, ps, 2KV, D]; layer int32 scalar; page / offset [B, T] where each prompt token
    goes (local page ids); valid [B, T] real tokens (padding is not written)."""

    pool: jax.Array
    layer: jax.Array
    page: jax.Array
    offset: jax.Array
    valid: jax.Array
    reads_pages = False

    def at_layer(self, pool, layer) -> "PagedPrefill":
        return dataclasses.replace(self, pool=pool, layer=layer)

    def write(self, k, v) -> "PagedPrefill":
        """k, v [B, T, KV, D] -> the view with the prompt's tokens written in place."""
        new = paged_attention.interleave(k, v)
        pool = paged_attention.write(self.pool, self.layer, new, self.page, self.offset,
                                     self.valid)
        return dataclasses.replace(self, pool=pool)

    def attend(self, q, sliding, window):
        raise TypeError("PagedPrefill does not read pages: the layer attends over the prompt's "
                        "own k / v (reads_pages is False)")
