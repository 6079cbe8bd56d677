"""Train state (a plain pytree), the optimizer, the learning-rate schedule and teacher weights.

AdamW is built as `clip -> scale_by_adam -> add_decayed_weights` with the learning rate applied
by the update step, so the schedule is indexed by TRAINING steps (algorithm.md §5, §11) and passed
in per call, not counted in optimizer updates.

Precision (`model.param_dtype`, docs/precision.md): the parameters, the Adam moments and the
teacher / reference copies are all kept in the parameter dtype, float32 by default or bfloat16
as the reference trains (torch AdamW on bf16 weights).  The gradient arrives in float32 (the
micro-batch accumulator), the Adam arithmetic runs in float32, and each stored value (moment,
weight, EMA teacher) is rounded to its dtype once per optimizer step.  In float32 this is the
plain fp32 AdamW.
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
    """params: the weights in `model.param_dtype` (nnx.Param state); teacher: shadow weights
    (ema / snapshot) in the same dtype, or None (fixed = live params, or no teacher); ref: frozen
    initial weights when a KL term is on, else None.  Counters are int32 scalars on device."""

    params: object
    opt_state: object
    teacher: object
    ref: object
    opt_step: jax.Array      # optimizer steps taken (teacher snapshot counter, §3)
    train_step: jax.Array    # completed training steps that made an update (schedule, §5)
    skipped: jax.Array       # optimizer steps skipped for a non-finite gradient norm


def make_optimizer(grad_clip: float, b1: float, b2: float, eps: float,
                   weight_decay: float) -> optax.GradientTransformation:
    """AdamW without its learning-rate scaling (applied by `apply_update`); its moments keep
    the dtype of the parameters they were initialised from (`keep_state_dtypes`)."""
    return keep_state_dtypes(optax.chain(optax.clip_by_global_norm(grad_clip),
                                         optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                                         optax.add_decayed_weights(weight_decay)))


def keep_state_dtypes(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run in float32 on its state and the parameters, with every state leaf rounded
    back to the dtype `init` gave it.

    `scale_by_adam` makes its moments like the parameters (bf16 for bf16 weights); left alone
    it would round `b1 * mu` to bf16 before adding the fp32 gradient term, and return the first
    moment in the promoted dtype (fp32): another state layout after the first step, recompiles,
    and not the reference's bf16 optimizer state.  A no-op in float32.
    """
    def update(updates, state, params=None):
        updates, new_state = inner.update(updates, _floats_f32(state), _floats_f32(params))
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
        return updates, new_state

    return optax.GradientTransformation(inner.init, update)


def learning_rate(step, lr: float, warmup_steps: int):
    """Constant with linear warmup from 0: lr * min(s / warmup, 1), s = completed train steps."""
    if warmup_steps <= 0:
        return lr
    return lr * min(step / warmup_steps, 1.0)


def _f32(x):
    return x.astype(jnp.float32)


def _floats_f32(tree):
    return jax.tree.map(lambda x: _f32(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


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
    # In float32, rounded to the parameter dtype once (bf16: an update below half a bf16 ulp
    # of the weight is lost, as in the reference's bf16 AdamW step).
    params = jax.tree.map(lambda p, u: (_f32(p) - lr * _f32(u)).astype(p.dtype),
                          state.params, updates)
    keep = lambda new, old: jax.tree.map(  # noqa: E731
        lambda a, b: jnp.where(finite, a, b), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    opt_step = state.opt_step + 1
    teacher = state.teacher
    if teacher_mode == "ema":
        teacher = jax.tree.map(
            lambda t, p: (ema_decay * _f32(t) + (1 - ema_decay) * _f32(p)).astype(t.dtype),
            teacher, params)
    elif teacher_mode == "snapshot":
        refresh = opt_step % sync_interval == 0
        teacher = jax.tree.map(lambda t, p: jnp.where(refresh, p, t), teacher, params)
    new = dataclasses.replace(state, params=params, opt_state=opt_state, teacher=teacher,
                              opt_step=opt_step, skipped=state.skipped + (~finite).astype(jnp.int32))
    return new, gnorm
