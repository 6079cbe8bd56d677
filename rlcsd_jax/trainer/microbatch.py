"""Micro-batches of a mini-batch, formed by a per-device token budget (like the reference's
`ppo_max_token_len_per_gpu`), so memory is bounded whatever the batch and response lengths.

Each rollout brings a student row (prompt + response) and, for methods with a teacher, teacher
rows (teacher prompt + the same response, one per context, scored one context at a time).  Rows
are sorted longest first and cut into micro-batches whose width class w = bucket(longest row)
fixes the rows per device: r = max(1, budget // w), so each device scores r rows of at most w
tokens at a time, in the forward and in the backward.  Every row is right padded to its own
micro-batch's widths (student, teacher, response), not to the step's longest.

Multi-host: every process holds its own rollouts, so a global micro-batch is the union of each
process's next r * (its batch-axis devices) rows.  The processes exchange their rows' lengths
once per mini-batch (a tiny all-gather) and run the same deterministic plan, so they agree on
the count and shapes of the micro-batches without further talk.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlcsd_jax import multihost
from rlcsd_jax.data.packing import bucket_length


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """This process's share of one global micro-batch.

    rows: indices (into the mini-batch's row list) of this process's rollouts in it, at most
      `local_rows` of them; the rest of the block is padding (zero masks).
    """

    rows: np.ndarray
    local_rows: int
    student_width: int
    teacher_width: int          # 0 without a teacher
    response_width: int


def plan(student_len, teacher_len, response_len, *, budget: int, devices_per_process: int,
         buckets=None, split: bool = True) -> list[MicroBatch]:
    """Micro-batches for this process's rows of one mini-batch (lengths: [n_local] each).

    budget: tokens per device per forward (`train.micro_batch_tokens`).  split=False puts the
    whole mini-batch in one micro-batch (for losses that normalise over the whole batch).
    """
    s = np.asarray(student_len, np.int64)
    t = np.asarray(teacher_len if teacher_len is not None else np.zeros_like(s), np.int64)
    n = np.asarray(response_len, np.int64)
    # Every process's lengths, padded to the longest list with -1 (no row).
    local = np.stack([s, t, n], axis=1) if len(s) else np.zeros((0, 3), np.int64)
    count = multihost.global_max(len(local))
    padded = np.full((count, 3), -1, np.int64)
    padded[:len(local)] = local
    per_process = multihost.allgather(padded[None])             # [P, count, 3]
    orders = [_longest_first(rows) for rows in per_process]
    me = _process_index(per_process.shape[0])
    out, pointer = [], [0] * len(orders)
    while any(p < len(o) for p, o in zip(pointer, orders)):
        heads = [rows[o[p]] for rows, o, p in zip(per_process, orders, pointer) if p < len(o)]
        width = bucket_length(max(int(max(h[0], h[1])) for h in heads), buckets)
        # Rows per device: what the budget allows, but no more than the rows left (rounded up to
        # a power of two, so a short last micro-batch reuses few shapes).
        left = max(len(o) - p for o, p in zip(orders, pointer))
        needed = _pow2(-(-left // devices_per_process))
        per_device = min(max(1, budget // width), needed) if split else needed
        take = per_device * devices_per_process
        chosen = [o[p:p + take] for o, p in zip(orders, pointer)]
        lens = np.concatenate([rows[c] for rows, c in zip(per_process, chosen)])
        out.append(MicroBatch(
            rows=chosen[me], local_rows=take,
            student_width=bucket_length(int(lens[:, 0].max()), buckets),
            teacher_width=(bucket_length(int(lens[:, 1].max()), buckets)
                           if lens[:, 1].max() > 0 else 0),
            response_width=bucket_length(int(lens[:, 2].max()), buckets)))
        pointer = [p + take for p in pointer]
    return out


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _longest_first(rows: np.ndarray) -> np.ndarray:
    """Indices of the real rows (not the -1 padding), longest (student or teacher) first."""
    real = np.flatnonzero(rows[:, 0] >= 0)
    cost = np.maximum(rows[real, 0], rows[real, 1])
    return real[np.argsort(-cost, kind="stable")]


def _process_index(num: int) -> int:
    import jax

    return jax.process_index() if num > 1 else 0
