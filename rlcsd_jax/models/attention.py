"""Grouped-query self-attention with QK-norm, per-layer RoPE/window choice and an optional KV cache.

One class serves Qwen3 (QK-norm per head over D) and Olmo-3 (QK-norm over the whole projection,
models.md §5.2).  The layer type (full or sliding) is data, not structure: the caller passes the
cos/sin tables of this layer and a traced `sliding` flag that picks the window with `lax.cond`,
so the layer stack stays scannable.  Which keys a query sees is decided by positions and segment
ids (`AttentionInputs`), never by a materialised [B, T, S] mask (`attention_impls`).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from rlcsd_jax.models import attention_impls, layers
from rlcsd_jax.models.config import ModelConfig


# HF tensor names (relative to `model.layers.{i}.`) of the parameters every block shares; each
# architecture adds its own norms.
HF_SHARED_LAYER_NAMES = {
    ("self_attn", "q_proj"): "self_attn.q_proj.weight",
    ("self_attn", "k_proj"): "self_attn.k_proj.weight",
    ("self_attn", "v_proj"): "self_attn.v_proj.weight",
    ("self_attn", "o_proj"): "self_attn.o_proj.weight",
    ("self_attn", "q_norm", "weight"): "self_attn.q_norm.weight",
    ("self_attn", "k_norm", "weight"): "self_attn.k_norm.weight",
    ("post_attention_layernorm", "weight"): "post_attention_layernorm.weight",
    ("mlp", "gate_proj"): "mlp.gate_proj.weight",
    ("mlp", "up_proj"): "mlp.up_proj.weight",
    ("mlp", "down_proj"): "mlp.down_proj.weight",
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionInputs:
    """Who sees whom, shared by every layer: q_pos / q_seg [B, T], k_pos / k_seg [B, S] int32
    (segment 0 = padding).  right_padded (static): rows are [real | padding] with positions
    0..n-1 and no cache, the layout cuDNN's length masks need.  prefix_q_seg /
    prefix_k_seg [B, T] / [B, S]: a shared-prefix row's second pass (responses see their
    group's prefix: `attention_impls.shared_prefix_attention`), None otherwise; tile_density
    (static): the planner's estimate of the tiles those two passes compute (pricing only)."""

    q_pos: jax.Array
    k_pos: jax.Array
    q_seg: jax.Array
    k_seg: jax.Array
    right_padded: bool = dataclasses.field(default=False, metadata=dict(static=True))
    prefix_q_seg: jax.Array | None = None
    prefix_k_seg: jax.Array | None = None
    tile_density: float | None = dataclasses.field(default=None, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """KV cache of one layer (or of all layers when stacked: leading [L] axis).

    k, v: [B, S_cache, KV, D] in the compute dtype.  The write offset and key positions live in
    `KVCache` (shared by all layers).
    """

    k: jax.Array
    v: jax.Array


@runtime_checkable
class PagedKV(Protocol):
    """A paged KV store that one layer writes its new k/v into (the rollout engine's page pool,
    `rlcsd_jax.inference.paged_kv`).  Passed where a `LayerCache` would go.

    write(k, v): k / v [B, T, KV, D] of this call's tokens -> the store with them written in
    place.  reads_pages (static): True (decode) means attention runs over the stored pages with
    `attend(q [B, T, H, D], sliding, window) -> [B, T, H, D]`; False (prefill) means the layer
    attends over its own k / v with the usual implementation (the prompt is all there is).
    """

    reads_pages: bool

    def write(self, k: jax.Array, v: jax.Array) -> "PagedKV": ...

    def attend(self, q: jax.Array, sliding, window: int | None) -> jax.Array: ...


class Attention(nnx.Module):
    """q/k/v/o kernels: [d, H, D], [d, KV, D], [d, KV, D], [H, D, d]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.q_proj = layers.param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, stack=stack)
        self.k_proj = layers.param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd,
                                   stack=stack)
        self.v_proj = layers.param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd,
                                   stack=stack)
        self.o_proj = layers.param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, stack=stack)
        q_norm_size = hd if cfg.qk_norm_per_head else h * hd
        k_norm_size = hd if cfg.qk_norm_per_head else kv * hd
        w32 = cfg.fp32_norm_and_rope
        self.q_norm = layers.RMSNorm(q_norm_size, cfg.rms_norm_eps, w32, param_dtype=pd, stack=stack)
        self.k_norm = layers.RMSNorm(k_norm_size, cfg.rms_norm_eps, w32, param_dtype=pd, stack=stack)
        self.per_head_norm = cfg.qk_norm_per_head
        self.rope_in_fp32 = cfg.fp32_norm_and_rope
        self.attention_impl = cfg.attention_impl
        self.sliding_window = cfg.sliding_window

    def _qk_norm(self, x, norm: layers.RMSNorm):
        if self.per_head_norm:
            return norm(x)
        b, t, n, hd = x.shape
        return norm(x.reshape(b, t, n * hd)).reshape(b, t, n, hd)

    def __call__(self, x, cos, sin, inputs: AttentionInputs, cache: LayerCache | None = None,
                 cache_index=None, sliding=None):
        """x [B, T, d]; cos/sin [B, T, D]; sliding: traced bool, this layer uses the window.

        Without a cache S = T.  With a cache, the new k/v are written at `cache_index` along the
        cache's sequence axis and attention runs over the whole cache (S = S_cache); positions
        and segment ids tell which slots are visible.  A `PagedKV` cache (the rollout engine)
        gets the new k/v written into its pages and either attends over them (decode) or lets
        this call attend over its own tokens (prefill).  Returns (out [B, T, d], cache or None).
        """
        q = layers.linear(x, self.q_proj[...], "btd,dhk->bthk")
        k = layers.linear(x, self.k_proj[...], "btd,dhk->bthk")
        v = layers.linear(x, self.v_proj[...], "btd,dhk->bthk")
        q, k = self._qk_norm(q, self.q_norm), self._qk_norm(k, self.k_norm)
        q = layers.apply_rope(q, cos, sin, self.rope_in_fp32)
        k = layers.apply_rope(k, cos, sin, self.rope_in_fp32)
        paged = isinstance(cache, PagedKV)
        if paged:
            cache = cache.write(k, v)
            if cache.reads_pages:
                out = cache.attend(q, sliding, self.sliding_window)
                return layers.linear(out, self.o_proj[...], "bthk,hkd->btd"), cache
        elif cache is not None:
            k_all = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype),
                                                        cache_index, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype),
                                                        cache_index, axis=1)
            cache = LayerCache(k=k_all, v=v_all)
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        impl = attention_impls.get(self.attention_impl)
        own_kv_only = cache is None or paged     # keys are this call's tokens only

        def attend(window):
            if inputs.prefix_q_seg is not None:
                return attention_impls.shared_prefix_attention(
                    self.attention_impl, q, k, v, inputs.q_pos, inputs.k_pos, inputs.q_seg,
                    inputs.k_seg, inputs.prefix_q_seg, inputs.prefix_k_seg, window=window,
                    tile_density=inputs.tile_density)
            return impl(q, k, v, inputs.q_pos, inputs.k_pos, inputs.q_seg, inputs.k_seg,
                        window=window, right_padded=inputs.right_padded and own_kv_only)

        if self.sliding_window is None or sliding is None:
            out = attend(None)
        else:
            out = jax.lax.cond(sliding, lambda: attend(self.sliding_window), lambda: attend(None))
        return layers.linear(out, self.o_proj[...], "bthk,hkd->btd"), cache
