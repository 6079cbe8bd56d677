"""The one record type every reader produces and every consumer (prompts, hints, eval) reads."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Record:
    """One problem.

    Attributes:
      problem: the raw problem text, without any prompt wrapper (algorithm.md §1.2).
      ground_truth: the reference final answer (``reward_model.ground_truth``).
      data_source: drives the prompt wrapper and the grader (e.g. ``deepmath_filtered_level5_7``,
        ``aime24``, ``kk_4to8``, ``kk_9``).
      index: ``extra_info.index`` if the source has one, else the row number in its file.
      solution: the dataset's reference solution / chain of thought (``extra_info.solution``), used
        by GT-solution teachers and the ``gt_cot`` hint; None when the source has none.
    """

    problem: str
    ground_truth: str
    data_source: str
    index: int | str
    solution: str | None = None
