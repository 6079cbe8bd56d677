"""The decoder-only language model shared by every architecture.

Layers are one block class instantiated with a leading `layers` axis on every parameter and run
with `jax.lax.scan` (optionally under `jax.checkpoint`), so compile time does not grow with depth.
The per-layer attention type (full / sliding, Olmo-3) is a scanned boolean input that picks the
RoPE table and mask for that layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rlcsd_jax.models import attention_impls, layers
from rlcsd_jax.models.attention import AttentionInputs, LayerCache
from rlcsd_jax.models.config import SLIDING, ModelConfig, RopeConfig
from rlcsd_jax.models.olmo3 import Olmo3Block
from rlcsd_jax.models.qwen3 import Qwen3Block

BLOCKS = {"qwen3": Qwen3Block, "olmo3": Olmo3Block}

REMAT_POLICIES = {
    "none": None,
    # Recompute everything in the backward pass: least memory.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs without batch dims (weights-stationary): the usual LLM trade-off.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Decoding state shared by all layers.

    layers: LayerCache with k/v [L, B, S, KV, D]; positions [B, S] int32 (token position held in
    each slot); valid [B, S] bool (slot holds a real token); index: scalar int32 write offset.
    """

    layers: LayerCache
    positions: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(layers=LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)),
                   positions=jnp.zeros((batch, length), jnp.int32),
                   valid=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32))

    @staticmethod
    def num_bytes(cfg: ModelConfig, batch: int, length: int, dtype=None) -> int:
        itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
        return 2 * cfg.num_layers * batch * length * cfg.num_kv_heads * cfg.head_dim * itemsize


def _inv_freq(rope: RopeConfig, head_dim: int):
    if rope.rope_type == "yarn":
        return layers.yarn_inv_freq(head_dim, rope.theta, rope.factor, rope.original_max_position,
                                    rope.beta_fast, rope.beta_slow, rope.truncate)
    return layers.default_inv_freq(head_dim, rope.theta)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, S] 0/1 -> [B, S] int32 positions counting real tokens (left or right padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """[B, S] segment ids (packed rows) -> [B, S] int32 positions restarting at every segment."""
    idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32),
                           segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)
    return idx - first


class CausalLM(nnx.Module):
    """`model(input_ids [B,S], attention_mask [B,S]) -> logits [B,S,V]`.

    Parameters: embed_tokens [V, d]; layers (stacked block, leading [L]); norm [d];
    lm_head [d, V] when embeddings are untied.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.model_type not in BLOCKS:
            raise ValueError(f"unsupported model_type {cfg.model_type!r}")
        if cfg.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={cfg.remat_policy!r}; allowed {sorted(REMAT_POLICIES)}")
        attention_impls.get(cfg.attention_impl)  # fail early on a typo
        pd = jnp.dtype(cfg.param_dtype)
        self.config = cfg
        self.embed_tokens = layers.param(rngs, (cfg.vocab_size, cfg.hidden_size),
                                         ("vocab", "embed"), pd)
        self.layers = BLOCKS[cfg.model_type](cfg, rngs=rngs, stack=cfg.num_layers)
        self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.fp32_norm_and_rope,
                                   param_dtype=pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.param(rngs, (cfg.hidden_size, cfg.vocab_size),
                                        ("embed", "vocab"), pd)

    # ------------------------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, positions=None):
        """fp32 logits [B, S, V] (bf16 matmul inputs under bf16 compute, fp32 accumulation).

        Training and scoring never call this on long sequences: they chunk `logits(h)`.
        """
        h, _ = self.hidden_states(input_ids, attention_mask, positions)
        return self.logits(h)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden [..., d] -> fp32 logits [..., V].  Callers chunk h to bound memory."""
        h = h.astype(jnp.dtype(self.config.dtype))
        if self.config.tie_word_embeddings:
            w = self.embed_tokens[...].astype(h.dtype)
            return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
        w = self.lm_head[...].astype(h.dtype)
        return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)

    def _rope_tables(self, positions):
        """((cos, sin) of full layers, (cos, sin) of sliding layers or (None, None)), [B, T, D]."""
        cfg = self.config
        full = layers.rope_cos_sin(positions, _inv_freq(cfg.rope_full, cfg.head_dim),
                                   cfg.rope_full.attention_factor)
        if not cfg.has_sliding_layers:
            return full, (None, None)
        return full, layers.rope_cos_sin(positions, _inv_freq(cfg.rope_sliding, cfg.head_dim),
                                         cfg.rope_sliding.attention_factor)

    @staticmethod
    def _layer_rope(tables, sliding):
        """The (cos, sin) of one scanned layer: the sliding layers' tables where `sliding` (a
        traced bool) and the model has any, else the full layers'."""
        (cos_f, sin_f), (cos_s, sin_s) = tables
        if cos_s is None:
            return cos_f, sin_f
        return jnp.where(sliding, cos_s, cos_f), jnp.where(sliding, sin_s, sin_f)

    def forward_paged(self, input_ids, positions, kv, segment_ids=None):
        """The rollout engine's forward: tokens [B, T] at `positions` [B, T] with a paged KV store.

        `kv` carries the whole page pool (`kv.pool`, every layer) and returns the view of one
        layer with `kv.at_layer(pool, layer)`, a `PagedKV` the attention writes into (and, for
        decode, reads from).  The pool rides in the layer scan's carry, so each layer's writes
        land in place in the one buffer instead of slicing the pool out and stacking it back
        (which would copy it every layer).  segment_ids [B, T] (0 = padding, prefill only).
        Returns (final-normed hidden states [B, T, d], kv with the updated pool).
        """
        cfg = self.config
        positions = positions.astype(jnp.int32)
        seg = (jnp.ones_like(positions) if segment_ids is None
               else segment_ids.astype(jnp.int32))
        inputs = AttentionInputs(positions, positions, seg, seg, right_padded=True)
        tables = self._rope_tables(positions)
        is_sliding = jnp.asarray([t == SLIDING for t in cfg.layer_types])
        graphdef, stacked = nnx.split(self.layers)

        def layer(carry, xs):
            h, pool = carry
            state, sliding, index = xs
            block = nnx.merge(graphdef, state)
            cos, sin = self._layer_rope(tables, sliding)
            h, view = block(h, cos, sin, inputs, kv.at_layer(pool, index), None,
                            sliding if cfg.has_sliding_layers else None)
            return (h, view.pool), None

        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(jnp.dtype(cfg.dtype))
        xs = (stacked, is_sliding, jnp.arange(cfg.num_layers, dtype=jnp.int32))
        (h, pool), _ = jax.lax.scan(layer, (h, kv.pool), xs)
        return self.norm(h), dataclasses.replace(kv, pool=pool)

    def hidden_states(self, input_ids, attention_mask=None, positions=None,
                      cache: KVCache | None = None, return_all: bool = False, *,
                      segment_ids=None, right_padded: bool = False, prefix_segments=None,
                      tile_density: float | None = None):
        """Final-normed hidden states [B, T, d] and the updated cache.

        attention_mask [B, T] marks real tokens (any padding side); or segment_ids [B, T] (0 =
        padding, 1, 2, ... = sequences packed in a row, each attending only to itself).
        positions [B, T] default to the count of real tokens before each one (restarting per
        segment).  right_padded: the caller's promise that rows are [real | padding] with
        positions 0..n-1 (lets cuDNN use length masks).  With a cache, the T new tokens are
        written at `cache.index`; attention sees every valid slot whose position is <= the
        query's.  prefix_segments: (q [B, T], k [B, T]) of a shared-prefix row without a cache
        (groups [prefix | r1 | r2 ...] packed in `segment_ids`, each prefix and response its
        own segment; q tags each response token with its group, k each prefix token, 0
        elsewhere): responses then also see their group's prefix
        (`attention_impls.shared_prefix_attention`; tile_density: the planner's estimate of
        the tiles it computes, for pricing).  return_all=True also returns the residual stream
        after every layer [L, B, T, d] (for parity debugging).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if segment_ids is not None:
            q_seg = segment_ids.astype(jnp.int32)
            if positions is None:
                positions = positions_from_segments(q_seg)
        else:
            if attention_mask is None:
                attention_mask = jnp.ones(input_ids.shape, jnp.int32)
            q_seg = (attention_mask != 0).astype(jnp.int32)
            if positions is None:
                positions = positions_from_mask(attention_mask)
        positions = positions.astype(jnp.int32)
        if cache is None:
            k_pos, k_valid = positions, q_seg != 0
            shared = (None, None) if prefix_segments is None else tuple(
                x.astype(jnp.int32) for x in prefix_segments)
            inputs = AttentionInputs(positions, positions, q_seg, q_seg, right_padded,
                                     prefix_q_seg=shared[0], prefix_k_seg=shared[1],
                                     tile_density=tile_density)
        else:
            if prefix_segments is not None:
                raise ValueError("prefix_segments is for rows without a cache")
            k_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.index, 1)
            k_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, q_seg != 0, cache.index, 1)
            inputs = AttentionInputs(positions, k_pos, q_seg, k_valid.astype(jnp.int32))

        tables = self._rope_tables(positions)
        is_sliding = jnp.asarray([t == SLIDING for t in cfg.layer_types])

        graphdef, stacked = nnx.split(self.layers)

        def layer(h, xs):
            state, sliding, layer_cache = xs
            block = nnx.merge(graphdef, state)
            cos, sin = self._layer_rope(tables, sliding)
            h, layer_cache = block(h, cos, sin, inputs, layer_cache,
                                   None if cache is None else cache.index,
                                   sliding if cfg.has_sliding_layers else None)
            return h, (layer_cache, h if return_all else None)

        policy = REMAT_POLICIES[cfg.remat_policy]
        if policy is not None:
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not cfg.scan_layers)

        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dtype)
        xs = (stacked, is_sliding, None if cache is None else cache.layers)
        if cfg.scan_layers:
            h, (new_layers, all_h) = jax.lax.scan(layer, h, xs)
        else:
            outs = []
            for i in range(cfg.num_layers):
                h, out = layer(h, jax.tree.map(lambda x, i=i: x[i], xs))
                outs.append(out)
            new_layers, all_h = jax.tree.map(lambda *x: jnp.stack(x), *outs) if outs else (
                None, None)
        h = self.norm(h)
        if cache is not None:
            cache = KVCache(layers=new_layers, positions=k_pos, valid=k_valid,
                            index=cache.index + input_ids.shape[1])
        if return_all:
            return h, cache, all_h
        return h, cache


def abstract_model(cfg: ModelConfig) -> CausalLM:
    """Shapes and dtypes only, no memory (`nnx.eval_shape`)."""
    return nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
