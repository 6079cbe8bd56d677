"""The planner's numbers for every shipped config on the TPU slice the docs recommend for it.

    python -m benchmarks.plan_table                    # print the markdown table
    python -m benchmarks.plan_table --write docs/tpu.md  # replace the table between its markers

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


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", help="a markdown file whose table between the plan-table "
                        "markers is replaced")
    args = parser.parse_args()
    text = table()
    print(text)
    if args.write:
        doc = open(args.write).read()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{args.write} has no {BEGIN} ... {END} markers")
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                     lambda _: f"{BEGIN}\n{text}\n{END}", doc, flags=re.S)
        with open(args.write, "w") as f:
            f.write(doc)


if __name__ == "__main__":
    main()
