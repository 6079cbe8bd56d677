"""FLOP counts (`rlcsd_jax.planner.flops`, whose docstring gives the convention), MFU and the
measured matmul peak of the device: MFU = model FLOPs / time / peak, where peak is a big square
matmul timed in the same run (bf16 on GPU, fp32 on CPU).
"""

from __future__ import annotations

import time

# The FLOP model is the package's own (the planner reports MFU with it too).
from rlcsd_jax.planner.flops import (  # noqa: F401  (re-exported for the benchmark modules)
    body_matmul_params,
    forward_flops,
    head_params,
    matmul_params,
    mfu,
    train_flops,
)


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
