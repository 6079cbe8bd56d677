"""Student and teacher prompts (RLCSD_SPEC §1.2, §2.1), chat rendering, and stop tokens.

Student message (one user turn, no system prompt):
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
import json
import os
import re
from typing import Iterable, Sequence

from rlcsd_jax.data.chat_templates import END_OF_TURN_TOKEN
from rlcsd_jax.data.records import Record

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# Training sources get the "Problem: " prefix (fnmatch patterns, compared lower-case).
DEFAULT_TRAIN_SOURCES = ("deepmath_filtered_level*", "kk_4to8", "kk_3to7")

_DAPO_PREFIX = re.compile(
    r"^\s*Solve the following math problem step by step\. The last line of your response "
    r"should be of the form Answer: \$Answer \(without quotes\) where \$Answer is the answer "
    r"to the problem\.\s*"
)
_DAPO_SUFFIX = re.compile(
    r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$"
)
_PROBLEM_PREFIX = "Problem: "


def strip_legacy_wrappers(text: str) -> str:
    """Recovers the raw problem from a stored user message (§1.2).

    Removes a DAPO "Answer:" instruction (its leading paragraph and its trailing reminder), a
    trailing boxed instruction, and — only together with that instruction — a leading
    "Problem: ".  Surrounding whitespace is stripped.
    """
    text = _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", text)).strip()
    if text.endswith(BOXED_INSTRUCTION):
        text = text[: -len(BOXED_INSTRUCTION)].rstrip()
        if text.startswith(_PROBLEM_PREFIX):
            text = text[len(_PROBLEM_PREFIX) :]
    return text.strip()


def is_train_source(data_source: str, train_sources: Sequence[str] = DEFAULT_TRAIN_SOURCES) -> bool:
    """Whether ``data_source`` matches one of the training-source patterns (case-insensitive)."""
    source = str(data_source).lower()
    return any(fnmatch.fnmatchcase(source, pattern.lower()) for pattern in train_sources)


def student_user_message(
    problem: str, data_source: str, train_sources: Sequence[str] = DEFAULT_TRAIN_SOURCES
) -> str:
    """The student's user-message content for one problem (§1.2)."""
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


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(model_dir_or_tokenizer, *, include_end_of_turn: bool = True) -> list[int]:
    """Token ids that end a sampled response.

    ``eos_token_id`` (int or list) from the folder's ``generation_config.json`` when present, else
    the tokenizer's eos.  With ``include_end_of_turn`` the ``<|im_end|>`` id is added when the
    vocabulary has it: every ChatML template (Qwen3, Olmo-3) closes the assistant turn with it,
    and a generation config that lists only ``<|endoftext|>`` would otherwise run past the answer.
    """
    tokenizer = None
    if isinstance(model_dir_or_tokenizer, (str, os.PathLike)):
        folder = os.fspath(model_dir_or_tokenizer)
    else:
        tokenizer = model_dir_or_tokenizer
        folder = getattr(tokenizer, "name_or_path", "") or ""
    ids: list[int] = []
    config_path = os.path.join(folder, "generation_config.json") if folder else ""
    if config_path and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            ids = _as_id_list(json.load(f).get("eos_token_id"))
    if not ids or include_end_of_turn:
        if tokenizer is None:
            from rlcsd_jax.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(folder)
        if not ids:
            ids = _as_id_list(tokenizer.eos_token_id)
        if include_end_of_turn:
            end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
            unk_id = getattr(tokenizer, "unk_token_id", None)
            if isinstance(end_id, int) and end_id != unk_id and end_id not in ids:
                ids.append(end_id)
    if not ids:
        raise ValueError(
            f"no stop token: {folder or 'the tokenizer'} has no generation_config.json "
            "eos_token_id and the tokenizer has no eos token"
        )
    return ids
