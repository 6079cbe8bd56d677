"""Building blocks shared by every architecture: RMSNorm, RoPE tables, SwiGLU, projections.

Shapes: B batch, T query length, S key length, H query heads, KV key/value heads, G = H // KV,
D head dim, d model width, F MLP width.  Parameters carry logical axis names (see
`rlcsd_jax.distributed.sharding.LOGICAL_RULES`) in their `out_sharding` metadata; the mesh mapping is applied
by `rlcsd_jax.distributed.sharding`, never here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

def param(rngs: nnx.Rngs | None, shape, names, dtype, init: str = "normal", stack: int | None = None):
    """A parameter with logical axis names; `stack` prepends a scanned `layers` axis."""
    if stack is not None:
        shape, names = (stack, *shape), ("layers", *names)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        # 0.02 is the HF initializer_range; only tiny from-scratch models use this init.
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, weight_in_fp32: bool) -> jax.Array:
    """RMSNorm over the last axis with an fp32 statistic.

    weight_in_fp32=False (Qwen3): the normalised value is cast to x.dtype first and then multiplied
    by the weight in x.dtype.  True (Olmo-3): the multiply happens in fp32 and the result is cast.
    models.md §1.1; the two differ by one bf16 rounding.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight_in_fp32:
        return (weight.astype(jnp.float32) * normed).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings (rotate-half / NeoX layout)
# ----------------------------------------------------------------------------------------------


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """[D/2] fp32 inverse frequencies, as HF `_compute_default_rope_parameters`."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_position: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  truncate: bool = True) -> np.ndarray:
    """[D/2] fp32 YaRN inverse frequencies, as HF `_compute_yarn_parameters` (§1.3).

    The correction range uses the full head dim while the ramp has D/2 entries.
    """
    dim = head_dim

    def correction_dim(num_rotations):
        return dim * math.log(original_max_position / (num_rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    inv = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv.astype(np.float32)


def yarn_default_attention_factor(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, scaling: float):
    """positions [B, T] int -> cos, sin [B, T, D] fp32 (concat(freqs, freqs) layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, in_fp32: bool) -> jax.Array:
    """x [B, T, N, D]; cos/sin [B, T, D].  rotate_half pairs (j, j + D/2).

    in_fp32=False (Qwen3): cos/sin are cast to x.dtype and the rotation runs in x.dtype.
    True (Olmo-3): the rotation runs in fp32 and the result is cast back.
    """
    dtype = x.dtype
    work = jnp.float32 if in_fp32 else dtype
    x = x.astype(work)
    cos = cos.astype(work)[:, :, None, :]
    sin = sin.astype(work)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def linear(x: jax.Array, kernel: jax.Array, spec: str) -> jax.Array:
    """Bias-free projection in the compute dtype of x (kernel cast, fp32 accumulation)."""
    return jnp.einsum(spec, x, kernel.astype(x.dtype), preferred_element_type=jnp.float32
                      ).astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)); kernels [d, F], [d, F], [F, d]."""

    def __init__(self, d: int, f: int, *, param_dtype, rngs, stack=None):
        self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), param_dtype, stack=stack)
        self.up_proj = param(rngs, (d, f), ("embed", "mlp"), param_dtype, stack=stack)
        self.down_proj = param(rngs, (f, d), ("mlp", "embed"), param_dtype, stack=stack)

    def __call__(self, x):
        gate = linear(x, self.gate_proj[...], "btd,df->btf")
        up = linear(x, self.up_proj[...], "btd,df->btf")
        return linear(jax.nn.silu(gate) * up, self.down_proj[...], "btf,fd->btd")


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, weight_in_fp32: bool, *, param_dtype, stack=None):
        self.weight = param(None, (size,), ("norm",), param_dtype, init="ones", stack=stack)
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps, self.weight_in_fp32)
