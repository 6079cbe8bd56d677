"""Scoring a mini-batch with each distinct prefix computed once (`scoring_prefix`): the plan.

A scoring row is (rollout, context, prefix, response).  Teacher rows: one per VALID context of a
rollout (the correct hint, and each real wrong hint: empty wrong-hint slots are not computed),
the prefix being the teacher prompt left-truncated exactly as full-row scoring does.  Student
rows: one per rollout, the prefix being its prompt (the G rollouts of a prompt share it).

Rows are grouped by prefix; a group is the prefix followed by the responses of its rows, cut
into pieces of at most `width` tokens when it is longer (the prefix is then computed once per
piece).  Pieces are packed first-fit-decreasing into shared-prefix rows of `width` tokens, and
each call runs one row per device block (`scoring_prefix.shared_prefix_stats`): the only
padding is the end of each row and the empty rows of the last call.  width = the token budget
per device, or less when one call's worth of rows would be mostly empty (the work / shards),
and at least the longest single prefix + response; rounded by `data.packing.default_bucket`.
Wide rows pack best (benchmarks/teacher_tokens.py), and attention skips the tiles between
sequences, so a wide row costs what its sequences need.
Every process plans its own rows; the processes agree on the width, the number of calls and
each call's scored width (small all-gathers), so the SPMD programs stay in lockstep.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlcsd_jax.data import packing
from rlcsd_jax.distributed import multihost
from rlcsd_jax.data.packing import bucket_length, default_bucket


@dataclasses.dataclass(frozen=True)
class Row:
    rollout: int          # index into the mini-batch's rows
    context: int          # 0 = the student prompt or the correct hint, k = wrong hint k
    prefix: tuple         # prefix token ids (the key that shares it)
    response: tuple       # response token ids (verbatim)


@dataclasses.dataclass
class Piece:
    """A prefix and the rows scored after it, laid out back to back in a packed row."""

    prefix: tuple
    rows: list            # row ids


@dataclasses.dataclass
class Call:
    """One call: this process's packed rows (one per device block, a list of Pieces each; rows
    past the process's last are empty), `scored` scored tokens each."""

    packed: list          # [shards][Piece]
    scored: int           # N (static)


@dataclasses.dataclass
class Plan:
    rows: list            # [Row]
    calls: list           # [Call]
    shards: int           # this process's device blocks
    width: int            # W, tokens per packed row (static)

    def counters(self) -> dict:
        """Tokens the programs compute (padded shapes, this process) and the useful ones (real
        prefix tokens, each distinct prefix once, plus real response tokens)."""
        computed = len(self.calls) * self.shards * self.width
        return {"tokens_computed": float(computed), "tokens_useful": useful_tokens(self.rows)}


def useful_tokens(rows: list[Row]) -> float:
    """Real prefix tokens (each distinct prefix once) plus real response tokens."""
    return float(sum(len(p) for p in {r.prefix for r in rows})
                 + sum(len(r.response) for r in rows))


RESPONSE_STEP = 512


def scored_width(n: int, width: int) -> int:
    """The LM-head width of a call whose fullest row scores n tokens (rows of `width`): the
    default bucket up to RESPONSE_STEP, then its multiples, at most `width`."""
    bucket = bucket_length(n) if n <= RESPONSE_STEP else -(-n // RESPONSE_STEP) * RESPONSE_STEP
    return min(bucket, width)


# Room left in the rows for first-fit's slack when the width is sized to the work.
PACKING_SLACK = 1.03


def widest_row(longest: int, budget: int) -> int:
    """The widest row `row_width` gives for rows of at most `longest` tokens (the planner's
    largest shape)."""
    return default_bucket(max(longest, budget))


def row_width(longest: int, work: int, budget: int) -> int:
    """Packed-row width (module doc): the work per device (`work` tokens) split evenly over
    the fewest calls of at most `budget` tokens, with PACKING_SLACK, but at least `longest`;
    bucketed."""
    calls = max(1, -(-int(work * PACKING_SLACK) // budget))
    return default_bucket(max(longest, min(budget, -(-int(work * PACKING_SLACK) // calls))))


def pieces(rows: list[Row], width: int) -> list[Piece]:
    """Each prefix with its rows (longest response first), cut where prefix + responses would
    pass `width` tokens."""
    by_prefix: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if not row.prefix:
            raise ValueError(f"scoring row {i} (rollout {row.rollout}, context {row.context}) "
                             "has an empty prefix: no state predicts its first response token")
        if row.response:
            by_prefix.setdefault(row.prefix, []).append(i)
    out = []
    for prefix, ids in by_prefix.items():
        piece, size = Piece(prefix, []), len(prefix)
        for i in sorted(ids, key=lambda i: -len(rows[i].response)):
            n = len(rows[i].response)
            if piece.rows and size + n > width:
                out.append(piece)
                piece, size = Piece(prefix, []), len(prefix)
            piece.rows.append(i)
            size += n
        out.append(piece)
    return out


def _size(piece: Piece, rows: list[Row]) -> int:
    return len(piece.prefix) + sum(len(rows[i].response) for i in piece.rows)


def pack(items: list[Piece], rows: list[Row], width: int) -> list[list[Piece]]:
    """First-fit decreasing of the pieces into rows of `width` tokens (fullest rows first)."""
    packed: list[list] = []                   # [tokens used, pieces]
    for n, piece in sorted(((_size(p, rows), p) for p in items), key=lambda x: -x[0]):
        fits = next((r for r in packed if r[0] + n <= width), None)
        if fits is None:
            packed.append([n, [piece]])
        else:
            fits[0] += n
            fits[1].append(piece)
    return [members for _, members in sorted(packed, key=lambda x: -x[0])]


def plan(rows: list[Row], *, shards: int, budget: int) -> Plan:
    """Pieces, packed rows and calls for `rows` on `shards` device blocks (see module doc)."""
    longest = multihost.global_max(max((len(r.prefix) + len(r.response) for r in rows),
                                       default=1))
    work = multihost.global_max(-(-int(useful_tokens(rows)) // shards))
    width = row_width(longest, work, budget)
    packed = pack(pieces(rows, width), rows, width)
    n_calls = multihost.global_max(-(-len(packed) // shards))
    calls = []
    for c in range(n_calls):
        members = packed[c * shards:(c + 1) * shards]
        members += [[] for _ in range(shards - len(members))]
        scored = max((sum(len(rows[i].response) for p in m for i in p.rows) for m in members),
                     default=1)
        scored = scored_width(multihost.global_max(max(scored, 1)), width)
        calls.append(Call(members, scored))
    return Plan(rows, calls, shards, width)


def call_arrays(call: Call, p: Plan, pad_id: int) -> tuple[dict, dict]:
    """Host arrays of a call (`scoring_prefix.shared_prefix_stats`' inputs: input_ids,
    positions, segment_ids, prefix_q_seg, prefix_k_seg [R, W]; pred_index, targets [R, N]) and
    where each row's scores land: {row id: (packed row, first scored index)}."""
    n_rows, w, n = len(call.packed), p.width, call.scored
    arr = dict(input_ids=np.full((n_rows, w), pad_id, np.int32),
               **{k: np.zeros((n_rows, w), np.int32) for k in
                  ("positions", "segment_ids", "prefix_q_seg", "prefix_k_seg")},
               pred_index=np.zeros((n_rows, n), np.int32), targets=np.zeros((n_rows, n), np.int32))
    where = {}
    for j, members in enumerate(call.packed):
        at = scored = 0
        seg = 1
        for group, piece in enumerate(members, start=1):
            plen = len(piece.prefix)
            sl = slice(at, at + plen)
            arr["input_ids"][j, sl] = piece.prefix
            arr["positions"][j, sl] = np.arange(plen)
            arr["segment_ids"][j, sl] = seg
            arr["prefix_k_seg"][j, sl] = group
            last = at + plen - 1                 # the state predicting each first token
            at, seg = at + plen, seg + 1
            for i in piece.rows:
                resp = p.rows[i].response
                n_resp = len(resp)
                sl = slice(at, at + n_resp)
                arr["input_ids"][j, sl] = resp
                arr["positions"][j, sl] = np.arange(plen, plen + n_resp)
                arr["segment_ids"][j, sl] = seg
                arr["prefix_q_seg"][j, sl] = group
                arr["pred_index"][j, scored:scored + n_resp] = np.concatenate(
                    [[last], np.arange(at, at + n_resp - 1)])
                arr["targets"][j, scored:scored + n_resp] = resp
                where[i] = (j, scored)
                at, scored, seg = at + n_resp, scored + n_resp, seg + 1
    return arr, where


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
    out = []
    for i, (r, pos) in enumerate(zip(rows, positions)):
        response = tuple(rollouts.response_ids(r))
        prompts = [contexts.correct_prompts[pos], *contexts.wrong_prompts[pos]]
        for c, prompt in enumerate(prompts):
            kept, _ = packing.truncate_prompt_left(prompt, len(response), max_len)
            out.append(Row(i, c, tuple(int(x) for x in kept), response))
    return out


def run(p: Plan, *, score_fn, put, get, pad_id: int, at_ids=None) -> list[dict]:
    """Score every row: per row a dict of host arrays [len(response), ...].

    score_fn(**call_arrays, at_ids) -> stats (on global arrays); put / get: host <-> global
    arrays (this process's blocks); at_ids(row_id) -> [len(response), k] ids to score each
    row at, or None."""
    out: list = [{} for _ in p.rows]
    for call in p.calls:
        arrays, where = call_arrays(call, p, pad_id)
        at = None
        if at_ids is not None:
            at = np.zeros((*arrays["targets"].shape, at_ids(0).shape[-1]), np.int32)
            for i, (j, s) in where.items():
                got = at_ids(i)
                at[j, s:s + len(got)] = got
            at = put(at)
        stats = get(score_fn(**dict(zip(arrays, put(tuple(arrays.values())))), at_ids=at))
        for i, (j, s) in where.items():
            n = len(p.rows[i].response)
            out[i] = {k: v[j, s:s + n] for k, v in stats.items()}
    return out


def per_rollout(p: Plan, outputs: list[dict], key: str, n_rollouts: int, contexts: int,
                width: int, trailing: tuple = ()) -> np.ndarray:
    """[contexts, n_rollouts, width, *trailing] of statistic `key` (zeros where a context is
    absent or past a response's end; `trailing` is the k of top-k statistics)."""
    dtype = np.int32 if key == "topk_ids" else np.float32
    arr = np.zeros((contexts, n_rollouts, width, *trailing), dtype)
    for row, o in zip(p.rows, outputs):
        if key in o:                              # an empty response has no statistics
            arr[row.context, row.rollout, :len(o[key])] = o[key]
    return arr
