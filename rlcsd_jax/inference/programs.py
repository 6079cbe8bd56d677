"""The engine's jitted device programs: prefill, page copy and multi-step decode.

    prefill_jit(graphdef, params, pool, ids, lengths, page_rows, requests, key, static)
        right-padded prompts [B, W] -> their KV written into pages, and the first token of each
        of their G samples drawn from the last prompt position: (pool, tokens [B, G],
        logprobs [B, G]).
    copy_jit(pool, src, dst, valid)
        copy-on-write of partial prompt pages [C] (one per sample that shares the prompt).
    decode_jit(graphdef, params, pool, slots, key, exit_after, max_new_tokens, static)
        up to `static.steps_per_call` decode steps of S slots in one `lax.while_loop`: each step
        gives a slot that starts a new page the next free page of its shard, writes every busy
        slot's token into its page (one scatter per layer) and attends over its pages; returns
        (pool, DecodeOut).  The loop stops early once `exit_after` slots have finished in this
        call (the host then refills them), every slot is idle, or a shard's free pages would
        not cover the next step (the host then preempts): nothing runs out of memory inside.

The pool is donated to every program and written in place.  The programs take the mesh from
the tracing context (`with jax.set_mesh(mesh)`), never as an argument; slot and prompt rows are
sharded over the batch axes, shard d's rows using shard d's pages.  `abstract_args` in
`inference.plan` gives these programs' inputs as ShapeDtypeStructs for the planner.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from rlcsd_jax.inference import paged_attention, selection
from rlcsd_jax.inference.paged_kv import PagedDecode, PagedPrefill

DEFAULT_BLOCKS = (16, 32, 32 * 2**20)


@dataclasses.dataclass(frozen=True)
class EngineStatic:
    """Compile-time constants of the programs (hashable; part of each program's cache key).

    attention: 'auto' (Pallas on TPU, gather elsewhere), 'gather' or 'pallas'; blocks: the
    Pallas kernel's (num_kv_pages_per_block, num_queries_per_block, vmem_limit_bytes).
    """

    page_size: int
    steps_per_call: int
    num_samples: int
    options: selection.SamplingOptions
    eos_ids: tuple[int, ...]
    pad_id: int = 0
    attention: str = "auto"
    blocks: tuple[int, int, int] = DEFAULT_BLOCKS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotBatch:
    """The slots of one decode call (host-built each call).  S slots over D batch shards (shard
    d owns slots [d*S/D, (d+1)*S/D)), W table pages, F free pages per shard.

    tokens [S] last sampled token (this call's first input); kv_len [S] tokens whose KV is
    stored = position of that input; generated [S] tokens generated so far (index of the next
    one); request [S] global row id (its RNG stream); active [S] bool; table [S, W] local page
    ids, the first num_pages [S] of them held.  free_pages [D * F]: each shard's free pages, in
    the order they are handed out; free_count [D]: how many of them are real.
    """

    tokens: jax.Array
    kv_len: jax.Array
    generated: jax.Array
    request: jax.Array
    active: jax.Array
    table: jax.Array
    num_pages: jax.Array
    free_pages: jax.Array
    free_count: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOut:
    """tokens / logprobs [S, N] (pad / 0 where a slot produced nothing); count [S] tokens made
    this call; done [S] the slot's request finished (EOS or max_new_tokens); table [S, W] and
    num_pages [S] with the pages taken in this call; taken [D] free pages used per shard (the
    first ones of each shard's free list); steps: scalar."""

    tokens: jax.Array
    logprobs: jax.Array
    count: jax.Array
    done: jax.Array
    table: jax.Array
    num_pages: jax.Array
    taken: jax.Array
    steps: jax.Array


def _page_demand(st: SlotBatch, page_size: int, shards: int):
    """Slots whose next write starts a page they do not hold yet: [S] bool, and per shard
    [D] int32."""
    need = st.active & (st.kv_len // page_size >= st.num_pages)
    return need, jnp.sum(need.reshape(shards, -1), axis=1, dtype=jnp.int32)


def _take_pages(st: SlotBatch, taken, page_size: int):
    """Give each slot that needs one the next free page of its shard (in slot order); the
    table gets it at column num_pages.  Returns (slots, taken [D])."""
    shards = st.free_count.shape[0]
    need, per_shard = _page_demand(st, page_size, shards)
    rank = jnp.cumsum(need.reshape(shards, -1), axis=1, dtype=jnp.int32) - 1
    free = st.free_pages.reshape(shards, -1)
    index = jnp.clip(taken[:, None] + rank, 0, free.shape[1] - 1)
    page = jnp.take_along_axis(free, index, axis=1).reshape(-1)
    s, w = st.table.shape
    column = jnp.where(need, st.num_pages, w)                    # w: out of bounds, dropped
    table = st.table.at[jnp.arange(s), column].set(page, mode="drop")
    st = dataclasses.replace(st, table=table, num_pages=st.num_pages + need)
    return st, taken + per_shard


def _prefill(graphdef, params, pool, ids, lengths, page_rows, requests, key,
             static: EngineStatic):
    """ids [B, W] right padded, lengths [B], page_rows [B, ceil(W/ps)] local page ids,
    requests [B, G] global row ids of each prompt's samples."""
    model = nnx.merge(graphdef, params)
    b, w = ids.shape
    ps = static.page_size
    t = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    valid = t < lengths[:, None]
    view = PagedPrefill(pool, jnp.zeros((), jnp.int32),
                        jnp.take_along_axis(page_rows, t // ps, axis=1), t % ps, valid)
    h, view = model.forward_paged(ids, t, view, segment_ids=valid.astype(jnp.int32))
    last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last)                                        # [B, V] fp32
    g = requests.shape[1]
    keys = selection.request_keys(key, requests.reshape(-1), jnp.zeros((b * g,), jnp.int32))
    tokens, logprobs = selection.select_rows(jnp.repeat(logits, g, axis=0), keys,
                                             static.options)
    return view.pool, tokens.reshape(b, g), logprobs.reshape(b, g)


def _decode(graphdef, params, pool, slots: SlotBatch, key, exit_after, max_new_tokens,
            static: EngineStatic):
    model = nnx.merge(graphdef, params)
    ps, n = static.page_size, static.steps_per_call
    s, shards = slots.tokens.shape[0], slots.free_count.shape[0]
    eos = jnp.asarray(static.eos_ids or (-1,), jnp.int32)
    started = slots.active

    def cond(c):
        pool, st, taken, toks, lps, count, i = c
        finished = jnp.sum(started & ~st.active)
        _, demand = _page_demand(st, ps, shards)
        pages_left = jnp.all(demand <= st.free_count - taken)   # else the host frees some
        return (i < n) & jnp.any(st.active) & (finished < exit_after) & pages_left

    def body(c):
        pool, st, taken, toks, lps, count, i = c
        st, taken = _take_pages(st, taken, ps)
        col = jnp.minimum(st.kv_len // ps, st.table.shape[1] - 1)
        page = jnp.take_along_axis(st.table, col[:, None], axis=1)[:, 0]
        view = PagedDecode(pool, jnp.zeros((), jnp.int32), st.table, st.kv_len, page,
                           st.kv_len % ps, st.active, static.attention, static.blocks)
        h, view = model.forward_paged(st.tokens[:, None], st.kv_len[:, None], view)
        keys = selection.request_keys(key, st.request, st.generated)
        tok, lp = selection.select_rows(model.logits(h[:, 0]), keys, static.options)
        busy = st.active
        tok = jnp.where(busy, tok, static.pad_id)
        lp = jnp.where(busy, lp, 0.0)
        step = busy.astype(jnp.int32)
        generated = st.generated + step
        still = busy & ~jnp.isin(tok, eos) & (generated < max_new_tokens)
        st = dataclasses.replace(st, tokens=jnp.where(busy, tok, st.tokens),
                                 kv_len=st.kv_len + step, generated=generated, active=still)
        toks = jax.lax.dynamic_update_slice_in_dim(toks, tok[:, None], i, axis=1)
        lps = jax.lax.dynamic_update_slice_in_dim(lps, lp[:, None], i, axis=1)
        return view.pool, st, taken, toks, lps, count + step, i + 1

    init = (pool, slots, jnp.zeros((shards,), jnp.int32),
            jnp.full((s, n), static.pad_id, jnp.int32), jnp.zeros((s, n), jnp.float32),
            jnp.zeros((s,), jnp.int32), jnp.zeros((), jnp.int32))
    pool, st, taken, toks, lps, count, steps = jax.lax.while_loop(cond, body, init)
    return pool, DecodeOut(toks, lps, count, started & ~st.active, st.table, st.num_pages,
                           taken, steps)


def _copy(pool, src, dst, valid):
    return paged_attention.copy_pages(pool, src, dst, valid)


prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "static"), donate_argnames=("pool",))
decode_jit = jax.jit(_decode, static_argnames=("graphdef", "static"), donate_argnames=("pool",))
copy_jit = jax.jit(_copy, donate_argnames=("pool",))


def compile_counts() -> dict[str, int]:
    """Distinct compiled engine programs so far (recompilation checks)."""
    return {"prefill": prefill_jit._cache_size(), "decode": decode_jit._cache_size(),
            "copy": copy_jit._cache_size()}
