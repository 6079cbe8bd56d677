"""Math answer equivalence (algorithm.md §6.2–6.3).

``math_reward(response, ground_truth)`` is 1.0 iff the LAST ``\\boxed{}`` of the response is
equivalent to the ground truth:

1. no box → 0;
2. simple-number fast path on both sides (after wrapper stripping, removing spaces and commas,
   mapping the Unicode minus and dropping a trailing degree marker): Decimal comparison;
3. otherwise math-verify on the box content and the ground truth as given (the wrapper
   stripping of step 2 is not applied here; math-verify handles ``\\left``, ``\\(`` etc.):
   each side wrapped in ``$…$`` unless it already has a ``$``,
   ``parse(…, fallback_mode="no_fallback")`` and ``verify(gold, pred)``;
4. only if step 3 raised: compare the strings with ``$`` and spaces removed, lower-cased.

Step 3 runs in a worker process with a hard wall-clock budget (``_verify_pool``), so a hostile
answer costs at most ``timeout_s`` seconds in any thread and then scores 0.  Answers longer than
``MAX_ANSWER_CHARS`` are not sent to sympy at all: no real answer is that long, and such inputs
(thousands of nested braces or parentheses) only exist to make the parser recurse; they are
compared with the step-4 string rule instead.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from rlcsd_jax.rewards import _verify_pool
from rlcsd_jax.rewards.boxed import last_boxed

DEFAULT_TIMEOUT_S = 10.0
MAX_ANSWER_CHARS = 2048

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_LEFT_RIGHT = re.compile(r"\\(left|right)(?![A-Za-z])")
_DEGREE_SUFFIXES = ("^{\\circ}", "^\\circ", "\\degree", "\\deg", "°")
_UNICODE_MINUS = "\u2212"


def strip_wrappers(text: str) -> str:
    """§6.3: strips surrounding ``$``, ``\\(…\\)`` and ``\\[…\\]``, removes ``\\left``/``\\right``
    and unwraps an inner ``\\boxed{}``."""
    text = text.strip()
    # A bounded loop: each pass removes at least one wrapper or stops.
    for _ in range(8):
        before = text
        if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
            text = text.strip("$").strip()
        for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
            if len(text) >= 4 and text.startswith(opener) and text.endswith(closer):
                text = text[2:-2].strip()
        text = _LEFT_RIGHT.sub("", text)
        if "\\boxed" in text:
            inner = last_boxed(text)
            if inner is not None:
                text = inner
        if text == before:
            break
    return text


def _simple_number(text: str) -> Decimal | None:
    """The fast-path number of §6.2 step 2, or None if the text is not a plain number."""
    text = strip_wrappers(text)
    text = re.sub(r"\s+", "", text).replace(",", "").replace(_UNICODE_MINUS, "-")
    for suffix in _DEGREE_SUFFIXES:
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def _string_fallback(gold: str, pred: str) -> bool:
    """§6.2 step 4: equality after removing ``$`` and whitespace, case-insensitive."""

    def norm(s: str) -> str:
        return re.sub(r"\s+", "", s.replace("$", "")).lower()

    return norm(gold) == norm(pred)


def _dollar_wrap(text: str) -> str:
    return text if "$" in text else f"${text}$"


def is_equivalent(gold: str, pred: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``pred`` (an extracted answer) equals ``gold`` under §6.2 steps 2–4."""
    gold_num, pred_num = _simple_number(gold), _simple_number(pred)
    if gold_num is not None and pred_num is not None:
        return gold_num == pred_num
    if len(gold) > MAX_ANSWER_CHARS or len(pred) > MAX_ANSWER_CHARS:
        return _string_fallback(gold, pred)
    reply = _verify_pool.get_pool().check(_dollar_wrap(gold), _dollar_wrap(pred), timeout_s)
    if reply is None:  # budget exhausted or worker died: not verified
        return False
    if "e" in reply:
        return _string_fallback(gold, pred)
    return bool(reply["r"])


def math_reward(response: str, ground_truth: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the last boxed answer of ``response`` matches ``ground_truth``, else 0.0.

    Thread-safe; returns within about ``timeout_s`` seconds of getting a worker, whatever the input.
    """
    pred = last_boxed(response)
    if pred is None:
        return 0.0
    return 1.0 if is_equivalent(str(ground_truth), pred, timeout_s=timeout_s) else 0.0
