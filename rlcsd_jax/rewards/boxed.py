"""Extraction of the last ``\\boxed{...}`` answer (algorithm.md §6.1).

The reference searches the whole decoded response, thinking included, and the LAST box wins.
"""

from __future__ import annotations

_BOXED = "\\boxed"
_BOXED_OPEN = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """Returns the stripped content of the last ``\\boxed{...}`` in ``text``, or None.

    From the last occurrence of ``\\boxed`` the characters are scanned while counting ``{`` and
    ``}`` until the depth returns to zero.  The span is accepted only if it starts with
    ``\\boxed{`` and ends with ``}``, so ``\\boxed 5``, ``\\fbox{5}`` and an unbalanced box give
    None.  Only the last ``\\boxed`` is considered: if it is malformed, an earlier well-formed box
    is NOT used (the reference behaves the same way).
    """
    if not isinstance(text, str):
        return None
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    end = None
    for pos in range(start, len(text)):
        char = text[pos]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                end = pos
                break
    if end is None:
        return None
    span = text[start : end + 1]
    if not span.startswith(_BOXED_OPEN) or not span.endswith("}"):
        return None
    return span[len(_BOXED_OPEN) : -1].strip()
