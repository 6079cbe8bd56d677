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

Under `train.loss_aggregation=reference_micro_batch` (`split` is a `ReferenceRule`) the
micro-batches are the reference's instead (THU-BPM/RLCSD 7eeff3c, its vendored verl:
`dp_actor._prepare_update_micro_batches`, `seqlen_balancing.rearrange_micro_batches`): the
mini-batch is read as the reference's 8 data-parallel ranks' shares (contiguous chunks of
ceil(M / 8) rows, 16 in every reference config), each share is cut into the number of
micro-batches its token budget asks for (the largest over the ranks, as the reference's
all-reduce MAX), Karmarkar-Karp balanced by the workload `24576·len + len²`.  The loss is then
normalised over each such micro-batch (`update._loss`), so these groups change the loss.  Rows
are still padded per micro-batch (each micro-batch is one forward, its rows spread over the
batch devices); `train.micro_batch_tokens` does not apply.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rlcsd_jax import losses
from rlcsd_jax.distributed import multihost
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
         buckets=None, split=True, contexts=None, positions=None) -> list[MicroBatch]:
    """Micro-batches for this process's rows of one mini-batch (lengths: [n_local] each).

    budget: tokens per device per forward (`train.micro_batch_tokens`).  split=False puts the
    whole mini-batch in one micro-batch (for losses that normalise over the whole batch); a
    `ReferenceRule` (`setup.split_minibatches` under reference_micro_batch aggregation) forms
    the reference's micro-batches (`reference_plan`), for which `contexts` / `positions` (the
    step's `batches.Contexts` and the rows' positions in it) give the teacher rows' lengths.
    """
    if isinstance(split, ReferenceRule):
        return reference_plan(student_len, teacher_len, response_len, rule=split,
                              devices_per_process=devices_per_process, buckets=buckets,
                              contexts=contexts, positions=positions)
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


# ----------------------------------------------------------------------------------------------
# The reference's micro-batches (train.loss_aggregation=reference_micro_batch).

# The reference trains on one node of 8 GPUs (scripts/_run_verl.sh: trainer.n_gpus_per_node=8,
# nnodes=1); verl gives each its share of a mini-batch: 16 prompts x 8 rollouts / 8 = 16 rows.
REFERENCE_GPUS = 8
# seqlen_balancing.calculate_workload: 24576 * len + len^2 (a 7B model's FLOPs, up to a factor).
WORKLOAD_PER_TOKEN = 24576
# dp_actor.update_policy's `needs_teacher_forward` (`losses.METHODS[m].reference_teacher_aware`):
# those methods' micro-batches budget the student and the teacher rows together; srpo (absent
# from its list) and grpo (no teacher) are cut by student tokens alone.


@dataclasses.dataclass(frozen=True)
class ReferenceRule:
    """How the reference cuts a mini-batch into the micro-batches its loss is normalised over.

    budget: `ppo_max_token_len_per_gpu` (`train.teacher_max_len`, the reference's per-task and
      per-method value under `config_base.reference_config`).
    rank_rows: rows of one reference GPU's share of a mini-batch (ceil(M / 8)).
    teacher_aware: the method's teacher rows count (`MethodSpec.reference_teacher_aware`).
    """

    method: str
    budget: int
    rank_rows: int
    teacher_aware: bool


def reference_rule(method: str, *, budget: int, minibatch_rows: int,
                   has_teacher: bool) -> ReferenceRule:
    return ReferenceRule(method=method, budget=int(budget),
                         rank_rows=max(1, -(-int(minibatch_rows) // REFERENCE_GPUS)),
                         teacher_aware=(has_teacher
                                        and losses.METHODS[method].reference_teacher_aware))


def workload(lengths) -> np.ndarray:
    """The reference's cost of a sequence of each length (int64)."""
    n = np.asarray(lengths, np.int64)
    return WORKLOAD_PER_TOKEN * n + n * n


def karmarkar_karp(values, k: int) -> list[list[int]]:
    """verl's `karmarkar_karp(values, k, equal_size=False)`: k sets of indices whose sums of
    `values` are balanced by the largest differencing method, each sorted; ties are broken as
    verl breaks them (its heap and set orders), so the sets are the reference's."""
    import heapq

    class _Set:
        __slots__ = ("sum", "items")

        def __init__(self):
            self.sum, self.items = 0, []

        def __lt__(self, other):
            if self.sum != other.sum:
                return self.sum < other.sum
            if len(self.items) != len(other.items):
                return len(self.items) < len(other.items)
            return self.items < other.items

    class _State:
        __slots__ = ("sets",)

        def __init__(self, idx, value):
            self.sets = [_Set() for _ in range(k)]
            self.sets[0].items.append((idx, value))
            self.sets[0].sum = value
            self.sets = sorted(self.sets, reverse=True)

        def merge(self, other):
            for i in range(k):
                self.sets[i].items.extend(other.sets[k - 1 - i].items)
                self.sets[i].sum += other.sets[k - 1 - i].sum
            self.sets = sorted(self.sets, reverse=True)

        def __lt__(self, other):       # the largest spread first, then the largest top set
            spread, other_spread = (self.sets[0].sum - self.sets[-1].sum,
                                    other.sets[0].sum - other.sets[-1].sum)
            if spread != other_spread:
                return spread > other_spread
            return self.sets[0] > other.sets[0]

    values = [int(v) for v in values]
    if not 1 <= k <= len(values):
        raise ValueError(f"cannot cut {len(values)} values into {k} non-empty sets")
    heap = []
    for value, idx in sorted((v, i) for i, v in enumerate(values)):
        heapq.heappush(heap, _State(idx, value))
    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        first.merge(second)
        heapq.heappush(heap, first)
    return [sorted(idx for idx, _ in s.items) for s in heap[0].sets]


def _ordered(parts: list[list[int]], work) -> list[list[int]]:
    """dp_actor's order of a rank's micro-batches: by (workload, first row) descending, then the
    lighter ones at both ends (`[::2][::-1] + [1::2]`).  Only the order of the additions
    depends on it."""
    parts = sorted(parts, key=lambda p: (sum(int(work[i]) for i in p), p[0] if p else 0),
                   reverse=True)
    return parts[::2][::-1] + parts[1::2]


def reference_rank_count(student_len, teacher_len, budget: int) -> int:
    """The number of micro-batches one rank's rows ask for (before the all-reduce MAX).

    Student-only (`rearrange_micro_batches`): ceil(student tokens / budget).  With teacher rows
    (`_get_batch_idx_list_from_effective_workloads`): ceil(total workload / workload(budget)),
    a row's workload being its student row's plus each of its teacher rows'.  At most the rows.
    """
    s = np.asarray(student_len, np.int64)
    if teacher_len is None:
        need = -(-int(s.sum()) // int(budget))
    else:
        total = int(workload(s).sum() + workload(teacher_len).sum())
        need = -(-total // max(int(workload(budget)), 1))
    return min(len(s), need)


def reference_micro_batches(student_len, teacher_len=None, *, budget: int,
                            rank_rows: int) -> list[np.ndarray]:
    """The reference's micro-batches of one mini-batch: row indices of each.

    student_len: [n] prompt + response tokens; teacher_len: None (student-only rule), or
    [n, C] tokens of each row's C teacher rows (teacher prompt + response, as the reference
    builds them).  The rows are read as consecutive ranks' shares of `rank_rows` rows; every
    rank takes the largest rank's micro-batch count (capped at its rows) and cuts its rows
    into that many Karmarkar-Karp sets balanced by workload.  Rank-major order.
    """
    s = np.asarray(student_len, np.int64)
    t = None if teacher_len is None else np.asarray(teacher_len, np.int64).reshape(len(s), -1)
    ranks = [np.arange(i, min(i + rank_rows, len(s))) for i in range(0, len(s), rank_rows)]
    if not ranks:
        return []
    count = max(reference_rank_count(s[r], None if t is None else t[r], budget) for r in ranks)
    out = []
    for r in ranks:
        work = workload(s[r])
        if t is not None:
            work = work + workload(t[r]).sum(axis=1)
        parts = karmarkar_karp(work, min(count, len(r)))
        out.extend(r[np.asarray(p, np.int64)] for p in _ordered(parts, work))
    return out


def reference_teacher_lengths(method: str, contexts, positions, response_len, *,
                              budget: int) -> np.ndarray:
    """[n, C] lengths of the teacher rows the reference scores for each rollout.

    A teacher prompt is cut from the left to `budget` - response tokens, so a row is
    response + min(prompt, budget - response).  opsd / sdpo / rlsd: one row (the GT-solution
    context); opsd_ectr / rlsd_ectr: the correct and the wrong context; rlcsd: the correct one
    and K wrong slots, K the most wrong hints any of the step's rollouts has (the reference
    packs every rollout's group to K and fills a short one with copies of its first wrong
    prompt, which are scored and so count)."""
    n = np.asarray(response_len, np.int64)

    def row(prompt, length):
        return int(length) + min(len(prompt), max(int(budget) - int(length), 0))

    spec = losses.METHODS[method]
    if spec.wrong_hints == "k_max":     # the step's most wrong hints, over every process
        slots = multihost.global_max(max((len(w) for w in contexts.wrong_prompts), default=0))
    else:
        slots = spec.num_wrong_slots(0)
    out = np.zeros((len(n), 1 + slots), np.int64)
    for i, (pos, length) in enumerate(zip(positions, n)):
        wrong = list(contexts.wrong_prompts[pos]) or [contexts.correct_prompts[pos]]
        prompts = [contexts.correct_prompts[pos]] + [
            wrong[j] if j < len(wrong) else wrong[0] for j in range(slots)]
        out[i] = [row(p, length) for p in prompts]
    return out


_warned = set()


def reference_plan(student_len, teacher_len, response_len, *, rule: ReferenceRule,
                   devices_per_process: int, buckets=None, contexts=None,
                   positions=None) -> list[MicroBatch]:
    """`plan` under the reference's rule: the micro-batches of `reference_micro_batches` over
    the global mini-batch (every process's rows, in process order), each one block of
    devices_per_process x (a power of two) rows per process, widths as `plan` sets them."""
    s = np.asarray(student_len, np.int64)
    t = np.asarray(teacher_len if teacher_len is not None else np.zeros_like(s), np.int64)
    n = np.asarray(response_len, np.int64)
    ref_t = None
    if rule.teacher_aware:
        if contexts is not None and positions is not None:
            ref_t = reference_teacher_lengths(rule.method, contexts, positions, n,
                                              budget=rule.budget)
        else:
            if rule.method not in _warned:
                _warned.add(rule.method)
                import logging

                logging.warning(
                    "reference_micro_batch: the teacher rows' lengths were not given "
                    "(microbatch.plan(contexts=, positions=)); %s micro-batches are cut by %s",
                    rule.method, "the longest teacher row" if teacher_len is not None
                    else "student tokens alone")
            if teacher_len is not None:
                ref_t = t[:, None]
    width = 0 if ref_t is None else multihost.global_max(ref_t.shape[1])
    local = np.zeros((len(s), 3 + width), np.int64)
    local[:, 0], local[:, 1], local[:, 2] = s, t, n
    if ref_t is not None and len(s):
        local[:, 3:3 + ref_t.shape[1]] = ref_t
    count = multihost.global_max(len(local))
    padded = np.full((count, local.shape[1]), -1, np.int64)
    padded[:len(local)] = local
    per_process = multihost.allgather(padded[None])               # [P, count, 3 + C]
    return reference_blocks(per_process, _process_index(per_process.shape[0]), rule=rule,
                            devices_per_process=devices_per_process, buckets=buckets,
                            with_teacher=ref_t is not None)


def reference_blocks(per_process, me: int, *, rule: ReferenceRule, devices_per_process: int,
                     buckets=None, with_teacher: bool) -> list[MicroBatch]:
    """Process `me`'s share of the reference's micro-batches of a global mini-batch.

    per_process: [P, count, 3 + C] every process's rows (student, longest teacher and response
    tokens, then the C teacher rows of the rule; -1 past a process's rows).  The global rows
    are the processes' in process order; each micro-batch is a block of devices_per_process x
    (a power of two) rows on every process, enough for the process holding most of its rows.
    """
    owner = [(p, int(i)) for p, rows in enumerate(per_process)
             for i in np.flatnonzero(rows[:, 0] >= 0)]
    if not owner:
        return []
    rows = np.stack([per_process[p, i] for p, i in owner])
    groups = reference_micro_batches(rows[:, 0], rows[:, 3:] if with_teacher else None,
                                     budget=rule.budget, rank_rows=rule.rank_rows)
    out = []
    for g in groups:
        mine = np.asarray([owner[j][1] for j in g if owner[j][0] == me], np.int64)
        most = max(sum(owner[j][0] == p for j in g) for p in range(len(per_process)))
        lens = rows[g]
        out.append(MicroBatch(
            rows=mine, local_rows=_pow2(-(-most // devices_per_process)) * devices_per_process,
            student_width=bucket_length(int(lens[:, 0].max()), buckets),
            teacher_width=(bucket_length(int(lens[:, 1].max()), buckets)
                           if lens[:, 1].max() > 0 else 0),
            response_width=bucket_length(int(lens[:, 2].max()), buckets)))
    return out
