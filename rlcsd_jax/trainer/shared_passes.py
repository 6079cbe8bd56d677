"""The trainer's scoring passes with shared prefixes (`train.share_teacher_prefixes`).

Student pass: old / reference log-probs and entropies of every rollout, its prompt computed once
per group (the prompt and its G responses packed as one shared-prefix piece).  Teacher pass: the method's teacher outputs of a mini-batch (`update.teacher_outputs`
computes the same thing from full rows), each distinct teacher prefix computed once and no
empty wrong-hint context computed.  Both return host arrays per rollout; the update's
micro-batches take their slices (`micro_batch_slice`).
"""

from __future__ import annotations

import functools

import numpy as np

from rlcsd_jax.distributed import multihost
from rlcsd_jax import scoring
from rlcsd_jax.trainer import batches as batches_lib
from rlcsd_jax.trainer import setup
from rlcsd_jax.trainer import shared_scoring as shared


def _runner(tr, params, **stat_kw):
    """The scoring function of `params` on the trainer's mesh, and its host <-> device moves."""
    spec = tr.spec
    kw = dict(chunk=spec.chunk, temperature=spec.temperature, **stat_kw)

    def score_fn(**arrays):
        return scoring.shared_prefix_stats(tr.graphdef, params, **arrays, **kw)
    return dict(score_fn=score_fn, put=tr.to_global,
                get=functools.partial(multihost.to_host_local, mesh=tr.mesh), pad_id=tr.pad_id)


def _plan(tr, rows):
    return shared.plan(rows, shards=setup.batch_devices_per_process(tr.mesh),
                       budget=tr.cfg.train.micro_batch_tokens)


def student_pass(tr, ro, rows: np.ndarray, params, *, width: int, top_k: int = 0,
                 entropy: bool = False):
    """Statistics of rollouts `rows` under `params`: dict of [n, width(, k)] host arrays, plus
    the plan's token counters."""
    plan = _plan(tr, shared.student_rows(ro, rows, batches_lib.prompt_ids))
    out = shared.run(plan, **_runner(tr, params, top_k=top_k, entropy=entropy))
    keys = ["logp"] + (["entropy"] if entropy else []) + (["topk_ids"] if top_k else [])
    arrays = {k: shared.per_rollout(plan, out, k, len(rows), 1, width,
                                    (top_k,) if k == "topk_ids" else ())[0] for k in keys}
    return arrays, plan.counters()


def teacher_pass(tr, ro, ctx, rows: np.ndarray, positions: np.ndarray, tparams, *,
                 width: int, student_ids=None):
    """The method's teacher outputs for a mini-batch's rollouts `rows` (positions in
    ctx.kept order), as host arrays [n, width, ...] keyed like `update.teacher_outputs`; plus
    the token counters and the prompt tokens truncated on the left."""
    cfg, spec = tr.cfg, tr.spec
    m, n = spec.method, len(rows)
    k_slots = batches_lib.num_wrong_slots(m, cfg.teacher.k_max)
    all_rows = shared.teacher_rows(ro, ctx, rows, positions, max_len=cfg.train.teacher_max_len)
    truncated = sum(len(ctx.correct_prompts[p]) + sum(len(w) for w in ctx.wrong_prompts[p])
                    for p in positions) - sum(len(r.prefix) for r in all_rows)
    correct = [r for r in all_rows if r.context == 0]
    wrong = [r for r in all_rows if r.context > 0]

    def score(rows_, **kw):
        plan = _plan(tr, rows_)
        at = kw.pop("at_ids", None)
        at_fn = None if at is None else (lambda i: at[plan.rows[i].rollout])
        return plan, shared.run(plan, at_ids=at_fn, **_runner(tr, tparams, **kw))

    def arrays(plan, out, key, contexts=1):
        trailing = () if key in ("logp", "entropy") else (spec.top_k,)
        return shared.per_rollout(plan, out, key, n, contexts, width, trailing)

    counters, ms = [], spec.method_spec
    if ms.student_topk:
        plan, out = score(correct, at_ids=student_ids, entropy=ms.teacher_entropy)
        counters.append(plan.counters())
        res = {"teacher_topk_logp": arrays(plan, out, "at_ids_logp")[0], "topk_ids": student_ids}
        if ms.teacher_entropy:
            res["teacher_entropy"] = arrays(plan, out, "entropy")[0]
    elif ms.teacher_scoring == "teacher_topk":
        plan, out = score(correct, top_k=spec.top_k)
        counters.append(plan.counters())
        res = {"teacher_topk_logp": arrays(plan, out, "topk_logp")[0],
               "topk_ids": arrays(plan, out, "topk_ids")[0]}
        if ms.wrong_hints == "one":       # the wrong context at the teacher's top-k ids
            plan, out = score(wrong, at_ids=res["topk_ids"])
            counters.append(plan.counters())
            res["teacher_wrong_topk_logp"] = arrays(plan, out, "at_ids_logp", 2)[1]
    else:
        plan, out = score(all_rows)
        counters.append(plan.counters())
        logp = arrays(plan, out, "logp", 1 + k_slots)
        if ms.wrong_hints == "none":
            res = {"teacher_logp": logp[0]}
        elif ms.wrong_hints == "one":
            res = {"teacher_correct_logp": logp[0], "teacher_wrong_logp": logp[1]}
        else:   # up to k_max wrong hints
            valid = np.zeros((n, k_slots), bool)
            for i, p in enumerate(positions):
                valid[i, :len(ctx.wrong_prompts[p])] = True
            res = {"teacher_correct_logp": logp[0],
                   "teacher_wrong_logp": np.moveaxis(logp[1:], 0, 1), "wrong_valid": valid}
    total = {k: sum(c[k] for c in counters) for k in counters[0]}
    return res, total, truncated


def micro_batch_slice(arrays: dict, rows: np.ndarray, local_rows: int, width: int) -> dict:
    """The rows `rows` of per-rollout host arrays, cut or zero-padded to `width` response
    positions and to `local_rows` rows (the micro-batch's block).  Arrays are [n, W], [n, W, k]
    or [n, K, W] (rlcsd's `teacher_wrong_logp`); `wrong_valid` [n, K] has no position axis."""
    out = {}
    for key, a in arrays.items():
        a = np.asarray(a)[rows]
        if key != "wrong_valid":
            axis = 2 if key == "teacher_wrong_logp" and a.ndim == 3 else 1   # rlcsd's [n, K, W]
            a = np.take(a, np.arange(min(width, a.shape[axis])), axis=axis)
            pad = [(0, 0)] * a.ndim
            pad[axis] = (0, width - a.shape[axis])
            a = np.pad(a, pad)
        block = np.zeros((local_rows, *a.shape[1:]), a.dtype)
        block[:len(rows)] = a
        out[key] = block
    return out
