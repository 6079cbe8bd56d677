"""The planner's numbers for every shipped config on the TPU slice the docs recommend for it.

    python -m benchmarks.plan_table                    # print the markdown table
    python -m benchmarks.plan_table --write docs/tpu.md  # replace the table between its markers
    python -m benchmarks.plan_table --configs qwen3_8b --write docs/tpu.md   # only those rows

Each config is compiled by `rlcsd_jax.plan.plan` (libtpu, no TPU needed) at its largest shapes:
per-program peak memory per device against the chip's HBM (for the rollout engine's decode
programs also the bytes read per generated token over their floor, e.g. `78.0 (1.20x)`), and
the roofline time of one training step by phase at a mean response of half the cap.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re

from rlcsd_jax.planner import topology

topology.ensure_compile_only_env()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.join(os.path.dirname(__file__), "..")
# config -> the slice docs/tpu.md recommends for it.
RECOMMENDED = {
    "qwen3_0p6b": "v5p-8",
    "qwen3_1p7b": "v5p-16",
    "qwen3_4b": "v5p-32",
    "qwen3_8b": "v5p-64",
    "olmo3_7b_think": "v5p-64",
}
BEGIN, END = "<!-- plan-table:begin -->", "<!-- plan-table:end -->"


def load_config(name: str, task: str = "math"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(task)
    cfg.lock()
    return cfg


def _cell(row) -> str:
    if row.error:
        return "compile error"
    mark = "" if row.fits else " **no**"
    ratio = "" if row.floor_ratio is None else f" ({row.floor_ratio:.2f}x)"
    return f"{row.total_gib:.1f}{ratio}{mark}"


def _seconds(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def table(configs=RECOMMENDED) -> str:
    from rlcsd_jax import plan

    lines, names = [], None
    for name, slice_name in configs.items():
        print(f"planning {name} on {slice_name} ...", flush=True)
        cfg = load_config(name)
        _, rows, est, _ = plan.plan(cfg, slice_name)
        if names is None:
            names = [r.name for r in rows]
            lines.append("| config | slice | HBM/device (GiB) | "
                         + " | ".join(names) + " | step s (sample + score + update) |")
            lines.append("|---" * (len(names) + 4) + "|")
        budget = rows[0].budget_gib
        step = (f"{_seconds(est['step'])} ({_seconds(est['sample'])} + {_seconds(est['score'])} "
                f"+ {_seconds(est['update'])})")
        lines.append(f"| {name} | {slice_name} | {budget:.1f} | "
                     + " | ".join(_cell(r) for r in rows) + f" | {step} |")
    return "\n".join(lines)


def merge(old: str, new: str) -> str:
    """The table `old` with the rows of `new`'s configs replaced (or appended), in
    RECOMMENDED's order; `new`'s header wins.  Rows are keyed by their first cell."""
    def rows(text):
        lines = [x for x in text.strip().splitlines() if x.startswith("|")]
        return lines[:2], {x.split("|")[1].strip(): x for x in lines[2:]}

    _, old_rows = rows(old)
    head, new_rows = rows(new)
    merged = {**old_rows, **new_rows}
    order = [c for c in RECOMMENDED if c in merged] + [c for c in merged if c not in RECOMMENDED]
    return "\n".join(head + [merged[c] for c in order])


def write(path: str, text: str, partial: bool) -> None:
    """Replace the table between the plan-table markers of `path` (only `text`'s rows when
    `partial`)."""
    doc = open(path).read()
    found = re.search(re.escape(BEGIN) + "\n(.*?)" + re.escape(END), doc, flags=re.S)
    if found is None:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    if partial:
        text = merge(found.group(1), text)
    doc = doc[:found.start()] + f"{BEGIN}\n{text}\n{END}" + doc[found.end():]
    with open(path, "w") as f:
        f.write(doc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", help="a markdown file whose table between the plan-table "
                        "markers is replaced")
    parser.add_argument("--configs", default="", help="comma-separated configs to plan (default "
                        "all); with --write only their rows are replaced")
    args = parser.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(names) - set(RECOMMENDED))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {sorted(RECOMMENDED)}")
    text = table({c: RECOMMENDED[c] for c in names} if names else RECOMMENDED)
    print(text)
    if args.write:
        write(args.write, text, partial=bool(names))


if __name__ == "__main__":
    main()
