"""Readers that turn stored datasets into ``Record`` lists.

* ``read_verl_parquet`` — verl rows (algorithm.md §7): ``data_source``, ``prompt`` (chat list),
  ``reward_model.ground_truth``, ``extra_info.problem / solution / index``.
* ``read_jsonl`` — one JSON object per line, with a field mapping (record field → dotted key).
* ``kk_records`` — Knights & Knaves generated on the fly from a data-source name (``kk_4to8``,
  ``kk_4to8_test``, ``kk_9``, …).
* ``read_records`` — dispatch on the path / name.
TFDS lives in ``tfds_reader`` (TensorFlow is slow to import).

A malformed row raises ``ValueError("<file>: row <i>: field '<name>' …")`` (rows count from 0;
JSONL errors also give the 1-based line number).  Files may be local or URLs (``gs://...``):
they are opened through ``etils.epath`` (``rlcsd_jax.data.storage``), so a pod can read its data
straight from a bucket.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import numpy as np

from rlcsd_jax.data import storage
from rlcsd_jax.data.knights_knaves import generate_puzzle
from rlcsd_jax.data.prompts import strip_legacy_wrappers
from rlcsd_jax.data.records import Record

_MISSING = object()
RECORD_FIELDS = ("problem", "ground_truth", "data_source", "index", "solution")


def get_path(obj: Any, path: str) -> Any:
    """``obj["a"]["b"]`` for ``path="a.b"``; ``_MISSING`` if any step is absent or None."""
    for key in path.split("."):
        if not isinstance(obj, Mapping) or obj.get(key) is None:
            return _MISSING
        obj = obj[key]
    return obj


class RowError(ValueError):
    """A malformed row; the message names the file, the row and the field."""

    def __init__(self, where: str, field: str, problem: str):
        super().__init__(f"{where}: field '{field}' {problem}")


def _text(value: Any, where: str, field: str, *, required: bool = True) -> str | None:
    if value is _MISSING:
        if required:
            raise RowError(where, field, "is missing")
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # numeric ground truths such as 42 are common
    if not isinstance(value, str):
        raise RowError(where, field, f"must be a string, got {type(value).__name__}")
    return value


def _index(value: Any, default: int, where: str, field: str) -> int | str:
    if value is _MISSING:
        return default
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        if hasattr(value, "item"):  # numpy scalars from TFDS
            return value.item()
        raise RowError(where, field, f"must be an int or a string, got {type(value).__name__}")
    return value


def _content_text(content: Any) -> str:
    """A chat message's text: a string, or the text segments of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for segment in content:
            if isinstance(segment, Mapping):
                if segment.get("type") == "text":
                    parts.append(str(segment.get("text", "")))
                elif "content" in segment:
                    parts.append(str(segment.get("content", "")))
            elif segment is not None:
                parts.append(str(segment))
        return " ".join(p for p in parts if p)
    return "" if content is None else str(content)


def prompt_problem(prompt: Any, where: str) -> str:
    """The problem inside a verl chat-list prompt, as the reference recovers it (§1.2): the
    text of the user messages (of every message when no user message has text), joined by
    newlines, stripped of its legacy wrappers."""
    if isinstance(prompt, str):
        return strip_legacy_wrappers(prompt)
    if hasattr(prompt, "tolist"):             # numpy arrays of messages (parquet readers)
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RowError(where, "prompt", "must be a non-empty list of chat messages")
    user, every = [], []
    for message in prompt:
        if not isinstance(message, Mapping):
            continue
        text = _content_text(message.get("content"))
        if text:
            every.append(text)
            if message.get("role") == "user":
                user.append(text)
    if not every:
        raise RowError(where, "prompt", "has no message with text")
    return strip_legacy_wrappers("\n".join(user or every).strip())


def verl_row_to_record(row: Mapping, where: str, row_number: int) -> Record:
    """One verl row → Record.  problem = ``extra_info.problem`` as stored (the prompt builders
    strip its wrappers); when it is missing or empty, the problem inside ``prompt``
    (``prompt_problem``), as the reference falls back."""
    problem = get_path(row, "extra_info.problem")
    if isinstance(problem, (list, tuple)):
        problem = _content_text(problem)
    if problem is _MISSING or problem == "" or problem == b"":
        problem = prompt_problem(row.get("prompt"), where)
    return Record(
        problem=_text(problem, where, "extra_info.problem"),
        ground_truth=_text(
            get_path(row, "reward_model.ground_truth"), where, "reward_model.ground_truth"
        ),
        data_source=_text(get_path(row, "data_source"), where, "data_source"),
        index=_index(get_path(row, "extra_info.index"), row_number, where, "extra_info.index"),
        solution=_text(
            get_path(row, "extra_info.solution"), where, "extra_info.solution", required=False
        ),
    )


def read_verl_parquet(path: str, *, batch_rows: int = 1024) -> list[Record]:
    """All rows of a verl-format parquet file, in file order."""
    import pyarrow.parquet as pq

    if not storage.path(path).is_file():
        raise FileNotFoundError(f"parquet file not found: {path}")
    records: list[Record] = []
    row_number = 0
    with storage.path(path).open("rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                records.append(verl_row_to_record(row, f"{path}: row {row_number}", row_number))
                row_number += 1
    return records


def mapped_record(
    obj: Mapping,
    field_map: Mapping[str, str],
    where: str,
    row_number: int,
    *,
    data_source: str | None = None,
) -> Record:
    """A Record from any mapping via ``field_map`` (record field → dotted key).

    ``problem`` and ``ground_truth`` must be mapped; ``data_source`` is mapped or given as the
    constant ``data_source``; ``index`` defaults to the row number and ``solution`` to None.
    """
    unknown = set(field_map) - set(RECORD_FIELDS)
    if unknown:
        raise ValueError(
            f"field_map has unknown record fields {sorted(unknown)}; allowed: {list(RECORD_FIELDS)}"
        )
    for needed in ("problem", "ground_truth"):
        if needed not in field_map:
            raise ValueError(f"field_map must map '{needed}' (got {dict(field_map)})")
    if "data_source" not in field_map and data_source is None:
        raise ValueError("give data_source=... or map 'data_source' in field_map")

    def value(field: str) -> Any:
        return get_path(obj, field_map[field]) if field in field_map else _MISSING

    source = value("data_source")
    return Record(
        problem=_text(value("problem"), where, field_map["problem"]),
        ground_truth=_text(value("ground_truth"), where, field_map["ground_truth"]),
        data_source=(
            _text(source, where, field_map["data_source"])
            if "data_source" in field_map
            else data_source
        ),
        index=_index(value("index"), row_number, where, field_map.get("index", "index")),
        solution=_text(
            value("solution"), where, field_map.get("solution", "solution"), required=False
        ),
    )


def read_jsonl(
    path: str, field_map: Mapping[str, str], *, data_source: str | None = None
) -> list[Record]:
    """Records from a JSON-lines file; blank lines are skipped (but still counted as lines)."""
    if not storage.path(path).is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    records: list[Record] = []
    with storage.path(path).open("r", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: row {len(records)} (line {line_number})"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append(
                mapped_record(obj, field_map, where, len(records), data_source=data_source)
            )
    return records


_KK_NAME = re.compile(r"kk_(\d+)(?:to(\d+))?(_test)?")


def parse_kk_source(data_source: str) -> tuple[int, int, str]:
    """``"kk_4to8"`` → (4, 8, "train"), ``"kk_4to8_test"`` → (4, 8, "test"), ``"kk_9"`` →
    (9, 9, "test"): single-size sets are the out-of-distribution evaluation sets."""
    match = _KK_NAME.fullmatch(data_source.lower())
    if not match:
        raise ValueError(
            f"not a K&K data source: {data_source!r} (expected kk_N, kk_AtoB or kk_AtoB_test)"
        )
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    split = "test" if match.group(3) or not match.group(2) else "train"
    return low, high, split


def kk_people_count(data_source: str, index: int) -> int:
    """People in record ``index`` of a generated K&K set: counts cycle through the set's range,
    so every size gets an equal share."""
    low, high, _ = parse_kk_source(data_source)
    return low + index % (high - low + 1)


def kk_record(data_source: str, index: int, *, seed: int = 0,
              name_pool: int | None = None) -> Record:
    """Record ``index`` of a generated K&K set; independent of every other record, so any slice
    can be produced alone.  Train and test sets draw from different seeds."""
    low, high, split = parse_kk_source(data_source)
    n_people = kk_people_count(data_source, index)
    rng = np.random.default_rng([seed, 1 if split == "test" else 0, low, high, index])
    puzzle = generate_puzzle(n_people, rng, name_pool=name_pool)
    return Record(
        problem=puzzle.quiz,
        ground_truth=puzzle.answer,
        data_source=data_source,
        index=index,
        solution=puzzle.reasoning,
    )


def kk_records(data_source: str, num_examples: int, *, seed: int = 0,
               name_pool: int | None = None) -> list[Record]:
    """``num_examples`` generated puzzles for a K&K data source (see ``parse_kk_source``)."""
    return [kk_record(data_source, i, seed=seed, name_pool=name_pool)
            for i in range(num_examples)]


def read_records(
    path_or_name: str,
    *,
    field_map: Mapping[str, str] | None = None,
    data_source: str | None = None,
    num_examples: int | None = None,
    seed: int = 0,
    kk_name_pool: int | None = None,
) -> list[Record]:
    """Dispatch: ``*.parquet`` (verl), ``*.jsonl`` (needs ``field_map``), or a K&K name."""
    if path_or_name.endswith(".parquet"):
        return read_verl_parquet(path_or_name)
    if path_or_name.endswith((".jsonl", ".json")):
        if field_map is None:
            raise ValueError(f"reading {path_or_name} needs a field_map")
        return read_jsonl(path_or_name, field_map, data_source=data_source)
    if _KK_NAME.fullmatch(path_or_name.lower()):
        if num_examples is None:
            raise ValueError(f"generating {path_or_name} needs num_examples")
        return kk_records(path_or_name, num_examples, seed=seed, name_pool=kk_name_pool)
    raise ValueError(
        f"don't know how to read {path_or_name!r}: expected a .parquet or .jsonl "
        "file or a K&K name such as kk_4to8 / kk_9"
    )
