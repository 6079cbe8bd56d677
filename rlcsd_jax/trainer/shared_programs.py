"""The scoring programs of the shared-prefix path (`train.share_teacher_prefixes`).

`shared_passes.teacher_pass` scores a mini-batch with `scoring.shared_prefix_stats`: one
shared-prefix row of W tokens per device block per call (each distinct prefix once, followed
by the responses scored under it), in the calls of `shared_scoring.plan`.  This module builds
it as `programs.Program`s for the planner and the trainer's start-up memory check, as
`programs.build` builds the full-row "score/teacher":

  * largest shape (memory): rows of the widest W (the budget's bucket, or teacher_max_len's
    when longer) with every token scored;
  * a typical twin (time): the same row width with the step's scored tokens per row, its
    `calls_per_step` = the step's useful tokens x the packing overhead / (blocks x W), and the
    attention tiles it computes (`tile_density`) from a row packed with mean-length groups.
    `SharedTypical` carries those numbers; benchmarks/teacher_tokens.py passes its simulated
    plans' own, `estimate_typical` derives them from the config's mean lengths.

The student passes (old and reference log-probs; sdpo / srpo's top-k) take the same program
over the student's rows, each prompt a prefix (`student_programs`).

Methods: rlcsd / rlsd / rlsd_ectr score log-probs of every valid context (one pass); opsd and
opsd_ectr's correct context its top-k, opsd_ectr's wrong context at those ids (a second pass,
"score/teacher_shared_wrong"); sdpo / srpo at the student's top-k ids (srpo with the entropy).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from rlcsd_jax import losses, scoring
from rlcsd_jax.models import flash
from rlcsd_jax.planner import flops
from rlcsd_jax.trainer import program_shapes as programs_lib
from rlcsd_jax.trainer import setup
from rlcsd_jax.trainer import shared_scoring

# Tokens of a teacher prompt beyond the student prompt and the hint's text: the teacher
# message's fixed sentences, the hint's answer line and the chat template (Qwen3: ~64).
TEMPLATE_TOKENS = 64
# Computed / used tokens of the packed rows (row ends, the last call's empty rows) on the
# simulated reference workload (benchmarks/teacher_tokens.py: 1.03-1.10 over 3 seeds, prefixes
# computed twice excluded); used when no simulation is given.
PACKING_OVERHEAD = 1.1
# Splash's query / key tile on v5p (`models.splash._BLOCKS`): the tile-density estimate's grain.
TILE = 512


@dataclasses.dataclass(frozen=True)
class SharedTypical:
    """A step's typical shared teacher scoring: calls per step (equivalent calls of one row per
    block of `width`), scored tokens per row, useful tokens and model FLOPs per call, and the
    share of attention tiles each pass computes."""

    width: int
    scored: int
    calls: float
    tokens: float
    model_flops: float
    tile_density: float
    source: str = "estimate"


def continuation_flops(mcfg, rows: int, prefix: int, t: int) -> float:
    """Model FLOPs of `rows` continuations of t tokens over a prefix of `prefix` tokens: body and
    LM head on the t tokens, attention of the last t queries of a causal row of prefix + t."""
    attn = flops.attention_flops(mcfg, 1, prefix + t) - flops.attention_flops(mcfg, 1, prefix)
    return rows * (2.0 * flops.body_matmul_params(mcfg) * t + 2.0 * flops.head_params(mcfg) * t
                   + attn)


def prefix_flops(mcfg, rows: int, width: int) -> float:
    return flops.forward_flops(mcfg, rows, width, head_tokens=0)


def largest_width(cfg) -> int:
    """The widest packed teacher row: the budget's, or one prefix + response of
    teacher_max_len's when longer."""
    return shared_scoring.widest_row(cfg.train.teacher_max_len, cfg.train.micro_batch_tokens)


def tile_density(segments: np.ndarray, prefix_q: np.ndarray, prefix_k: np.ndarray,
                 tile: int = TILE) -> float:
    """Mean share of (query tile, key tile) pairs the two passes of shared-prefix rows compute:
    causal and with intersecting segment-id ranges (`models.splash._skip_by_segments`).  Rows
    [R, W]; the tile is min(tile, W), which must divide W."""
    w = segments.shape[-1]
    tile = min(tile, w)
    if w % tile:
        raise ValueError(f"row width {w} is not a multiple of the {tile}-token tile")
    n = w // tile
    causal = np.tril(np.ones((n, n), bool))

    def ranges(x):
        b = np.asarray(x).reshape(-1, n, tile)
        return tuple(np.asarray(r) for r in flash.block_range(b, b != 0))

    def live(q_seg, k_seg):
        q_lo, q_hi = ranges(q_seg)
        k_lo, k_hi = ranges(k_seg)
        meet = (k_lo[:, None, :] <= q_hi[:, :, None]) & (k_hi[:, None, :] >= q_lo[:, :, None])
        return (meet & causal).mean()

    return float((live(segments, segments) + live(prefix_q, prefix_k)) / 2)


def _mean_row(width: int, prefix: int, response: int, per_prefix: int) -> dict:
    """`shared_scoring.call_arrays` of one row of `width` filled with groups of a `prefix`-token
    prefix and up to `per_prefix` responses of `response` tokens (the typical layout)."""
    rows, members, used = [], [], 0
    while used + prefix + response <= width:
        fit = min(per_prefix, (width - used - prefix) // response)
        ids = list(range(len(rows), len(rows) + fit))
        key = (len(members) + 1,) * prefix
        rows += [shared_scoring.Row(i, 0, key, (1,) * response) for i in ids]
        members.append(shared_scoring.Piece(key, ids))
        used += prefix + fit * response
    scored = shared_scoring.scored_width(max(len(rows) * response, 1), width)
    p = shared_scoring.Plan(rows, [shared_scoring.Call([members], scored)], 1, width)
    return shared_scoring.call_arrays(p.calls[0], p, 0)[0]


def _estimate(cfg, mcfg, shards: int, sh: programs_lib.Shapes, *, prefixes: int, rows: int,
              mean_p: int, mean_r: int) -> SharedTypical:
    """Typical shared-prefix calls of a step with `prefixes` distinct prefixes of `mean_p`
    tokens and `rows` responses of `mean_r` tokens scored after them: a group longer than a
    row is cut into pieces that each repeat the prefix (`shared_scoring.pieces`), rows packed
    at PACKING_OVERHEAD, the tile density of a row filled with mean-length pieces."""
    useful = prefixes * mean_p + rows * mean_r
    per_minibatch = useful / sh.minibatches / shards
    width = shared_scoring.row_width(mean_p + mean_r, int(per_minibatch),
                                     cfg.train.micro_batch_tokens)
    per_prefix = max(1, round(rows / prefixes))
    per_piece = max(1, min(per_prefix, (width - mean_p) // max(mean_r, 1)))
    computed = prefixes * -(-per_prefix // per_piece) * mean_p + rows * mean_r
    calls = computed * PACKING_OVERHEAD / (shards * width)
    layout = _mean_row(width, mean_p, mean_r, per_piece)
    flops = prefix_flops(mcfg, prefixes, mean_p) + continuation_flops(mcfg, rows, mean_p, mean_r)
    return SharedTypical(
        width=width, scored=int(layout["targets"].shape[1]), calls=calls, tokens=useful / calls,
        model_flops=flops / calls,
        tile_density=tile_density(layout["segment_ids"][None], layout["prefix_q_seg"][None],
                                  layout["prefix_k_seg"][None]),
        source="estimate from the mean lengths")


def _mean_prompt(cfg, sh: programs_lib.Shapes) -> int:
    # the typical prompt step_shapes assumes (a quarter of max_prompt_len by default)
    return getattr(sh, "mean_prompt_len", 0) or max(cfg.data.max_prompt_len // 4, 1)


def estimate_typical(cfg, mcfg, shards: int, sh: programs_lib.Shapes) -> SharedTypical:
    """A step's typical shared teacher scoring from the config's mean lengths, without a
    workload: every rollout kept with every context valid, each of the G rollouts of a group a
    hint (self-rollout methods; one ground-truth prefix per group otherwise), a teacher prefix
    = mean prompt + TEMPLATE_TOKENS + a mean response."""
    rows = sh.prompts * sh.group
    self_rollout = losses.METHODS[cfg.method].teacher_context == "self_rollout"
    prefixes = rows if self_rollout else sh.prompts
    mean_p = min(_mean_prompt(cfg, sh) + TEMPLATE_TOKENS + sh.mean_response_len,
                 cfg.train.teacher_max_len - 1)
    return _estimate(cfg, mcfg, shards, sh, prefixes=prefixes, rows=rows * sh.teacher_contexts,
                     mean_p=mean_p, mean_r=sh.mean_response_len)


def estimate_student_typical(cfg, mcfg, shards: int, sh: programs_lib.Shapes) -> SharedTypical:
    """The student pass's typical calls: each prompt once, its G responses after it."""
    return _estimate(cfg, mcfg, shards, sh, prefixes=sh.prompts, rows=sh.prompts * sh.group,
                     mean_p=_mean_prompt(cfg, sh), mean_r=sh.mean_response_len)


def _passes(method: str, top_k: int) -> list[tuple[str, dict, bool, float]]:
    """(name suffix, static keywords, takes at_ids, share of the step's teacher rows) of each
    scoring pass of `method` (as `shared_passes.teacher_pass` runs them)."""
    ms = losses.METHODS[method]
    if ms.student_topk:
        return [("", dict(entropy=ms.teacher_entropy), True, 1.0)]
    if ms.teacher_scoring == "teacher_topk" and ms.wrong_hints == "one":
        return [("", dict(top_k=top_k), False, 0.5), ("_wrong", {}, True, 0.5)]
    if ms.teacher_scoring == "teacher_topk":
        return [("", dict(top_k=top_k), False, 1.0)]
    return [("", {}, False, 1.0)]


def _programs(rs, passes, *, graphdef, spec, shards: int, width: int, typ: SharedTypical,
              resident) -> list[programs_lib.Program]:
    """One program per pass (name, params, static keywords, takes at_ids, share of the step's
    calls): the largest shape (rows of `width`, every token scored) with its typical twin."""
    mesh, mcfg = rs.mesh, rs.model_config
    b = lambda shape: programs_lib.batch_array(shape, jnp.int32, mesh)  # noqa: E731

    def program(name, params, kw, takes_ids, share, width, scored, typical_shape):
        rows = b((shards, width))
        at = programs_lib.batch_array((shards, scored, spec.top_k), jnp.int32, mesh) \
            if takes_ids else None
        kwargs = dict(chunk=spec.chunk, temperature=spec.temperature, **kw,
                      tile_density=typ.tile_density if typical_shape else None)
        if typical_shape:
            calls, tokens, model = typ.calls * share, typ.tokens, typ.model_flops
        else:
            calls, tokens = typ.calls * share, shards * width
            model = continuation_flops(mcfg, shards, 0, width)
        return programs_lib.Program(
            name, "score", scoring.shared_prefix_stats,
            (graphdef, params, rows, rows, rows, rows, rows, b((shards, scored)),
             b((shards, scored)), at), kwargs, calls, tokens, model,
            what=f"{shards} shared-prefix rows (1 per block) x {width} tokens, {scored} scored"
                 + (f", attention tiles {typ.tile_density:.3f}" if typical_shape else ""),
            resident=resident, is_typical=typical_shape)

    out = []
    for name, params, kw, takes_ids, share in passes:
        big = program(name, params, kw, takes_ids, share, width, width, False)
        big.typical = program(name, params, kw, takes_ids, share, typ.width, typ.scored, True)
        out.append(big)
    return out


def teacher_programs(rs: programs_lib.RunSetup, *, graphdef, state, spec, shards: int,
                     sh: programs_lib.Shapes,
                     typical: SharedTypical | None = None) -> list[programs_lib.Program]:
    """The shared path's teacher-scoring programs, largest shapes with their typical twins:
    "score/teacher_shared" (opsd_ectr also "score/teacher_shared_wrong").  `state` is the
    abstract TrainState, `shards` the batch devices (data x fsdp)."""
    cfg = rs.cfg
    typ = typical or estimate_typical(cfg, rs.model_config, shards, sh)
    tparams = state.params if spec.teacher_mode == "fixed" else state.teacher
    resident = (state.opt_state, state.ref,
                state.teacher if spec.teacher_mode == "fixed" else state.params)
    passes = [(f"score/teacher_shared{suffix}", tparams, kw, takes_ids, share)
              for suffix, kw, takes_ids, share in _passes(spec.method, spec.top_k)]
    return _programs(rs, passes, graphdef=graphdef, spec=spec, shards=shards,
                     width=largest_width(cfg), typ=typ, resident=resident)


def student_programs(rs: programs_lib.RunSetup, *, graphdef, state, spec, shards: int,
                     sh: programs_lib.Shapes, need_ref: bool,
                     typical: SharedTypical | None = None) -> list[programs_lib.Program]:
    """The shared student passes `Trainer._shared_old_logprobs` runs (each prompt once, its G
    responses after it): "score/student_shared" (old log-probs and entropies), with a
    reference model "score/ref_shared", for sdpo / srpo "score/student_topk_shared"."""
    cfg = rs.cfg
    typ = typical or estimate_student_typical(cfg, rs.model_config, shards, sh)
    # the static keywords `shared_passes.student_pass` gives
    passes = [("score/student_shared", state.params, dict(top_k=0, entropy=True), False, 1.0)]
    if need_ref:
        passes.append(("score/ref_shared", state.ref, dict(top_k=0, entropy=False), False, 1.0))
    if spec.method_spec.student_topk:
        passes.append(("score/student_topk_shared", state.params,
                       dict(top_k=spec.top_k, entropy=False), False, 1.0))
    width = shared_scoring.widest_row(cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
                                      cfg.train.micro_batch_tokens)
    return _programs(rs, passes, graphdef=graphdef, spec=spec, shards=shards, width=width,
                     typ=typ, resident=(state.opt_state, state.teacher, state.ref))


def standalone(rs: programs_lib.RunSetup, *, mean_response_len: int | None = None,
               typical: SharedTypical | None = None,
               shapes: programs_lib.Shapes | None = None) -> list[programs_lib.Program]:
    """`teacher_programs` of a run outside `programs.build` (the abstract train state and the
    step's shapes made as build makes them)."""
    cfg, mesh = rs.cfg, rs.mesh
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    sh = shapes or programs_lib.step_shapes(cfg, shards, mean_response_len)
    spec = setup.step_spec(cfg, sh.response_len)
    graphdef, params = programs_lib.abstract_params(rs.model_config, mesh)
    state = programs_lib.abstract_state(params, spec, spec.need_ref, mesh)
    return teacher_programs(rs, graphdef=graphdef, state=state, spec=spec, shards=shards, sh=sh,
                            typical=typical)
