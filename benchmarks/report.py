"""Markdown rendering of benchmark rows and the append-only RESULTS.md writer.

A row is a dict: model, kind, shape, jax / hf (result dicts from jax_side / hf_side, or
{"error": "..."}), and the MFU peak is passed at render time.  The run's section is rewritten
after every measurement (file = what was there before the run + this run's section), so a crash
or an OOM late in a GPU run still leaves every finished number on disk.
"""

from __future__ import annotations

import math
import os

from benchmarks import flops as flops_lib

TITLE = "# rlcsd_jax vs HF transformers: benchmark results"

# (model, measurement, shape, HF reference, target): one H200, HF transformers 5.17 +
# torch 2.11, bf16, sdpa, random weights.
TARGETS = (
    ("qwen3-1.7b", "decode T=1 p=.95 k=20", "64 × 512 → +512",
     "699 tok/s dynamic cache; 4,060 tok/s static (compiled, 53 s first call)",
     "≥ 14,000 tok/s"),
    ("qwen3-1.7b", "scoring", "16 × 4096", "95,800 tok/s, 49% MFU",
     "≥ 1.0× HF and ≥ 50% MFU"),
    ("qwen3-1.7b", "train step", "2 × 4096", "26,400 tok/s, 40% MFU (8 × 4096 OOM)",
     "≥ 1.1× HF, ≥ 45% MFU, 8 × 4096 fits"),
    ("qwen3-8b", "scoring", "8 × 4096", "28,600 tok/s, 61% MFU", "—"),
    ("qwen3-8b", "decode", "64 × 512 → +512", "614 tok/s", "—"),
)
TARGETS_MD = "\n".join(
    ["## Targets", "",
     "Reference: one H200, HF transformers 5.17 + torch 2.11, bf16, sdpa, random weights.", "",
     "| model | measurement | shape | HF reference | target for rlcsd_jax |",
     "|---|---|---|---|---|"]
    + ["| " + " | ".join(t) + " |" for t in TARGETS]) + "\n"

COLUMNS = ("model", "measurement", "shape", "JAX tok/s", "HF tok/s", "JAX/HF", "JAX MFU",
           "HF MFU", "JAX mem", "HF mem", "JAX compile s", "HF first call s", "notes")

_MEM_TAG = {"compiled estimate": "est", "RSS delta": "rss", "max_memory_allocated": "peak",
            "peak_bytes_in_use (cumulative)": "peak*"}


def _num(x, fmt="{:,.0f}"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return fmt.format(x)


def fmt_bytes(n) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def _bytes(n, method) -> str:
    if n is None:
        return "n/a"
    return f"{fmt_bytes(n)} ({_MEM_TAG.get(method, method)})"


def _clean(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ").strip()


def _ok(side) -> bool:
    return isinstance(side, dict) and "error" not in side and side.get("tok_s")


def render_row(row: dict, peak: float | None, cpu: bool = False) -> str:
    """One table line; cpu=True adds the per-CPU-second ratio to the notes."""
    jx, hf = row.get("jax"), row.get("hf")
    notes = list(row.get("notes", []))
    cells = [row["model"], row["kind"], row["shape"]]
    for side in (jx, hf):
        if side is None:
            cells.append("pending")
        elif "error" in side:
            cells.append("n/a" if side["error"].startswith("n/a") else "error")
        else:
            cells.append(_num(side["tok_s"]))
    cells.append(_num(jx["tok_s"] / hf["tok_s"], "{:.2f}×") if _ok(jx) and _ok(hf) else "n/a")
    for side in (jx, hf):
        m = flops_lib.mfu(side.get("flops"), side.get("seconds"), peak) if _ok(side) else None
        cells.append(_num(None if m is None else 100 * m, "{:.1f}%"))
    for side in (jx, hf):
        cells.append(_bytes(side.get("mem_bytes"), side.get("mem_method")) if _ok(side) else "n/a")
    cells.append(_num(jx.get("compile_s"), "{:.1f}") if _ok(jx) else "n/a")
    cells.append(_num(hf.get("first_s"), "{:.1f}") if _ok(hf) else "n/a")
    if _ok(jx) and _ok(hf) and jx.get("cores") and hf.get("cores"):
        note = f"host cores busy JAX {jx['cores']:.1f} / HF {hf['cores']:.1f}"
        if cpu:  # tokens per CPU-second: robust to time stolen by other processes
            ratio = (jx["tok_s"] / jx["cores"]) / (hf["tok_s"] / hf["cores"])
            note += f", per CPU-second {ratio:.2f}×"
        notes.append(note)
    for name, side in (("JAX", jx), ("HF", hf)):
        if isinstance(side, dict) and "error" in side:
            notes.append(f"{name} {side['error']}")
        elif isinstance(side, dict) and side.get("note"):
            notes.append(f"{name}: {side['note']}")
    cells.append("; ".join(notes))
    return "| " + " | ".join(_clean(c) for c in cells) + " |"


def render_section(meta: dict, rows: list[dict], details: list[str], peak: float | None,
                   done: bool) -> str:
    """One run's markdown: heading, environment bullets, the table, detail bullets."""
    lines = [f"## {meta['date']} · suite `{meta['suite']}` · {meta['device']}"
             + ("" if done else " (in progress)"), ""]
    lines += [f"- {k}: {v}" for k, v in meta.get("bullets", {}).items()]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [render_row(r, peak, meta.get("cpu", False)) for r in rows]
    if details:
        lines += ["", "Details:", ""] + [f"- {_clean(d)}" for d in details]
    return "\n".join(lines) + "\n"


class ResultsFile:
    """Append-only results file: the header + targets once, then one section per run."""

    def __init__(self, path: str):
        self.path = path
        prefix = ""
        if os.path.exists(path):
            with open(path) as f:
                prefix = f.read()
        if TITLE not in prefix:
            prefix = f"{TITLE}\n\nAppended by `python -m benchmarks.run`; see README.md.\n\n" \
                     f"{TARGETS_MD}\n" + prefix
        if prefix and not prefix.endswith("\n\n"):
            prefix = prefix.rstrip("\n") + "\n\n"
        self.prefix = prefix

    def write(self, section: str):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.prefix + section)
        os.replace(tmp, self.path)


def table_is_well_formed(markdown: str) -> bool:
    """Every results table has a header, a separator and rows with the same cell count."""
    tables, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    if not tables:
        return False
    for t in tables:
        if len(t) < 3 or set(t[1].replace("|", "").strip()) - set("-: "):
            return False
        n = t[0].count("|")
        if any(line.count("|") != n or not line.rstrip().endswith("|") for line in t):
            return False
    return True
