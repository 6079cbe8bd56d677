"""Host-side teacher hint construction (algorithm.md §2.2, §2.3, §12.2–12.5).

Plain Python on decoded text. Given each group's rollouts (full decoded responses, thinking
included; rewards; the group's problem, GT answer and optional GT solution) this builds, per
target rollout, the teacher user-message text for the correct hint and for up to ``k_max`` wrong
hints, decides which rollouts are dropped, and reports drop statistics. Randomness comes from
an explicit ``numpy.random.Generator`` (the reference uses unseeded Python ``random``).

Rules of §2.3, per group (``P`` = rollouts with reward > 0, ``N`` = the rest):
  * ``N`` empty → drop the group (all-correct groups are always dropped); ``source =
    self_rollout`` and ``P`` empty → drop (all-wrong groups survive only under ``gt_cot``).
  * Positive contexts: every ``i ∈ P``, solution = its text, answer = its last ``\\boxed{}``
    (the GT answer if it has none). Negative contexts: ``i ∈ N`` WITH a box only (a wrong rollout
    without a box stays a target but can never be a hint). No negative context → drop the group.
  * Per target ``i``: correct hint = the GT context (``gt_cot``) or a uniform draw from
    ``P \\ {i}``; wrong pool ``W`` = all negative contexts for a correct target, minus ``{i}``
    for a wrong one. An empty pool (only possible through self-exclusion) drops the target.
    Wrong hints = ``[w0] + shuffle(W \\ {w0})[:k_max − 1]`` (``K = min(k_max, |W|)``, without
    replacement), or just ``[w0]`` in single-wrong mode (opsd_ectr, rlsd_ectr).
Every hint (correct or wrong) uses the same template, ``teacher_user_message`` (§2.1): a wrong
hint still says "Correct final answer: <its wrong boxed answer>".
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlcsd_jax.data.prompts import teacher_user_message
from rlcsd_jax.rewards import last_boxed

HINT_SOURCES = ("self_rollout", "gt_cot")
_SOURCE_ALIASES = {
    "self": "self_rollout", "rollout": "self_rollout", "self_rollout": "self_rollout",
    "gt": "gt_cot", "dataset": "gt_cot", "dataset_cot": "gt_cot", "ground_truth_cot": "gt_cot",
    "gt_cot": "gt_cot",
}

# Drop reasons (TargetHints.drop_reason).
DROP_ALL_CORRECT = "group_all_correct"
DROP_ALL_WRONG = "group_all_wrong"
DROP_NO_WRONG_CONTEXT = "group_no_boxed_wrong"
DROP_NO_CORRECT_SIBLING = "no_correct_sibling"
DROP_NO_WRONG_SIBLING = "no_wrong_sibling"


def normalize_hint_source(source: str | None) -> str:
    """``self_rollout`` (aliases self, rollout) or ``gt_cot`` (aliases gt, dataset,
    dataset_cot, ground_truth_cot); case, ``-`` and spaces are normalised."""
    key = str(source or "self_rollout").strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _SOURCE_ALIASES:
        raise ValueError(
            f"unknown correct-hint source {source!r}; allowed: {sorted(_SOURCE_ALIASES)} "
            f"(canonical: {HINT_SOURCES}).")
    return _SOURCE_ALIASES[key]


@dataclasses.dataclass(frozen=True)
class Group:
    """One prompt's rollouts. ``responses`` are the full decoded texts (special tokens skipped,
    thinking kept, §2.3); ``problem`` is the raw problem with wrappers removed (§1.2)."""

    problem: str
    ground_truth: str
    responses: Sequence[str]
    rewards: Sequence[float]
    solution: str | None = None


@dataclasses.dataclass(frozen=True)
class TargetHints:
    """Teacher contexts for one target rollout.

    ``correct_hint`` / ``wrong_hints`` are teacher user-message texts (apply the chat template
    and tokenise them downstream). ``correct_index`` / ``wrong_indices`` are in-group rollout
    indices of the hints (``correct_index`` is None under ``gt_cot``).
    """

    kept: bool
    correct_hint: str | None = None
    wrong_hints: tuple[str, ...] = ()
    correct_index: int | None = None
    wrong_indices: tuple[int, ...] = ()
    correct_pool_size: int = 0
    wrong_pool_size: int = 0
    drop_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class HintBatch:
    """``targets`` in input order (group by group, rollout by rollout) and drop ``stats``."""

    targets: list[TargetHints]
    stats: dict[str, float]

    @property
    def kept_mask(self) -> np.ndarray:
        return np.array([t.kept for t in self.targets], dtype=bool)

    @property
    def kept_indices(self) -> np.ndarray:
        """Flat indices of the surviving rollouts (the reference's ``select_idxs``, §2.3.8)."""
        return np.nonzero(self.kept_mask)[0]


def _missing(solution: str | None) -> bool:
    return solution is None or not str(solution).strip()


def gt_solution_hint(problem: str, ground_truth: str, solution: str | None, *,
                     where: str = "") -> str:
    """§2.2 teacher context: template(solution = dataset CoT, answer = GT). Raises if the
    sample has no solution (the reference errors rather than falling back)."""
    if _missing(solution):
        raise ValueError(
            f"GT-solution teacher needs extra_info.solution, but it is missing or empty"
            f"{' for ' + where if where else ''} (§2.2).")
    return teacher_user_message(problem, solution, ground_truth)


def gt_solution_hints(groups: Sequence[Group]) -> list[str]:
    """One §2.2 teacher context per rollout (all rollouts of a group share it); no filtering."""
    out = []
    for g, group in enumerate(groups):
        hint = gt_solution_hint(group.problem, group.ground_truth, group.solution,
                                where=f"group {g}")
        out.extend([hint] * len(group.responses))
    return out


def _check_group(g: int, group: Group) -> None:
    if len(group.responses) != len(group.rewards):
        raise ValueError(f"group {g}: {len(group.responses)} responses but "
                         f"{len(group.rewards)} rewards.")


def build_group_hints(group: Group, *, rng: np.random.Generator, source: str = "self_rollout",
                      k_max: int = 4, single_wrong: bool = False,
                      counters: dict | None = None) -> list[TargetHints]:
    """Hints for one group's targets (§2.3 steps 1–7). ``counters`` (optional) accumulates
    ``all_same_outcome_group_count``, ``self_negative_missing_boxed_count`` and
    ``self_excluded_sampling_skip_count``."""
    source = normalize_hint_source(source)
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}.")
    counters = {} if counters is None else counters
    for key in ("all_same_outcome_group_count", "self_negative_missing_boxed_count",
                "self_excluded_sampling_skip_count"):
        counters.setdefault(key, 0)
    n = len(group.responses)
    correct = [float(r) > 0 for r in group.rewards]
    pos = [i for i in range(n) if correct[i]]
    neg = [i for i in range(n) if not correct[i]]
    if not pos or not neg:
        counters["all_same_outcome_group_count"] += 1
    if not neg:
        return [TargetHints(kept=False, drop_reason=DROP_ALL_CORRECT)] * n
    if source == "self_rollout" and not pos:
        return [TargetHints(kept=False, drop_reason=DROP_ALL_WRONG)] * n

    pos_ctx: dict[int, str] = {}
    gt_ctx = None
    if source == "gt_cot":
        gt_ctx = gt_solution_hint(group.problem, group.ground_truth, group.solution)
    else:
        for i in pos:
            # `or`: a missing (or empty) box falls back to the GT answer, as in the reference.
            answer = last_boxed(group.responses[i]) or group.ground_truth
            pos_ctx[i] = teacher_user_message(group.problem, group.responses[i], answer)
    neg_ctx: dict[int, str] = {}
    for i in neg:
        answer = last_boxed(group.responses[i])
        if answer is None:
            counters["self_negative_missing_boxed_count"] += 1
            continue
        neg_ctx[i] = teacher_user_message(group.problem, group.responses[i], answer)
    if not neg_ctx:
        return [TargetHints(kept=False, drop_reason=DROP_NO_WRONG_CONTEXT)] * n

    out = []
    for i in range(n):
        # Draw order mirrors the reference: correct hint, then w0, then the shuffle.
        if source == "gt_cot":
            c_idx, c_hint, c_pool = None, gt_ctx, 1
        else:
            c_candidates = [j for j in pos_ctx if j != i]
            if not c_candidates:
                counters["self_excluded_sampling_skip_count"] += 1
                out.append(TargetHints(kept=False, drop_reason=DROP_NO_CORRECT_SIBLING))
                continue
            c_idx = c_candidates[int(rng.integers(len(c_candidates)))]
            c_hint, c_pool = pos_ctx[c_idx], len(c_candidates)
        pool = list(neg_ctx) if correct[i] else [j for j in neg_ctx if j != i]
        if not pool:
            counters["self_excluded_sampling_skip_count"] += 1
            out.append(TargetHints(kept=False, drop_reason=DROP_NO_WRONG_SIBLING))
            continue
        w0 = pool[int(rng.integers(len(pool)))]
        chosen = [w0]
        if not single_wrong:
            rest = [j for j in pool if j != w0]
            chosen += [rest[k] for k in rng.permutation(len(rest))][: k_max - 1]
        out.append(TargetHints(
            kept=True, correct_hint=c_hint, wrong_hints=tuple(neg_ctx[j] for j in chosen),
            correct_index=c_idx, wrong_indices=tuple(chosen), correct_pool_size=c_pool,
            wrong_pool_size=len(pool)))
    return out


def build_hints(groups: Sequence[Group], *,
                rng: np.random.Generator | Sequence[np.random.Generator],
                source: str = "self_rollout", k_max: int = 4,
                single_wrong: bool = False) -> HintBatch:
    """§2.3 for a whole batch. ``single_wrong=True`` for opsd_ectr / rlsd_ectr.

    ``rng``: one generator drawn from group after group, or one generator per group (the
    trainer's choice: a group's draws then do not depend on which host or batch it is in).

    Stats (prefix them with the method name when logging, e.g. ``rlcsd/``):
      * ``group_count``, ``valid_group_count``, ``valid_group_ratio``: groups with ≥ 1 kept
        target; ``aborted_ratio`` = the other groups / all groups (reference semantics: a
        group-level ratio).
      * ``sample_count``, ``valid_sample_count``, ``skipped_sample_count``, ``kept_ratio``.
      * ``all_same_outcome_group_count``, ``self_negative_missing_boxed_count`` (wrong rollouts
        without a box in groups that reached step 4), ``self_excluded_sampling_skip_count``
        (targets dropped because self-exclusion emptied a pool).
      * ``correct_pool_size_mean``, ``wrong_pool_size_mean`` (``|W|``), ``k_mean`` (number of
        wrong hints used), averaged over kept targets (0 when none is kept).
    """
    source = normalize_hint_source(source)
    if source == "gt_cot":
        missing = [g for g, grp in enumerate(groups) if _missing(grp.solution)]
        if missing:
            raise ValueError(
                f"correct-hint source gt_cot needs a non-empty GT solution for every group; "
                f"{len(missing)}/{len(groups)} lack one (group indices {missing[:8]}).")
    counters: dict[str, int] = {}
    targets: list[TargetHints] = []
    valid_groups = 0
    rngs = [rng] * len(groups) if isinstance(rng, np.random.Generator) else list(rng)
    if len(rngs) != len(groups):
        raise ValueError(f"got {len(rngs)} generators for {len(groups)} groups")
    for g, group in enumerate(groups):
        _check_group(g, group)
        group_targets = build_group_hints(group, rng=rngs[g], source=source, k_max=k_max,
                                          single_wrong=single_wrong, counters=counters)
        valid_groups += any(t.kept for t in group_targets)
        targets.extend(group_targets)
    kept = [t for t in targets if t.kept]
    n_groups = len(groups)
    counts = {
        "group_count": float(n_groups),
        "valid_group_count": float(valid_groups),
        "sample_count": float(len(targets)),
        "valid_sample_count": float(len(kept)),
        "all_same_outcome_group_count": float(counters.get("all_same_outcome_group_count", 0)),
        "self_negative_missing_boxed_count": float(
            counters.get("self_negative_missing_boxed_count", 0)),
        "self_excluded_sampling_skip_count": float(
            counters.get("self_excluded_sampling_skip_count", 0)),
        # Sums over kept targets; merge_stats turns them into the *_mean stats.
        "correct_pool_size_sum": float(sum(t.correct_pool_size for t in kept)),
        "wrong_pool_size_sum": float(sum(t.wrong_pool_size for t in kept)),
        "k_sum": float(sum(len(t.wrong_hints) for t in kept)),
    }
    return HintBatch(targets=targets, stats=merge_stats([counts]))


def merge_stats(parts: Sequence[dict]) -> dict:
    """Batch stats from per-part counts (e.g. one part per host): counts add up, ratios and
    means are recomputed from the totals, so merging equals building the stats in one go."""
    total = {k: float(sum(p[k] for p in parts)) for k in _COUNT_KEYS}
    n_groups, valid_groups = total["group_count"], total["valid_group_count"]
    n_targets, n_kept = total["sample_count"], total["valid_sample_count"]
    return {
        **{k: v for k, v in total.items() if not k.endswith("_sum")},
        "valid_group_ratio": valid_groups / max(n_groups, 1),
        "aborted_ratio": (n_groups - valid_groups) / max(n_groups, 1),
        "skipped_sample_count": n_targets - n_kept,
        "kept_ratio": n_kept / max(n_targets, 1),
        "correct_pool_size_mean": total["correct_pool_size_sum"] / max(n_kept, 1),
        "wrong_pool_size_mean": total["wrong_pool_size_sum"] / max(n_kept, 1),
        "k_mean": total["k_sum"] / max(n_kept, 1),
        **{k: v for k, v in total.items() if k.endswith("_sum")},
    }


_COUNT_KEYS = ("group_count", "valid_group_count", "sample_count", "valid_sample_count",
               "all_same_outcome_group_count", "self_negative_missing_boxed_count",
               "self_excluded_sampling_skip_count", "correct_pool_size_sum",
               "wrong_pool_size_sum", "k_sum")
