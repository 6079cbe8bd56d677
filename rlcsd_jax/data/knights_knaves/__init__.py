"""Knights & Knaves data: a generator of unique-solution puzzles with their reasoning, and a TFDS
builder (`tfds_builder`, imports TensorFlow: import it explicitly)."""

from rlcsd_jax.data.knights_knaves.generate import generate_puzzle
from rlcsd_jax.data.knights_knaves.puzzles import (MAX_PEOPLE, MIN_PEOPLE, NAMES, KKPuzzle,
                                                   answer_text, quiz_text, solve)
from rlcsd_jax.data.knights_knaves.reasoning import reasoning_text

__all__ = ["MAX_PEOPLE", "MIN_PEOPLE", "NAMES", "KKPuzzle", "answer_text", "generate_puzzle",
           "quiz_text", "reasoning_text", "solve"]
