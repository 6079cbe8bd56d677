"""Train state (a plain pytree), the optimizer, the learning-rate schedule and teacher weights.

AdamW is built as `clip -> scale_by_adam -> add_decayed_weights` with the learning rate applied
by the update step, so the schedule is indexed by TRAINING steps (RLCSD_SPEC §5, §11) and passed
in per call, not counted in optimizer updates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

TEACHER_MODES = ("fixed", "ema", "snapshot")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """params: fp32 master weights (nnx.Param state); teacher: shadow weights (ema / snapshot)
    or None (fixed = live params, or no teacher); ref: frozen initial weights when a KL term is
    on, else None.  Counters are int32 scalars on device."""

    params: object
    opt_state: object
    teacher: object
    ref: object
    opt_step: jax.Array      # optimizer steps taken (teacher snapshot counter, §3)
    train_step: jax.Array    # completed training steps that made an update (schedule, §5)
    skipped: jax.Array       # optimizer steps skipped for a non-finite gradient norm


def make_optimizer(grad_clip: float, b1: float, b2: float, eps: float,
                   weight_decay: float) -> optax.GradientTransformation:
    """AdamW without its learning-rate scaling (applied by `apply_update`)."""
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.add_decayed_weights(weight_decay))


def learning_rate(step, lr: float, warmup_steps: int):
    """Constant with linear warmup from 0: lr * min(s / warmup, 1), s = completed train steps."""
    if warmup_steps <= 0:
        return lr
    return lr * min(step / warmup_steps, 1.0)


def init_state(params, tx, teacher_mode: str | None, need_ref: bool) -> TrainState:
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    teacher = copy(params) if teacher_mode in ("ema", "snapshot") else None
    return TrainState(params=params, opt_state=tx.init(params), teacher=teacher,
                      ref=copy(params) if need_ref else None,
                      opt_step=jnp.zeros((), jnp.int32), train_step=jnp.zeros((), jnp.int32),
                      skipped=jnp.zeros((), jnp.int32))


def apply_update(state: TrainState, grads, tx, lr, *, teacher_mode, ema_decay: float,
                 sync_interval: int):
    """One optimizer step: skip on a non-finite gradient norm (§8), then the teacher update.

    Returns (new state, grad norm).  The teacher counter advances on every optimizer step.
    """
    gnorm = optax.global_norm(grads)
    finite = jnp.isfinite(gnorm)
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, opt_state = tx.update(safe_grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), state.params, updates)
    keep = lambda new, old: jax.tree.map(  # noqa: E731
        lambda a, b: jnp.where(finite, a, b), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    opt_step = state.opt_step + 1
    teacher = state.teacher
    if teacher_mode == "ema":
        teacher = jax.tree.map(lambda t, p: ema_decay * t + (1 - ema_decay) * p, teacher, params)
    elif teacher_mode == "snapshot":
        refresh = opt_step % sync_interval == 0
        teacher = jax.tree.map(lambda t, p: jnp.where(refresh, p, t), teacher, params)
    new = dataclasses.replace(state, params=params, opt_state=opt_state, teacher=teacher,
                              opt_step=opt_step, skipped=state.skipped + (~finite).astype(jnp.int32))
    return new, gnorm
