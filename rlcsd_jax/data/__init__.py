"""Datasets, prompts and tokenizers.

* ``Record`` — one problem (records.py).
* Readers — verl parquet, JSONL with a field mapping, Knights & Knaves generated on the fly
  (readers.py), TFDS datasets incl. a generated K&K builder (tfds_kk.py; TensorFlow is imported
  only when a TFDS function is called).
* ``BatchIterator`` — deterministic, multi-host sharded, resumable batches (iterator.py).
* Prompts — student / teacher messages, chat rendering, long-prompt filtering, stop ids
  (prompts.py, chat_templates.py).
* Tokenizers — ``load_tokenizer`` and a tiny byte-level BPE for tests (tokenizer.py).
"""

from rlcsd_jax.data.iterator import BatchIterator
from rlcsd_jax.data.prompts import (
    BOXED_INSTRUCTION,
    DEFAULT_TRAIN_SOURCES,
    encode_prompt,
    filter_long_prompts,
    is_train_source,
    render_chat,
    strip_legacy_wrappers,
    student_prompt,
    student_user_message,
    teacher_prompt,
    teacher_user_message,
)
from rlcsd_jax.data.readers import kk_records, read_jsonl, read_records, read_verl_parquet
from rlcsd_jax.data.records import Record
from rlcsd_jax.data.tfds_reader import build_kk_tfds, read_tfds
from rlcsd_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, stop_token_ids

__all__ = [
    "BOXED_INSTRUCTION",
    "BatchIterator",
    "DEFAULT_TRAIN_SOURCES",
    "Record",
    "build_kk_tfds",
    "build_tiny_tokenizer",
    "encode_prompt",
    "filter_long_prompts",
    "is_train_source",
    "kk_records",
    "load_tokenizer",
    "read_jsonl",
    "read_records",
    "read_tfds",
    "read_verl_parquet",
    "render_chat",
    "stop_token_ids",
    "strip_legacy_wrappers",
    "student_prompt",
    "student_user_message",
    "teacher_prompt",
    "teacher_user_message",
]
