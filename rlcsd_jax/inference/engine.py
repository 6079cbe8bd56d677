"""The rollout engine: continuous batching over a paged KV cache.

    out = generate_batch(graphdef, params, prompts, num_samples=G, options=..., max_new_tokens=N,
                         eos_ids=..., pad_id=..., seed_or_key=..., max_slots=64,
                         kv_budget_tokens=..., page_size=32, steps_per_call=16, mesh=mesh)
    out["tokens"]  [R, N] int32 (pad after EOS), out["logprobs"] [R, N] fp32, out["lengths"] [R],
    out["truncated"] [R] bool, out["stats"] dict;  R = len(prompts) * G, prompt-major.

The host loop (`Scheduler`) admits waiting requests into free slots, prefills their prompts
into pages (`programs.prefill_jit`, once per prompt for its G samples), copies partial prompt
pages (`copy_jit`), reserves pages for the next call and runs `decode_jit` for up to
`steps_per_call` steps; finished rows free their pages and slots at every call boundary.  It
shares the caller's parameters (no copy).  See docs/engine.md for the knobs and numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlcsd_jax.data.packing import bucket_length
from rlcsd_jax.distributed import multihost
from rlcsd_jax.inference import paged_attention, pages, programs, scheduler
from rlcsd_jax.inference.selection import SamplingOptions


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Knobs of the engine.

    max_slots: decode rows (a multiple of the mesh's batch shards; rounded up).
    page_size, steps_per_call: tokens per page; decode steps per device call.
    kv_budget_tokens: KV tokens the pool holds over all shards (`pages.kv_budget_tokens_for_bytes`
      derives it from memory), capped at (and None =) enough for every slot at the longest
      possible row.
    min_slots: smallest decode slot bucket once nothing waits (None: max_slots // 4).
    prefill_rows: most prompts prefilled per shard per round (None: slots per shard).
    refill_fraction: a call returns early once this fraction of its slots finished while
      requests wait, so they are refilled without waiting for the full call.
    table_buckets: page-table widths of 1/4, 1/2 and all of the longest row's pages (those of
      at least min_table_pages) instead of one width, so the gather attention reads less while
      rows are short; None = on for the gather attention, off for Pallas (which reads only
      live pages whatever the width).
    attention: 'auto' | 'gather' | 'pallas'; pallas_blocks: (kv pages per block, queries per
      block, vmem limit bytes) for the TPU kernel.
    """

    max_slots: int = 64
    page_size: int = 32
    steps_per_call: int = 16
    kv_budget_tokens: int | None = None
    min_slots: int | None = None
    prefill_rows: int | None = None
    refill_fraction: float = 1 / 16
    table_buckets: bool | None = None
    min_table_pages: int = 8
    attention: str = "auto"
    pallas_blocks: tuple[int, int, int] = programs.DEFAULT_BLOCKS


def _pow4(n: int) -> int:
    p = 1
    while p < n:
        p *= 4
    return p


def _mesh_context(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _put(x: np.ndarray, mesh):
    """A host array (identical on every process) -> a device array, axis 0 over the batch
    axes of `mesh` (replicated for scalars)."""
    if mesh is None:
        return jnp.asarray(x)
    spec = P(paged_attention.batch_axes(mesh), *([None] * (x.ndim - 1))) if x.ndim else P()
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _get(tree):
    """Device outputs -> host NumPy, the global value on every process (all-gathered across
    hosts, so every process's scheduler sees the same outputs)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        tree)


def check_prompts(prompts, max_new_tokens: int, page_size: int, pages_per_shard: int,
                  shards: int, num_samples: int) -> None:
    """Every row must fit the page budget alone (its pages live on one batch shard); raise a
    clear error before anything is decoded."""
    budget = pages_per_shard * page_size
    for i, p in enumerate(prompts):
        n = len(p)
        if n == 0:
            raise ValueError(f"prompt row {i} is empty; every prompt needs at least one token")
        if n > budget:
            raise ValueError(
                f"prompt row {i} has {n} tokens, longer than the whole KV page budget of "
                f"{budget} tokens per batch shard ({pages_per_shard} pages of {page_size}, "
                f"{shards} shard(s)); raise kv_budget_tokens (or the memory for it) or "
                "shorten the prompt")
        need = -(-(n + max_new_tokens - 1) // page_size)
        need += 1 if num_samples > 1 and n % page_size else 0   # the shared partial page
        if need > pages_per_shard:
            raise ValueError(
                f"prompt row {i} ({n} tokens) with max_new_tokens={max_new_tokens} needs "
                f"{need} KV pages of {page_size} tokens, but the KV budget gives "
                f"{pages_per_shard} pages per batch shard ({shards} shard(s)); raise "
                "kv_budget_tokens or lower max_new_tokens")


class Engine:
    """One generation job: the pool, the scheduler and the device calls (see module doc)."""

    def __init__(self, graphdef, params, prompts, *, num_samples: int,
                 options: SamplingOptions, max_new_tokens: int, eos_ids, pad_id: int, key,
                 config: EngineConfig, mesh=None, buckets=None):
        self.graphdef, self.params, self.mesh = graphdef, params, mesh
        self.cfg_model = nnx.merge(graphdef, params).config   # no copy: views of params
        self.prompts = [list(map(int, p)) for p in prompts]
        self.key, self.pad_id = key, int(pad_id)
        shards = pages.batch_shards(mesh)
        c = config
        ps = c.page_size
        max_slots = -(-c.max_slots // shards) * shards
        # Sized from the prompt bucket, not the longest prompt, so the pool's and the tables'
        # shapes (and the compiled programs) repeat across calls with the same bucket.
        widest = self.prompt_width = bucket_length(max(len(p) for p in self.prompts), buckets)
        max_pages = -(-(widest + max_new_tokens - 1) // ps)
        per_shard = max_slots // shards
        # Never more than every slot can hold at the longest row (+ a shared partial page).
        pages_per_shard = per_shard * (max_pages + 1)
        if c.kv_budget_tokens is not None:
            pages_per_shard = min(pages_per_shard,
                                  pages.pages_per_shard(c.kv_budget_tokens, ps, shards))
        check_prompts(self.prompts, max_new_tokens, ps, pages_per_shard, shards, num_samples)
        with _mesh_context(mesh):
            attention = paged_attention.resolve(c.attention, self.cfg_model.head_dim)
        table_buckets = (attention == "gather") if c.table_buckets is None else c.table_buckets
        widths = {max_pages}
        if table_buckets:       # max, 1/2, 1/4 of it: at most 3 decode programs per slot count
            widths |= {w for w in (-(-max_pages // 2), -(-max_pages // 4))
                       if w >= c.min_table_pages}
        min_slots = c.min_slots if c.min_slots is not None else max(shards, max_slots // 4)
        self.limits = scheduler.Limits(
            max_slots=max_slots, min_slots=max(min_slots, shards), shards=shards,
            pages_per_shard=pages_per_shard, page_size=ps, steps_per_call=c.steps_per_call,
            max_new_tokens=int(max_new_tokens), prefill_rows=c.prefill_rows or per_shard,
            refill_fraction=c.refill_fraction, table_widths=tuple(sorted(widths)))
        self.static = programs.EngineStatic(
            page_size=ps, steps_per_call=c.steps_per_call, num_samples=num_samples,
            options=options, eos_ids=tuple(int(e) for e in eos_ids), pad_id=self.pad_id,
            attention=attention, blocks=tuple(c.pallas_blocks))
        self.sched = scheduler.Scheduler(self.prompts, num_samples, eos_ids, self.limits)

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        with _mesh_context(self.mesh):
            pool = pages.init_pool(self.cfg_model, self.limits.shards * self.limits.pages_per_shard,
                                   self.limits.page_size, self.mesh)
            sched = self.sched
            while not sched.done():
                to_prefill = sched.admit()
                admitted = bool(sched.pending)
                if to_prefill:
                    pool = self._prefill(pool, to_prefill)
                copies = sched.insert()
                if copies:
                    pool = self._copy(pool, copies)
                sched.reserve()
                batch = sched.batch()
                if batch is None:
                    if not admitted and not sched.done():
                        raise RuntimeError("engine: no request can be admitted and none runs "
                                           f"({len(sched.queue)} waiting); scheduler bug")
                    continue
                pool, out = self._decode(pool, batch)
                sched.decoded(batch, out)
            del pool
        if sched.pages.in_use():
            raise RuntimeError(f"engine: {sched.pages.in_use()} pages still held after the "
                               "last row finished (a reference-count leak)")
        result = sched.results(self.pad_id)
        result["stats"] = dict(sched.stats)
        return result

    def _prefill(self, pool, to_prefill: dict[int, list[int]]):
        lim, g = self.limits, self.static.num_samples
        # Rows per shard in powers of 4 and one width (the job's prompt bucket): few programs.
        rows = _pow4(max(len(v) for v in to_prefill.values()))
        width = self.prompt_width
        n = lim.shards * rows
        ids = np.full((n, width), self.pad_id, np.int32)
        lengths = np.zeros(n, np.int32)
        page_rows = np.zeros((n, -(-width // lim.page_size)), np.int32)
        requests = np.zeros((n, g), np.int32)
        where = []
        for d, prompt_ids in to_prefill.items():
            for i, p in enumerate(prompt_ids):
                b, tokens = d * rows + i, self.prompts[p]
                ids[b, :len(tokens)], lengths[b] = tokens, len(tokens)
                held = self.sched.prompts[p].prefill_pages
                page_rows[b, :len(held)] = held
                requests[b] = p * g + np.arange(g)
                where.append((b, p))
        pool, tokens, logprobs = programs.prefill_jit(
            self.graphdef, self.params, pool, _put(ids, self.mesh), _put(lengths, self.mesh),
            _put(page_rows, self.mesh), _put(requests, self.mesh), self.key, self.static)
        tokens, logprobs = _get((tokens, logprobs))
        for b, p in where:
            self.sched.prefilled(p, tokens[b], logprobs[b])
        self.sched.stats["prefill_calls"] += 1
        self.sched.stats["prefill_rows"] += len(where)
        return pool

    def _copy(self, pool, copies):
        lim = self.limits
        per = lim.max_slots // lim.shards
        src, dst = np.zeros(lim.shards * per, np.int32), np.zeros(lim.shards * per, np.int32)
        valid = np.zeros(lim.shards * per, bool)
        used = [0] * lim.shards
        for d, s, t in copies:
            i = d * per + used[d]
            src[i], dst[i], valid[i] = s, t, True
            used[d] += 1
        return programs.copy_jit(pool, _put(src, self.mesh), _put(dst, self.mesh),
                                 _put(valid, self.mesh))

    def _decode(self, pool, batch):
        a = batch["arrays"]
        slots = programs.SlotBatch(**{k: _put(v, self.mesh) for k, v in a.items()})
        pool, out = programs.decode_jit(
            self.graphdef, self.params, pool, slots, self.key, jnp.int32(batch["exit_after"]),
            jnp.int32(self.limits.max_new_tokens), self.static)
        return pool, _get(out)


def generate_batch(graphdef, params, prompts: Sequence[Sequence[int]], *, num_samples: int = 1,
                   options: SamplingOptions = SamplingOptions(), max_new_tokens: int,
                   eos_ids: Sequence[int] = (), pad_id: int = 0, seed_or_key=0,
                   max_slots: int = 64, kv_budget_tokens: int | None = None,
                   page_size: int = 32, steps_per_call: int = 16, mesh=None, buckets=None,
                   **engine_options) -> dict:
    """Sample `num_samples` continuations of every prompt on the engine (module docstring).

    Returns host arrays: tokens [R, N] int32 (pad_id after the end), logprobs [R, N] fp32,
    lengths [R] (up to and including the first EOS), truncated [R] bool (no EOS within N),
    stats dict(decode_steps, busy_slot_steps, total_slot_steps, peak_kv_tokens,
    live_kv_tokens_at_peak, decode_calls, prefill_calls, prefill_rows, preemptions).
    Rows are prompt-major: prompt 0 samples 0..G-1, prompt 1, ...  The same key gives the same
    tokens whatever max_slots, page_size or steps_per_call.  engine_options: the other
    `EngineConfig` fields.  Multi-host: each process passes its own block of prompts and gets
    its rows back (`_gather_prompts`); the stats are global.
    """
    if not prompts:
        raise ValueError("generate_batch() needs at least one prompt")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and num_samples={num_samples} must "
                         "be >= 1")
    key = seed_or_key
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    config = EngineConfig(max_slots=max_slots, page_size=page_size, steps_per_call=steps_per_call,
                          kv_budget_tokens=kv_budget_tokens, **engine_options)
    everyone = _gather_prompts(prompts)
    engine = Engine(graphdef, params, everyone, num_samples=num_samples, options=options,
                    max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, key=key,
                    config=config, mesh=mesh, buckets=buckets)
    out = engine.run()
    if jax.process_count() == 1:
        return out

    stats = out.pop("stats")
    return dict(multihost.local_block(out), stats=stats)


def _gather_prompts(prompts) -> list[list[int]]:
    """Multi-host: each process passes its block of prompts (the trainer's convention,
    `rlcsd_jax.distributed.multihost`); every process schedules the concatenation, in process order, and
    returns its own rows (`multihost.local_block`).  One process: the prompts themselves."""
    prompts = [list(map(int, p)) for p in prompts]
    if jax.process_count() == 1:
        return prompts

    width = multihost.global_max(max(len(p) for p in prompts))
    block = np.full((len(prompts), width + 1), -1, np.int64)
    for i, p in enumerate(prompts):
        block[i, 0], block[i, 1:len(p) + 1] = len(p), p
    gathered = multihost.allgather(block)
    return [row[1:row[0] + 1].tolist() for row in gathered]


__all__ = ["Engine", "EngineConfig", "check_prompts", "generate_batch"]
