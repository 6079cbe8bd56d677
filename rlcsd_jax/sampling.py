"""Sampling: the public `generate` API, and the static KV-cache sampler.

`generate` runs on the rollout engine (`rlcsd_jax.inference`, docs/engine.md): continuous
batching over a paged KV cache, prompt pages shared by a prompt's samples, decode attention over
live pages, per-request random streams.  The static sampler below (`generate_arrays`,
`prefill_jit`, `decode_jit`) stays available for the trainer, the planner and benchmarks: one
prefill over left-padded prompts, then a `lax.while_loop` decode of the whole batch.

Why left padding: every prompt then ends at the same buffer index, so the whole batch decodes
with one shared cache write offset and a static slice, while per-row *positions* (count of real
tokens) keep RoPE and causality exact for every row (`attention_mask` works on positions).

G samples per prompt share one prefill: the prompt cache and last-position logits are repeated
G times along the batch before the first token is drawn, instead of prefilling G copies.

Static shapes: prompt lengths are padded to a bucket (`data.packing`'s rule) and the cache
holds bucket + max_new_tokens slots, so a run compiles one prefill and one decode program per
(batch, bucket).  Cache buffers are donated to the decode loop.

Log-probs: the log-probability of each sampled token under softmax(logits / T) over the FULL
vocabulary, in fp32 (the "old" log-prob of algorithm.md §1.3, not the top-k/top-p renormalised
one).  With temperature 0 (greedy) it is the log-softmax of the raw logits.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from rlcsd_jax.distributed import sharding
from rlcsd_jax.inference import programs as engine_programs
from rlcsd_jax.inference.engine import generate_batch
from rlcsd_jax.inference.pages import kv_budget_tokens_for_bytes
# Token selection lives with the engine; re-exported here (the public names of this module).
from rlcsd_jax.inference.selection import SamplingOptions, select_tokens  # noqa: F401
from rlcsd_jax.models.decoder import KVCache

# Prompt widths: `data.packing`'s rule (powers of two, then steps of 2,048 above 8,192).
DEFAULT_BUCKETS = None


@dataclasses.dataclass
class GenerationOutput:
    """Per generated sequence, prompt-major (prompt 0 samples 0..n-1, prompt 1, …)."""

    tokens: list[list[int]]       # new tokens up to and including the first EOS
    logprobs: list[list[float]]   # log p(token) under softmax(logits / T), full vocab, fp32
    truncated: list[bool]         # budget reached without an EOS
    prompt_index: list[int]       # which prompt each sequence continues
    # The engine's counters: decode_steps, busy_slot_steps, total_slot_steps, peak_kv_tokens
    # (and live_kv_tokens_at_peak, decode_calls, prefill_calls, prefill_rows, preemptions).
    stats: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Jitted prefill and decode
# ----------------------------------------------------------------------------------------------


def _cache_sharding(mesh, shape):
    spec = sharding.logical_to_spec(("layers", "batch", "length", "kv_heads", "head_dim"),
                                    shape, mesh)
    return jax.sharding.NamedSharding(mesh, spec)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """The compile-time settings of one static-sampler call (hashable: `prefill_jit` and
    `decode_jit` take it as their static argument, so each distinct value is its own program)."""

    max_new_tokens: int
    num_samples: int
    opts: SamplingOptions
    eos_ids: tuple[int, ...]
    pad_id: int
    mesh: object = None


def make_static(*, max_new_tokens: int, num_samples: int, options: SamplingOptions,
                eos_ids: Sequence[int], pad_id: int, mesh=None) -> SamplerSettings:
    """The static (compile-time) arguments of `prefill_jit` / `decode_jit` for one call."""
    return SamplerSettings(int(max_new_tokens), int(num_samples), options,
                           tuple(int(e) for e in eos_ids), int(pad_id), mesh)


@struct.dataclass
class DecodeState:
    """The static sampler's decode state: what `prefill_jit` returns and `decode_jit` carries
    through its `lax.while_loop`.

    R = B * num_samples rows (prompt-major), N = max_new_tokens, C = P + N cache slots for
    prompts [B, P].
    """

    # The rows' KV cache: k / v [layers, R, C, kv_heads, head_dim] in the compute dtype,
    # positions [R, C] int32, valid [R, C] bool, index () int32 (the next write slot).
    cache: KVCache
    # The tokens drawn so far, [R, N] int32; pad_id in the columns not drawn yet and after EOS.
    tokens: jax.Array
    # Their log-probs under softmax(logits / T) over the full vocabulary, [R, N] float32;
    # 0 where `tokens` holds pad_id.
    logprobs: jax.Array
    # The last token drawn per row (the next step's input), [R] int32.
    last: jax.Array
    # The position of `last` (real tokens before it), [R] int32.
    next_pos: jax.Array
    # Whether the row has drawn an EOS, [R] bool.
    done: jax.Array
    # Tokens drawn per row so far = the column the next one goes to, () int32.
    step: jax.Array
    # The call's random key, () typed key; column j is drawn with fold_in(key, j).
    key: jax.Array


def _prefill(graphdef, params, input_ids, attention_mask, key,
             static: SamplerSettings) -> DecodeState:
    """Prompts [B, P] (left padded) -> decode state for B * n rows with the first token drawn."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    b, p = input_ids.shape
    cache = KVCache.init(cfg, b, p + static.max_new_tokens)
    if static.mesh is not None:
        layers = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, _cache_sharding(static.mesh, x.shape)), cache.layers)
        cache = dataclasses.replace(cache, layers=layers)
    h, cache = model.hidden_states(input_ids, attention_mask, cache=cache)
    last_logits = model.logits(h[:, -1])
    next_pos = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)
    n = static.num_samples
    if n > 1:  # share the prompt KV across the group instead of prefilling it n times
        rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis)  # noqa: E731
        cache = KVCache(layers=jax.tree.map(lambda x: rep(x, 1), cache.layers),
                        positions=rep(cache.positions), valid=rep(cache.valid), index=cache.index)
        last_logits, next_pos = rep(last_logits), rep(next_pos)
    tokens, logprobs = select_tokens(last_logits, jax.random.fold_in(key, 0), static.opts)
    out_tokens = jnp.full((b * n, static.max_new_tokens), static.pad_id, jnp.int32)
    out_logprobs = jnp.zeros((b * n, static.max_new_tokens), jnp.float32)
    return DecodeState(cache=cache, tokens=out_tokens.at[:, 0].set(tokens),
                       logprobs=out_logprobs.at[:, 0].set(logprobs), last=tokens,
                       next_pos=next_pos,
                       done=jnp.isin(tokens, jnp.asarray(static.eos_ids, jnp.int32)),
                       step=jnp.ones((), jnp.int32), key=key)


def _decode(graphdef, params, state: DecodeState, static: SamplerSettings):
    """While-loop decode: one token per step for the whole batch until all rows hit EOS."""
    model = nnx.merge(graphdef, params)
    eos = jnp.asarray(static.eos_ids, jnp.int32)

    def cond(s: DecodeState):
        return (s.step < static.max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        rows = s.last.shape[0]
        h, cache = model.hidden_states(s.last[:, None], jnp.ones((rows, 1), jnp.int32),
                                       s.next_pos[:, None], cache=s.cache)
        tok, lp = select_tokens(model.logits(h[:, -1]), jax.random.fold_in(s.key, s.step),
                                static.opts)
        tok = jnp.where(s.done, static.pad_id, tok)
        lp = jnp.where(s.done, 0.0, lp)
        return s.replace(
            cache=cache,
            tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.step, 1),
            logprobs=jax.lax.dynamic_update_slice_in_dim(s.logprobs, lp[:, None], s.step, 1),
            last=tok, next_pos=s.next_pos + 1, done=s.done | jnp.isin(tok, eos),
            step=s.step + 1)

    state = jax.lax.while_loop(cond, body, state)
    tokens = state.tokens
    is_eos = jnp.isin(tokens, eos)
    steps = jnp.arange(tokens.shape[1])
    first_eos = jnp.min(jnp.where(is_eos, steps, tokens.shape[1]), axis=-1)
    lengths = jnp.minimum(first_eos + 1, tokens.shape[1])
    # The final loop state is returned (and dropped by the caller) so the donated input
    # buffers, the KV cache above all, alias it: XLA reuses them instead of copying.
    return dict(tokens=tokens, logprobs=state.logprobs, lengths=lengths,
                truncated=first_eos >= tokens.shape[1], final_state=state)


prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "static"))
decode_jit = jax.jit(_decode, static_argnames=("graphdef", "static"), donate_argnames=("state",))

_seen_shapes: set = set()
PREFILL_CALLS = {"count": 0, "rows": 0}


def compile_counts() -> dict[str, int]:
    """Distinct compiled programs so far (recompilation checks): the static sampler's prefill /
    decode and the engine's (`engine_prefill`, `engine_decode`, `engine_copy`)."""
    counts = {"prefill": prefill_jit._cache_size(), "decode": decode_jit._cache_size()}
    counts.update({f"engine_{k}": v for k, v in engine_programs.compile_counts().items()})
    return counts


def generate_arrays(model_or_graphdef, params, input_ids, attention_mask, key, *,
                    max_new_tokens: int, num_samples: int = 1,
                    options: SamplingOptions = SamplingOptions(), eos_ids: Sequence[int] = (),
                    pad_id: int = 0, mesh=None) -> dict:
    """Array API for the trainer: left-padded prompts [B, P] -> device arrays.

    Returns dict(tokens [B*n, N] int32 (pad after EOS), logprobs [B*n, N] fp32, lengths [B*n]
    (tokens up to and including the first EOS), truncated [B*n] bool).  No host round trip.
    """
    graphdef = (model_or_graphdef if isinstance(model_or_graphdef, nnx.GraphDef)
                else nnx.split(model_or_graphdef)[0])
    static = make_static(max_new_tokens=max_new_tokens, num_samples=num_samples,
                         options=options, eos_ids=eos_ids, pad_id=pad_id, mesh=mesh)
    shape_key = (input_ids.shape, static)
    if shape_key not in _seen_shapes:
        if len(_seen_shapes) >= 8:
            logging.warning("sampler: compiling for a new shape %s after warm-up; check the "
                            "length buckets", input_ids.shape)
        _seen_shapes.add(shape_key)
    PREFILL_CALLS["count"] += 1
    PREFILL_CALLS["rows"] += int(input_ids.shape[0])
    state = prefill_jit(graphdef, params, input_ids, attention_mask, key, static)
    out = decode_jit(graphdef, params, state, static)
    del out["final_state"]
    return out


# ----------------------------------------------------------------------------------------------
# High-level API
# ----------------------------------------------------------------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int = 0):
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
    return ids, mask


def check_cache_memory(cfg, batch: int, cache_len: int, available_bytes: int | None,
                       dtype=None) -> int:
    """Bytes the KV cache needs; raises a clear error instead of an XLA OOM mid-run."""
    need = KVCache.num_bytes(cfg, batch, cache_len, dtype)
    if available_bytes is not None and need > available_bytes:
        raise MemoryError(
            f"KV cache needs {need / 2**30:.2f} GiB ({cfg.num_layers} layers x {batch} rows x "
            f"{cache_len} slots x {cfg.num_kv_heads} kv heads x {cfg.head_dim} dims x 2 (k,v)) "
            f"but only {available_bytes / 2**30:.2f} GiB is available; lower the batch, "
            "max_new_tokens or the prompt bucket, or shard the batch over more devices.")
    return need


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_ids: Sequence[int] = (), seed: int = 0, num_samples: int = 1, pad_id: int = 0,
             buckets: Sequence[int] = DEFAULT_BUCKETS, memory_limit_bytes: int | None = None,
             mesh=None, max_slots: int | None = None, kv_budget_tokens: int | None = None,
             page_size: int = 32, steps_per_call: int = 16,
             min_slots: int | None = None) -> GenerationOutput:
    """Sample continuations for token-id prompts on the rollout engine (`rlcsd_jax.inference`).

    max_slots: rows decoded at once (default: every row, at most 256; a job that fits in one
    wave keeps all its slots to the end unless min_slots says otherwise); kv_budget_tokens: KV
    tokens of the page pool (default: derived from memory_limit_bytes per device when given,
    else enough for every slot at the longest row).  A row that cannot fit the budget alone
    raises before anything is decoded.  Token j of output row r is drawn with
    fold_in(fold_in(key(seed), r), j): the same seed gives the same tokens whatever max_slots,
    page_size or steps_per_call.  Output rows are prompt-major (prompt i's samples at
    i*num_samples ...); `stats` holds the engine's counters.
    """
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    options = SamplingOptions(temperature, top_k, top_p)
    rows = len(prompts) * num_samples
    if kv_budget_tokens is None and memory_limit_bytes is not None:
        kv_budget_tokens = kv_budget_tokens_for_bytes(model.config, memory_limit_bytes, mesh)
    max_slots = max_slots or min(rows, 256)
    if min_slots is None and rows <= max_slots:
        min_slots = max_slots       # one wave: one decode program beats shrinking for the tail
    graphdef, params = nnx.split(model)
    out = generate_batch(graphdef, params, prompts, num_samples=num_samples, options=options,
                         max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                         seed_or_key=seed, max_slots=max_slots,
                         kv_budget_tokens=kv_budget_tokens, page_size=page_size,
                         steps_per_call=steps_per_call, mesh=mesh, buckets=buckets,
                         min_slots=min_slots)
    PREFILL_CALLS["count"] += out["stats"]["prefill_calls"]
    PREFILL_CALLS["rows"] += out["stats"]["prefill_rows"]
    tokens, logprobs, truncated, index = [], [], [], []
    for row in range(out["tokens"].shape[0]):
        n = int(out["lengths"][row])
        tokens.append(out["tokens"][row, :n].tolist())
        logprobs.append(out["logprobs"][row, :n].tolist())
        truncated.append(bool(out["truncated"][row]))
        index.append(row // num_samples)
    return GenerationOutput(tokens, logprobs, truncated, index, out["stats"])
