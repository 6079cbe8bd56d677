"""The engine's programs as abstract inputs, for the planner (compile for a TPU slice on a CPU).

    args = plan.abstract_args(model_cfg, mesh, max_slots=..., num_pages=..., page_size=...,
                              steps_per_call=..., prompt_bucket=..., max_seq_len=...)
    with jax.set_mesh(mesh):
        programs.decode_jit.lower(*args["decode"]).compile()
        programs.prefill_jit.lower(*args["prefill"]).compile()

Every array is a `jax.ShapeDtypeStruct` carrying the NamedSharding the engine gives it (slot and
prompt rows and pool pages over ('data', 'fsdp'), kv heads over 'tensor' when they divide it,
parameters by the rules table), so what compiles is exactly what the engine runs.  The decode
program is a while loop of `steps_per_call` steps (its cost analysis counts the body once).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlcsd_jax import models
from rlcsd_jax.distributed import sharding
from rlcsd_jax.inference import paged_attention, pages, programs
from rlcsd_jax.inference.selection import SamplingOptions


def _sds(shape, dtype, mesh, spec=P()):
    dtype = dtype if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else jnp.dtype(dtype)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def _rows(shape, dtype, mesh):
    """Leading axis over the batch axes (the engine's `_put`)."""
    spec = P(paged_attention.batch_axes(mesh), *([None] * (len(shape) - 1)))
    return _sds(shape, dtype, mesh, spec)


def abstract_params(cfg, mesh, dtype=None):
    """(graphdef, params as ShapeDtypeStructs with their rule-table shardings), floating leaves
    in `dtype` (default the compute dtype: the trainer decodes with a compute-dtype copy)."""
    graphdef, params = nnx.split(models.abstract_model(cfg))
    shardings = sharding.param_shardings(params, mesh)
    dtype = jnp.dtype(dtype or cfg.dtype)

    def attach(var, sh):
        d = dtype if jnp.issubdtype(var.dtype, jnp.floating) else var.dtype
        return var.replace(jax.ShapeDtypeStruct(var.shape, d, sharding=sh.get_value()))
    return graphdef, jax.tree.map(attach, params, shardings,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_args(cfg, mesh, *, max_slots: int, num_pages: int, page_size: int,
                  steps_per_call: int, prompt_bucket: int, max_seq_len: int,
                  prefill_rows: int | None = None, num_samples: int = 1,
                  options: SamplingOptions = SamplingOptions(), eos_ids=(), pad_id: int = 0,
                  attention: str = "auto", blocks=programs.DEFAULT_BLOCKS,
                  graphdef=None, params=None) -> dict:
    """Positional arguments of `programs.prefill_jit`, `decode_jit` and `copy_jit`.

    max_slots / num_pages / prefill_rows: global counts (multiples of the batch shards);
    num_pages covers every shard.  max_seq_len: the longest row (prompt + max new tokens),
    which sets the decode page-table width ceil(max_seq_len / page_size) (the widest the
    engine uses).  prefill_rows: prompts per prefill call over all shards (default: one per
    slot).  graphdef / params: the caller's (e.g. the trainer's abstract compute-dtype copy);
    built from `cfg` when omitted.  Returns dict(prefill=tuple, decode=tuple, copy=tuple,
    static=EngineStatic).
    """
    if graphdef is None or params is None:
        graphdef, params = abstract_params(cfg, mesh)
    shards = pages.batch_shards(mesh)
    for name, n in (("max_slots", max_slots), ("num_pages", num_pages)):
        if n % shards:
            raise ValueError(f"{name}={n} must be a multiple of the {shards} batch shards")
    with jax.set_mesh(mesh):
        resolved = paged_attention.resolve(attention, cfg.head_dim)
    static = programs.EngineStatic(
        page_size=page_size, steps_per_call=steps_per_call, num_samples=num_samples,
        options=options, eos_ids=tuple(int(e) for e in eos_ids), pad_id=pad_id,
        attention=resolved, blocks=tuple(blocks))
    pool = _sds(pages.pool_shape(cfg, num_pages, page_size), cfg.dtype, mesh,
                paged_attention.pool_spec(mesh, cfg.num_kv_heads))
    key = _sds((), jax.eval_shape(lambda: jax.random.key(0)).dtype, mesh)
    i32 = jnp.int32
    rows = prefill_rows or max_slots
    prefill = (graphdef, params, pool, _rows((rows, prompt_bucket), i32, mesh),
               _rows((rows,), i32, mesh), _rows((rows, -(-prompt_bucket // page_size)), i32, mesh),
               _rows((rows, num_samples), i32, mesh), key, static)
    s = max_slots
    slots = programs.SlotBatch(
        tokens=_rows((s,), i32, mesh), kv_len=_rows((s,), i32, mesh),
        generated=_rows((s,), i32, mesh), request=_rows((s,), i32, mesh),
        active=_rows((s,), jnp.bool_, mesh),
        table=_rows((s, -(-max_seq_len // page_size)), i32, mesh),
        num_pages=_rows((s,), i32, mesh), free_pages=_rows((num_pages,), i32, mesh),
        free_count=_rows((shards,), i32, mesh))
    decode = (graphdef, params, pool, slots, key, _sds((), i32, mesh), _sds((), i32, mesh), static)
    copy = (pool, _rows((s,), i32, mesh), _rows((s,), i32, mesh), _rows((s,), jnp.bool_, mesh))
    return dict(prefill=prefill, decode=decode, copy=copy, static=static)
