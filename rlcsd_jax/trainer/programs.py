"""The jitted programs one training step runs, at the config's largest shapes, as abstract inputs.

The planner (`python -m rlcsd_jax.plan`) compiles these for a TPU slice it does not have; the
trainer compiles the same list on its real devices at start-up and checks each program's memory
against the device before it samples anything.  Both lower the trainer's own functions
(the rollout engine's `inference.programs.prefill_jit` / `decode_jit`, or with
`engine.enabled=False` the static sampler's `sampling.prefill_jit` / `decode_jit`;
`update.teacher_outputs`, `update.update`, ...) with the static arguments the trainer passes
(`setup.step_spec`, `setup.engine_options`, `sampling.make_static`), so what the planner reports
is what the trainer will run.

Shapes are the worst case of a step: prompts at the largest prompt bucket, responses at the
response cap, teacher rows at the largest teacher bucket, a full mini-batch.  Everything is a
`jax.ShapeDtypeStruct` with its sharding: no weights exist and nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from rlcsd_jax import sampling
from rlcsd_jax.inference import paged_attention
from rlcsd_jax.inference import pages
from rlcsd_jax.inference import plan as engine_plan
from rlcsd_jax.inference import programs as engine_programs
from rlcsd_jax.models.config import SLIDING
from rlcsd_jax.planner import flops
from rlcsd_jax.trainer import setup
from rlcsd_jax.trainer import shared_programs
from rlcsd_jax.trainer import update as update_lib
# The program list's building blocks, re-exported: `programs.Program`, `programs.step_shapes`, ...
from rlcsd_jax.trainer.program_shapes import (  # noqa: F401
    DecodeFloor, MicroShape, PHASES, Program, RunSetup, Shapes, _sds, abstract_params,
    abstract_state, batch_array, bytes_of, like_outputs, run_setup, step_shapes,
    student_batch_spec, teacher_batch_spec, with_dtype)


def _generate_programs(rs: RunSetup, graphdef, params_c, name: str, phase: str, prompts: int,
                       width: int, samples: int, options, max_new: int, calls: float,
                       mean_new: float, lower_dependent: Callable, resident) -> list[Program]:
    mesh, mcfg = rs.mesh, rs.model_config
    static = sampling.make_static(max_new_tokens=max_new, num_samples=samples, options=options,
                                  eos_ids=rs.eos_ids, pad_id=rs.pad_id, mesh=mesh)
    ids = batch_array((prompts, width), jnp.int32, mesh)
    key = _sds((), jax.eval_shape(lambda: jax.random.key(0)).dtype, mesh)
    prefill = Program(
        f"{name}/prefill", phase, sampling.prefill_jit, (graphdef, params_c, ids, ids, key, static),
        {}, calls, prompts * width, flops.forward_flops(mcfg, prompts, width, head_tokens=1),
        what=f"{prompts} prompts x {width} tokens -> {prompts * samples} rows",
        resident=resident)
    state = lower_dependent(prefill)
    rows = prompts * samples
    cache = width + max_new
    decode = Program(
        f"{name}/decode", phase, sampling.decode_jit, (graphdef, params_c, state, static), {},
        calls, rows * mean_new, flops.decode_flops(mcfg, rows, cache) * max_new,
        loop_trips=max_new - 1,
        what=f"{rows} rows x {cache} cache slots, {max_new - 1} steps", resident=resident)
    return [prefill, decode]


# ----------------------------------------------------------------------------------------------
# The rollout engine's programs (cfg.engine.enabled)
# ----------------------------------------------------------------------------------------------

# Busy fraction of the slot-steps of a job with more rows than slots: the engine refills a slot
# as soon as its row ends, so on a long-tailed workload ~95% of slot-steps are useful
# (docs/engine.md measures 96.5%; the last rows' tail is the rest).
BUSY_FRACTION = 0.95


def _pow4(n: int) -> int:
    """The engine's prefill row bucket per shard (`Engine._prefill`)."""
    p = 1
    while p < n:
        p *= 4
    return p


def device_bytes(tree) -> float:
    """Bytes one device holds of the (abstract or real) arrays in `tree`."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            continue                        # static arguments (graphdef, spec, ...)
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return float(total)


@dataclasses.dataclass(frozen=True)
class EngineShape:
    """How the engine runs one generation job of `prompts` x `samples` rows (global counts)."""

    prompts: int
    samples: int
    width: int                   # prompt bucket
    max_new: int
    slots: int                   # decode slots (engine_options' max_slots, shard multiple)
    shards: int
    page_size: int
    steps_per_call: int
    pages_per_shard: int
    kv_budget_tokens: int | None     # engine_options' (None: every slot at the longest row)
    prefill_prompts: int             # prompts prefilled by the first admission wave
    prefill_rows: int                # rows of that prefill call over all shards (pow4 per shard)
    mean_prompt: float
    mean_new: float

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    @property
    def max_pages(self) -> int:
        return -(-(self.width + self.max_new - 1) // self.page_size)

    @property
    def row_pages(self) -> int:
        """Pages a row of the prompt bucket needs alone (`engine.check_prompts`)."""
        shared = 1 if self.samples > 1 and self.width % self.page_size else 0
        return self.max_pages + shared

    def pool_refusal(self, mcfg, mesh) -> str | None:
        """Why the engine would refuse the job (its pool cannot hold one longest row), or None."""
        if self.pages_per_shard >= self.row_pages:
            return None
        per_token = live_kv_bytes(mcfg, mesh, 1)          # one token, every layer, per device
        size = self.pages_per_shard * self.page_size * per_token
        size = f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"
        return (f"the KV page pool left to the engine ({self.pages_per_shard} pages of "
                f"{self.page_size} tokens per batch shard, {size} per device) cannot "
                f"hold one row of {self.width} prompt + {self.max_new} new tokens "
                f"({self.row_pages} pages): the engine would refuse the job")

    @property
    def mean_kv_len(self) -> float:
        """Live KV tokens of a decoding slot on average: the prompt and half its response."""
        return self.mean_prompt + self.mean_new / 2

    @property
    def decode_calls(self) -> float:
        """Expected decode calls per job.  A job with more rows than slots refills slots as rows
        end (`BUSY_FRACTION` of slot-steps useful); one that fits in one wave keeps its slots
        until its longest row ends, which in a long-tailed batch of many rows is the cap.  Both
        at least the cap's worth of steps (the last row)."""
        useful = self.rows * self.mean_new
        busy = useful / (BUSY_FRACTION * self.slots * self.steps_per_call)
        tail = self.max_new / self.steps_per_call
        return float(math.ceil(max(busy if self.rows > self.slots else 0.0, tail)))


def engine_shape(cfg, mcfg, mesh, *, prompts: int, samples: int, width: int, max_new: int,
                 mean_prompt: float, mean_new: float, free_bytes: float | None) -> EngineShape:
    """The engine's sizes for a job, as `Engine.__init__` derives them from
    `setup.engine_options(cfg, mcfg, mesh, free_bytes, rows)`: slots, and the pool capped at
    every slot at the longest row (+ a shared partial page), otherwise from kv_budget_tokens.
    The first admission wave takes min(prompts, slots // G) prompts (each prefilled once for its
    G samples) spread over the shards, rows per shard rounded up to a power of 4."""
    rows = prompts * samples
    opts = setup.engine_options(cfg, mcfg, mesh, free_bytes, rows)
    shards = pages.batch_shards(mesh)
    slots = -(-int(opts["max_slots"]) // shards) * shards
    ps = int(opts["page_size"])
    max_pages = -(-(width + max_new - 1) // ps)
    per_shard = slots * (max_pages + 1) // shards
    budget = opts["kv_budget_tokens"]
    if budget is not None:
        per_shard = min(per_shard, pages.pages_per_shard(budget, ps, shards))
    first = max(1, min(prompts, slots // samples))
    return EngineShape(
        prompts=prompts, samples=samples, width=width, max_new=max_new, slots=slots,
        shards=shards, page_size=ps, steps_per_call=int(opts["steps_per_call"]),
        pages_per_shard=per_shard, kv_budget_tokens=budget, prefill_prompts=first,
        prefill_rows=shards * _pow4(-(-first // shards)), mean_prompt=float(mean_prompt),
        mean_new=float(mean_new))


def live_kv_bytes(mcfg, mesh, kv_len: float) -> float:
    """KV bytes one slot's decode step reads on its device at `kv_len` live tokens: every layer's
    k and v (sliding layers at most the window), kv heads split over 'tensor' when they divide."""
    kv = mcfg.num_kv_heads
    if paged_attention.head_axis(mesh, kv):
        kv //= mesh.shape["tensor"]
    per_token = 2 * kv * mcfg.head_dim * jnp.dtype(mcfg.dtype).itemsize
    return float(sum(per_token * (min(kv_len, mcfg.sliding_window) if kind == SLIDING
                                  else kv_len) for kind in mcfg.layer_types))


def _engine_programs(rs: RunSetup, graphdef, params_c, name: str, phase: str, es: EngineShape,
                     options, resident) -> list[Program]:
    """The engine's prefill (first admission wave) and decode (`steps_per_call` steps of every
    slot) programs of one generation job, lowered from `inference.plan.abstract_args` with the
    trainer's compute-dtype parameters.  The page-copy program (a few pages) is left out."""
    mesh, mcfg = rs.mesh, rs.model_config
    args = engine_plan.abstract_args(
        mcfg, mesh, max_slots=es.slots, num_pages=es.shards * es.pages_per_shard,
        page_size=es.page_size, steps_per_call=es.steps_per_call, prompt_bucket=es.width,
        max_seq_len=es.width + es.max_new, prefill_rows=es.prefill_rows,
        num_samples=es.samples, options=options, eos_ids=rs.eos_ids, pad_id=rs.pad_id,
        graphdef=graphdef, params=params_c)
    pool = (f"pool {es.shards} x {es.pages_per_shard} pages of {es.page_size} "
            f"({es.shards * es.pages_per_shard * es.page_size} tokens)")
    refusal = es.pool_refusal(mcfg, mesh)
    prefill = Program(
        f"{name}/prefill", phase, engine_programs.prefill_jit, args["prefill"], {},
        # the first wave's call; later prompts are admitted as slots free up, counted here in
        # equivalent full calls (their padding to a power of 4 is not counted)
        es.prompts / es.prefill_prompts, es.prefill_rows * es.width,
        flops.forward_flops(mcfg, es.prefill_rows, es.width, head_tokens=1),
        what=f"{es.prefill_prompts} prompts ({es.prefill_rows} rows) x {es.width} tokens -> "
             f"{es.prefill_prompts * es.samples} slots; {pool}",
        resident=resident, refusal=refusal)
    calls = es.decode_calls
    useful = es.rows * es.mean_new / calls            # generated tokens per call
    slots_dev = es.slots // es.shards
    floor = DecodeFloor(device_bytes(params_c), slots_dev,
                        live_kv_bytes(mcfg, mesh, es.mean_kv_len), es.steps_per_call)
    decode = Program(
        f"{name}/decode", phase, engine_programs.decode_jit, args["decode"], {}, calls, useful,
        flops.decode_flops(mcfg, useful, es.mean_kv_len), loop_trips=es.steps_per_call,
        what=f"{es.slots} slots x {es.steps_per_call} steps, table {es.max_pages} pages, "
             f"mean live KV {es.mean_kv_len:.0f} tokens; {es.rows} rows x mean "
             f"{es.mean_new:.0f} new tokens in {calls:.0f} calls; {pool}",
        resident=resident, mean_kv_len=es.mean_kv_len, decode_floor=floor, refusal=refusal)
    return [prefill, decode]


def build(rs: RunSetup, *, mean_response_len: int | None = None,
          lower_dependent: Callable | None = None, shapes: Shapes | None = None,
          memory_per_device: float | None = None) -> list[Program]:
    """Every program of a training step and of an evaluation, in the order the trainer runs them.

    Scoring and update programs are built at their largest micro-batch (memory); each carries a
    `typical` twin at the mean lengths whose cost the planner uses for the time estimate.
    lower_dependent(program) -> the abstract outputs of `program` to feed the next one (the
    planner passes the compiled programs' own output shardings; default: `like_outputs`).
    shapes: default `step_shapes(cfg, ...)`.
    memory_per_device: the device budget; with the rollout engine (cfg.engine.enabled) its page
    pool is sized, as the trainer sizes it when sampling starts, from what is left of it after
    the train state and the compute-dtype copy of the weights (`setup.engine_options`); None =
    the engine's default (every slot can hold the longest row).
    """
    cfg, mesh, mcfg = rs.cfg, rs.mesh, rs.model_config
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    sh = shapes or step_shapes(cfg, devices, mean_response_len)
    spec = setup.step_spec(cfg, sh.response_len)
    need_ref = spec.need_ref
    graphdef, params = abstract_params(mcfg, mesh)
    params_c = with_dtype(params, cfg.model.dtype)
    if lower_dependent is None:
        def lower_dependent(p):
            return like_outputs(p.fn, p.args, p.kwargs, mesh)

    state = abstract_state(params, spec, need_ref, mesh)
    out: list[Program] = []
    decode_params = params_c              # `Trainer.sampling_params`: replicated when cheap
    if setup.replicate_decode_weights(cfg, bytes_of(params_c), memory_per_device):
        decode_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
            params_c)
    free = None
    if memory_per_device is not None:     # what sampling finds free: the state and its params
        free = max(0.0, memory_per_device - device_bytes(state) - device_bytes(decode_params))
    mean_prompt = sh.mean_prompt_len or max(sh.prompt_width // 4, 1)

    def generate(name, phase, prompts, samples, options, max_new, mean_new):
        if cfg.engine.enabled:
            es = engine_shape(cfg, mcfg, mesh, prompts=prompts, samples=samples,
                              width=sh.prompt_width, max_new=max_new, mean_prompt=mean_prompt,
                              mean_new=mean_new, free_bytes=free)
            return _engine_programs(rs, graphdef, decode_params, name, phase, es, options,
                                    resident=(state,))
        return _generate_programs(rs, graphdef, params_c, name, phase, prompts,
                                  sh.prompt_width, samples, options, max_new, 1.0, mean_new,
                                  lower_dependent, resident=(state,))

    train_opts = sampling.SamplingOptions(cfg.rollout.temperature, cfg.rollout.top_k,
                                          cfg.rollout.top_p)
    out += generate("rollout", "sample", sh.prompts, sh.group, train_opts, sh.response_len,
                    sh.mean_response_len)

    minibatches = sh.minibatches
    calls = minibatches * sh.typical_micro_batches      # micro-batch calls per step

    def student_program(name, fn, make_args, kwargs, shape, resident, flop_factor, typical):
        """A program over student rows of `shape`; typical=True counts the mean lengths as its
        useful tokens (MFU), else the full rows."""
        sb = student_batch_spec(shape.rows, shape.student_width, shape.response_width, mesh)
        seq = sh.mean_student_len if typical else shape.student_width
        head = sh.mean_response_len if typical else shape.response_width
        p = Program(
            name, "score", fn, make_args(sb), kwargs, calls, shape.rows * seq,
            flop_factor * flops.forward_flops(mcfg, shape.rows, seq, head_tokens=head),
            what=f"{shape.rows} rows x {shape.student_width} tokens", resident=resident)
        return p, sb

    def with_typical(make):
        """(program at the largest micro-batch with its typical twin attached, both batches)."""
        big, sb_big = make(sh.student_max, typical=False)
        small, sb_small = make(sh.typical, typical=True)
        small.is_typical = True
        big.typical = small
        return big, sb_big, sb_small

    def old_logprobs(shape, typical):
        return student_program(
            "score/old_logprobs", update_lib.old_logprobs,
            lambda sb: (graphdef, state.params, state.ref, sb),
            dict(spec=spec, with_ref=need_ref), shape, (state.opt_state, state.teacher),
            2 if need_ref else 1, typical)

    prog, sb_max, sb_typ = with_typical(old_logprobs)
    share = cfg.train.share_teacher_prefixes
    if share:
        # `Trainer._shared_old_logprobs`: shared-prefix rows of each prompt and its G
        # responses; the update takes host arrays of the full-row outputs' shapes.
        out += shared_programs.student_programs(rs, graphdef=graphdef, state=state, spec=spec,
                                                shards=devices, sh=sh, need_ref=need_ref)
        sb_max = dict(sb_max, **like_outputs(prog.fn, prog.args, prog.kwargs, mesh))
        sb_typ = dict(sb_typ, **like_outputs(prog.typical.fn, prog.typical.args,
                                             prog.typical.kwargs, mesh))
    else:
        out.append(prog)
        sb_max = dict(sb_max, **lower_dependent(prog))
        sb_typ = dict(sb_typ, **lower_dependent(prog.typical))

    teacher_max, teacher_typ = {}, {}
    if spec.teacher_mode is not None:
        c = sh.teacher_contexts
        tparams = state.params if spec.teacher_mode == "fixed" else state.teacher
        ids_max = ids_typ = None
        if spec.method_spec.student_topk:
            def topk(shape, typical):
                return student_program(
                    "score/student_topk", update_lib.student_topk_ids,
                    lambda sb: (graphdef, state.params, sb), dict(spec=spec), shape,
                    (state.opt_state, state.teacher, state.ref), 1, typical)
            prog, _, _ = with_typical(topk)
            # its inputs are the old-logprob batches (same rows): rebuild with them
            prog.args = (graphdef, state.params, sb_max)
            prog.typical.args = (graphdef, state.params, sb_typ)
            if share:          # priced among the shared student programs above
                ids_max = like_outputs(prog.fn, prog.args, prog.kwargs, mesh)
                ids_typ = like_outputs(prog.typical.fn, prog.typical.args,
                                       prog.typical.kwargs, mesh)
            else:
                out.append(prog)
                ids_max, ids_typ = lower_dependent(prog), lower_dependent(prog.typical)

        def teacher_program(shape, ids, typical):
            tb = teacher_batch_spec(c, shape.rows, shape.teacher_width, c - 1, mesh)
            mean_t = sh.mean_teacher_len if typical else shape.teacher_width
            head = sh.mean_response_len if typical else shape.response_width
            return Program(
                "score/teacher", "score", update_lib.teacher_outputs,
                (graphdef, tparams, tb, ids, spec), dict(length=shape.response_width), calls,
                c * shape.rows * mean_t,
                flops.forward_flops(mcfg, c * shape.rows, mean_t, head_tokens=head),
                what=f"{c} contexts x {shape.rows} rows x {shape.teacher_width} tokens",
                resident=(state.opt_state, state.ref,
                          state.teacher if spec.teacher_mode == "fixed" else state.params))

        big_t = sh.teacher_max
        big = teacher_program(big_t, _match_rows(ids_max, big_t.rows, mesh), False)
        big.typical = teacher_program(sh.typical, ids_typ, True)
        big.typical.is_typical = True
        if share:
            # `shared_passes.teacher_pass`: shared-prefix rows (each distinct prefix once, its
            # responses after it); the update takes host arrays of the full-row outputs' shapes.
            out += shared_programs.teacher_programs(
                rs, graphdef=graphdef, state=state, spec=spec, shards=devices, sh=sh)
            teacher_max = like_outputs(big.fn, big.args, big.kwargs, mesh)
            teacher_typ = like_outputs(big.typical.fn, big.typical.args, big.typical.kwargs, mesh)
        else:
            out.append(big)
            teacher_max = lower_dependent(big)
            teacher_typ = lower_dependent(big.typical)
        # The largest teacher micro-batch can have fewer rows than the largest student one:
        # the update's teacher inputs follow the student micro-batch they belong to.
        teacher_max = _match_rows(teacher_max, sh.student_max.rows, mesh)

    token_total = _sds((), jnp.float32, mesh)
    grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                                        sharding=x.sharding), state.params)

    def grad_program(sb, teacher, shape, typical):
        real = sh.mean_student_len if typical else shape.student_width
        head = sh.mean_response_len if typical else shape.response_width
        return Program(
            "update/grad", "update", update_lib.accumulate_grads,
            (graphdef, state.params, grads, sb, teacher, token_total), dict(spec=spec), calls,
            shape.rows * real, flops.train_flops(mcfg, shape.rows, real, head_tokens=head),
            what=f"{shape.rows} rows x {shape.student_width} tokens, gradient",
            resident=(state.opt_state, state.teacher, state.ref))

    big = grad_program(sb_max, teacher_max, sh.student_max, False)
    big.typical = grad_program(sb_typ, teacher_typ, sh.typical, True)
    big.typical.is_typical = True
    out.append(big)
    lr = _sds((), jnp.float32, mesh)
    nan = _sds((), jnp.bool_, mesh)
    out.append(Program(
        "update/apply", "update", update_lib.apply_grads, (state, grads, lr, nan),
        dict(spec=spec), minibatches, 0, 0.0, what="clip + AdamW + teacher update"))

    eval_opts = sampling.SamplingOptions(cfg.eval.temperature, cfg.eval.top_k, cfg.eval.top_p)
    out += generate("eval", "eval", sh.eval_prompts, sh.eval_samples, eval_opts,
                    sh.eval_response_len, sh.eval_response_len / 2)
    return out


def _match_rows(tree, rows: int, mesh):
    """Abstract arrays whose leading row axis is resized to `rows` (None passes through)."""
    if tree is None:
        return None
    return jax.tree.map(lambda x: batch_array((rows, *x.shape[1:]), x.dtype, mesh), tree)
