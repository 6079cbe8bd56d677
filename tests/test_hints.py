"""Hint construction rules of algorithm.md §2.2 / §2.3 on hand-built groups."""

import collections

import numpy as np
import pytest

from rlcsd_jax import hints
from rlcsd_jax.data.prompts import teacher_user_message


def box(ans, think="t"):
    return f"<think>{think}</think> so \\boxed{{{ans}}}"


def rng(seed=0):
    return np.random.default_rng(seed)


def group(rewards, texts=None, solution="GT sol", gt="7", problem="What is 3+4?"):
    texts = texts or [box(i) for i in range(len(rewards))]
    return hints.Group(problem=problem, ground_truth=gt, responses=texts, rewards=rewards,
                       solution=solution)


def test_template_char_for_char():
    text = "<think>\nhmm 3+4\n</think>\n\nThe answer is \\boxed{7}."
    g = group([1, 1, 0], texts=[box(7), text, box(8, think="x")])
    t0 = hints.build_hints([g], rng=rng()).targets[0]
    expected = (
        "Problem: What is 3+4?\n\nHere is a reference solution to this problem:\n"
        "=== Reference Solution Begin ===\n"
        "<think>\nhmm 3+4\n</think>\n\nThe answer is \\boxed{7}.\n\nCorrect final answer: 7\n"
        "=== Reference Solution End ===\n\n"
        "After reading the reference solution above, make sure you understand the reasoning "
        "behind each step.\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}.")
    assert t0.correct_hint == expected
    # A wrong hint uses the SAME template, still labelled "Correct final answer" (§2.1, §12.2).
    assert t0.wrong_hints == (teacher_user_message("What is 3+4?", box(8, think="x"), "8"),)
    assert "Correct final answer: 8\n=== Reference Solution End ===" in t0.wrong_hints[0]


def test_self_exclusion_both_ways_and_unboxed_wrong_never_a_hint():
    texts = [box(7), box(7), box(8), box(9), "no box here"]
    g = group([1, 1, 0, 0, 0], texts=texts)
    for seed in range(20):
        t = hints.build_hints([g], rng=rng(seed)).targets
        assert all(x.kept for x in t)
        assert t[0].correct_index == 1 and t[1].correct_index == 0  # never itself
        assert sorted(t[0].wrong_indices) == [2, 3]  # a correct target may use any wrong one
        assert t[2].wrong_indices == (3,) and t[3].wrong_indices == (2,)  # never itself
        assert sorted(t[4].wrong_indices) == [2, 3]  # unboxed wrong: still a target
        assert all(4 not in x.wrong_indices for x in t)
        assert t[2].wrong_pool_size == 1 and t[4].wrong_pool_size == 2


def test_only_correct_rollout_and_only_boxed_wrong_are_dropped():
    g = group([1, 0, 0], texts=[box(7), box(8), "unboxed"])
    b = hints.build_hints([g], rng=rng())
    t = b.targets
    assert not t[0].kept and t[0].drop_reason == hints.DROP_NO_CORRECT_SIBLING
    assert not t[1].kept and t[1].drop_reason == hints.DROP_NO_WRONG_SIBLING
    assert b.stats["self_excluded_sampling_skip_count"] == 2
    # The unboxed wrong rollout still trains: correct hint = rollout 0, wrong hint = rollout 1.
    assert t[2].kept and t[2].correct_index == 0 and t[2].wrong_indices == (1,)
    assert b.kept_indices.tolist() == [2]


@pytest.mark.parametrize("source", ["self_rollout", "gt_cot"])
def test_group_level_drops(source):
    all_correct = group([1, 1, 1])
    all_wrong = group([0, 0, 0])
    no_boxed_wrong = group([1, 1, 0], texts=[box(7), box(7), "nothing"])
    b = hints.build_hints([all_correct, all_wrong, no_boxed_wrong], rng=rng(), source=source)
    t = b.targets
    assert all(x.drop_reason == hints.DROP_ALL_CORRECT for x in t[:3])
    assert all(x.drop_reason == hints.DROP_NO_WRONG_CONTEXT for x in t[6:])
    assert b.stats["self_negative_missing_boxed_count"] == 1
    assert b.stats["all_same_outcome_group_count"] == 2
    if source == "self_rollout":
        assert all(x.drop_reason == hints.DROP_ALL_WRONG for x in t[3:6])
        assert b.stats["valid_group_count"] == 0 and b.stats["aborted_ratio"] == 1.0
    else:  # gt_cot keeps all-wrong groups: GT hint + the other wrong rollouts
        assert all(x.kept for x in t[3:6])
        gt_hint = teacher_user_message("What is 3+4?", "GT sol", "7")
        assert all(x.correct_hint == gt_hint and x.correct_index is None for x in t[3:6])
        assert sorted(t[3].wrong_indices) == [1, 2]
        assert b.stats["valid_group_ratio"] == pytest.approx(1 / 3)
        assert b.stats["aborted_ratio"] == pytest.approx(2 / 3)


def test_gt_cot_single_boxed_wrong_drops_that_target_and_correct_targets_get_gt():
    g = group([1, 0, 0], texts=[box(7), box(8), "unboxed"])
    t = hints.build_hints([g], rng=rng(), source="gt").targets
    assert t[0].kept and t[0].correct_index is None and t[0].wrong_indices == (1,)
    assert not t[1].kept and t[1].drop_reason == hints.DROP_NO_WRONG_SIBLING
    assert t[2].kept and t[2].wrong_indices == (1,)


def test_positive_without_box_falls_back_to_gt_answer():
    g = group([1, 1, 0], texts=[box(7), "seven, no box", box(8)])
    t = hints.build_hints([g], rng=rng()).targets
    assert t[0].correct_hint == teacher_user_message("What is 3+4?", "seven, no box", "7")


@pytest.mark.parametrize("k_max", [1, 2, 4, 10])
def test_k_is_min_kmax_pool_without_replacement(k_max):
    rewards = [1, 1] + [0] * 6
    g = group(rewards)
    for seed in range(10):
        t = hints.build_hints([g], rng=rng(seed), k_max=k_max).targets
        for i, x in enumerate(t):
            pool = set(range(2, 8)) - {i}
            assert len(x.wrong_indices) == min(k_max, len(pool))
            assert len(set(x.wrong_indices)) == len(x.wrong_indices)  # no repeats
            assert set(x.wrong_indices) <= pool
            assert x.wrong_hints == tuple(
                teacher_user_message("What is 3+4?", box(j), str(j)) for j in x.wrong_indices)


def test_draws_are_uniform():
    g = group([1, 1, 1, 1, 0, 0, 0, 0])
    r = rng(123)
    corr, first, members = collections.Counter(), collections.Counter(), collections.Counter()
    for _ in range(1500):
        t = hints.build_hints([g], rng=r, k_max=2).targets
        corr[t[0].correct_index] += 1
        first[t[0].wrong_indices[0]] += 1
        members.update(t[0].wrong_indices)
    assert set(corr) == {1, 2, 3} and all(400 < c < 600 for c in corr.values())
    assert set(first) == {4, 5, 6, 7} and all(290 < c < 460 for c in first.values())
    assert all(620 < c < 880 for c in members.values())  # each of 4 in a 2-subset: p = 1/2


def test_determinism_with_seed():
    groups = [group([1, 1, 1, 0, 0, 0, 0, 0]), group([0, 1, 0, 1, 0, 0, 1, 0])]
    a = hints.build_hints(groups, rng=rng(7))
    b = hints.build_hints(groups, rng=rng(7))
    c = hints.build_hints(groups, rng=rng(8))
    assert a == b
    assert [t.wrong_indices for t in a.targets] != [t.wrong_indices for t in c.targets]


def test_single_wrong_mode():
    g = group([1, 1, 0, 0, 0, 0])
    for seed in range(5):
        t = hints.build_hints([g], rng=rng(seed), single_wrong=True).targets
        assert all(len(x.wrong_hints) == 1 and len(x.wrong_indices) == 1 for x in t)
        assert all(x.wrong_indices[0] != i for i, x in enumerate(t))


def test_stats_and_kept_indices():
    groups = [
        group([1, 1, 0, 0]),  # all kept; |W| = 2, 2, 1, 1; correct pools 1, 1, 2, 2
        group([1, 0, 0, 0]),  # target 4 dropped (only correct); wrongs: |W| = 2, correct pool 1
        group([1, 1, 1, 1]),  # all-correct: dropped
    ]
    b = hints.build_hints(groups, rng=rng(), k_max=4)
    assert b.kept_indices.tolist() == [0, 1, 2, 3, 5, 6, 7]
    s = b.stats
    assert s["group_count"] == 3 and s["valid_group_count"] == 2
    assert s["valid_group_ratio"] == pytest.approx(2 / 3)
    assert s["aborted_ratio"] == pytest.approx(1 / 3)
    assert s["sample_count"] == 12 and s["valid_sample_count"] == 7
    assert s["skipped_sample_count"] == 5 and s["kept_ratio"] == pytest.approx(7 / 12)
    assert s["self_excluded_sampling_skip_count"] == 1
    assert s["all_same_outcome_group_count"] == 1
    assert s["wrong_pool_size_mean"] == pytest.approx(12 / 7)
    assert s["k_mean"] == pytest.approx(12 / 7)
    assert s["correct_pool_size_mean"] == pytest.approx(9 / 7)
    s2 = hints.build_hints(groups, rng=rng(), k_max=1).stats
    assert s2["k_mean"] == 1.0 and s2["wrong_pool_size_mean"] == pytest.approx(12 / 7)
    empty = hints.build_hints([], rng=rng())
    assert empty.stats["valid_group_ratio"] == 0.0 and empty.kept_indices.size == 0


def test_per_group_generators_and_merged_stats_do_not_depend_on_the_split():
    # Multi-host training builds hints per host on its own groups, with one generator per
    # group: the hints and the merged stats must equal building them for the whole batch.
    groups = [group([1, 1, 0, 0, 0, 0]), group([1, 0, 0, 0, 0, 0]), group([1, 1, 1, 1, 1, 1]),
              group([0, 1, 1, 0, 1, 0])]
    rngs = lambda idx: [np.random.default_rng([5, i]) for i in idx]  # noqa: E731
    whole = hints.build_hints(groups, rng=rngs(range(4)))
    parts = [hints.build_hints(groups[:2], rng=rngs(range(2))),
             hints.build_hints(groups[2:], rng=rngs(range(2, 4)))]
    assert whole.targets == parts[0].targets + parts[1].targets
    merged = hints.merge_stats([p.stats for p in parts])
    assert merged.keys() == whole.stats.keys()
    for k, v in whole.stats.items():
        assert merged[k] == pytest.approx(v), k
    with pytest.raises(ValueError, match="3 generators for 4 groups"):
        hints.build_hints(groups, rng=rngs(range(3)))


def test_sources_aliases_and_errors():
    for alias in ("self", "rollout", "Self-Rollout", "self_rollout"):
        assert hints.normalize_hint_source(alias) == "self_rollout"
    for alias in ("gt", "dataset", "dataset_cot", "ground_truth_cot", "GT COT"):
        assert hints.normalize_hint_source(alias) == "gt_cot"
    with pytest.raises(ValueError, match="allowed"):
        hints.normalize_hint_source("teacher")
    with pytest.raises(ValueError, match="solution"):
        hints.build_hints([group([1, 0], solution=None)], rng=rng(), source="gt")
    with pytest.raises(ValueError, match="rewards"):
        hints.build_hints([hints.Group("p", "1", ["a", "b"], [1])], rng=rng())
    with pytest.raises(ValueError, match="k_max"):
        hints.build_hints([group([1, 0])], rng=rng(), k_max=0)


def test_gt_solution_teacher():
    groups = [group([1, 0, 0], solution="  Step 1.\n"), group([0, 0], gt="x", problem="Q2")]
    out = hints.gt_solution_hints(groups)
    assert len(out) == 5 and len(set(out[:3])) == 1 and len(set(out[3:])) == 1
    assert out[0] == teacher_user_message("What is 3+4?", "Step 1.", "7")
    assert "Step 1.\n\nCorrect final answer: 7\n===" in out[0]
    assert out[3] == teacher_user_message("Q2", "GT sol", "x")
    with pytest.raises(ValueError, match="group 1"):
        hints.gt_solution_hints([groups[0], group([1], solution="   ")])
