"""Knights & Knaves grading (algorithm.md §6.4); the puzzle generator is `data.knights_knaves`.

Grading: take the last ``\\boxed{}`` of the response (none → 0), parse both it and the ground
truth (unwrapped from its own box if it has one) into ``{name.lower(): role}`` and compare.
A statement is found wherever ``<Name> (= | : | is | is a | is an) <knight|knave>`` appears,
case-insensitively, with Name = a letter followed by letters, ``-`` or ``'`` (at most 64
characters in all); the first occurrence of a name wins.  Correct iff the ground-truth dict is
non-empty and the dicts are equal, so order is free and a missing or an extra person is wrong.
"""

from __future__ import annotations

import re

from rlcsd_jax.rewards.boxed import last_boxed

# Two guards keep matching linear on hostile input without changing any realistic result:
# the look-behind never starts a name right after a letter (finditer's leftmost match cannot
# start there anyway: the longer name would match too), and names are capped at 64 characters
# so a long run of name characters ("Ab-Ab-Ab-…") costs O(64) per start instead of O(run).
_ASSIGNMENT = re.compile(
    r"(?<![A-Za-z])([A-Za-z][A-Za-z'\-]{0,63})\s*(?:=|:|is\s+an|is\s+a|is)\s*(knight|knave)",
    re.IGNORECASE,
)


def parse_assignments(text: str) -> dict[str, str]:
    """``{name.lower(): "knight" | "knave"}`` from free text; the first mention of a name wins."""
    result: dict[str, str] = {}
    for match in _ASSIGNMENT.finditer(text):
        result.setdefault(match.group(1).lower(), match.group(2).lower())
    return result


def kk_answer_correct(pred: str, ground_truth: str) -> bool:
    """Whether an extracted answer matches the ground truth (box around the ground truth allowed)."""
    if "\\boxed" in ground_truth:
        unwrapped = last_boxed(ground_truth)
        if unwrapped is not None:
            ground_truth = unwrapped
    gold = parse_assignments(ground_truth)
    return bool(gold) and parse_assignments(pred) == gold


def kk_reward(response: str, ground_truth: str) -> float:
    """1.0 if the last boxed answer of ``response`` names exactly the ground-truth roles."""
    pred = last_boxed(response)
    if pred is None:
        return 0.0
    return 1.0 if kk_answer_correct(pred, str(ground_truth)) else 0.0
