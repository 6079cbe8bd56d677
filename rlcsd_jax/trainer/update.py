"""Jitted device work of a training step: old/ref log-probs, teacher scoring, the update.

Batches are dicts of arrays with a fixed number of rows M (the nominal mini-batch: 16 prompts x
G rollouts by default); rows that did not survive the hint filter are zero-mask padding, so every
mini-batch has one shape and, under per-rollout aggregation, the loss is divided by the NOMINAL
mini-batch size as in the reference (RLCSD_SPEC §4.9).

Student batch keys: input_ids / attention_mask [M, P+N], response_start [M], response_mask
[M, N], advantages [M], old_logp [M, N] (filled by `old_logprobs`), sampler_logp [M, N],
ref_logp [M, N] (when a KL term is on).  Teacher batch: input_ids / attention_mask [C, M, S],
response_start [C, M], wrong_valid [M, K].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlcsd_jax import losses, scoring
from rlcsd_jax.trainer import state as state_lib


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the update (hashable: a jit static argument)."""

    method: str
    hparams: tuple                 # sorted (name, value) loss hyper-parameters
    aggregation: str               # "per_rollout" | "batch"
    response_len: int              # N
    chunk: int
    top_k: int                     # distillation top-k (opsd/sdpo/srpo/opsd_ectr)
    teacher_mode: str | None
    ema_decay: float
    sync_interval: int
    grad_clip: float
    adam: tuple                    # (b1, b2, eps, weight_decay)
    rollout_is: tuple | None       # (mode, threshold) or None

    @property
    def tx(self):
        return state_lib.make_optimizer(self.grad_clip, *self.adam)


# Which student statistic each method's loss needs, and how teacher outputs map to loss args.
TOPK_METHODS = ("opsd", "sdpo", "srpo", "opsd_ectr")


def student_stats(graphdef, params, batch, spec: StepSpec, *, top_k=0, at_ids=None,
                  entropy=False):
    model = nnx.merge(graphdef, params)
    return scoring.response_stats(model, batch["input_ids"], batch["attention_mask"],
                                  batch["response_start"], spec.response_len, top_k=top_k,
                                  at_ids=at_ids, entropy=entropy, chunk=spec.chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "with_ref"))
def old_logprobs(graphdef, params, ref_params, batch, *, spec: StepSpec, with_ref: bool):
    """No-grad forward at the weights that produced the rollouts: old logp, entropy, ref logp."""
    params = jax.lax.stop_gradient(params)
    stats = student_stats(graphdef, params, batch, spec, entropy=True)
    out = {"old_logp": stats["logp"], "entropy": stats["entropy"]}
    if with_ref:
        out["ref_logp"] = student_stats(graphdef, jax.lax.stop_gradient(ref_params), batch,
                                        spec)["logp"]
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def student_topk_ids(graphdef, params, batch, *, spec: StepSpec):
    """The student's own top-k ids (sdpo / srpo choose the distillation support, §3)."""
    stats = student_stats(graphdef, jax.lax.stop_gradient(params), batch, spec, top_k=spec.top_k)
    return stats["topk_ids"]


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def teacher_outputs(graphdef, teacher_params, tbatch, student_ids, spec: StepSpec) -> dict:
    """Teacher log-probs for one mini-batch, per method (§3 table).  Stop-gradient, one program."""
    kw = dict(graphdef=graphdef, length=spec.response_len, chunk=spec.chunk)
    ids, mask, start = tbatch["input_ids"], tbatch["attention_mask"], tbatch["response_start"]
    m = spec.method
    if m in ("sdpo", "srpo"):
        out = scoring.score(params=teacher_params, input_ids=ids[:1], attention_mask=mask[:1],
                            response_start=start[:1], at_ids=student_ids,
                            entropy=(m == "srpo"), **kw)
        res = {"teacher_topk_logp": out["at_ids_logp"][0], "topk_ids": student_ids}
        if m == "srpo":
            res["teacher_entropy"] = out["entropy"][0]
        return res
    if m in ("opsd", "opsd_ectr"):
        c = scoring.score(params=teacher_params, input_ids=ids[:1], attention_mask=mask[:1],
                          response_start=start[:1], top_k=spec.top_k, **kw)
        res = {"teacher_topk_logp": c["topk_logp"][0], "topk_ids": c["topk_ids"][0]}
        if m == "opsd_ectr":
            w = scoring.score(params=teacher_params, input_ids=ids[1:2], attention_mask=mask[1:2],
                              response_start=start[1:2], at_ids=res["topk_ids"], **kw)
            res["teacher_wrong_topk_logp"] = w["at_ids_logp"][0]
        return res
    out = scoring.score(params=teacher_params, input_ids=ids, attention_mask=mask,
                        response_start=start, **kw)["logp"]
    if m == "rlsd":
        return {"teacher_logp": out[0]}
    if m == "rlsd_ectr":
        return {"teacher_correct_logp": out[0], "teacher_wrong_logp": out[1]}
    if m == "rlcsd":
        return {"teacher_correct_logp": out[0],
                "teacher_wrong_logp": jnp.moveaxis(out[1:], 0, 1),   # [M, K, N]
                "wrong_valid": tbatch["wrong_valid"]}
    raise ValueError(f"method {m!r} has no teacher")


def _loss(params, graphdef, batch, teacher, spec: StepSpec):
    """The method's loss on one mini-batch; returns (loss, metrics)."""
    m = spec.method
    at_ids = teacher.get("topk_ids") if m in TOPK_METHODS else None
    stats = student_stats(graphdef, params, batch, spec, at_ids=at_ids)
    mask = batch["response_mask"]
    args = dict(mask=mask)
    needed = set(losses.INPUTS[m])
    pool = dict(logp=stats["logp"], old_logp=batch["old_logp"], advantages=batch["advantages"],
                student_topk_logp=stats.get("at_ids_logp"))
    pool.update({k: v for k, v in teacher.items() if k != "topk_ids"})
    for k in needed - {"mask"}:
        args[k] = pool[k]
    if m in ("opsd", "opsd_ectr"):
        args["logp"] = stats["logp"]          # only for the KL term
    hp = dict(spec.hparams)
    if hp.get("kl_coef", 0.0) > 0:
        args["ref_logp"] = batch["ref_logp"]
    if spec.rollout_is is not None:
        mode, threshold = spec.rollout_is
        args["is_weights"] = losses.rollout_is_weights(batch["old_logp"], batch["sampler_logp"],
                                                       mask, mode=mode, threshold=threshold)
    fn = functools.partial(losses.get(m), **hp)
    if spec.aggregation == "per_rollout":
        return losses.per_rollout(fn)(rollout_denominator=mask.shape[0], **args)
    return fn(**args)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"), donate_argnames=("state",))
def update(graphdef, state: state_lib.TrainState, batch, teacher, lr, nan_grad, *,
           spec: StepSpec):
    """One optimizer step on a mini-batch.  `nan_grad` (bool) injects a NaN gradient (tests)."""
    (loss, metrics), grads = jax.value_and_grad(_loss, has_aux=True)(
        state.params, graphdef, batch, teacher, spec)
    grads = jax.tree.map(lambda g: jnp.where(nan_grad, jnp.nan, g), grads)
    state, gnorm = state_lib.apply_update(
        state, grads, spec.tx, lr, teacher_mode=spec.teacher_mode, ema_decay=spec.ema_decay,
        sync_interval=spec.sync_interval)
    metrics = dict(metrics, loss=loss, grad_norm=gnorm, lr=jnp.asarray(lr, jnp.float32))
    return state, metrics
