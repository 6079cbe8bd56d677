"""The building blocks of the trainer's program list (`trainer.programs`): a `Program` (one
jitted function with abstract, sharded inputs and its pricing), the step's worst-case and typical
`Shapes`, abstract parameters / optimizer state, and batch specs.  Nothing is allocated:
everything is a `jax.ShapeDtypeStruct` with its sharding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlcsd_jax.distributed import sharding
from rlcsd_jax import models
from rlcsd_jax.data import packing
from rlcsd_jax.trainer import batches as batches_lib
from rlcsd_jax.trainer import setup
from rlcsd_jax.trainer import state as state_lib
from rlcsd_jax.trainer import update as update_lib
PHASES = ("sample", "score", "update", "eval")


@dataclasses.dataclass(frozen=True)
class DecodeFloor:
    """The least a device must read per decode step: its compute-dtype weights once per step
    (shared by its slots) and each slot's live KV.  Per device."""

    weight_bytes: float          # compute-dtype weights a device holds
    slots: int                   # decode slots per device (all assumed active)
    kv_bytes_per_token: float    # live KV read for one slot's step (all layers, window-capped)
    steps_per_call: int

    @property
    def bytes_per_token(self) -> float:
        return self.weight_bytes / self.slots + self.kv_bytes_per_token


@dataclasses.dataclass
class Program:
    """One jitted program at one shape and how often a training step runs it.

    calls_per_step: calls per training step (eval programs: per evaluation).
    loop_trips: iterations to assume for loops whose trip count is data dependent (the decode
      while-loop runs until every row is done: the planner multiplies its per-iteration cost).
    tokens_per_call: token positions the call produces (generated tokens) or scores.
    model_flops_per_call: the useful FLOPs of the call (for MFU), see `rlcsd_jax.planner.flops`.
    mean_kv_len: live KV tokens per slot assumed when pricing the engine's ragged paged attention
      kernel (it reads only live pages; `planner.hlo_cost`); None = every table page.
    decode_floor: engine decode programs: what a decode step must read at least, per device
      (`DecodeFloor`), for the report's bytes-per-token vs floor ratio.
    """

    name: str
    phase: str
    fn: Any
    args: tuple
    kwargs: dict
    calls_per_step: float
    tokens_per_call: float
    model_flops_per_call: float
    loop_trips: int | None = None
    what: str = ""                       # shape summary for the report
    resident: tuple = ()                 # arrays in HBM during the call that are not arguments
    typical: "Program | None" = None     # the same program at the mean lengths (time estimate)
    is_typical: bool = False             # this is such a twin (not a largest shape)
    mean_kv_len: float | None = None
    decode_floor: DecodeFloor | None = None
    refusal: str | None = None           # why it cannot run although it compiles (KV pool)

    def lower(self):
        return self.fn.lower(*self.args, **self.kwargs)

    @property
    def mesh(self):
        """The mesh of the program's (first) sharded argument."""
        for x in jax.tree.leaves(self.args):
            if isinstance(getattr(x, "sharding", None), NamedSharding):
                return x.sharding.mesh
        raise ValueError(f"{self.name}: no sharded argument")


# ----------------------------------------------------------------------------------------------
# Abstract values with shardings
# ----------------------------------------------------------------------------------------------


def _sds(shape, dtype, mesh, spec=P()) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def batch_array(shape, dtype, mesh, axis: int = 0) -> jax.ShapeDtypeStruct:
    """A global array whose `axis` is the batch (over ('data', 'fsdp')), as `Trainer.to_global`
    makes."""
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype),
                                sharding=sharding.batch_sharding(mesh, len(shape), axis))


def abstract_params(mcfg, mesh):
    """(graphdef, params State of ShapeDtypeStructs carrying each parameter's sharding)."""
    graphdef, params = nnx.split(models.abstract_model(mcfg))
    shardings = sharding.param_shardings(params, mesh)

    def attach(var, sh):
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh.get_value()))
    return graphdef, jax.tree.map(attach, params, shardings,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_dtype(params, dtype):
    """The trainer's `sampling_params`: floating leaves in the compute dtype, same shardings."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def abstract_state(params, spec: update_lib.StepSpec, need_ref: bool, mesh):
    """The TrainState the trainer builds from `params` (its layout, not its values): the
    optimizer moments and teacher / reference copies take their parameter's sharding."""
    init = jax.jit(lambda p: state_lib.init_state(p, spec.tx, spec.teacher_mode, need_ref))
    shapes = jax.eval_shape(init, params)
    flat_params = {tuple(path): leaf for path, leaf in
                   jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, P())

    def attach(path, leaf):
        # A leaf whose trailing key path is a parameter's path is a copy or a moment of it.
        for start in range(len(path)):
            match = flat_params.get(tuple(path[start:]))
            if match is not None and match.shape == leaf.shape:
                return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=match.sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)
    return jax.tree_util.tree_map_with_path(attach, shapes)


def like_outputs(fn, args, kwargs, mesh):
    """Abstract outputs of a jitted fn(*args, **kwargs) when it could not be compiled: each array
    sharded on its first axis that the batch mesh axes divide (rows; the KV cache's second
    axis), replicated otherwise."""
    out = fn.eval_shape(*args, **kwargs)     # a jitted function knows its static arguments
    n = mesh.shape["data"] * mesh.shape["fsdp"]

    def attach(x):
        axes = [i for i, d in enumerate(x.shape) if d % n == 0]
        if not axes:
            return _sds(x.shape, x.dtype, mesh)
        return batch_array(x.shape, x.dtype, mesh, axes[0])
    return jax.tree.map(attach, out)


# ----------------------------------------------------------------------------------------------
# The step's shapes
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MicroShape:
    """One micro-batch's static shape: global rows, student / teacher / response widths."""

    rows: int
    student_width: int
    teacher_width: int
    response_width: int


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of one training step (global rows, token widths): worst case and typical."""

    prompts: int            # prompts per step
    group: int              # G
    prompt_width: int       # largest prompt bucket
    response_len: int       # N, the response cap
    minibatch_rows: int     # M = minibatch prompts x G
    teacher_contexts: int   # C
    student_max: MicroShape   # the largest micro-batch the student programs can see
    teacher_max: MicroShape   # the largest micro-batch the teacher program can see
    typical: MicroShape       # a micro-batch at the mean lengths (for the time estimate)
    typical_micro_batches: int   # micro-batches per mini-batch at the mean lengths
    mean_student_len: int
    mean_teacher_len: int
    mean_response_len: int
    eval_prompts: int
    eval_samples: int
    eval_response_len: int
    # typical prompt (max_prompt_len / 4, as the typical micro-batch): the engine's mean live KV
    mean_prompt_len: int = 0

    @property
    def minibatches(self) -> int:
        return self.prompts * self.group // self.minibatch_rows


def _rows(budget: int, width: int, devices: int) -> int:
    """Global rows of a micro-batch of width `width` (`microbatch.plan`'s rule)."""
    return max(1, budget // max(width, 1)) * devices


def step_shapes(cfg, batch_devices: int, mean_response_len: int | None = None) -> Shapes:
    """The step's shapes on a mesh with `batch_devices` devices on ('data', 'fsdp').

    Worst case: prompts at max_prompt_len, responses at the cap, teacher rows at
    teacher_max_len.  Typical: a quarter of max_prompt_len for the prompt, the mean response
    length, and for self-rollout teachers a hint as long as a mean response."""
    prompt_buckets = tuple(cfg.rollout.prompt_buckets) or None
    buckets = tuple(cfg.train.teacher_buckets) or None
    k_slots = batches_lib.num_wrong_slots(cfg.method, cfg.teacher.k_max)
    has_teacher = setup.teacher_mode(cfg) is not None
    budget, n = cfg.train.micro_batch_tokens, cfg.rollout.max_new_tokens
    bucket = lambda x: packing.bucket_length(x, buckets)  # noqa: E731
    minibatch_rows = cfg.train.minibatch_prompts * cfg.rollout.group_size
    split = setup.split_minibatches(cfg)

    # at most the mini-batch, in whole power-of-two rows per device (`microbatch.plan`)
    most = _pow2(-(-minibatch_rows // batch_devices)) * batch_devices

    def micro(student: int, teacher: int, response: int) -> MicroShape:
        ws, wt = bucket(student), bucket(teacher) if teacher else 0
        rows = _rows(budget, max(ws, wt), batch_devices) if split else most
        return MicroShape(min(rows, most), ws, wt, bucket(response))

    mean_n = mean_response_len or max(n // 2, 1)
    mean_prompt = max(cfg.data.max_prompt_len // 4, 1)
    mean_teacher = min(cfg.train.teacher_max_len,
                       mean_prompt + 2 * mean_n) if has_teacher else 0
    longest_student = cfg.data.max_prompt_len + n
    student_max = micro(longest_student, 0, n)
    teacher_max = micro(longest_student, cfg.train.teacher_max_len if has_teacher else 0, n)
    typical = micro(mean_prompt + mean_n, mean_teacher, mean_n)
    return Shapes(
        prompts=cfg.rollout.prompts_per_step, group=cfg.rollout.group_size,
        prompt_width=packing.bucket_length(cfg.data.max_prompt_len, prompt_buckets),
        response_len=n, minibatch_rows=minibatch_rows, teacher_contexts=1 + k_slots,
        student_max=student_max, teacher_max=teacher_max, typical=typical,
        typical_micro_batches=-(-minibatch_rows // typical.rows),
        mean_student_len=mean_prompt + mean_n,
        mean_teacher_len=mean_teacher, mean_response_len=mean_n,
        eval_prompts=cfg.eval.batch_prompts, eval_samples=setup.eval_samples(cfg),
        eval_response_len=cfg.eval.max_new_tokens, mean_prompt_len=mean_prompt)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def student_batch_spec(rows: int, width: int, response_len: int, mesh) -> dict:
    """`batches.student_batch` as abstract arrays (one micro-batch)."""
    b = lambda shape, dtype: batch_array(shape, dtype, mesh)  # noqa: E731
    return dict(input_ids=b((rows, width), jnp.int32), attention_mask=b((rows, width), jnp.int32),
                response_start=b((rows,), jnp.int32),
                response_mask=b((rows, response_len), jnp.int32),
                advantages=b((rows,), jnp.float32),
                sampler_logp=b((rows, response_len), jnp.float32))


def teacher_batch_spec(contexts: int, rows: int, width: int, k_slots: int, mesh) -> dict:
    """`batches.teacher_arrays` after `Trainer.to_global` (the wrong-hint validity rides along)."""
    t = lambda shape: batch_array(shape, jnp.int32, mesh, axis=1)  # noqa: E731
    return dict(input_ids=t((contexts, rows, width)), attention_mask=t((contexts, rows, width)),
                response_start=t((contexts, rows)),
                wrong_valid=batch_array((rows, k_slots), jnp.bool_, mesh))


# ----------------------------------------------------------------------------------------------
# The programs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunSetup:
    """What the programs need from a run: its config, mesh, model and sampling constants."""

    cfg: Any
    mesh: Any
    model_config: Any
    eos_ids: tuple = ()
    pad_id: int = 0


def run_setup(cfg, mesh, *, vocab_size: int | None = None, eos_ids=(), pad_id: int = 0,
              model_config=None) -> RunSetup:
    mcfg = model_config or setup.model_config(cfg, vocab_size)
    return RunSetup(cfg, mesh, mcfg, tuple(int(e) for e in eos_ids), int(pad_id))


def bytes_of(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
