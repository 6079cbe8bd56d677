"""train.loss_aggregation=reference_micro_batch against the reference implementation.

The reference is THU-BPM/RLCSD at 7eeff3c, its vendored verl:
  * micro-batches: `verl/workers/actor/dp_actor.py` (`_prepare_update_micro_batches`,
    `_get_batch_idx_list_from_effective_workloads`, `update_policy`'s `needs_teacher_forward`)
    and `verl/utils/seqlen_balancing.py` (`calculate_workload`, `karmarkar_karp`,
    `rearrange_micro_batches`);
  * the loss of a micro-batch: `verl/trainer/ppo/core_algos.py` (`compute_policy_loss_srpo`,
    transcribed below; sdpo and rlcsd through `test_losses`' NumPy versions of the same
    formulas), times `loss_scale_factor = n_mb / ppo_mini_batch_size` on each of the 8 GPUs,
    whose gradients are averaged.

The `ref_*` functions are a float64 NumPy transcription of that code (the partition one line
for one line, with verl's heap and tie orders), written apart from `trainer.microbatch`.  The
rows' token lengths (which decide the micro-batches) are realistic (prompts up to 2k tokens,
responses up to 16k); the loss arrays have T = 6 positions, since the loss of a micro-batch
does not depend on how the lengths were drawn.
"""

import heapq
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fake_rollouts
from rlcsd_jax import losses
from rlcsd_jax.trainer import microbatch
from test_losses import np_is, np_jsd, np_log_softmax, np_rlcsd, np_sdpo, np_tail

BUDGET = 40960
RANK_ROWS = 16          # 16 prompts x 8 rollouts / 8 GPUs in every reference config
GPUS = 8
M = RANK_ROWS * GPUS    # the nominal mini-batch


# ----------------------------------------------------------------------------------------------
# The reference's rule, transcribed.


def ref_calculate_workload(seqlen):
    seqlen = np.asarray(seqlen, np.int64)
    return 24576 * seqlen + seqlen ** 2


def ref_karmarkar_karp(seqlen_list, k_partitions):
    """seqlen_balancing.karmarkar_karp(..., equal_size=False), as written there."""

    class Set:
        def __init__(self):
            self.sum = 0
            self.items = []

        def add(self, idx, val):
            self.items.append((idx, val))
            self.sum += val

        def merge(self, other):
            for idx, val in other.items:
                self.items.append((idx, val))
                self.sum += val

        def __lt__(self, other):
            if self.sum != other.sum:
                return self.sum < other.sum
            if len(self.items) != len(other.items):
                return len(self.items) < len(other.items)
            return self.items < other.items

    class State:
        def __init__(self, items, k):
            self.k = k
            self.sets = [Set() for _ in range(k)]
            assert len(items) in [1, k]
            for i, (idx, seqlen) in enumerate(items):
                self.sets[i].add(idx=idx, val=seqlen)
            self.sets = sorted(self.sets, reverse=True)

        def get_partitions(self):
            return [[idx for idx, _ in s.items] for s in self.sets]

        def merge(self, other):
            for i in range(self.k):
                self.sets[i].merge(other.sets[self.k - 1 - i])
            self.sets = sorted(self.sets, reverse=True)

        @property
        def spread(self):
            return self.sets[0].sum - self.sets[-1].sum

        def __lt__(self, other):
            if self.spread != other.spread:
                return self.spread > other.spread
            return self.sets[0] > other.sets[0]

    sorted_seqlen_list = sorted([(seqlen, i) for i, seqlen in enumerate(seqlen_list)])
    states_pq = []
    for seqlen, idx in sorted_seqlen_list:
        heapq.heappush(states_pq, State(items=[(idx, seqlen)], k=k_partitions))
    while len(states_pq) > 1:
        state0 = heapq.heappop(states_pq)
        state1 = heapq.heappop(states_pq)
        state0.merge(state1)
        heapq.heappush(states_pq, state0)
    return states_pq[0].get_partitions()


def ref_get_seqlen_balanced_partitions(seqlen_list, k_partitions):
    assert len(seqlen_list) >= k_partitions
    partitions = ref_karmarkar_karp(seqlen_list, k_partitions)
    assert len(partitions) == k_partitions and all(len(p) > 0 for p in partitions)
    return [sorted(p) for p in partitions]


def ref_order(batch_idx_list, workloads):
    batch_idx_list.sort(key=lambda partition: (sum(workloads[idx] for idx in partition),
                                               partition[0] if partition else 0), reverse=True)
    return batch_idx_list[::2][::-1] + batch_idx_list[1::2]


def ceildiv(a, b):
    return -(a // -b)


def ref_teacher_mask_sums(method, correct_prompts, wrong_groups, response_lens, budget):
    """Attention-mask sums of the teacher tensors self_distill_main builds for a batch:
    sdpo / opsd / rlsd: teacher_* [B]; rlcsd: teacher_correct_* [B] and teacher_wrong_multi_*
    [B, K] (K = the batch's largest group; a short group repeats its first prompt)."""

    def build(prompts, responses):       # _build_teacher_batch_from_prompts
        out = []
        for prompt_ids, n in zip(prompts, responses):
            max_prompt_tokens = max(budget - n, 0)
            if len(prompt_ids) > max_prompt_tokens:
                prompt_ids = prompt_ids[-max_prompt_tokens:] if max_prompt_tokens > 0 else []
            out.append(len(prompt_ids) + n)
        return np.asarray(out, np.int64)

    masks = [build(correct_prompts, response_lens)]
    if method == "rlcsd":                # _build_teacher_multi_batch_from_prompt_groups
        max_group_size = max(len(g) for g in wrong_groups)
        flat = [(g[j] if j < len(g) else g[0]) for g in wrong_groups for j in range(max_group_size)]
        flat_n = [n for n in response_lens for _ in range(max_group_size)]
        masks.append(build(flat, flat_n).reshape(len(response_lens), max_group_size))
    return masks


def ref_rank_count(student, teacher_masks, max_token_len):
    """A rank's micro-batch count before the all-reduce MAX."""
    if teacher_masks is None:                       # rearrange_micro_batches
        return min(len(student), ceildiv(int(student.sum()), max_token_len))
    effective = ref_calculate_workload(student)     # _get_batch_idx_list_from_effective_workloads
    for t in teacher_masks:
        effective = effective + (ref_calculate_workload(t).sum(axis=1) if t.ndim == 2
                                 else ref_calculate_workload(t))
    max_workload = int(ref_calculate_workload(np.asarray([max_token_len]))[0])
    return min(len(student), ceildiv(int(effective.sum()), max(max_workload, 1)))


def ref_rank_partition(student, teacher_masks, num_micro_batches):
    workloads = ref_calculate_workload(student)
    if teacher_masks is not None:
        for t in teacher_masks:
            workloads = workloads + (ref_calculate_workload(t).sum(axis=1) if t.ndim == 2
                                     else ref_calculate_workload(t))
        num_micro_batches = min(num_micro_batches, len(student))
    workloads = [int(w) for w in workloads]
    parts = ref_get_seqlen_balanced_partitions(workloads, num_micro_batches)
    return ref_order(parts, workloads)


def ref_micro_batches(student, teacher_masks, max_token_len, rank_rows=RANK_ROWS):
    """Every rank's micro-batches (global row indices), rank by rank.  The ranks hold
    consecutive rows and agree on the count by an all-reduce MAX."""
    ranks = [np.arange(i, min(i + rank_rows, len(student)))
             for i in range(0, len(student), rank_rows)]
    sub = lambda r: None if teacher_masks is None else [t[r] for t in teacher_masks]  # noqa
    num = max(ref_rank_count(student[r], sub(r), max_token_len) for r in ranks)
    return [[r[j] for j in part] for r in ranks
            for part in ref_rank_partition(student[r], sub(r), num)]


def ref_srpo(d, lp, sp, beta=1.0, alpha=0.5, is_clip=2.0, lo=0.2, hi=0.2, clip_c=3.0):
    """core_algos.compute_policy_loss_srpo (sparse top-k + tail) on one micro-batch; `lp` and
    `sp` are the variables, d["logp"] the detached log-probs of the importance weight."""
    valid = d["mask"]
    adv = np.broadcast_to(d["advantages"][:, None], lp.shape) * valid
    rollout_adv = (adv * valid).sum(1) / np.maximum(valid.sum(1), 1.0)
    correct = (rollout_adv > 0).astype(np.float64)
    grpo_mask, sdpo_mask = correct[:, None] * valid, (1.0 - correct)[:, None] * valid
    ratio = np.exp(np.clip(lp - d["old_logp"], -20.0, 20.0))
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - lo, 1 + hi)
    clip1 = np.maximum(pg1, pg2)
    clip2 = np.minimum(-adv * clip_c, clip1)
    grpo_tok = np.where(adv < 0, clip2, clip1)
    jsd = np_jsd(np_tail(sp), np_tail(d["teacher_topk_logp_s"]), alpha)
    sdpo_tok = jsd * np_is(d["logp"], d["old_logp"], is_clip)     # detached: d's logp
    log_w = -beta * d["teacher_entropy"]
    log_w_max = np.where(sdpo_mask > 0, log_w, -1.0e30).max()
    w_unnorm = np.exp(np.minimum(log_w - log_w_max, 50.0)) * sdpo_mask
    w_mean = w_unnorm.sum() / max(sdpo_mask.sum(), 1.0)
    sdpo_tok = sdpo_tok * (w_unnorm / max(w_mean, 1e-12))
    return float(((grpo_tok * grpo_mask).sum() + (sdpo_tok * sdpo_mask).sum())
                 / max(grpo_mask.sum() + sdpo_mask.sum(), 1.0))


REF_LOSS = {
    "srpo": lambda d, lp, sp: ref_srpo(d, lp, sp),
    "sdpo": lambda d, lp, sp: np_sdpo(d, sp, d["logp"]),
    "rlcsd": lambda d, lp, sp: np_rlcsd(d, lp, d["logp"]),
}


def ref_total(method, d, groups, lp=None, sp=None, rank_rows=RANK_ROWS, gpus=GPUS):
    """The mini-batch's loss as the reference's gradient sees it: each micro-batch's loss times
    n_mb / ppo_mini_batch_size on its rank, averaged over the ranks."""
    lp = d["logp"] if lp is None else lp
    sp = d["student_topk_logp_s"] if sp is None else sp
    total = 0.0
    for g in groups:
        g = np.asarray(g)
        sub = {k: v[g] for k, v in d.items()}
        total += REF_LOSS[method](sub, lp[g], sp[g]) * len(g) / rank_rows
    return total / gpus


# ----------------------------------------------------------------------------------------------
# Inputs.


def make_rows(seed, B=M, T=6, K=4, V=10, k=4, group=8, longest=16384, hints=(200, 8000),
              cut=0.1):
    """Loss arrays of B rollouts (groups of `group`), in test_losses.make_data's style, and the
    token lengths and teacher prompts (as id arrays) the micro-batches are formed from."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.float64)
    s_full = np_log_softmax(1.5 * rng.normal(size=(B, T, V)))
    t_full = np_log_softmax(s_full + 0.8 * rng.normal(size=(B, T, V)))
    w_full = np_log_softmax(t_full[:, None] + 0.8 * rng.normal(size=(B, K, T, V)))
    y = rng.integers(V, size=(B, T))
    take = lambda full, ids: np.take_along_axis(full, ids, axis=-1)  # noqa: E731
    logp = take(s_full, y[..., None])[..., 0]
    s_ids = np.argsort(-s_full, -1)[..., :k]
    n_wrong = rng.integers(1, K + 1, size=B)
    d = {
        "mask": mask,
        "advantages": rng.choice([-1.2, -0.4, 0.0, 0.3, 1.1], size=B),
        "logp": logp,
        "old_logp": logp + 0.15 * rng.normal(size=(B, T)),
        "teacher_entropy": -np.sum(np.exp(t_full) * t_full, -1),
        "student_topk_logp_s": take(s_full, s_ids),
        "teacher_topk_logp_s": take(t_full, s_ids),
        "teacher_correct_logp": take(t_full, y[..., None])[..., 0],
        "teacher_wrong_logp": np.stack([take(w_full[:, j], y[..., None])[..., 0]
                                        for j in range(K)], axis=1),
        "wrong_valid": np.arange(K)[None] < n_wrong[:, None],
    }
    for key, val in d.items():
        if key in ("mask", "advantages", "wrong_valid"):
            continue
        m = mask[:, None] if key == "teacher_wrong_logp" else mask
        d[key] = np.where(m.reshape(m.shape + (1,) * (val.ndim - m.ndim)) > 0, val, 0.0)
    prompt = np.repeat(rng.integers(100, 2000, size=B // group), group)
    response = rng.integers(300, longest + 1, size=B)
    # Teacher prompts: the prompt with a hint; a few long enough to be cut to the budget.
    hint = lambda: int(rng.choice([rng.integers(*hints), rng.integers(25000, 40000)],  # noqa
                                  p=[1 - cut, cut]))
    correct = [np.zeros(p + hint(), np.int32) for p in prompt]
    wrong = [[np.zeros(p + hint(), np.int32) for _ in range(nw)]
             for p, nw in zip(prompt, n_wrong)]
    lengths = dict(student=(prompt + response).astype(np.int64), response=response,
                   correct=correct, wrong=wrong)
    return d, lengths


def contexts_for(method, lengths):
    wrong = (lengths["wrong"] if method in ("rlcsd", "opsd_ectr", "rlsd_ectr")
             else [[] for _ in lengths["wrong"]])
    return types.SimpleNamespace(correct_prompts=lengths["correct"], wrong_prompts=wrong)


def reference_groups(method, lengths, budget=BUDGET, rank_rows=RANK_ROWS):
    masks = None
    if losses.METHODS[method].reference_teacher_aware:
        ctx = contexts_for(method, lengths)
        masks = ref_teacher_mask_sums(method, ctx.correct_prompts, ctx.wrong_prompts,
                                      [int(n) for n in lengths["response"]], budget)
    return ref_micro_batches(lengths["student"], masks, budget, rank_rows)


def our_plan(method, lengths, budget=BUDGET, minibatch_rows=M, devices=1):
    rule = microbatch.reference_rule(method, budget=budget, minibatch_rows=minibatch_rows,
                                     has_teacher=method != "grpo")
    n = len(lengths["student"])
    return microbatch.plan(lengths["student"], None, lengths["response"], budget=999,
                           devices_per_process=devices, split=rule,
                           contexts=contexts_for(method, lengths), positions=np.arange(n))


ARGS = {
    "srpo": dict(logp="logp", old_logp="old_logp", advantages="advantages", mask="mask",
                 student_topk_logp="student_topk_logp_s",
                 teacher_topk_logp="teacher_topk_logp_s", teacher_entropy="teacher_entropy"),
    "sdpo": dict(logp="logp", old_logp="old_logp", student_topk_logp="student_topk_logp_s",
                 teacher_topk_logp="teacher_topk_logp_s", mask="mask"),
    "rlcsd": dict(logp="logp", old_logp="old_logp", advantages="advantages", mask="mask",
                  teacher_correct_logp="teacher_correct_logp",
                  teacher_wrong_logp="teacher_wrong_logp", wrong_valid="wrong_valid"),
}


def our_total_fn(method, d, micro, denominator):
    """(logp, student_topk_logp) -> the sum over `micro` of losses.micro_batch(loss) on each
    micro-batch's block (its rows, then zero-mask rows up to local_rows), as update._loss."""
    agg = losses.micro_batch(losses.get(method))

    def block(x, mb):
        x = x[np.asarray(mb.rows, np.int64)]
        pad = np.zeros((mb.local_rows - len(mb.rows),) + x.shape[1:], x.dtype)
        return jnp.concatenate([x, pad]) if isinstance(x, jax.Array) else np.concatenate([x, pad])

    def total(lp, sp):
        arrays = dict(d, logp=lp, student_topk_logp_s=sp)
        out = 0.0
        for mb in micro:
            args = {a: block(arrays[key], mb) for a, key in ARGS[method].items()}
            out = out + agg(rollout_denominator=denominator, **args)[0]
        return out

    return total


# ----------------------------------------------------------------------------------------------
# Tests.


def test_karmarkar_karp_is_verls():
    """Equal sets, in the same order, with verl's tie-breaking (many equal values)."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 20))
        high = [3, 10, 10 ** 9][trial % 3]
        values = [int(v) for v in rng.integers(0, high, size=n)]
        k = int(rng.integers(1, n + 1))
        ours = microbatch.karmarkar_karp(values, k)
        ref = [sorted(p) for p in ref_karmarkar_karp(values, k)]
        assert ours == ref, (values, k)


@pytest.mark.parametrize("method", ["srpo", "grpo", "sdpo", "opsd", "rlcsd", "rlsd_ectr"])
def test_micro_batches_are_the_references(method):
    """microbatch.plan under a ReferenceRule (with the step's contexts, as the trainer hook
    passes them) gives the reference's micro-batches, rank by rank, in its order; srpo and grpo
    by student tokens, the others by student + teacher workload."""
    for seed in range(3):
        _, lengths = make_rows(seed)
        if method == "rlsd_ectr":           # one wrong hint each
            lengths["wrong"] = [w[:1] for w in lengths["wrong"]]
        ours = [list(mb.rows) for mb in our_plan(method, lengths)]
        if method == "rlsd_ectr":
            ctx = types.SimpleNamespace(correct_prompts=lengths["correct"],
                                        wrong_prompts=lengths["wrong"])
            masks = [ref_teacher_mask_sums("sdpo", ctx.correct_prompts, None,
                                           [int(n) for n in lengths["response"]], BUDGET)[0],
                     ref_teacher_mask_sums("sdpo", [w[0] for w in ctx.wrong_prompts], None,
                                           [int(n) for n in lengths["response"]], BUDGET)[0]]
            ref = ref_micro_batches(lengths["student"], masks, BUDGET)
        else:
            ref = reference_groups(method, lengths)
        assert ours == [list(g) for g in ref]
        sizes = [len(g) for g in ours]
        assert sorted(i for g in ours for i in g) == list(range(M))
        # rlcsd's six teacher rows leave one rollout per micro-batch at math lengths.
        assert max(sizes) > 1 or method == "rlcsd", sizes
    if method in ("srpo", "grpo"):   # student tokens only: bigger groups than with teachers
        assert np.mean(sizes) > 3, sizes


def test_teacher_rows_as_the_reference_builds_them():
    """Prompts cut from the left to budget - response; rlcsd's wrong slots padded to the
    step's largest group with the first wrong prompt; the correct context first."""
    ctx = types.SimpleNamespace(
        correct_prompts=[np.zeros(100), np.zeros(900), np.zeros(50)],
        wrong_prompts=[[np.zeros(30), np.zeros(40)], [np.zeros(10)],
                       [np.zeros(5), np.zeros(6), np.zeros(7)]])
    got = microbatch.reference_teacher_lengths("rlcsd", ctx, np.array([1, 0]), [200, 20],
                                               budget=1000)
    np.testing.assert_array_equal(got, [[1000, 210, 210, 210], [120, 50, 60, 50]])
    sdpo = types.SimpleNamespace(correct_prompts=ctx.correct_prompts,
                                 wrong_prompts=[[], [], []])
    np.testing.assert_array_equal(
        microbatch.reference_teacher_lengths("sdpo", sdpo, np.arange(3), [20, 200, 2000],
                                             budget=1000), [[120], [1000], [2000]])


@pytest.mark.parametrize("method", ["srpo", "sdpo", "rlcsd"])
def test_loss_is_the_references(method):
    """The mini-batch's loss (and gradient) from our micro-batches and losses.micro_batch
    equal the reference's: each micro-batch normalised on its own, times n_mb / 16 per rank,
    averaged over 8 ranks.  Per-rollout and whole-mini-batch normalisation differ from it."""
    # rlcsd with short responses and hints (its micro-batches then hold several rollouts).
    d, lengths = make_rows(seed=11, **(dict(longest=2048, hints=(100, 2000), cut=0.0)
                                       if method == "rlcsd" else {}))
    micro = our_plan(method, lengths)
    groups = reference_groups(method, lengths)
    with jax.enable_x64(True):
        jd = {k: jnp.asarray(v) for k, v in d.items()}
        total = our_total_fn(method, jd, micro, M)
        ours = float(jax.jit(total)(jd["logp"], jd["student_topk_logp_s"]))
        ref = ref_total(method, d, groups)
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)
        fn = losses.get(method)
        args = {a: jd[key] for a, key in ARGS[method].items()}
        per_rollout = float(losses.per_rollout(fn)(rollout_denominator=M, **args)[0])
        whole = float(fn(**args)[0])
        assert abs(ours - per_rollout) > 1e-4 and abs(ours - whole) > 1e-4, (ours, per_rollout,
                                                                            whole)
        if method == "rlcsd":
            return
        grads = jax.jit(jax.grad(total, argnums=(0, 1)))(jd["logp"], jd["student_topk_logp_s"])
    rng = np.random.default_rng(0)
    for which, x, g in (("lp", d["logp"], grads[0]), ("sp", d["student_topk_logp_s"], grads[1])):
        for _ in range(8):
            idx = tuple(int(rng.integers(s)) for s in x.shape)
            while d["mask"][idx[:2]] == 0:
                idx = tuple(int(rng.integers(s)) for s in x.shape)
            fd = []
            for eps in (1e-6, -1e-6):
                xx = x.copy()
                xx[idx] += eps
                fd.append(ref_total(method, d, groups, **{which: xx}))
            np.testing.assert_allclose(np.asarray(g)[idx], (fd[0] - fd[1]) / 2e-6, rtol=1e-5,
                                       atol=1e-9, err_msg=f"d/d{which}{idx}")


def issue_example():
    """A 4-rollout SRPO micro-batch: one all-wrong group (rewards 0 -> A = 0, every token
    distilled), rollouts of 3, 2, 4 and 6 tokens.  At every token the student puts 0.99 on its
    top-1 id and the teacher 0.01 (JSD J = 0.637), the importance weights make the per-token
    values 0.40, 0.56, 0.70, 0.90, and the teacher entropies are 2.0, 1.5, 1.0, 0.3.

    Issue 20 quotes 0.804 (reference) vs 0.640 (per rollout) for an example whose inputs were
    not kept; this one is built to have both values: the per-rollout loss is the mean of the
    four values, the reference's weighs them by length x exp(-entropy)."""
    lens, values = np.array([3, 2, 4, 6]), np.array([0.40, 0.56, 0.70, 0.90])
    entropy, T = np.array([2.0, 1.5, 1.0, 0.3]), 6
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.float64)
    s_top, t_top = np.log(0.99), np.log(0.01)
    jsd = float(np_jsd(np_tail(np.array([[s_top]])), np_tail(np.array([[t_top]])))[0])
    old = -np.ones((4, T))
    logp = old + np.log(values / jsd)[:, None]
    d = {"mask": mask, "advantages": np.zeros(4), "logp": logp * mask, "old_logp": old * mask,
         "student_topk_logp_s": (s_top * mask)[..., None],
         "teacher_topk_logp_s": (t_top * mask)[..., None],
         "teacher_entropy": entropy[:, None] * mask}
    return d, jsd


def test_issue_example_reproduces_0804_vs_0640():
    d, jsd = issue_example()
    assert abs(jsd - 0.637) < 5e-4
    # One reference GPU's 4 rollouts of a math run: 40,960 tokens hold them in one micro-batch.
    student = np.array([1200 + 2000, 1200 + 3000, 1200 + 5000, 1200 + 9000])
    micro = microbatch.plan(student, None, student - 1200, budget=999, devices_per_process=1,
                            split=microbatch.reference_rule("srpo", budget=BUDGET,
                                                            minibatch_rows=M, has_teacher=True))
    assert [list(mb.rows) for mb in micro] == [[0, 1, 2, 3]]
    with jax.enable_x64(True):
        jd = {k: jnp.asarray(v) for k, v in d.items()}
        args = {a: jd[key] for a, key in ARGS["srpo"].items()}
        fn = losses.get("srpo")
        reference = float(losses.micro_batch(fn)(rollout_denominator=4, **args)[0])
        per_rollout = float(losses.per_rollout(fn)(rollout_denominator=4, **args)[0])
    assert round(per_rollout, 3) == 0.640 and round(reference, 3) == 0.804, (per_rollout,
                                                                             reference)
    np.testing.assert_allclose(per_rollout, 0.64, rtol=1e-12)
    np.testing.assert_allclose(reference, ref_srpo(d, d["logp"], d["student_topk_logp_s"]),
                               rtol=1e-12)
    w = np.array([3, 2, 4, 6]) * np.exp(-np.array([2.0, 1.5, 1.0, 0.3]))
    np.testing.assert_allclose(reference, (w * [0.40, 0.56, 0.70, 0.90]).sum() / w.sum(),
                               rtol=1e-12)


def test_rank_scaling_and_block_padding():
    """Zero-mask block rows are not rollouts (n_mb counts live rows); a micro-batch weighs
    n_mb / M, so a mini-batch's micro-batches of one rollout each give the per-rollout loss."""
    d, lengths = make_rows(seed=5, B=16)
    with jax.enable_x64(True):
        jd = {k: jnp.asarray(v) for k, v in d.items()}
        ones = [microbatch.MicroBatch(rows=np.array([i]), local_rows=4, student_width=0,
                                      teacher_width=0, response_width=0) for i in range(16)]
        total = our_total_fn("srpo", jd, ones, 16)(jd["logp"], jd["student_topk_logp_s"])
        args = {a: jd[key] for a, key in ARGS["srpo"].items()}
        per_rollout = losses.per_rollout(losses.get("srpo"))(rollout_denominator=16, **args)[0]
        np.testing.assert_allclose(float(total), float(per_rollout), rtol=1e-12)


def test_multi_device_blocks():
    """Rows spread over 4 devices: every block a multiple of 4 rows, the same groups."""
    _, lengths = make_rows(seed=2)
    one = our_plan("sdpo", lengths)
    four = our_plan("sdpo", lengths, devices=4)
    assert [list(m.rows) for m in one] == [list(m.rows) for m in four]
    for m in four:
        assert m.local_rows % 4 == 0 and m.local_rows >= len(m.rows)
        assert m.local_rows // 4 & (m.local_rows // 4 - 1) == 0      # a power of two per device


def test_processes_share_the_global_micro_batches():
    """Two processes holding 64 rows each: every micro-batch is the union of the processes'
    shares, the same rows as one process holding all 128 (the global order is process 0's rows,
    then process 1's), with one block size on both."""
    _, lengths = make_rows(seed=4)
    rule = microbatch.reference_rule("sdpo", budget=BUDGET, minibatch_rows=M, has_teacher=True)
    t = microbatch.reference_teacher_lengths("sdpo", contexts_for("sdpo", lengths), np.arange(M),
                                             lengths["response"], budget=BUDGET)
    rows = np.concatenate([np.stack([lengths["student"], t[:, 0], lengths["response"]], 1), t],
                          axis=1)
    one = microbatch.reference_blocks(rows[None], 0, rule=rule, devices_per_process=2,
                                      with_teacher=True)
    two = [microbatch.reference_blocks(rows.reshape(2, M // 2, -1), me, rule=rule,
                                       devices_per_process=2, with_teacher=True)
           for me in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1])
    for whole, a, b in zip(one, *two):
        assert list(whole.rows) == list(a.rows) + [int(i) + M // 2 for i in b.rows]
        assert a.local_rows == b.local_rows >= max(len(a.rows), len(b.rows))
        assert (a.student_width, a.teacher_width) == (whole.student_width, whole.teacher_width)


def test_method_defaults_and_budgets():
    """srpo and sdpo default to the reference's micro-batches, the others keep theirs; the
    rule's budget is train.teacher_max_len (the reference's per task and method)."""
    from rlcsd_jax.trainer import train_config
    from rlcsd_jax.trainer import setup

    for method in losses.names():
        cfg = train_config.reference_config(task="logic", preset="qwen3-4b", checkpoint="",
                                           math_train="")
        cfg.method = method
        setup.check_config(cfg)
        split = setup.split_minibatches(cfg)
        if method in ("srpo", "sdpo"):
            assert setup.aggregation(cfg) == "reference_micro_batch"
            assert split == microbatch.ReferenceRule(method, 32768, 16, method == "sdpo")
        else:
            assert not isinstance(split, microbatch.ReferenceRule)
        cfg.train.loss_aggregation = "reference_micro_batch"
        split = setup.split_minibatches(cfg)
        assert split.budget == cfg.train.teacher_max_len and split.rank_rows == 16
        assert split.teacher_aware == losses.METHODS[method].reference_teacher_aware
        cfg.train.loss_aggregation = "per_rollout"
        assert setup.split_minibatches(cfg) is True
    cfg = train_config.reference_config(task="math", preset="qwen3-4b", checkpoint="",
                                       math_train="x")
    cfg.method = "srpo"
    setup.check_config(cfg)
    assert setup.split_minibatches(cfg).budget == 40960


# ----------------------------------------------------------------------------------------------
# The trainer.


@pytest.fixture
def fake_texts(monkeypatch):
    return fake_rollouts.install(monkeypatch.setattr)


@pytest.mark.parametrize("method", ["srpo", "sdpo"])
def test_trainer_runs_reference_micro_batches(tmp_path, monkeypatch, fake_texts, method):
    """A tiny run under the method's default (reference_micro_batch): 8 prompts x 8 rollouts
    in one mini-batch, read as 8 ranks of 8 rows; the trainer's micro-batches are the
    reference's (sdpo's counting its teacher rows, from the step's contexts), and the step is
    finite."""
    from test_train_loop import tiny_config

    from rlcsd_jax.trainer import rl_trainer

    cfg = tiny_config(tmp_path, method, **{"rollout.group_size": 8,
                                           "rollout.prompts_per_step": 8,
                                           "train.minibatch_prompts": 8})
    plans = []
    real_plan = microbatch.plan

    def recording_plan(*a, **k):
        plans.append((a, k, real_plan(*a, **k)))
        return plans[-1][2]

    monkeypatch.setattr(rl_trainer.microbatch, "plan", recording_plan)
    tr = rl_trainer.Trainer(cfg, str(tmp_path))
    assert tr.spec.aggregation == "reference_micro_batch"
    m = tr.train_step(next(tr.iterator))
    assert np.isfinite(m["train/loss"]) and np.isfinite(m["train/grad_norm"])
    (args, kwargs, micro), = plans
    rule = kwargs["split"]
    assert rule == microbatch.ReferenceRule(method, cfg.train.teacher_max_len, 8,
                                            method == "sdpo")
    s_len = np.asarray(args[0])
    assert kwargs["contexts"] is not None
    if method == "sdpo":
        t_len = microbatch.reference_teacher_lengths(method, kwargs["contexts"],
                                                     kwargs["positions"], args[2],
                                                     budget=rule.budget)
        masks = [t_len[:, 0]]
    else:
        masks = None
    ref = ref_micro_batches(s_len, masks, rule.budget, rank_rows=8)
    assert [list(mb.rows) for mb in micro] == [list(g) for g in ref]
    assert m["train/micro_batches"] == len(ref) and max(len(g) for g in ref) > 1
