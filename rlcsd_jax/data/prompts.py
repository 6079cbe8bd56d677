"""Student and teacher prompts (algorithm.md §1.2, §2.1), chat rendering, and stop tokens.

Student message (one user turn, no system prompt), with ``problem`` cleaned of legacy wrappers
(``strip_legacy_wrappers``, the reference's rule):
  training sources: ``"Problem: {problem}\\n\\n" + BOXED_INSTRUCTION``
  every other source (eval): ``"{problem}\\n\\n" + BOXED_INSTRUCTION``
Teacher message (§2.1, always with the "Problem: " prefix): ``teacher_user_message``.
Both are rendered with the tokenizer's own chat template, ``add_generation_prompt=True`` and
``enable_thinking`` (True for students and teachers in every shipped config); see
``chat_templates`` for what Qwen3 and Olmo-3-Think templates produce.  Prompts longer than the
limit are dropped and counted, never truncated.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

from rlcsd_jax.data.records import Record

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# The reference's other answer instruction (its retired base-model prompt); only stripped.
THINKING_BOXED_INSTRUCTION = ("Please first think step by step inside <think>...</think> tags, "
                              "and then put your final answer within \\boxed{}.")
# The reference's legacy DAPO instruction: its two sentences, as one leading block.
LEGACY_DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
    '\n\nRemember to put your answer on its own line after "Answer:".')
# Training sources get the "Problem: " prefix (fnmatch patterns, compared lower-case): the
# reference's non-eval sources among those whose prompts it rebuilds (§1.2).
DEFAULT_TRAIN_SOURCES = ("deepmath_filtered*", "dapo_math_17k", "openthoughts_114k_math_filtered",
                         "kk_4to8", "kk_3to7")
_PROBLEM_PREFIX = "Problem: "


def strip_legacy_wrappers(text: str | None) -> str:
    """The raw problem inside a stored prompt or problem text (§1.2), by the reference's rule.

    The text is stripped, then the first match wins:
    1. it starts with ``LEGACY_DAPO_INSTRUCTION + "\\n\\n"``: what follows;
    2. for each instruction (``BOXED_INSTRUCTION``, then ``THINKING_BOXED_INSTRUCTION``): it
       starts with "Problem: " and ends with ``"\\n\\n" + instruction``: what lies between;
       else it ends with ``"\\n\\n" + instruction``: what comes before;
    3. otherwise the stripped text itself.
    The result is stripped; None gives "".  A "Problem: " without the instruction stays, and so
    does the DAPO form that puts the problem between its two sentences (the reference's
    pattern needs both sentences first).
    """
    if text is None:
        return ""
    text = str(text).strip()
    dapo = LEGACY_DAPO_INSTRUCTION + "\n\n"
    if text.startswith(dapo):
        return text[len(dapo):].strip()
    for instruction in (BOXED_INSTRUCTION, THINKING_BOXED_INSTRUCTION):
        suffix = "\n\n" + instruction
        if text.startswith(_PROBLEM_PREFIX) and text.endswith(suffix):
            return text[len(_PROBLEM_PREFIX):-len(suffix)].strip()
        if text.endswith(suffix):
            return text[:-len(suffix)].strip()
    return text


def is_train_source(data_source: str, train_sources: Sequence[str] = DEFAULT_TRAIN_SOURCES) -> bool:
    """Whether ``data_source`` matches one of the training-source patterns (case-insensitive)."""
    source = str(data_source).lower()
    return any(fnmatch.fnmatchcase(source, pattern.lower()) for pattern in train_sources)


def student_user_message(
    problem: str, data_source: str, train_sources: Sequence[str] = DEFAULT_TRAIN_SOURCES
) -> str:
    """The student's user-message content for one problem (§1.2).

    ``problem`` is cleaned first (``strip_legacy_wrappers``, applied twice as the reference's
    prompt builder does), so a problem text that already carries the instruction (the
    reference's K&K puzzles, a stored "Problem: ..." prompt) gets it once, not twice.
    """
    problem = strip_legacy_wrappers(strip_legacy_wrappers(problem))
    body = _PROBLEM_PREFIX + problem if is_train_source(data_source, train_sources) else problem
    return f"{body}\n\n{BOXED_INSTRUCTION}"


def teacher_user_message(
    problem: str, solution: str | None, answer: str, *, mode: str = "solution_answer"
) -> str:
    """The "Reference Solution" teacher message of §2.1, character for character.

    ``mode="solution_answer"`` (every shipped config, and RLCSD's hard-coded choice) uses
    ``PRIV = f"{solution.strip()}\\n\\nCorrect final answer: {answer.strip()}"``;
    ``mode="answer_only"`` uses just ``f"Correct final answer: {answer.strip()}"``.  The same
    template serves correct and wrong hints.
    """
    if mode == "solution_answer":
        if solution is None:
            raise ValueError(
                "teacher_user_message(mode='solution_answer') needs a solution, got None"
            )
        priv = f"{solution.strip()}\n\nCorrect final answer: {answer.strip()}"
    elif mode == "answer_only":
        priv = f"Correct final answer: {answer.strip()}"
    else:
        raise ValueError(
            f"unknown teacher mode {mode!r}; allowed: 'solution_answer', 'answer_only'"
        )
    return (
        f"Problem: {problem}\n\nHere is a reference solution to this problem:\n"
        f"=== Reference Solution Begin ===\n{priv}\n=== Reference Solution End ===\n\n"
        "After reading the reference solution above, make sure you understand the reasoning "
        f"behind each step.\n\n{BOXED_INSTRUCTION}"
    )


def render_chat(
    tokenizer, user_content: str, enable_thinking: bool = True, **template_kwargs
) -> str:
    """One user turn rendered by the tokenizer's own chat template, with the generation prompt.

    ``enable_thinking`` is always passed: Qwen3 templates read it, others (Olmo-3) ignore it.
    """
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_content}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
        **template_kwargs,
    )


def student_prompt(
    tokenizer,
    record: Record,
    *,
    train_sources: Sequence[str] = DEFAULT_TRAIN_SOURCES,
    enable_thinking: bool = True,
) -> str:
    """The rendered student prompt string for a record."""
    return render_chat(
        tokenizer,
        student_user_message(record.problem, record.data_source, train_sources),
        enable_thinking,
    )


def teacher_prompt(
    tokenizer,
    problem: str,
    solution: str | None,
    answer: str,
    *,
    mode: str = "solution_answer",
    enable_thinking: bool = True,
) -> str:
    """The rendered teacher prompt string (§2.1)."""
    return render_chat(
        tokenizer, teacher_user_message(problem, solution, answer, mode=mode), enable_thinking
    )


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of an already rendered prompt; the template supplies every special token."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def filter_long_prompts(
    records: Iterable[Record],
    tokenizer,
    max_len: int,
    *,
    train_sources: Sequence[str] = DEFAULT_TRAIN_SOURCES,
    enable_thinking: bool = True,
) -> tuple[list[Record], int]:
    """Keeps records whose rendered student prompt has at most ``max_len`` tokens.

    Returns ``(kept, n_dropped)``; prompts are never truncated (verl's filter_overlong_prompts).
    """
    records = list(records)
    if not records:
        return [], 0
    texts = [
        student_prompt(tokenizer, r, train_sources=train_sources, enable_thinking=enable_thinking)
        for r in records
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept = [r for r, row in zip(records, ids) if len(row) <= max_len]
    return kept, len(records) - len(kept)
