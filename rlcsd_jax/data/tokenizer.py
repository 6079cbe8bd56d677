"""Tokenizer loading, and a tiny deterministic byte-level BPE tokenizer for tests and tiny runs.

``build_tiny_tokenizer`` writes a normal Hugging Face tokenizer folder (``tokenizer.json``,
``tokenizer_config.json`` with a Qwen3-style ``chat_template``, ``generation_config.json``), so
``AutoTokenizer.from_pretrained`` — the path real checkpoints take — is what tests exercise.
Byte-level BPE makes ``decode(encode(x)) == x`` for any text, unicode included.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from rlcsd_jax.data.chat_templates import END_OF_TURN_TOKEN, QWEN3_CHAT_TEMPLATE
from rlcsd_jax.data.knights_knaves import generate_puzzle
from rlcsd_jax.data.prompts import BOXED_INSTRUCTION, teacher_user_message

# Special tokens get ids 0..len-1 in this order.  <think> / </think> are added as NORMAL tokens
# (as in Qwen3) so that decoding with skip_special_tokens=True keeps them.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")
THINK_TOKENS = ("<think>", "</think>")
DEFAULT_VOCAB_SIZE = 512

_MATH_CORPUS = (
    "Problem: Find all real x such that x^2 - 5x + 6 = 0.",
    "The roots are $x = 2$ and $x = 3$, so the answer is \\boxed{2, 3}.",
    "Compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. Therefore \\boxed{\\dfrac{5}{6}}.",
    "Let $f(x) = 3x^{2} + 2x - 1$. Then $f'(x) = 6x + 2$ and f(1) = 4.",
    "The angle is 90^\\circ and the area is 1,000 square units; the value is -12.5.",
    "\\sqrt{2} \\approx 1.4142, \\pi \\approx 3.14159, e^{i\\pi} + 1 = 0,",
    "\\left( a + b \\right)^2 = a^2 + 2ab + b^2.",
    "The interval is [0, 1) \\cup (2, \\infty) and the set is \\{1, 2, 3\\}.",
    "Answer: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.5 0.25 1/2 3/4 7\\% \\text{cm}.",
)


def load_tokenizer(path: str):
    """``transformers.AutoTokenizer`` from a local folder (never the network)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def default_corpus() -> list[str]:
    """Deterministic training text: generated K&K puzzles (2–11 people), prompts, math snippets."""
    texts = list(_MATH_CORPUS)
    for n in range(2, 12):
        for k in range(4):
            puzzle = generate_puzzle(n, np.random.default_rng([n, k]))
            texts += [puzzle.quiz, puzzle.reasoning, f"\\boxed{{{puzzle.answer}}}"]
    texts.append(teacher_user_message("What is 1 + 1?", "1 + 1 = 2.", "2"))
    texts.append(f"<think>\nLet me think.\n</think>\n\nSo \\boxed{{2}}. {BOXED_INSTRUCTION}")
    return texts


def build_tiny_tokenizer(
    out_dir: str, corpus_texts: Iterable[str] | None = None, *, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> str:
    """Trains a byte-level BPE tokenizer and saves it as a Hugging Face folder; returns ``out_dir``.

    ``vocab_size`` is the final size, or less once the corpus has no pair left to merge (the
    default corpus stops at 857).  Ids: ``<|endoftext|>``=0, ``<|im_start|>``=1,
    ``<|im_end|>``=2, ``<pad>``=3, then the 256 byte symbols and merges, then ``<think>`` and
    ``</think>`` (the last two ids).  eos is ``<|im_end|>`` and
    ``generation_config.json`` lists ``[<|im_end|>, <|endoftext|>]`` like Qwen3's.  The same corpus
    gives the same files.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = len(SPECIAL_TOKENS) + 256 + len(THINK_TOKENS)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be >= {min_size} (specials + 256 bytes), got {vocab_size}"
        )
    texts = list(default_corpus() if corpus_texts is None else corpus_texts)
    core = Tokenizer(models.BPE())
    # No prefix space and no normaliser: that is what makes decoding exact.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer=trainer)
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    generation_config = {
        "eos_token_id": [
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ],
        "pad_token_id": tokenizer.pad_token_id,
    }
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config, f, indent=2)
    return out_dir


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
