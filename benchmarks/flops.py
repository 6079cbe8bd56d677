"""FLOP counts, MFU and the measured matmul peak of the device.

Convention (PaLM-style model FLOPs, the same for JAX and HF):
  forward  = 2 * N_body * tokens  +  2 * d * V * head_tokens  +  attention
  attention = 2 * 2 * L * S * H * D * tokens / 2   (QK^T and PV, halved for causality)
  train step = 3 * forward  (backward = 2x forward; remat recomputation is NOT counted)
N_body counts the matmul weights of the layers (q, k, v, o, gate, up, down); the LM head
(d x V, counted whether or not it is tied) is added per position that goes through it.  Embedding
lookups, norms, RoPE, softmax and the loss are not counted.  MFU = model FLOPs / time / peak,
where peak is a big square matmul timed in the same run (bf16 on GPU, fp32 on CPU).
"""

from __future__ import annotations

import time

from rlcsd_jax.models import ModelConfig


def body_matmul_params(cfg: ModelConfig) -> int:
    """Matmul weights of all layers (excludes embeddings and the LM head)."""
    d, h, kv, hd, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.intermediate_size)
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    return cfg.num_layers * per_layer


def head_params(cfg: ModelConfig) -> int:
    return cfg.hidden_size * cfg.vocab_size


def matmul_params(cfg: ModelConfig) -> int:
    """N_matmul of the issue: layer matmuls + LM head, no embeddings."""
    return body_matmul_params(cfg) + head_params(cfg)


def forward_flops(cfg: ModelConfig, batch: int, seq: int, head_tokens: int | None = None) -> float:
    """Model FLOPs of one forward over [batch, seq] tokens.

    head_tokens: positions per row that go through the LM head (default all `seq`).
    """
    head_tokens = seq if head_tokens is None else head_tokens
    tokens = batch * seq
    attn = 2 * 2 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim * tokens / 2
    return (2.0 * body_matmul_params(cfg) * tokens + 2.0 * head_params(cfg) * batch * head_tokens
            + attn)


def train_flops(cfg: ModelConfig, batch: int, seq: int, head_tokens: int | None = None) -> float:
    return 3.0 * forward_flops(cfg, batch, seq, head_tokens)


def mfu(flops: float | None, seconds: float | None, peak_flops: float | None) -> float | None:
    """Fraction of the peak, or None when any input is missing (decode has no MFU)."""
    if not flops or not peak_flops or not seconds:
        return None
    return flops / seconds / peak_flops


def jax_matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of an [n, n] @ [n, n] jnp.matmul in `dtype` on the default JAX device."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / sorted(times)[len(times) // 2]


def torch_matmul_peak(dtype: str, n: int, device: str, repeats: int = 5) -> float:
    """FLOP/s of an [n, n] @ [n, n] torch.matmul (for diagnosis; MFU uses the JAX peak)."""
    import torch

    tdt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(tdt)
    b = torch.randn(n, n, device=device).to(tdt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / sorted(times)[len(times) // 2]
