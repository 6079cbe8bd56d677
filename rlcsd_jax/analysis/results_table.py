"""The paper-style results table: per-source scores in percent, group averages ("Math Avg",
"Logic Avg") and the overall average, as markdown that can be parsed back and appended to.

Rows are `{"name": str, "scores": {source: fraction}}`; missing cells print as `-`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

# Paper table groups (algorithm.md §5): column order, then the group's unweighted mean.
GROUPS: dict[str, tuple[str, ...]] = {
    "Math Avg": ("amc23", "aime24", "aime25"),
    "Logic Avg": ("kk_4to8_test", "kk_9", "kk_10", "kk_11"),
}
AVG_COLUMN = "Avg"
NAME_HEADER = "Checkpoint"
MISSING = "-"




def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def aggregate_columns(scores: Mapping[str, float]) -> dict[str, float]:
    """Source scores (fractions) -> every table column: the sources, "Math Avg" / "Logic Avg"
    over the group's sources that are present, and "Avg" over all sources (= `eval/avg`)."""
    cells = dict(scores)
    for avg_name, members in GROUPS.items():
        present = [scores[s] for s in members if s in scores]
        if present:
            cells[avg_name] = _mean(present)
    if scores:
        cells[AVG_COLUMN] = _mean(scores.values())
    return cells


def table_columns(sources: Iterable[str]) -> list[str]:
    """Column order: each known group's sources then its avg, other sources sorted, then "Avg"
    (left out when every source belongs to one group, whose avg is then the average)."""
    srcs = set(sources)
    cols: list[str] = []
    for avg_name, members in GROUPS.items():
        present = [s for s in members if s in srcs]
        if present:
            cols += present + [avg_name]
    known = {s for members in GROUPS.values() for s in members}
    cols += sorted(srcs - known)
    if srcs and not any(srcs <= set(members) for members in GROUPS.values()):
        cols.append(AVG_COLUMN)
    return cols


def percent(x: float) -> str:
    return f"{100.0 * float(x):.1f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Mapping]) -> str:
    """A markdown table, one row per checkpoint, values in percent with one decimal.

    A row is {"name": str, "scores": {source: fraction}} (scores as in results.json), or
    {"name": str, "cells": {column: text}} (a row read back by `parse_table`, kept verbatim).
    Columns are the union over rows; a row without a column shows "-".
    """
    sources: set[str] = set()
    rendered, kept_aggregates = [], []
    aggregates = set(GROUPS) | {AVG_COLUMN}
    for row in rows:
        if "scores" in row:
            cells = {k: percent(v) for k, v in aggregate_columns(row["scores"]).items()}
            sources |= set(row["scores"])
        else:
            cells = dict(row["cells"])
            sources |= set(cells) - aggregates
            kept_aggregates += [c for c in cells if c in aggregates]
        rendered.append((row["name"], cells))
    cols = table_columns(sources)
    cols += [c for c in dict.fromkeys(kept_aggregates) if c not in cols]  # an old table's own
    lines = ["| " + " | ".join([NAME_HEADER] + [_escape(c) for c in cols]) + " |",
             "|" + "|".join([":---"] + ["---:"] * len(cols)) + "|"]
    for row_name, cells in rendered:
        values = [_escape(row_name)] + [_escape(cells.get(c, MISSING)) for c in cols]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _split_row(line: str) -> list[str]:
    parts = _CELL_SPLIT.split(line.strip())
    if parts and parts[0].strip() == "":
        parts = parts[1:]
    if parts and parts[-1].strip() == "":
        parts = parts[:-1]
    return [p.strip().replace("\\|", "|") for p in parts]


def parse_table(text: str) -> tuple[str, list[dict], str]:
    """(text before, rows as {"name", "cells"}, text after) of the first markdown table in
    `text`; no table -> (text, [], "")."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
    if start is None:
        return text, [], ""
    end = start
    while end < len(lines) and lines[end].lstrip().startswith("|"):
        end += 1
    header = _split_row(lines[start])
    rows = []
    for line in lines[start + 1:end]:
        cells = _split_row(line)
        if all(re.fullmatch(r":?-+:?", c) for c in cells):   # the alignment row
            continue
        cells += [""] * (len(header) - len(cells))
        rows.append({"name": cells[0],
                     "cells": {h: c for h, c in zip(header[1:], cells[1:]) if c != MISSING}})
    return "".join(lines[:start]), rows, "".join(lines[end:])


def append_row(existing: str, row: Mapping) -> str:
    """`existing` markdown with `row` added to its first table (a row of the same name is
    replaced); text around the table is kept."""
    before, rows, after = parse_table(existing)
    rows = [r for r in rows if r["name"] != row["name"]] + [row]
    if before and not before.endswith("\n"):
        before += "\n"
    return before + format_table(rows) + after


def table_row(results: Mapping) -> dict:
    return {"name": results["name"], "scores": dict(results["scores"])}
