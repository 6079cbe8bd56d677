"""Binary verifiers (algorithm.md §6): math (boxed + math-verify) and Knights & Knaves.

``compute_score(data_source, response, ground_truth)`` routes by data source, lower-cased: the
K&K sources (and any source starting with ``kk_``) use the K&K grader, everything else the math
grader.  It returns ``{"score", "acc", "formatted"}`` with score = acc ∈ {0.0, 1.0};
``formatted`` (1 if ``</think>`` appears) is a metric only, never a bonus.  Thinking content is
NOT removed before grading: the last box wins wherever it is.

Importing this package is cheap: no JAX, TensorFlow or sympy (math-verify runs in worker
processes started on first use).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from rlcsd_jax.rewards._verify_pool import default_max_workers, shutdown_pool
from rlcsd_jax.rewards.boxed import last_boxed
from rlcsd_jax.rewards.knights_knaves import kk_reward
from rlcsd_jax.rewards.math import DEFAULT_TIMEOUT_S, math_reward

__all__ = [
    "KK_SOURCES",
    "compute_score",
    "compute_scores",
    "is_kk_source",
    "kk_reward",
    "last_boxed",
    "math_reward",
    "shutdown_pool",
]

KK_SOURCES = frozenset(
    {
        "kk_3to7",
        "kk_3to7_test",
        "kk_4to8",
        "kk_4to8_test",
        "kk_8",
        "kk_9",
        "kk_10",
        "kk_11",
    }
)


def is_kk_source(data_source: str) -> bool:
    """Whether a data source is graded as Knights & Knaves."""
    source = str(data_source).lower()
    return source in KK_SOURCES or source.startswith("kk_")


def compute_score(
    data_source: str, response: str, ground_truth: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict[str, float]:
    """``{"score", "acc", "formatted"}`` for one decoded response (special tokens skipped)."""
    if is_kk_source(data_source):
        acc = kk_reward(response, ground_truth)
    else:
        acc = math_reward(response, ground_truth, timeout_s=timeout_s)
    return {"score": acc, "acc": acc, "formatted": 1.0 if "</think>" in response else 0.0}


def compute_scores(
    data_sources: Sequence[str],
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, float]]:
    """``compute_score`` over a batch, in order; math checks run on all verify workers at once."""
    if not len(data_sources) == len(responses) == len(ground_truths):
        raise ValueError(
            f"batch lengths differ: {len(data_sources)} data sources, "
            f"{len(responses)} responses, {len(ground_truths)} ground truths"
        )
    if not responses:
        return []
    with ThreadPoolExecutor(max_workers=default_max_workers()) as threads:
        return list(
            threads.map(
                lambda args: compute_score(*args, timeout_s=timeout_s),
                zip(data_sources, responses, ground_truths),
            )
        )
