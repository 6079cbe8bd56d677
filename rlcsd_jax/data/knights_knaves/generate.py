"""Random Knights & Knaves puzzles with exactly one solution, with their reference reasoning."""

from __future__ import annotations

import numpy as np

from rlcsd_jax.data.knights_knaves.puzzles import (MAX_PEOPLE, MIN_PEOPLE, NAMES, KKPuzzle,
                                                   answer_text, quiz_text, random_statement,
                                                   solve)
from rlcsd_jax.data.knights_knaves.reasoning import reasoning_text


def generate_puzzle(
    n_people: int, rng: np.random.Generator, *, max_tries: int = 100_000,
    name_pool: int | None = None,
) -> KKPuzzle:
    """A random puzzle with exactly one solution (checked by ``solve``).

    ``name_pool`` draws names from the first ``name_pool`` of ``NAMES`` only (easier puzzles for
    tiny models, which otherwise spend their capacity learning to copy rare names).
    """
    if not MIN_PEOPLE <= n_people <= MAX_PEOPLE:
        raise ValueError(f"n_people must be in [{MIN_PEOPLE}, {MAX_PEOPLE}], got {n_people}")
    pool = len(NAMES) if not name_pool else min(int(name_pool), len(NAMES))
    if pool < n_people:
        raise ValueError(f"name_pool={name_pool} is smaller than n_people={n_people}")
    picked = rng.choice(pool, size=n_people, replace=False)
    names = tuple(NAMES[int(k)] for k in picked)
    for _ in range(max_tries):
        statements = tuple(random_statement(i, n_people, rng) for i in range(n_people))
        solutions = solve(statements, n_people)
        if solutions.shape[0] == 1:
            solution = tuple(bool(x) for x in solutions[0])
            return KKPuzzle(
                names=names,
                statements=statements,
                solution=solution,
                quiz=quiz_text(names, statements, rng),
                answer=answer_text(names, solution),
                reasoning=reasoning_text(names, statements),
            )
    raise RuntimeError(f"no unique-solution puzzle with {n_people} people in {max_tries} tries")
