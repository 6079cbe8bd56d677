"""Jitted device work of a training step: old/ref log-probs, teacher scoring, the update.

The update of one mini-batch runs as micro-batches (`trainer.microbatch`): `accumulate_grads`
adds each micro-batch's gradient into an fp32 accumulator, `apply_grads` then takes the one
optimizer step.  Micro-batching does not change the loss: under per-rollout aggregation each
micro-batch contributes the sum of its rollouts' losses divided by the NOMINAL mini-batch size
M (as the reference does, algorithm.md §4.9); under batch aggregation a token-mean loss is
weighted by the micro-batch's share of the mini-batch's response tokens, and the losses that
are not a single token-mean (`losses.METHODS[m].token_mean_loss` False) get the whole
mini-batch in one micro-batch.  Under reference_micro_batch aggregation the micro-batches are
the reference's (`microbatch.ReferenceRule`) and they do define the loss: the method's loss
of each micro-batch as a whole (srpo's entropy weights normalised and its one denominator over
the micro-batch), times its rollouts / M: the reference's `n_mb / 16` on each of its 8 GPUs,
whose gradients are averaged (`dp_actor.update_policy`, `loss_scale_factor`).

Student batch keys (R rows of one micro-batch, right padded): input_ids / attention_mask
[R, S], response_start [R], response_mask [R, T], advantages [R], sampler_logp [R, T], old_logp
and entropy [R, T] (filled by `old_logprobs`), ref_logp [R, T] (when a KL term is on).  Teacher
batch: input_ids / attention_mask [C, R, S_t], response_start [C, R], wrong_valid [R, K].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlcsd_jax import losses, scoring
from rlcsd_jax.trainer import reductions
from rlcsd_jax.trainer import state as state_lib


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the update (hashable: a jit static argument)."""

    method: str
    hparams: tuple                 # sorted (name, value) loss hyper-parameters
    aggregation: str               # "per_rollout" | "batch" | "reference_micro_batch"
    response_len: int              # N, the response cap
    chunk: int                     # LM-head tokens per device per chunk
    minibatch_rows: int            # M, the nominal mini-batch (per-rollout loss denominator)
    top_k: int                     # distillation top-k (opsd/sdpo/srpo/opsd_ectr)
    teacher_mode: str | None
    ema_decay: float
    sync_interval: int
    grad_clip: float
    adam: tuple                    # (b1, b2, eps, weight_decay)
    rollout_is: tuple | None       # (mode, threshold) or None
    temperature: float = 1.0       # rollout T: every training log-prob is of logits / T (§1.3)

    @property
    def tx(self):
        return state_lib.make_optimizer(self.grad_clip, *self.adam)

    @property
    def method_spec(self) -> losses.MethodSpec:
        """The method's entry in the method table (`losses.METHODS`)."""
        return losses.METHODS[self.method]

    @property
    def need_ref(self) -> bool:
        """A reference model is kept: its log-probs feed the KL term (algorithm.md §4.10)."""
        return self.method_spec.needs_reference(self.hparams)


def student_stats(graphdef, params, batch, spec: StepSpec, *, top_k=0, at_ids=None,
                  entropy=False):
    """Statistics of the micro-batch's T = response_mask.shape[1] response positions."""
    model = nnx.merge(graphdef, params)
    return scoring.response_stats(model, batch["input_ids"], batch["attention_mask"],
                                  batch["response_start"], batch["response_mask"].shape[1],
                                  top_k=top_k, at_ids=at_ids, entropy=entropy, chunk=spec.chunk,
                                  right_padded=True, temperature=spec.temperature)


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


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "length"))
def teacher_outputs(graphdef, teacher_params, tbatch, student_ids, spec: StepSpec, *,
                    length: int) -> dict:
    """Teacher log-probs of one micro-batch's T = `length` response positions, per method (§3
    table).  Stop-gradient, one program; the C contexts are scored one after the other."""
    kw = dict(graphdef=graphdef, length=length, chunk=spec.chunk, right_padded=True,
              temperature=spec.temperature)
    ids, mask, start = tbatch["input_ids"], tbatch["attention_mask"], tbatch["response_start"]
    ms = spec.method_spec
    if ms.teacher_scoring is None:
        raise ValueError(f"method {spec.method!r} has no teacher")
    if ms.student_topk:
        out = scoring.score(params=teacher_params, input_ids=ids[:1], attention_mask=mask[:1],
                            response_start=start[:1], at_ids=student_ids,
                            entropy=ms.teacher_entropy, **kw)
        res = {"teacher_topk_logp": out["at_ids_logp"][0], "topk_ids": student_ids}
        if ms.teacher_entropy:
            res["teacher_entropy"] = out["entropy"][0]
        return res
    if ms.teacher_scoring == "teacher_topk":
        c = scoring.score(params=teacher_params, input_ids=ids[:1], attention_mask=mask[:1],
                          response_start=start[:1], top_k=spec.top_k, **kw)
        res = {"teacher_topk_logp": c["topk_logp"][0], "topk_ids": c["topk_ids"][0]}
        if ms.wrong_hints == "one":       # the wrong context at the teacher's top-k ids
            w = scoring.score(params=teacher_params, input_ids=ids[1:2], attention_mask=mask[1:2],
                              response_start=start[1:2], at_ids=res["topk_ids"], **kw)
            res["teacher_wrong_topk_logp"] = w["at_ids_logp"][0]
        return res
    out = scoring.score(params=teacher_params, input_ids=ids, attention_mask=mask,
                        response_start=start, **kw)["logp"]
    if ms.wrong_hints == "none":
        return {"teacher_logp": out[0]}
    if ms.wrong_hints == "one":
        return {"teacher_correct_logp": out[0], "teacher_wrong_logp": out[1]}
    return {"teacher_correct_logp": out[0],                           # up to k_max wrong hints
            "teacher_wrong_logp": jnp.moveaxis(out[1:], 0, 1),        # [M, K, N]
            "wrong_valid": tbatch["wrong_valid"]}


def _loss(params, graphdef, batch, teacher, token_total, spec: StepSpec):
    """The method's loss on one micro-batch, scaled so the micro-batches of a mini-batch add up
    to the mini-batch's loss; returns (loss, metrics with their `_weight`: the units its
    metrics' means are over, `reductions.LOSS_UNITS`)."""
    m = spec.method
    at_ids = teacher.get("topk_ids") if spec.method_spec.uses_topk else None
    stats = student_stats(graphdef, params, batch, spec, at_ids=at_ids)
    mask = batch["response_mask"]
    args = dict(mask=mask)
    needed = set(losses.INPUTS[m])
    pool = dict(logp=stats["logp"], old_logp=batch["old_logp"], advantages=batch["advantages"],
                student_topk_logp=stats.get("at_ids_logp"))
    pool.update({k: v for k, v in teacher.items() if k != "topk_ids"})
    for k in needed - {"mask"}:
        args[k] = pool[k]
    args["logp"] = stats["logp"]              # every loss takes it (opsd*: for the KL term only)
    hp = dict(spec.hparams)
    if spec.need_ref:
        args["ref_logp"] = batch["ref_logp"]
    if spec.rollout_is is not None:
        mode, threshold = spec.rollout_is
        args["is_weights"] = losses.rollout_is_weights(batch["old_logp"], batch["sampler_logp"],
                                                       mask, mode=mode, threshold=threshold)
    fn = functools.partial(losses.get(m), **hp)
    tokens = jnp.sum((mask > 0).astype(jnp.float32))
    if spec.aggregation == "per_rollout":
        loss, metrics = losses.per_rollout(fn)(rollout_denominator=spec.minibatch_rows, **args)
        weight = jnp.sum(jnp.any(mask > 0, axis=-1).astype(jnp.float32))   # live rollouts
    elif spec.aggregation == "reference_micro_batch":
        loss, metrics = losses.micro_batch(fn)(rollout_denominator=spec.minibatch_rows, **args)
        weight = tokens         # its metrics are the loss function's, over the micro-batch
    else:
        loss, metrics = fn(**args)
        loss = loss * tokens / jnp.maximum(token_total, 1.0)
        weight = tokens
    return loss, dict(metrics, _weight=weight)


@jax.jit
def zero_grads(params):
    """An fp32 gradient accumulator shaped (and sharded) like `params`."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"), donate_argnames=("grads",))
def accumulate_grads(graphdef, params, grads, batch, teacher, token_total, *, spec: StepSpec):
    """grads + d(micro-batch loss)/d(params); token_total: the mini-batch's response tokens
    (the batch-aggregation denominator).  Returns (grads, metrics incl. loss and _weight)."""
    (loss, metrics), g = jax.value_and_grad(_loss, has_aux=True)(
        params, graphdef, batch, teacher, token_total, spec)
    grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
    return grads, dict(metrics, loss=loss)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def apply_grads(state: state_lib.TrainState, grads, lr, nan_grad, *, spec: StepSpec):
    """The mini-batch's optimizer step from its accumulated gradient (clip, AdamW, skip a
    non-finite norm, teacher EMA / snapshot).  `nan_grad` (bool) injects a NaN (tests)."""
    grads = jax.tree.map(lambda g: jnp.where(nan_grad, jnp.nan, g), grads)
    state, gnorm = state_lib.apply_update(
        state, grads, spec.tx, lr, teacher_mode=spec.teacher_mode, ema_decay=spec.ema_decay,
        sync_interval=spec.sync_interval)
    return state, dict(grad_norm=gnorm, lr=jnp.asarray(lr, jnp.float32))


def combine_metrics(per_micro_batch: list[dict]) -> dict:
    """One mini-batch's metrics from its micro-batches': the losses are shares of the
    mini-batch's loss and add up; every other metric reduces as `reductions` declares (counts
    add up, maxima take the largest, the loss function's means are weighted by the
    micro-batch's `_weight`: live rollouts under per-rollout aggregation, response tokens
    under batch and reference_micro_batch aggregation).  `_weight` stays, summed, for the
    mini-batch -> step reduction."""
    import numpy as np

    out = reductions.reduce([{k: v for k, v in m.items() if k != "loss"}
                             for m in per_micro_batch])
    out["loss"] = float(sum(float(np.asarray(m["loss"])) for m in per_micro_batch))
    return out
