"""Olmo-3 (7B / 32B Think): post-norm blocks, QK-norm over the whole projection, 3:1 sliding /
full attention with YaRN on full layers only (models.md §1.3, §5.1).

Chat format of Olmo-3-Think (§4.2; the prompt code renders with the checkpoint's own
chat template, these constants document what that template produces):
"""

from __future__ import annotations

import json

from flax import nnx

from rlcsd_jax.models import layers
from rlcsd_jax.models.attention import HF_SHARED_LAYER_NAMES, Attention
from rlcsd_jax.models.config import FULL, SLIDING, ModelConfig, RopeConfig

# <|endoftext|>, <|im_start|>, <|im_end|>, <|pad|>.  No BOS.  `<think>` is ordinary text.
ENDOFTEXT_ID, IM_START_ID, IM_END_ID, PAD_ID = 100257, 100264, 100265, 100277
STOP_TOKEN_IDS = (IM_END_ID, ENDOFTEXT_ID)
DEFAULT_SYSTEM_7B_THINK = (
    "You are OLMo, a helpful function-calling AI assistant built by Ai2. Your date cutoff is "
    "November 2024, and your model weights are available at https://huggingface.co/allenai. "
    "You do not currently have access to any functions. <functions></functions>")
# The generation prompt ends with "<think>" and no newline.
GENERATION_PROMPT = "<|im_start|>assistant\n<think>"


class Olmo3Block(nnx.Module):
    """h += post_attn_norm(attn(h)); h += post_ffn_norm(mlp(h)) — no input norms."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        pd, d, eps = cfg.param_dtype, cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, rngs=rngs, stack=stack)
        self.post_attention_layernorm = layers.RMSNorm(d, eps, True, param_dtype=pd, stack=stack)
        self.mlp = layers.SwiGLU(d, cfg.intermediate_size, param_dtype=pd, rngs=rngs, stack=stack)
        self.post_feedforward_layernorm = layers.RMSNorm(d, eps, True, param_dtype=pd, stack=stack)

    def __call__(self, h, cos, sin, inputs, cache=None, cache_index=None, sliding=None):
        a, cache = self.self_attn(h, cos, sin, inputs, cache, cache_index, sliding)
        h = h + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(h)), cache


HF_LAYER_NAMES = {
    **HF_SHARED_LAYER_NAMES,
    ("post_feedforward_layernorm", "weight"): "post_feedforward_layernorm.weight",
}


def _olmo3(*, num_layers: int, **shape) -> ModelConfig:
    """An Olmo-3 config of the given shape, with what every size shares: the 100278-token
    vocabulary, untied embeddings, three sliding-window (4096) layers to one full layer, YaRN
    (factor 8 over 8192 positions) on the full layers only, 65536 positions, the EOS / pad ids."""
    yarn = RopeConfig(theta=500_000.0, rope_type="yarn", factor=8.0, original_max_position=8192,
                      attention_factor=1.2079441541679836, beta_fast=32.0, beta_slow=1.0)
    return ModelConfig(
        model_type="olmo3", vocab_size=100278, num_layers=num_layers, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        layer_types=tuple(FULL if (i + 1) % 4 == 0 else SLIDING for i in range(num_layers)),
        rope_full=yarn, rope_sliding=RopeConfig(theta=500_000.0), sliding_window=4096,
        max_position_embeddings=65536,
        hf_extra=json.dumps({"eos_token_id": ENDOFTEXT_ID, "pad_token_id": PAD_ID,
                             "torch_dtype": "bfloat16"}),
        **shape)


# The published sizes (models.md §2).


def olmo3_7b_think() -> ModelConfig:
    return _olmo3(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                  num_kv_heads=32, head_dim=128)


def olmo3_32b_think() -> ModelConfig:
    return _olmo3(hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40,
                  num_kv_heads=8, head_dim=128)


PRESETS = {
    "olmo3-7b-think": olmo3_7b_think(),
    "olmo3-32b-think": olmo3_32b_think(),
}
