"""Qwen3 dense (0.6B / 1.7B / 4B / 8B): pre-norm blocks with per-head QK-norm (MODEL_SPEC §1.2)."""

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


def _preset(vocab, d, f, n_layers, h, kv, tied, head_dim=128) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3", vocab_size=vocab, hidden_size=d, intermediate_size=f,
        num_layers=n_layers, num_heads=h, num_kv_heads=kv, head_dim=head_dim, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, layer_types=(FULL,) * n_layers,
        rope_full=RopeConfig(theta=1_000_000.0), max_position_embeddings=40960,
        hf_extra=json.dumps({"bos_token_id": 151643, "eos_token_id": 151645,
                             "torch_dtype": "bfloat16"}))


# MODEL_SPEC §2.
PRESETS = {
    "qwen3-0.6b": _preset(151936, 1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _preset(151936, 2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _preset(151936, 2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _preset(151936, 4096, 12288, 36, 32, 8, False),
    # The embedded CPU demo (configs/tiny.py): Qwen3 architecture, a few hundred K parameters;
    # the vocabulary is replaced by the tiny tokenizer's size at build time.
    "qwen3-tiny": _preset(512, 128, 384, 2, 4, 2, True, head_dim=32),
}
