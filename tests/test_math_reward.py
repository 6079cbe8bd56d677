"""Math verifier (algorithm.md §6.1–6.3): a table of answers and a hostile-input budget test.

Expected values follow docs/algorithm.md §6: last box wins (thinking included), the simple-number fast path
(spaces and commas removed, unicode minus, degree markers) compares Decimals, everything else goes
to math-verify, and a missing or malformed last box scores 0.
"""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rlcsd_jax.rewards import compute_score, compute_scores, last_boxed, math_reward
from rlcsd_jax.rewards.math import MAX_ANSWER_CHARS, strip_wrappers


def B(s):
    return "The answer is \\boxed{" + s + "}."


CASES = [
    # (id, response, gt, expected)
    ("int", B("42"), "42", 1.0),
    ("int_wrong", B("41"), "42", 0.0),
    ("frac_vs_slash", B("\\frac{1}{2}"), "1/2", 1.0),
    ("dfrac_vs_frac", B("\\dfrac{3}{4}"), "\\frac{3}{4}", 1.0),
    ("tfrac", B("\\tfrac{3}{4}"), "3/4", 1.0),
    ("frac_short", B("\\frac34"), "\\frac{3}{4}", 1.0),
    ("decimal_vs_frac", B("0.5"), "\\frac{1}{2}", 1.0),
    ("frac_vs_decimal", B("\\frac{1}{4}"), "0.25", 1.0),
    ("decimal_trailing_zero", B("2.50"), "2.5", 1.0),
    ("decimal_leading_dot", B(".5"), "0.5", 1.0),
    ("decimal_trailing_dot", B("3."), "3", 1.0),
    ("frac_wrong", B("\\frac{2}{3}"), "\\frac{3}{2}", 0.0),
    ("negative", B("-7"), "-7", 1.0),
    ("negative_sign_wrong", B("7"), "-7", 0.0),
    ("unicode_minus", B("\u22127"), "-7", 1.0),
    ("plus_sign", B("+3"), "3", 1.0),
    ("thousands_comma", B("1,000"), "1000", 1.0),
    ("thousands_space", B("1 000 000"), "1000000", 1.0),
    ("thousands_comma_gt", B("12345"), "12,345", 1.0),
    # Only spaces and commas are removed on the fast path; math-verify reads "1\\,000" as 1*000.
    ("thinspace_not_removed", B("1\\,000"), "1000", 0.0),
    ("degree_circ", B("90^\\circ"), "90", 1.0),
    ("degree_brace", B("90^{\\circ}"), "90", 1.0),
    ("degree_unicode", B("45°"), "45", 1.0),
    ("degree_cmd", B("30\\degree"), "30", 1.0),
    ("degree_wrong", B("60^\\circ"), "90", 0.0),
    ("dollar_wrapped", B("$5$"), "5", 1.0),
    ("paren_wrapped", B("\\(5\\)"), "5", 1.0),
    ("left_right", B("\\left(1,2\\right)"), "(1,2)", 1.0),
    ("text_unit", B("5\\text{ cm}"), "5", 1.0),
    ("text_unit_gt", B("12"), "12 \\text{ meters}", 1.0),
    ("mbox_unit", B("7 \\mbox{ dollars}"), "7", 1.0),
    ("sqrt", B("2\\sqrt{2}"), "\\sqrt{8}", 1.0),
    ("sqrt_wrong", B("\\sqrt{3}"), "\\sqrt{2}", 0.0),
    ("pi", B("2\\pi"), "2\\pi", 1.0),
    ("pi_expr", B("\\frac{\\pi}{2}"), "\\pi/2", 1.0),
    ("expression", B("x^2+2x+1"), "(x+1)^2", 1.0),
    ("expression_wrong", B("x^2+1"), "(x+1)^2", 0.0),
    ("set_order", B("\\{3, 1, 2\\}"), "\\{1,2,3\\}", 1.0),
    ("set_wrong", B("\\{1, 2\\}"), "\\{1,2,3\\}", 0.0),
    ("tuple", B("(1, 2)"), "(1,2)", 1.0),
    ("tuple_order", B("(2, 1)"), "(1,2)", 0.0),
    # Reference quirk (§6.2 step 2): commas are removed before the number test, so "2, 3" is 23.
    ("comma_list_reads_as_number", B("2, 3"), "3, 2", 0.0),
    ("comma_list_same_order", B("2, 3"), "2,3", 1.0),
    ("interval", B("[0, 1)"), "[0,1)", 1.0),
    ("interval_open_closed", B("(0, 1]"), "[0,1)", 0.0),
    ("interval_union", B("(-\\infty, 0) \\cup (1, \\infty)"), "(-\\infty,0)\\cup(1,\\infty)", 1.0),
    ("infinity", B("\\infty"), "\\infty", 1.0),
    ("percent", B("50\\%"), "50", 1.0),
    ("sci", B("1.5\\times 10^{3}"), "1500", 1.0),
    ("power", B("2^{10}"), "1024", 1.0),
    ("equation_rhs", B("x = 5"), "5", 1.0),
    (
        "matrix",
        B("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"),
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        1.0,
    ),
    ("nested_box", B("\\boxed{7}"), "7", 1.0),
    ("box_in_gt", B("7"), "\\boxed{7}", 1.0),
    ("no_box", "The answer is 42.", "42", 0.0),
    ("fbox", "\\fbox{42}", "42", 0.0),
    ("boxed_space", "\\boxed 42", "42", 0.0),
    ("last_box_wins", "\\boxed{41} then \\boxed{42}", "42", 1.0),
    ("last_box_wins_wrong", "\\boxed{42} then \\boxed{41}", "42", 0.0),
    ("unbalanced_last", "\\boxed{42} and \\boxed{43", "42", 0.0),
    ("unbalanced_inner", B("\\frac{1}{2"), "1/2", 0.0),
    ("boxed_in_thinking_only", "<think>maybe \\boxed{42}</think> I am not sure.", "42", 1.0),
    ("boxed_thinking_then_answer", "<think>\\boxed{41}</think> Final: \\boxed{42}", "42", 1.0),
    ("answer_then_thinking_box_wrong", "<think>\\boxed{42}</think> Final: \\boxed{40}", "42", 0.0),
    ("empty_box", "\\boxed{}", "42", 0.0),
    ("empty_gt", B("42"), "", 0.0),
    ("text_answer", B("\\text{Yes}"), "Yes", 1.0),
    ("text_answer_wrong", B("\\text{No}"), "Yes", 0.0),
    ("choice_letter", B("C"), "C", 1.0),
    ("choice_letter_wrong", B("B"), "C", 0.0),
    ("large_int", B("123456789012345678901234567890"), "123456789012345678901234567890", 1.0),
    (
        "large_int_off_by_one",
        B("123456789012345678901234567891"),
        "123456789012345678901234567890",
        0.0,
    ),
    ("decimal_close_not_equal", B("0.33"), "\\frac{1}{3}", 0.0),
    ("log", B("\\log_2 8"), "3", 1.0),
    ("binom", B("\\binom{5}{2}"), "10", 1.0),
    ("dollar_gt", B("5"), "$5$", 1.0),
    ("bracket_display", B("\\[ 12 \\]"), "12", 1.0),
]


@pytest.mark.parametrize(
    "response,ground_truth,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_math_reward_table(response, ground_truth, expected):
    assert math_reward(response, ground_truth) == expected


def test_table_is_large_and_ids_unique():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{5}", "5"),
        ("a \\boxed{ \\frac{1}{2} } b", "\\frac{1}{2}"),
        ("\\boxed{1} \\boxed{2}", "2"),
        ("\\boxed{\\boxed{3}}", "3"),  # the last occurrence of \\boxed is the inner one
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed{}", ""),
        ("\\boxed 5", None),
        ("\\fbox{5}", None),
        ("\\boxed{5", None),
        ("\\boxed{1} then \\boxed{2", None),  # only the LAST \\boxed counts, even if malformed
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("$5$", "5"),
        ("$$ 5 $$", "5"),
        ("\\(x\\)", "x"),
        ("\\[ 7 \\]", "7"),
        ("\\left( 1, 2 \\right)", "( 1, 2 )"),
        ("\\boxed{9}", "9"),
        ("$\\boxed{9}$", "9"),
        ("\\rightarrow", "\\rightarrow"),
    ],
)
def test_strip_wrappers(text, expected):
    assert strip_wrappers(text) == expected


def test_hostile_inputs_return_within_budget_from_a_thread():
    """Exponent towers (sympy hangs in C), 100 kB of braces, 10k nested parentheses."""
    hostile = [
        (B("10^{10^{10^{10}}}"), "5"),
        (B("9^{9^{9^{9}}}"), "10^{10^{10^{10}}}"),
        ("\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}", "1"),
        ("\\boxed{" + "{" * 100_000, "1"),
        (B("(" * 10_000 + "1" + ")" * 10_000), "1"),
        (B("1"), "(" * 10_000 + "1" + ")" * 10_000),
    ]
    results = []

    def run():
        for response, gt in hostile:
            results.append(math_reward(response, gt, timeout_s=1.0))

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=10.0)
    assert not worker.is_alive(), "hostile inputs did not finish within 10 s"
    assert time.monotonic() - start < 10.0
    assert results == [0.0] * len(hostile)
    # The pool recovers from the killed workers.
    assert math_reward(B("\\frac{1}{2}"), "0.5") == 1.0


def test_workers_are_killed_at_interpreter_exit():
    # atexit runs handlers last-registered-first, so a handler registered before the rewards
    # package is imported runs after the pool's own shutdown and can check the workers.
    script = textwrap.dedent("""
      import atexit
      procs = []
      def check():
        print("dead" if procs and all(p.poll() is not None for p in procs) else "alive")
      atexit.register(check)
      from rlcsd_jax.rewards import _verify_pool, math_reward
      assert math_reward("\\\\boxed{\\\\frac{1}{2}}", "0.5") == 1.0
      procs.extend(w.proc for w in _verify_pool.get_pool()._all)
  """)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=repo_root,
    )
    assert out.stdout.strip() == "dead"


def test_oversized_answers_use_the_string_rule():
    long_answer = "x" * (MAX_ANSWER_CHARS + 1)
    assert math_reward(B(long_answer), long_answer) == 1.0
    assert math_reward(B(long_answer), long_answer + "y") == 0.0


def test_concurrent_calls_from_many_threads_are_correct():
    picked = [c for c in CASES if "\\boxed" in c[1]][:24]
    results = {}

    def run(k):
        results[k] = [math_reward(r, g) for _, r, g, _ in picked]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    expected = [e for *_, e in picked]
    assert all(results[k] == expected for k in range(4))


@pytest.mark.parametrize(
    "source,response,gt,expected",
    [
        (
            "kk_9",
            "\\boxed{Alice is a knight, Bob is a knave}",
            "Bob is a knave, Alice is a knight",
            1.0,
        ),
        ("KK_4to8_test", "\\boxed{Alice is a knight}", "Alice is a knave", 0.0),
        ("kk_12", "\\boxed{Alice is a knight}", "Alice is a knight", 1.0),  # any kk_* is K&K
        ("aime24", "\\boxed{Alice is a knight}", "Alice is a knight", 1.0),  # math: string equal
        ("aime24", "\\boxed{042}", "42", 1.0),
        ("deepmath_filtered_level5_7", "no box", "42", 0.0),
    ],
)
def test_compute_score_routing(source, response, gt, expected):
    out = compute_score(source, response, gt)
    assert out == {"score": expected, "acc": expected, "formatted": 0.0}


def test_formatted_is_a_metric_only():
    assert compute_score("amc23", "<think>x</think> \\boxed{3}", "3") == {
        "score": 1.0,
        "acc": 1.0,
        "formatted": 1.0,
    }
    assert compute_score("amc23", "<think>x</think> \\boxed{4}", "3") == {
        "score": 0.0,
        "acc": 0.0,
        "formatted": 1.0,
    }


def test_compute_scores_batch_keeps_order():
    sources = ["amc23", "kk_9", "amc23", "kk_10"]
    responses = [B("1/2"), "\\boxed{A is a knight}", B("3"), "\\boxed{A is a knave}"]
    gts = ["0.5", "A is a knight", "4", "A is a knight"]
    assert [s["acc"] for s in compute_scores(sources, responses, gts)] == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="batch lengths differ"):
        compute_scores(sources, responses[:2], gts)
