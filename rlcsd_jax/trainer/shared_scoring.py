"""Scoring a mini-batch with each distinct prefix computed once (`scoring_prefix`): the plan.

A scoring row is (rollout, context, prefix, response).  Teacher rows: one per VALID context of a
rollout (the correct hint, and each real wrong hint: empty wrong-hint slots are not computed),
the prefix being the teacher prompt left-truncated exactly as full-row scoring does.  Student
rows: one per rollout, the prefix being its prompt (the G rollouts of a prompt share it).

Rows are grouped by prefix; each prefix and all its rows go to one device block (`shard`), the
blocks balanced by tokens.  Each block's prefixes are taken longest first; a unit runs the
next N prefixes of every block at the width P of the longest of them, N x P <= `budget` tokens
per device (`prefix_kv`), then those prefixes' rows in calls of at most `budget` tokens of
(prefix + response) per device (`continuation_stats`).  Every process plans its own blocks; the processes agree on
the number and shapes of the units and calls (small all-gathers), so the SPMD programs stay in
lockstep.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlcsd_jax import multihost
from rlcsd_jax.data.packing import bucket_length


@dataclasses.dataclass(frozen=True)
class Row:
    rollout: int          # index into the mini-batch's rows
    context: int          # 0 = the student prompt or the correct hint, k = wrong hint k
    prefix: tuple         # prefix token ids (the key that shares it)
    response: tuple       # response token ids (verbatim)


@dataclasses.dataclass
class Call:
    """One continuation call: this process's rows of it, per block (lists of Row indices)."""

    rows: list            # [shards][...] row ids
    rows_per_block: int   # r (static)
    width: int            # T (static)


@dataclasses.dataclass
class Unit:
    prefixes: list        # [shards][...] prefix keys of this unit
    per_block: int        # N (static)
    width: int            # P (static)
    calls: list           # [Call]


@dataclasses.dataclass
class Plan:
    rows: list            # [Row]
    units: list           # [Unit]
    shards: int           # this process's device blocks

    def counters(self) -> dict:
        """Tokens the programs compute (padded shapes, this process) and the useful ones (real
        prefix tokens, each distinct prefix once, plus real response tokens)."""
        computed = sum(self.shards * u.per_block * u.width
                       + sum(self.shards * c.rows_per_block * c.width for c in u.calls)
                       for u in self.units)
        return {"tokens_computed": float(computed), "tokens_useful": useful_tokens(self.rows)}


def useful_tokens(rows: list[Row]) -> float:
    """Real prefix tokens (each distinct prefix once) plus real response tokens."""
    return float(sum(len(p) for p in {r.prefix for r in rows})
                 + sum(len(r.response) for r in rows))


def plan(rows: list[Row], *, shards: int, budget: int, buckets=None) -> Plan:
    """Units and calls for `rows` on `shards` device blocks of this process (see module doc)."""
    by_prefix: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        by_prefix.setdefault(row.prefix, []).append(i)
    cost = {p: len(p) + sum(len(rows[i].response) for i in ids) for p, ids in by_prefix.items()}
    blocks = [[] for _ in range(shards)]
    load = [0] * shards
    for p in sorted(by_prefix, key=lambda p: -cost[p]):       # longest first, to the lightest
        b = int(np.argmin(load))
        blocks[b].append(p)
        load[b] += cost[p]
    # Each block's prefixes longest first; unit u takes the next N of every block, its width
    # the bucket of the longest of them (over every block and process) and N what the budget
    # allows at that width (N x P <= budget, or one prefix of P > budget): every unit stays
    # within the per-device token budget and similar lengths share a unit.
    blocks = [sorted(block, key=len, reverse=True) for block in blocks]
    pointer = [0] * shards
    units = []
    while (left := multihost.global_max(max(len(b) - p for b, p in zip(blocks, pointer)))) > 0:
        head = max((len(b[p]) for b, p in zip(blocks, pointer) if p < len(b)), default=1)
        width = _agree_bucket(head, buckets)
        per_block = min(max(1, budget // width), 1 << max(left - 1, 0).bit_length())
        members = [b[p:p + per_block] for b, p in zip(blocks, pointer)]
        pointer = [p + per_block for p in pointer]
        unit_rows = [[i for p in m for i in by_prefix[p]] for m in members]
        # Response widths take their own finer rule (`response_bucket`): `buckets`
        # (train.teacher_buckets) size whole scoring rows, far wider than a response alone.
        units.append(Unit(members, per_block, width, _calls(unit_rows, rows, width, budget)))
    return Plan(rows, units, shards)


RESPONSE_STEP = 512


def response_bucket(n: int) -> int:
    """Continuation widths: the default bucket up to RESPONSE_STEP, then its multiples (powers
    of two waste up to half of a 4k-8k response)."""
    return bucket_length(n) if n <= RESPONSE_STEP else -(-n // RESPONSE_STEP) * RESPONSE_STEP


def _agree_bucket(length: int, buckets) -> int:
    return bucket_length(multihost.global_max(length), buckets)


def _calls(unit_rows: list[list[int]], rows: list[Row], prefix_width: int,
           budget: int) -> list[Call]:
    """The unit's rows (longest response first) in calls of r rows per block, r x (P + T) <=
    budget tokens per device (at least one row)."""
    order = [sorted(block, key=lambda i: -len(rows[i].response)) for block in unit_rows]
    pointer = [0] * len(order)
    calls = []
    # A block's pointer may run past its end (r rows taken from a shorter block): > 0, not != 0.
    while multihost.global_max(max((len(o) - p for o, p in zip(order, pointer)), default=0)) > 0:
        head = max((len(rows[o[p]].response) for o, p in zip(order, pointer) if p < len(o)),
                   default=1)
        width = response_bucket(multihost.global_max(head))
        left = multihost.global_max(max(len(o) - p for o, p in zip(order, pointer)))
        per_block = min(max(1, budget // (prefix_width + width)),
                        1 << max(left - 1, 0).bit_length())
        chosen = [o[p:p + per_block] for o, p in zip(order, pointer)]
        calls.append(Call(chosen, per_block, width))
        pointer = [p + per_block for p in pointer]
    return calls


def prefix_arrays(unit: Unit, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[shards * N, P] left-padded prefix ids and mask of a unit (this process's blocks)."""
    n, p = unit.per_block, unit.width
    ids = np.full((len(unit.prefixes) * n, p), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for b, members in enumerate(unit.prefixes):
        for j, prefix in enumerate(members):
            row = b * n + j
            if prefix:
                ids[row, p - len(prefix):] = prefix
                mask[row, p - len(prefix):] = 1
    return ids, mask


def call_arrays(call: Call, unit: Unit, rows: list[Row], pad_id: int):
    """(prefix index [shards * r] local to the block, ids / mask [shards * r, T]) of a call."""
    r, t = call.rows_per_block, call.width
    local = [{p: j for j, p in enumerate(members)} for members in unit.prefixes]
    index = np.zeros(len(call.rows) * r, np.int32)
    ids = np.full((len(call.rows) * r, t), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for b, block in enumerate(call.rows):
        for j, i in enumerate(block):
            row, out = rows[i], b * r + j
            index[out] = local[b][row.prefix]
            ids[out, :len(row.response)] = row.response
            mask[out, :len(row.response)] = 1
    return index, ids, mask


# ----------------------------------------------------------------------------------------------
# Rows of a mini-batch, running a plan, and per-rollout arrays
# ----------------------------------------------------------------------------------------------


def student_rows(rollouts, rows: np.ndarray, prompt_ids) -> list[Row]:
    """One row per rollout, its prompt as the prefix (shared by the prompt's G rollouts)."""
    return [Row(i, 0, tuple(int(x) for x in prompt_ids(rollouts, r)),
                tuple(rollouts.response_ids(r))) for i, r in enumerate(rows)]


def teacher_rows(rollouts, contexts, rows: np.ndarray, positions: np.ndarray, *,
                 max_len: int) -> list[Row]:
    """One row per valid context of each rollout (correct hint first, then its wrong hints),
    the prompt left-truncated so prompt + response fit `max_len`, as full-row scoring does."""
    from rlcsd_jax import teacher_batch

    out = []
    for i, (r, pos) in enumerate(zip(rows, positions)):
        response = tuple(rollouts.response_ids(r))
        prompts = [contexts.correct_prompts[pos], *contexts.wrong_prompts[pos]]
        for c, prompt in enumerate(prompts):
            kept, _ = teacher_batch.truncate_prompt_left(prompt, len(response), max_len)
            out.append(Row(i, c, tuple(int(x) for x in kept), response))
    return out


def run(p: Plan, *, prefix_fn, continuation_fn, put, get, pad_id: int,
        at_ids=None) -> list[dict]:
    """Score every row: per row a dict of host arrays [len(response), ...].

    prefix_fn(ids, mask) -> cache; continuation_fn(cache, index, ids, mask, at_ids) -> stats
    (both on global arrays); put / get: host <-> global arrays (this process's blocks);
    at_ids(row_id) -> [len(response), k] ids to score each row at, or None."""
    out: list = [None] * len(p.rows)
    for unit in p.units:
        cache = prefix_fn(*put(prefix_arrays(unit, pad_id)))
        for call in unit.calls:
            index, ids, mask = call_arrays(call, unit, p.rows, pad_id)
            at = None
            if at_ids is not None:
                at = np.zeros((*ids.shape, at_ids(0).shape[-1]), np.int32)
                for b, block in enumerate(call.rows):
                    for j, i in enumerate(block):
                        got = at_ids(i)
                        at[b * call.rows_per_block + j, :len(got)] = got
                at = put(at)
            stats = get(continuation_fn(cache, *put((index, ids, mask)), at))
            for b, block in enumerate(call.rows):
                for j, i in enumerate(block):
                    n = len(p.rows[i].response)
                    out[i] = {k: v[b * call.rows_per_block + j, :n] for k, v in stats.items()}
    return out


def per_rollout(p: Plan, outputs: list[dict], key: str, n_rollouts: int, contexts: int,
                width: int, trailing: tuple = ()) -> np.ndarray:
    """[contexts, n_rollouts, width, *trailing] of statistic `key` (zeros where a context is
    absent or past a response's end; `trailing` is the k of top-k statistics)."""
    dtype = np.int32 if key == "topk_ids" else np.float32
    arr = np.zeros((contexts, n_rollouts, width, *trailing), dtype)
    for row, o in zip(p.rows, outputs):
        arr[row.context, row.rollout, :len(o[key])] = o[key]
    return arr
