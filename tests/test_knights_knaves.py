"""Knights & Knaves: generator (unique solutions, determinism), grader and parser (algorithm.md §6.4)."""

import numpy as np
import pytest

from rlcsd_jax.rewards import kk_reward
from rlcsd_jax.data.knights_knaves import NAMES, answer_text, generate_puzzle, solve
from rlcsd_jax.rewards.knights_knaves import parse_assignments
from rlcsd_jax.data.knights_knaves.puzzles import evaluate, render

# Many puzzles where brute force is cheap, fewer where it is 2^10–2^11 assignments.
PUZZLES_PER_SIZE = {**{n: 200 for n in range(2, 9)}, 9: 60, 10: 60, 11: 60}


def _boxed(text):
    return f"<think>...</think> The final answer is \\boxed{{{text}}}"


@pytest.mark.parametrize("n", sorted(PUZZLES_PER_SIZE))
def test_generated_puzzles_have_exactly_one_solution(n):
    rng = np.random.default_rng(1234 + n)
    for _ in range(PUZZLES_PER_SIZE[n]):
        puzzle = generate_puzzle(n, rng)
        solutions = solve(puzzle.statements, n)
        assert solutions.shape == (1, n)
        assert tuple(bool(x) for x in solutions[0]) == puzzle.solution
        # The solution really satisfies every statement (independent of the vectorised solver).
        roles = dict(enumerate(puzzle.solution))
        assert all(bool(evaluate(s, roles)) == roles[i] for i, s in enumerate(puzzle.statements))
        assert len(set(puzzle.names)) == n and set(puzzle.names) <= set(NAMES)


@pytest.mark.parametrize("n", [2, 4, 8, 11])
def test_grader_accepts_own_answer_and_rejects_every_flip(n):
    rng = np.random.default_rng(99 + n)
    for _ in range(10):
        p = generate_puzzle(n, rng)
        assert kk_reward(_boxed(p.answer), p.answer) == 1.0
        assert kk_reward(_boxed(p.answer), f"\\boxed{{{p.answer}}}") == 1.0  # boxed ground truth
        conclusion = p.reasoning.strip().splitlines()[-1]
        assert kk_reward(_boxed(conclusion), p.answer) == 1.0
        for i in range(n):
            flipped = list(p.solution)
            flipped[i] = not flipped[i]
            assert kk_reward(_boxed(answer_text(p.names, flipped)), p.answer) == 0.0
        missing = answer_text(p.names[1:], p.solution[1:])
        assert kk_reward(_boxed(missing), p.answer) == 0.0
        extra = p.answer + ", Zed is a knight"
        assert kk_reward(_boxed(extra), p.answer) == 0.0
        reordered = answer_text(p.names[::-1], p.solution[::-1])
        assert kk_reward(_boxed(reordered), p.answer) == 1.0


def test_puzzle_text_shape():
    p = generate_puzzle(3, np.random.default_rng(7))
    assert p.quiz.startswith(
        "A very special island is inhabited only by knights and knaves. "
        "Knights always tell the truth, and knaves always lie. You meet 3 "
        f"inhabitants: {p.names[0]}, {p.names[1]}, and {p.names[2]}."
    )
    assert p.quiz.endswith("So who is a knight and who is a knave?")
    for name, stmt in zip(p.names, p.statements):
        said = render(stmt, p.names)
        assert f"{name} " in p.quiz and f'"{said[0].upper()}{said[1:]}."' in p.quiz
    assert p.answer == ", ".join(
        f"{nm} is a {'knight' if k else 'knave'}" for nm, k in zip(p.names, p.solution)
    )
    assert p.reasoning.splitlines()[-1] == f"Conclusion: {p.answer}."
    assert "Assume" in p.reasoning


def test_generator_is_deterministic():
    first = [generate_puzzle(n, np.random.default_rng(5)) for n in range(2, 12)]
    second = [generate_puzzle(n, np.random.default_rng(5)) for n in range(2, 12)]
    assert first == second
    other = [generate_puzzle(n, np.random.default_rng(6)) for n in range(2, 12)]
    assert first != other


def test_generator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_people"):
        generate_puzzle(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_people"):
        generate_puzzle(12, np.random.default_rng(0))


def test_solver_counts_all_solutions():
    # A says "B is a knight", B says "A is a knight": both knights or both knaves.
    sols = solve((("knight", 1), ("knight", 0)), 2)
    assert sorted(map(tuple, sols.tolist())) == [(False, False), (True, True)]
    # A says "B is a knight", B says "A is a knave": no consistent assignment.
    assert solve((("knight", 1), ("knave", 0)), 2).shape == (0, 2)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Alice is a knight, Bob is a knave", {"alice": "knight", "bob": "knave"}),
        ("ALICE IS A KNIGHT and bob is an knave", {"alice": "knight", "bob": "knave"}),
        (
            "Alice: knight; Bob = knave; Carol is knight",
            {"alice": "knight", "bob": "knave", "carol": "knight"},
        ),
        ("Alice:knight,Bob=knave", {"alice": "knight", "bob": "knave"}),
        ("Mary-Jane is a knight, O'Neil is a knave", {"mary-jane": "knight", "o'neil": "knave"}),
        ("Alice is a knight. Later: Alice is a knave", {"alice": "knight"}),  # first mention wins
        ("(1) Alice is a knight (2) Bob is a knave", {"alice": "knight", "bob": "knave"}),
        ("Alice is not a knight", {}),
        ("Alice -> knight", {}),
        ("nobody here", {}),
        ("", {}),
    ],
)
def test_parse_assignments(text, expected):
    assert parse_assignments(text) == expected


@pytest.mark.parametrize(
    "response,gt,expected",
    [
        ("\\boxed{Bob is a knave, Alice is a knight}", "Alice is a knight, Bob is a knave", 1.0),
        ("\\boxed{alice = KNIGHT, bob: knave}", "Alice is a knight, Bob is a knave", 1.0),
        ("Alice is a knight, Bob is a knave", "Alice is a knight, Bob is a knave", 0.0),  # no box
        (
            "Alice is a knave \\boxed{Alice is a knight, Bob is a knave}",
            "Alice is a knight, Bob is a knave",
            1.0,
        ),  # only the box is graded
        (
            "\\boxed{Alice is a knight, Bob is a knave} then \\boxed{Alice is a knave}",
            "Alice is a knight, Bob is a knave",
            0.0,
        ),  # last box wins
        ("\\boxed{Alice is a knight}", "Alice is a knight, Bob is a knave", 0.0),  # missing person
        (
            "\\boxed{Alice is a knight, Bob is a knave, Carl is a knave}",
            "Alice is a knight, Bob is a knave",
            0.0,
        ),  # extra person
        ("\\boxed{}", "", 0.0),  # an empty ground truth never matches
        ("\\boxed{nothing}", "no roles in this ground truth", 0.0),
        (
            "\\boxed{Alice is a knight, Bob is a knave}",
            "\\boxed{Alice is a knight, Bob is a knave}",
            1.0,
        ),  # boxed ground truth is unwrapped
        ("\\boxed{Alice is a knight, Bob is a knave", "Alice is a knight, Bob is a knave", 0.0),
    ],
)
def test_kk_reward_cases(response, gt, expected):
    assert kk_reward(response, gt) == expected


def test_parser_is_linear_on_hostile_input():
    import time

    start = time.monotonic()
    assert parse_assignments("a" * 200_000 + " is a knigh") == {}
    assert parse_assignments("Ab-" * 50_000) == {}
    assert time.monotonic() - start < 2.0
