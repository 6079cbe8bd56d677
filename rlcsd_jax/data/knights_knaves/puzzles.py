"""Knights & Knaves puzzles: statements, a vectorised brute-force solver, rendering.

The generator (`generate.generate_puzzle`) draws from these; `reasoning` writes the solutions.

Each inhabitant makes one statement; knights' statements are true and knaves' false, so an
assignment is a solution iff ``is_knight[i] == value(statement_i)`` for every i.  The solver
checks all 2^N assignments at once as a ``[2^N, N]`` boolean matrix (2048 rows for N = 11).

Statements are small trees of tuples over person indices:
  ("knight", i) / ("knave", i)          X is a knight / X is a knave
  ("not", leaf)                         X is not a knight / X is not a knave
  ("and" | "or" | "implies" | "iff", leaf, leaf)
  ("same", i, j) / ("different", i, j)  X and Y are the same kind / different kinds
Simple claims ("leaf", "not") are about someone else; two-person claims may include the speaker
(as in the upstream generator), which is what makes two-person puzzles solvable at all.

The generator follows the Logic-RL / Xie et al. style: random statements, kept only when the
puzzle has exactly one solution.  Everything is driven by a ``numpy.random.Generator``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

NAMES = (
    "Alice",
    "Bob",
    "Carol",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Isabella",
    "Jack",
    "Kate",
    "Liam",
    "Mia",
    "Noah",
    "Olivia",
    "Peter",
    "Quinn",
    "Rachel",
    "Samuel",
    "Tina",
    "Uma",
    "Victor",
    "Wendy",
    "Xavier",
    "Yara",
    "Zoe",
    "Aiden",
    "Chloe",
    "Ethan",
    "Lily",
    "Mason",
    "Sofia",
    "Oliver",
    "Ava",
    "Lucas",
    "Harper",
    "Logan",
    "Ella",
    "James",
    "Ruby",
)
MIN_PEOPLE, MAX_PEOPLE = 2, 11
# Statement kinds and how often they are drawn: simple claims dominate, as in Logic-RL.
_KINDS = ("leaf", "not", "and", "or", "implies", "iff", "same", "different")
_KIND_P = np.array([0.30, 0.10, 0.12, 0.12, 0.10, 0.10, 0.08, 0.08])
_VERBS = ("said", "claimed", "stated", "remarked", "asserted")


@dataclasses.dataclass(frozen=True)
class KKPuzzle:
    """One puzzle.  ``solution[i]`` is True iff ``names[i]`` is a knight."""

    names: tuple[str, ...]
    statements: tuple
    solution: tuple[bool, ...]
    quiz: str
    answer: str
    reasoning: str

    @property
    def n_people(self) -> int:
        return len(self.names)


def referenced(stmt) -> tuple[int, ...]:
    """Person indices a statement mentions, in order of appearance, without duplicates."""
    kind = stmt[0]
    if kind in ("knight", "knave"):
        return (stmt[1],)
    if kind in ("same", "different"):
        return (stmt[1], stmt[2])
    refs: list[int] = []
    for child in stmt[1:]:
        refs.extend(r for r in referenced(child) if r not in refs)
    return tuple(refs)


_BINARY = {
    "and": np.logical_and,
    "or": np.logical_or,
    "implies": lambda a, b: np.logical_or(np.logical_not(a), b),
    "iff": np.equal,
}


def evaluate(stmt, knights):
    """Truth value of ``stmt``.

    ``knights`` is either a dict person → bool (a partial assignment, as the reasoner uses; every
    mentioned person must be in it), giving a numpy bool, or a ``[M, N]`` bool array of M
    assignments (the solver), giving ``[M]`` values.
    """

    def role(i):
        return knights[:, i] if isinstance(knights, np.ndarray) else knights[i]

    kind = stmt[0]
    if kind == "knight":
        return np.asarray(role(stmt[1]))
    if kind == "knave":
        return np.logical_not(role(stmt[1]))
    if kind == "same":
        return np.equal(role(stmt[1]), role(stmt[2]))
    if kind == "different":
        return np.not_equal(role(stmt[1]), role(stmt[2]))
    if kind == "not":
        return np.logical_not(evaluate(stmt[1], knights))
    if kind in _BINARY:
        return _BINARY[kind](evaluate(stmt[1], knights), evaluate(stmt[2], knights))
    raise ValueError(f"unknown statement kind {kind!r} in {stmt!r}")


@functools.lru_cache(maxsize=None)
def _all_assignments(n: int) -> np.ndarray:
    """``[2^n, n]`` bool matrix; row m has person i a knight iff bit i of m is set."""
    rows = np.arange(1 << n, dtype=np.int64)
    return ((rows[:, None] >> np.arange(n)) & 1).astype(bool)


def solve(statements, n: int) -> np.ndarray:
    """All solutions as a ``[S, n]`` bool array (True = knight), by checking every assignment."""
    knights = _all_assignments(n)
    ok = np.ones(knights.shape[0], dtype=bool)
    for i, stmt in enumerate(statements):
        ok &= knights[:, i] == evaluate(stmt, knights)
    return knights[ok]


def render(stmt, names) -> str:
    """English text of a statement (lower-case start)."""
    kind = stmt[0]
    if kind in ("knight", "knave"):
        return f"{names[stmt[1]]} is a {kind}"
    if kind == "not":
        return f"{names[stmt[1][1]]} is not a {stmt[1][0]}"
    if kind == "same":
        return f"{names[stmt[1]]} and {names[stmt[2]]} are the same kind"
    if kind == "different":
        return f"{names[stmt[1]]} and {names[stmt[2]]} are different kinds"
    a, b = render(stmt[1], names), render(stmt[2], names)
    if kind == "implies":
        return f"if {a} then {b}"
    if kind == "iff":
        return f"{a} if and only if {b}"
    return f"{a} {kind} {b}"


def answer_text(names, solution) -> str:
    """``"Alice is a knight, Bob is a knave, …"`` in the order of ``names``."""
    return ", ".join(
        f"{name} is a {'knight' if k else 'knave'}" for name, k in zip(names, solution)
    )


def quiz_text(names, statements, rng: np.random.Generator) -> str:
    """The puzzle in the Logic-RL wording."""
    n = len(names)
    listed = ", ".join(names[:-1]) + f", and {names[-1]}"
    lines = [
        "A very special island is inhabited only by knights and knaves. Knights always tell the "
        "truth, and knaves always lie. You meet "
        f"{n} inhabitants: {listed}."
    ]
    for name, stmt in zip(names, statements):
        text = render(stmt, names)
        verb = _VERBS[int(rng.integers(len(_VERBS)))]
        lines.append(f'{name} {verb}, "{text[0].upper()}{text[1:]}."')
    lines.append("So who is a knight and who is a knave?")
    return " ".join(lines)


def _random_leaf(rng: np.random.Generator, others: np.ndarray):
    return ("knight" if rng.random() < 0.5 else "knave", int(rng.choice(others)))


def random_statement(speaker: int, n: int, rng: np.random.Generator):
    """One random statement by ``speaker`` about the other ``n - 1`` people."""
    others = np.array([p for p in range(n) if p != speaker])
    kind = _KINDS[int(rng.choice(len(_KINDS), p=_KIND_P))]
    if kind == "leaf":
        return _random_leaf(rng, others)
    if kind == "not":
        return ("not", _random_leaf(rng, others))
    # Two distinct people, so at most one of them is the speaker.
    i, j = (int(x) for x in rng.choice(n, size=2, replace=False))
    if kind in ("same", "different"):
        return (kind, i, j)
    return (
        kind,
        ("knight" if rng.random() < 0.5 else "knave", i),
        ("knight" if rng.random() < 0.5 else "knave", j),
    )
