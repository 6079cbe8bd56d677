"""Model FLOPs: the useful arithmetic of a forward, a training step or a decode step (for MFU).

Convention (PaLM-style, the same for every implementation measured against it):
  forward   = 2 * N_body * tokens + 2 * d * V * head_tokens + attention
  attention = 4 * H * D * (keys each query sees), summed over layers and queries: causal rows
              see half the row on average, Olmo-3's sliding layers at most the window
  train     = 3 * forward (backward = 2x forward; remat recomputation is not useful work)
  decode    = per generated token: 2 * N_body + 2 * d * V + attention over the tokens in cache
N_body counts the layers' matmul weights (q, k, v, o, gate, up, down); the LM head (d x V,
counted whether or not it is tied) runs on `head_tokens` positions.  Embedding lookups, norms,
RoPE, softmax and the loss are not counted.
"""

from __future__ import annotations

from rlcsd_jax.models.config import SLIDING, ModelConfig


def body_matmul_params(cfg: ModelConfig) -> int:
    """Matmul weights of all layers (excludes embeddings and the LM head)."""
    d, h, kv, hd, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.intermediate_size)
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    return cfg.num_layers * per_layer


def head_params(cfg: ModelConfig) -> int:
    return cfg.hidden_size * cfg.vocab_size


def matmul_params(cfg: ModelConfig) -> int:
    """Layer matmuls + LM head, no embeddings."""
    return body_matmul_params(cfg) + head_params(cfg)


def _visible_keys_causal(seq: int, window: int | None) -> float:
    """Sum over the queries of a causal row of length `seq` of the keys each one sees."""
    if window is None or window >= seq:
        return seq * (seq + 1) / 2
    return window * (window + 1) / 2 + (seq - window) * window


def attention_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """QK^T and PV of causal self-attention over [batch, seq], all layers."""
    per_key = 4 * cfg.num_heads * cfg.head_dim
    total = 0.0
    for kind in cfg.layer_types:
        window = cfg.sliding_window if kind == SLIDING else None
        total += per_key * _visible_keys_causal(seq, window)
    return batch * total


def forward_flops(cfg: ModelConfig, batch: int, seq: int, head_tokens: int | None = None) -> float:
    """Model FLOPs of one forward over [batch, seq] tokens; `head_tokens` positions per row go
    through the LM head (default all `seq`)."""
    head_tokens = seq if head_tokens is None else head_tokens
    return (2.0 * body_matmul_params(cfg) * batch * seq
            + 2.0 * head_params(cfg) * batch * head_tokens + attention_flops(cfg, batch, seq))


def train_flops(cfg: ModelConfig, batch: int, seq: int, head_tokens: int | None = None) -> float:
    return 3.0 * forward_flops(cfg, batch, seq, head_tokens)


def decode_flops(cfg: ModelConfig, rows: int, kv_len: float) -> float:
    """One decode step of `rows` sequences with `kv_len` tokens in cache each."""
    per_key = 4 * cfg.num_heads * cfg.head_dim
    attn = sum(per_key * (min(kv_len, cfg.sliding_window) if kind == SLIDING else kv_len)
               for kind in cfg.layer_types)
    return rows * (2.0 * matmul_params(cfg) + attn)


def mfu(flops: float | None, seconds: float | None, peak_flops: float | None) -> float | None:
    """Fraction of the peak, or None when any input is missing."""
    if not flops or not peak_flops or not seconds:
        return None
    return flops / seconds / peak_flops
