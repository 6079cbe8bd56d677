"""Training-dynamics figure from one or more workdirs' `metrics.jsonl`.

    python -m rlcsd_jax.plot --workdir runs/grpo --workdir runs/rlcsd --out dynamics.png \
        [--labels GRPO,RLCSD] [--smooth 0.9]

One panel per quantity the paper tracks (reward, validation accuracy, response length, entropy,
and for RLCSD the contrastive-signal statistics), one colour per workdir.  A panel whose key is
in no workdir is skipped and said so.  A step logged twice (a run resumed from an earlier
checkpoint) is plotted with its last value.  Workdirs and `--out` may be gs:// URLs.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys

from rlcsd_jax.data import storage
from rlcsd_jax.trainer.metrics import read_jsonl

log = logging.getLogger("rlcsd_jax.analysis.plot")

# (title, y label, candidate keys: the first one a run has is used)
PANELS = (
    ("Training reward", "mean reward", ("train/reward_mean",)),
    ("Validation accuracy", "accuracy (mean@k)", ("eval/avg",)),
    ("Response length", "tokens", ("train/response_length_mean",)),
    ("Entropy", "nats / token", ("train/entropy", "train/entropy_mc")),
    ("Contrastive signal e_ctr (mean)", "e_ctr", ("rlcsd/e_ctr_mean",)),
    ("Contrastive signal |e_ctr| (mean)", "|e_ctr|", ("rlcsd/e_ctr_abs_mean",)),
    ("Selected-token ratio", "fraction of tokens", ("rlcsd/selected_token_ratio",)),
)
EVAL_PANEL = "Validation accuracy"


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, sorted by step, last value per step, nulls dropped."""
    by_step = {}
    for r in records:
        if key in r and r[key] is not None:
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average (TensorBoard-style smoothing, bias-corrected)."""
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc, weight = alpha * acc + (1 - alpha) * v, alpha * weight + (1 - alpha)
        out.append(acc / weight)
    return out


def eval_sources(records: list[dict]) -> list[str]:
    """`eval/<source>` accuracy keys (not the average, not length statistics)."""
    keys = {k for r in records for k in r if k.startswith("eval/")}
    return sorted(k for k in keys if k != "eval/avg" and "length" not in k)


def _available(runs, keys) -> bool:
    return any(series(recs, k)[0] for _, recs in runs for k in keys)


def render(runs: list[tuple[str, list[dict]]], out: str, smooth: float = 0.0) -> list[str]:
    """Draw the figure for `runs` = [(label, records)] into `out`; returns the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, ylabel, keys in PANELS:
        if _available(runs, keys):
            panels.append((title, ylabel, keys))
        else:
            log.info("plot: skipping panel %r: no %s in any workdir", title, " / ".join(keys))
    if not panels:
        raise ValueError("none of the plotted metrics are in these workdirs: "
                         + ", ".join(k for _, _, keys in PANELS for k in keys))
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, keys) in zip(axes.flat, panels):
        for i, (label, recs) in enumerate(runs):
            color = colors[i % len(colors)]
            key = next((k for k in keys if series(recs, k)[0]), None)
            if key is None:
                log.info("plot: %s has no %s", label, " / ".join(keys))
                continue
            steps, values = series(recs, key)
            if title == EVAL_PANEL:
                _draw_eval(ax, label, recs, steps, values, color)
            elif smooth > 0:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, ema(values, smooth), color=color, label=label, linewidth=1.6)
            else:
                ax.plot(steps, values, color=color, label=label, linewidth=1.4)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(out)[1][1:].lower() or "png", dpi=120)
    plt.close(fig)
    storage.write_bytes(out, buf.getvalue())
    return [p[0] for p in panels]


def _draw_eval(ax, label, recs, steps, values, color):
    """Eval runs every N steps: markers + lines, the average bold, each source dashed."""
    ax.plot(steps, values, color=color, marker="o", markersize=4, linewidth=1.6,
            label=f"{label}: avg")
    markers = "s^vD<>pP*X"
    for j, key in enumerate(eval_sources(recs)):
        s_steps, s_values = series(recs, key)
        ax.plot(s_steps, s_values, color=color, marker=markers[j % len(markers)], markersize=3,
                linestyle="--", linewidth=0.9, alpha=0.6, label=f"{label}: {key[5:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcsd_jax.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", action="append", required=True,
                        help="training workdir holding metrics.jsonl (repeat to compare runs)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", default=None,
                        help="comma-separated legend labels, one per --workdir "
                             "(default: the folder names)")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA smoothing in [0, 1) for the per-step curves (0 = raw)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    labels = args.labels.split(",") if args.labels else [
        os.path.basename(w.rstrip("/")) for w in args.workdir]
    if len(labels) != len(args.workdir):
        parser.error(f"--labels has {len(labels)} names for {len(args.workdir)} workdirs")
    if not 0.0 <= args.smooth < 1.0:
        parser.error(f"--smooth must be in [0, 1), got {args.smooth}")
    try:
        runs = [(label, read_jsonl(w)) for label, w in zip(labels, args.workdir)]
        drawn = render(runs, args.out, smooth=args.smooth)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info("wrote %s (%d runs; panels: %s)", args.out, len(runs), ", ".join(drawn))
    return 0

