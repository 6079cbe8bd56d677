"""GRPO outcome advantages (algorithm.md §1.5) and the nominal RLSD λ schedule (§4.5, §10.2).

``A_i = (r_i − mean_g) / (std_g + 1e-6)`` with the Bessel-corrected (/(n−1)) std of the group;
a group of size 1 uses mean 0 and std 1 (so ``A = r / (1 + 1e-6)``); all-same groups give 0.
Advantages are computed on the full, UNFILTERED batch, before any RLCSD drop (§2.3).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

GRPO_STD_EPS = 1e-6


def grpo_advantages(rewards, group_ids, num_groups: int | None = None):
    """Jittable GRPO advantages, ``rewards[N], group_ids[N] -> [N]`` (float32 unless x64).

    ``group_ids`` are integers identifying the prompt (any values: they are relabelled with
    ``jnp.unique(size=N)`` so the shape stays static). When ``num_groups`` is given the ids must
    already lie in ``[0, num_groups)`` and the relabelling is skipped. Non-integer host ids (e.g.
    uid strings) are first relabelled to integers on the host with ``np.unique``.
    """
    if not isinstance(group_ids, jax.Array):
        ids_np = np.asarray(group_ids)
        if ids_np.dtype.kind not in "iub":
            group_ids = np.unique(ids_np, return_inverse=True)[1].reshape(-1)
    rewards = jnp.asarray(rewards)
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        rewards = rewards.astype(jnp.float32)
    return _grpo_advantages_jit(rewards, jnp.asarray(group_ids), num_groups)


@functools.partial(jax.jit, static_argnames="num_groups")
def _grpo_advantages_jit(rewards, group_ids, num_groups):
    n = rewards.shape[0]
    if num_groups is None:
        _, seg = jnp.unique(group_ids, return_inverse=True, size=n, fill_value=group_ids[0])
        seg = seg.reshape(-1)
        num_groups = n
    else:
        seg = group_ids
    count = jax.ops.segment_sum(jnp.ones_like(rewards), seg, num_segments=num_groups)
    total = jax.ops.segment_sum(rewards, seg, num_segments=num_groups)
    mean = total / jnp.maximum(count, 1.0)
    sq = jax.ops.segment_sum((rewards - mean[seg]) ** 2, seg, num_segments=num_groups)
    std = jnp.sqrt(sq / jnp.maximum(count - 1.0, 1.0))
    single = count[seg] <= 1
    mean_i = jnp.where(single, 0.0, mean[seg])
    std_i = jnp.where(single, 1.0, std[seg])
    return (rewards - mean_i) / (std_i + GRPO_STD_EPS)


def lam_schedule(lam: float, step, decay_steps: int):
    """Nominal RLSD λ decay (§4.5): ``λ·max(1 − min((step − 1)/decay_steps, 1), 0)``.

    ``decay_steps <= 0`` (or ``step`` None) returns ``lam`` unchanged, which mirrors the
    reference runs, where the decay never applies (§10.2).
    """
    if step is None or decay_steps is None or decay_steps <= 0:
        return lam
    frac = jnp.minimum((jnp.asarray(step, jnp.float32) - 1.0) / decay_steps, 1.0)
    return lam * jnp.maximum(1.0 - frac, 0.0)
