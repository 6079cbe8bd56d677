"""The teacher-scoring programs of the shared-prefix path (`train.share_teacher_prefixes`).

`shared_passes.teacher_pass` scores a mini-batch with two jitted functions: `scoring_prefix.
prefix_kv` (each distinct teacher prefix once, N per device block, left padded to width P) and
`scoring_prefix.continuation_stats` (r responses per block of width T over their cached prefix),
in the units and calls of `shared_scoring.plan`.  This module builds them as `programs.Program`s
for the planner and the trainer's start-up memory check, as `programs.build` builds the full-row
"score/teacher":

  * largest shapes (memory): one prefix per block at the widest prefix bucket,
    bucket(teacher_max_len - 1) (one prefix of at least the budget runs alone in its batch); one
    row per block with a response at the cap's bucket over that prefix.  This bounds a step's
    calls only when every unit has N x P <= max(budget, P): see benchmarks/RESULTS.md (issue 19)
    for the units `shared_scoring.plan` forms today, which can exceed it;
  * a typical twin (time): a representative unit / call shape with `calls_per_step` counted in
    equivalent calls (the step's padded work / one call's), given as `SharedTypical` (the
    simulation in benchmarks/teacher_tokens.py passes the plan's own numbers) or estimated from
    the config's mean lengths (`estimate_typical`).

Methods: rlcsd / rlsd / rlsd_ectr score log-probs of every valid context (one continuation
program); opsd and opsd_ectr's correct context its top-k, opsd_ectr's wrong context at those ids;
sdpo / srpo at the student's top-k ids (srpo with the entropy).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from rlcsd_jax import scoring_prefix
from rlcsd_jax.data.packing import bucket_length, default_bucket
from rlcsd_jax.trainer import batches as batches_lib
from rlcsd_jax.trainer import programs as programs_lib

# Tokens of a teacher prompt beyond the student prompt and the hint's text: the teacher
# message's fixed sentences, the hint's answer line and the chat template (Qwen3: ~64).
TEMPLATE_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class CallShape:
    """One kind of call at a representative shape and how many of them a step runs.

    per_block: prefixes (prefix_kv) or rows (continuation_stats) per device block;
    prefix_width: P; response_width: T (continuation only, else 0);
    calls: equivalent calls per step (the step's padded model FLOPs of this kind over one
      call's); tokens: useful tokens per equivalent call (real prefix / response tokens);
    model_flops: useful model FLOPs per equivalent call."""

    per_block: int
    prefix_width: int
    response_width: int
    calls: float
    tokens: float
    model_flops: float


@dataclasses.dataclass(frozen=True)
class SharedTypical:
    """The typical prefix and continuation calls of a step (one CallShape per kind; a method
    with two continuation passes, opsd_ectr, shares the rows between them)."""

    prefix: CallShape
    continuation: CallShape
    source: str = "estimate"


def continuation_flops(mcfg, rows: int, prefix: int, t: int) -> float:
    """Model FLOPs of `rows` continuations of t tokens over a prefix of `prefix` tokens: body and
    LM head on the t tokens, attention of the last t queries of a causal row of prefix + t."""
    from rlcsd_jax.planner import flops

    attn = flops.attention_flops(mcfg, 1, prefix + t) - flops.attention_flops(mcfg, 1, prefix)
    return rows * (2.0 * flops.body_matmul_params(mcfg) * t + 2.0 * flops.head_params(mcfg) * t
                   + attn)


def prefix_flops(mcfg, rows: int, width: int) -> float:
    from rlcsd_jax.planner import flops

    return flops.forward_flops(mcfg, rows, width, head_tokens=0)


def largest_prefix_width(cfg) -> int:
    """The widest prefix batch: a prompt of teacher_max_len - 1 tokens (one response token)."""
    buckets = tuple(cfg.train.teacher_buckets) or None
    return bucket_length(max(cfg.train.teacher_max_len - 1, 1), buckets)


def largest_response_width(cfg) -> int:
    """Continuation widths take the default bucket rule (`shared_scoring._calls`)."""
    return default_bucket(cfg.rollout.max_new_tokens)


def estimate_typical(cfg, mcfg, shards: int, sh: programs_lib.Shapes) -> SharedTypical:
    """A step's typical shared teacher scoring from the config's mean lengths, without a
    workload: every rollout kept with every context valid, each of the G rollouts of a group a
    hint (self-rollout methods; one ground-truth prefix per group otherwise), a teacher prefix
    = mean prompt + TEMPLATE_TOKENS + a mean response; batches filled to the token budget."""
    budget = cfg.train.micro_batch_tokens
    buckets = tuple(cfg.train.teacher_buckets) or None
    m = cfg.method
    rows = sh.prompts * sh.group
    contexts = rows * sh.teacher_contexts
    prefixes = rows if m in batches_lib.SELF_ROLLOUT_METHODS else sh.prompts
    # the typical prompt step_shapes assumes (a quarter of max_prompt_len by default)
    mean_prompt = getattr(sh, "mean_prompt_len", 0) or max(cfg.data.max_prompt_len // 4, 1)
    mean_p = min(mean_prompt + TEMPLATE_TOKENS + sh.mean_response_len,
                 cfg.train.teacher_max_len - 1)
    # per mini-batch (the trainer plans each one), per device block
    per_block_prefixes = -(-prefixes // (sh.minibatches * shards))
    per_block_contexts = -(-contexts // (sh.minibatches * shards))
    p = bucket_length(mean_p, buckets)
    n = min(max(1, budget // p), programs_lib._pow2(per_block_prefixes))
    t = default_bucket(sh.mean_response_len)
    r = min(max(1, budget // (p + t)), programs_lib._pow2(per_block_contexts))
    prefix_calls = prefixes / (n * shards)
    cont_calls = contexts / (r * shards)
    return SharedTypical(
        prefix=CallShape(n, p, 0, prefix_calls, prefixes * mean_p / prefix_calls,
                         prefix_flops(mcfg, prefixes, mean_p) / prefix_calls),
        continuation=CallShape(r, p, t, cont_calls, contexts * sh.mean_response_len / cont_calls,
                               continuation_flops(mcfg, contexts, mean_p, sh.mean_response_len)
                               / cont_calls),
        source="estimate from the mean lengths")


def _passes(method: str, top_k: int) -> list[tuple[str, dict, bool, float]]:
    """(name suffix, static keywords, takes at_ids, share of the step's teacher rows) of each
    continuation pass of `method` (as `shared_passes.teacher_pass` runs them)."""
    if method in ("sdpo", "srpo"):
        return [("", dict(entropy=method == "srpo"), True, 1.0)]
    if method == "opsd":
        return [("", dict(top_k=top_k), False, 1.0)]
    if method == "opsd_ectr":
        return [("", dict(top_k=top_k), False, 0.5), ("_wrong", {}, True, 0.5)]
    return [("", {}, False, 1.0)]


def teacher_programs(rs: programs_lib.RunSetup, *, graphdef, state, spec, shards: int,
                     sh: programs_lib.Shapes, lower_dependent,
                     typical: SharedTypical | None = None) -> list[programs_lib.Program]:
    """The shared path's teacher-scoring programs, largest shapes with their typical twins:
    "score/teacher_prefix" (prefix_kv) and "score/teacher_continuation" (continuation_stats;
    opsd_ectr also "score/teacher_continuation_wrong").  `state` is the abstract TrainState,
    `shards` the batch devices (data x fsdp), lower_dependent(program) -> its abstract outputs
    (the prefix cache the continuations take)."""
    cfg, mesh, mcfg = rs.cfg, rs.mesh, rs.model_config
    typ = typical or estimate_typical(cfg, mcfg, shards, sh)
    tparams = state.params if spec.teacher_mode == "fixed" else state.teacher
    resident = (state.opt_state, state.ref,
                state.teacher if spec.teacher_mode == "fixed" else state.params)
    b = lambda shape, dtype=jnp.int32: programs_lib.batch_array(shape, dtype, mesh)  # noqa: E731

    def prefix_program(per_block, width, typical_shape: CallShape | None):
        rows = shards * per_block
        ids = b((rows, width))
        if typical_shape is None:
            calls, tokens = typ.prefix.calls, rows * width
            model = prefix_flops(mcfg, rows, width)
        else:
            calls, tokens = typical_shape.calls, typical_shape.tokens
            model = typical_shape.model_flops
        return programs_lib.Program(
            "score/teacher_prefix", "score", scoring_prefix.prefix_kv,
            (graphdef, tparams, ids, ids), {}, calls, tokens, model,
            what=f"{rows} prefixes ({per_block} per block) x {width} tokens -> KV",
            resident=resident, is_typical=typical_shape is not None)

    big_p = prefix_program(1, largest_prefix_width(cfg), None)
    big_p.typical = prefix_program(typ.prefix.per_block, typ.prefix.prefix_width, typ.prefix)
    out = [big_p]
    cache_big, cache_typ = lower_dependent(big_p), lower_dependent(big_p.typical)

    def continuation_program(suffix, kw, takes_ids, share, cache, prefix_width, per_block,
                             width, typical_shape: CallShape | None):
        rows = shards * per_block
        at = b((rows, width, spec.top_k)) if takes_ids else None
        kwargs = dict(shards=shards, chunk=spec.chunk, temperature=spec.temperature, **kw)
        if typical_shape is None:
            calls, tokens = typ.continuation.calls * share, rows * width
            model = continuation_flops(mcfg, rows, prefix_width, width)
        else:
            calls = typical_shape.calls * share
            tokens, model = typical_shape.tokens, typical_shape.model_flops
        return programs_lib.Program(
            f"score/teacher_continuation{suffix}", "score", scoring_prefix.continuation_stats,
            (graphdef, tparams, cache, b((rows,)), b((rows, width)), b((rows, width)), at),
            kwargs, calls, tokens, model,
            what=f"{rows} rows ({per_block} per block) x {width} tokens over prefixes of "
                 f"{prefix_width}", resident=resident, is_typical=typical_shape is not None)

    c = typ.continuation
    for suffix, kw, takes_ids, share in _passes(spec.method, spec.top_k):
        big = continuation_program(suffix, kw, takes_ids, share, cache_big,
                                   big_p.args[2].shape[1], 1, largest_response_width(cfg), None)
        big.typical = continuation_program(suffix, kw, takes_ids, share, cache_typ,
                                           typ.prefix.prefix_width, c.per_block,
                                           c.response_width, c)
        out.append(big)
    return out


def standalone(rs: programs_lib.RunSetup, *, mean_response_len: int | None = None,
               typical: SharedTypical | None = None, lower_dependent=None,
               shapes: programs_lib.Shapes | None = None) -> list[programs_lib.Program]:
    """`teacher_programs` of a run outside `programs.build` (the abstract train state and the
    step's shapes made as build makes them); default lower_dependent: `programs.like_outputs`."""
    from rlcsd_jax.trainer import setup

    cfg, mesh = rs.cfg, rs.mesh
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    sh = shapes or programs_lib.step_shapes(cfg, shards, mean_response_len)
    spec = setup.step_spec(cfg, sh.response_len)
    need_ref = dict(spec.hparams).get("kl_coef", 0.0) > 0
    graphdef, params = programs_lib.abstract_params(rs.model_config, mesh)
    state = programs_lib.abstract_state(params, spec, need_ref, mesh)
    if lower_dependent is None:
        def lower_dependent(p):
            return programs_lib.like_outputs(p.fn, p.args, p.kwargs, mesh)
    return teacher_programs(rs, graphdef=graphdef, state=state, spec=spec, shards=shards, sh=sh,
                            lower_dependent=lower_dependent, typical=typical)
