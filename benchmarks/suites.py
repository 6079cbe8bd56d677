"""Benchmark models, per-suite shapes, and the random inputs both frameworks consume.

Every array is drawn once with numpy from a fixed seed and handed to JAX and to torch, so the two
sides see the same token ids.  Token ids avoid 0..2 (pad / bos / eos of the tiny configs).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from rlcsd_jax import models

# Small Qwen3 shapes for the CPU suite (and the GPU-path smoke test).  eos/bos/pad ids must lie
# inside the vocabulary for HF generate's logits processors.
_SMALL_EXTRA = json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
CUSTOM_MODELS = {
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=192, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16),
    "small": dict(vocab_size=32768, hidden_size=256, intermediate_size=768, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=64),
    # The real Qwen3 vocabulary: the LM head + fp32 log-softmax dominate, as they do (less
    # extremely) for Qwen3-0.6B/1.7B.
    "small-152k": dict(vocab_size=151936, hidden_size=256, intermediate_size=768, num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=64),
}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """All shapes of one model's run.

    decode: [decode_batch, prompt_len] prompts -> +new_tokens (forced length).
    scoring: [score_batch, score_seq]; multi-context: [contexts, ctx_batch, score_seq].
    train: [train_batch, train_seq]; max-batch search doubles B up to train_max_batch (0 = off).
    response_start: first response index in scoring/train rows (T = seq - response_start).
    k_wrong: wrong-hint teachers K of the rlcsd loss; chunk: LM-head chunk of scoring.
    """

    decode_batch: int
    prompt_len: int
    new_tokens: int
    score_batch: int
    score_seq: int
    contexts: int
    ctx_batch: int
    train_batch: int
    train_seq: int
    train_max_batch: int = 0
    response_start: int = 1
    k_wrong: int = 4
    chunk: int = 256


SUITE_MODELS = {"cpu": ("tiny", "small", "small-152k"), "gpu": ("qwen3-1.7b",)}

_CPU_SHAPES = {
    "tiny": Shapes(4, 32, 32, 4, 128, 5, 1, 2, 128),
    "small": Shapes(4, 64, 64, 4, 256, 5, 1, 2, 256),
}
_GPU_SHAPES = {
    "default": Shapes(64, 512, 512, 16, 4096, 5, 3, 2, 4096, train_max_batch=16),
    "qwen3-8b": Shapes(64, 512, 512, 8, 4096, 5, 1, 1, 4096, train_max_batch=8),
    # Smoke test of the gpu code path on CPU.
    "tiny": Shapes(2, 16, 8, 2, 64, 2, 1, 1, 64, train_max_batch=2, chunk=32),
}


def default_shapes(suite: str, model: str) -> Shapes:
    if suite == "cpu":
        return _CPU_SHAPES.get(model, _CPU_SHAPES["small"])
    return _GPU_SHAPES.get(model, _GPU_SHAPES["default"])


def model_config(name: str, *, dtype: str, param_dtype: str = "float32", remat: str = "none",
                 attention_impl: str = "auto", scan_layers: bool = True) -> models.ModelConfig:
    """A preset (`qwen3-1.7b`, …) or a custom CPU shape (`tiny`, `small`) with numerics knobs."""
    knobs = dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat,
                 attention_impl=attention_impl, scan_layers=scan_layers)
    if name in CUSTOM_MODELS:
        layers = CUSTOM_MODELS[name]["num_layers"]
        return models.get_preset("qwen3-0.6b", **CUSTOM_MODELS[name], tie_word_embeddings=True,
                                 layer_types=(models.FULL,) * layers, hf_extra=_SMALL_EXTRA,
                                 max_position_embeddings=40960, **knobs)
    return models.get_preset(name, **knobs)


def _ids(rng: np.random.Generator, shape, vocab: int) -> np.ndarray:
    return rng.integers(3, vocab, size=shape, dtype=np.int32)


def decode_inputs(s: Shapes, vocab: int, seed: int = 0):
    """(ids [B, P] int32, mask [B, P] int32 all ones): full-length prompts, no padding."""
    rng = np.random.default_rng(seed)
    ids = _ids(rng, (s.decode_batch, s.prompt_len), vocab)
    return ids, np.ones_like(ids)


def score_inputs(rows: int, seq: int, vocab: int, seed: int = 1):
    """(ids [rows, S] int32, mask [rows, S] all ones)."""
    rng = np.random.default_rng(seed)
    ids = _ids(rng, (rows, seq), vocab)
    return ids, np.ones_like(ids)


def train_inputs(batch: int, seq: int, s: Shapes, vocab: int, seed: int = 2) -> dict:
    """Student batch and precomputed rlcsd inputs (T = seq - response_start, K = k_wrong).

    input_ids, attention_mask [B, S]; response_start [B]; mask, old_logp,
    teacher_correct_logp [B, T]; teacher_wrong_logp [B, K, T]; wrong_valid [B, K]; advantages [B].
    Log-probs sit near -log V (a random model's value) so PPO ratios stay near 1.
    """
    rng = np.random.default_rng(seed)
    t, k = seq - s.response_start, s.k_wrong
    base = -np.log(vocab)

    def lp(*shape):
        return (base + 0.3 * rng.standard_normal(shape)).astype(np.float32)

    ids = _ids(rng, (batch, seq), vocab)
    valid = (rng.random((batch, k)) < 0.8).astype(np.int32)
    valid[:, 0] = 1
    return dict(input_ids=ids, attention_mask=np.ones_like(ids),
                response_start=np.full((batch,), s.response_start, np.int32),
                mask=np.ones((batch, t), np.float32), old_logp=lp(batch, t),
                teacher_correct_logp=lp(batch, t), teacher_wrong_logp=lp(batch, k, t),
                wrong_valid=valid,
                advantages=rng.choice([-1.0, 1.0], size=batch).astype(np.float32))
