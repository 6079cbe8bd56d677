"""Qwen3 dense (0.6B / 1.7B / 4B / 8B): pre-norm blocks with per-head QK-norm (models.md §1.2)."""

from __future__ import annotations

import json

from flax import nnx

from rlcsd_jax.models import layers
from rlcsd_jax.models.attention import HF_SHARED_LAYER_NAMES, Attention
from rlcsd_jax.models.config import FULL, ModelConfig, RopeConfig


class Qwen3Block(nnx.Module):
    """h += attn(input_norm(h)); h += mlp(post_attention_norm(h))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        pd, d, eps = cfg.param_dtype, cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = layers.RMSNorm(d, eps, False, param_dtype=pd, stack=stack)
        self.self_attn = Attention(cfg, rngs=rngs, stack=stack)
        self.post_attention_layernorm = layers.RMSNorm(d, eps, False, param_dtype=pd, stack=stack)
        self.mlp = layers.SwiGLU(d, cfg.intermediate_size, param_dtype=pd, rngs=rngs, stack=stack)

    def __call__(self, h, cos, sin, inputs, cache=None, cache_index=None, sliding=None):
        a, cache = self.self_attn(self.input_layernorm(h), cos, sin, inputs, cache, cache_index,
                                  sliding)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), cache


# HF tensor name per block parameter path (relative to the block).
HF_LAYER_NAMES = {
    **HF_SHARED_LAYER_NAMES,
    ("input_layernorm", "weight"): "input_layernorm.weight",
}


def _qwen3(*, num_layers: int, **shape) -> ModelConfig:
    """A Qwen3 config of the given shape, with what every size shares: RMSNorm eps 1e-6, full
    attention on every layer, RoPE θ 1e6, 40960 positions, the BOS / EOS ids."""
    return ModelConfig(
        model_type="qwen3", num_layers=num_layers, rms_norm_eps=1e-6,
        layer_types=(FULL,) * num_layers, rope_full=RopeConfig(theta=1_000_000.0),
        max_position_embeddings=40960,
        hf_extra=json.dumps({"bos_token_id": 151643, "eos_token_id": 151645,
                             "torch_dtype": "bfloat16"}),
        **shape)


# The published sizes (models.md §2).


def qwen3_0p6b() -> ModelConfig:
    return _qwen3(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                  num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True)


def qwen3_1p7b() -> ModelConfig:
    return _qwen3(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28,
                  num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True)


def qwen3_4b() -> ModelConfig:
    return _qwen3(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                  num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=True)


def qwen3_8b() -> ModelConfig:
    return _qwen3(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                  num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=False)


def qwen3_tiny() -> ModelConfig:
    """The embedded CPU demo (configs/tiny.py): Qwen3 architecture, a few hundred K parameters;
    the vocabulary is replaced by the tiny tokenizer's size at build time."""
    return _qwen3(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True)


PRESETS = {
    "qwen3-0.6b": qwen3_0p6b(),
    "qwen3-1.7b": qwen3_1p7b(),
    "qwen3-4b": qwen3_4b(),
    "qwen3-8b": qwen3_8b(),
    "qwen3-tiny": qwen3_tiny(),
}
