"""RLCSD vs GRPO (and RLSD, OPSD) from one hint-reading base: held-out pass@1 over RL steps.

    python -m benchmarks.tiny_hints_experiment --out /tmp/tiny_hints_exp \\
        [--methods rlcsd,grpo,rlsd,opsd] [--seeds 0,1,2] [--steps 30] [--eval_every 10] \\
        [--parallel 2] [--plot docs/tiny_hints.png] [--config.KEY=VALUE ...]

1. The base: `configs/tiny_hints.py` with `train.num_steps=0` (warm-start mixture, held-out
   eval, role-token diagnostics, one checkpoint) in OUT/base, exported to an HF folder
   (OUT/base_hf, `rlcsd_jax.convert --to_hf`, bit-exact in fp32).  Skipped when present.
2. One RL run per (method, seed) from that folder (`model.checkpoint`, no warm start), in
   OUT/<method>_s<seed>, evaluating held-out pass@1 every `eval_every` steps; a run that
   already holds `--steps` steps is reused, a shorter one is continued from its checkpoint.
   `--parallel N` runs N at once.
3. OUT/results.json and OUT/results.md: per-seed pass@1 at each evaluated step, the mean over
   seeds with its standard error (SD / sqrt(seeds)), and the first step at which each method's
   mean reaches GRPO's final mean; `--plot` draws the curves (mean ± SE) as a PNG.

Extra `--config.KEY=VALUE` flags are passed to every RL run (e.g. a smaller eval set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                      "tiny_hints.py")


def _run(cmd: list[str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def build_base(out: str, extra: list[str]) -> str:
    base, hf = os.path.join(out, "base"), os.path.join(out, "base_hf")
    if not os.path.exists(os.path.join(base, "summary.json")):
        cmd = [sys.executable, "-m", "rlcsd_jax.train", f"--config={CONFIG}",
               f"--workdir={base}", "--config.train.num_steps=0", "--config.eval.at_end=False",
               *extra]
        if _run(cmd, os.path.join(out, "base.log")).wait():
            raise SystemExit(f"base run failed: see {out}/base.log")
    if not os.path.exists(os.path.join(hf, "config.json")):
        subprocess.run([sys.executable, "-m", "rlcsd_jax.convert", "--to_hf", "--src", base,
                        "--out", hf], check=True)
    return hf


def rl_command(out: str, hf: str, method: str, seed: int, steps: int, eval_every: int,
               extra: list[str]) -> tuple[list[str], str]:
    workdir = os.path.join(out, f"{method}_s{seed}")
    return [sys.executable, "-m", "rlcsd_jax.train", f"--config={CONFIG}",
            f"--workdir={workdir}", f"--config.model.checkpoint={hf}",
            "--config.warm_start.steps=0", "--config.warm_start.hint_diagnostics=0",
            f"--config.method={method}", f"--config.seed={seed}",
            f"--config.train.num_steps={steps}", f"--config.eval.every={eval_every}",
            f"--config.checkpoint.every={steps}", *extra], workdir


def done_steps(workdir: str) -> int:
    """RL steps a finished run holds (0: none).  A shorter run is resumed from its last
    checkpoint and continued: the lr is constant after warmup and every random draw derives
    from (seed, step), so the continuation equals a run of the longer length."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f).get("steps") or 0)


def run_all(out: str, hf: str, methods, seeds, steps, eval_every, parallel, extra) -> None:
    pending = [(m, s) for s in seeds for m in methods]
    running: list[tuple[subprocess.Popen, str, float]] = []
    while pending or running:
        while pending and len(running) < parallel:
            m, s = pending.pop(0)
            cmd, workdir = rl_command(out, hf, m, s, steps, eval_every, extra)
            if done_steps(workdir) >= steps:
                continue
            print(f"start {m} seed {s}", flush=True)
            running.append((_run(cmd, workdir + ".log"), workdir, time.time()))
        time.sleep(2)
        for item in list(running):
            proc, workdir, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"done {os.path.basename(workdir)} rc={proc.returncode} "
                      f"({time.time() - t0:.0f}s)", flush=True)


def eval_curve(workdir: str) -> dict[int, tuple[float, float]]:
    """{step: (pass@1, its standard error over problems)} from a run's metrics.jsonl."""
    curve = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return curve
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "eval/avg" in row:
                curve[int(row["step"])] = (row["eval/avg"], row.get("eval/avg_stderr", np.nan))
    return curve


def collect(out: str, methods, seeds) -> dict:
    res = {}
    for m in methods:
        per_seed = {s: eval_curve(os.path.join(out, f"{m}_s{s}")) for s in seeds}
        per_seed = {s: c for s, c in per_seed.items() if c}
        if not per_seed:
            continue
        steps = sorted(set.intersection(*(set(c) for c in per_seed.values())))
        mat = np.array([[per_seed[s][t][0] for t in steps] for s in per_seed])
        se = _se(mat)
        res[m] = dict(steps=steps, seeds=list(per_seed),
                      per_seed={str(s): [per_seed[s][t][0] for t in steps] for s in per_seed},
                      per_seed_se={str(s): [per_seed[s][t][1] for t in steps] for s in per_seed},
                      mean=mat.mean(0).tolist(), se=se.tolist())
    ref = "grpo"
    if ref in res and res[ref]["mean"][-1] > res[ref]["mean"][0]:
        # Only meaningful when GRPO ended above the base: otherwise step 0 "reaches" it.
        target = res[ref]["mean"][-1]
        for m, r in res.items():
            hit = [t for t, v in zip(r["steps"], r["mean"]) if t > 0 and v >= target]
            r["first_step_at_grpo_final"] = hit[0] if hit else None
    elif ref in res:
        for r in res.values():
            r["first_step_at_grpo_final"] = "n/a: GRPO's final mean is not above its step-0 mean"
    return res


def _se(x: np.ndarray) -> np.ndarray:
    """Standard error of the mean over the first axis (seeds); nan with a single seed."""
    if len(x) < 2:
        return np.full(x.shape[1:], np.nan)
    return x.std(0, ddof=1) / np.sqrt(len(x))


def render(res: dict) -> str:
    lines = []
    for m, r in res.items():
        lines.append(f"### {m} (seeds {', '.join(map(str, r['seeds']))})\n")
        lines.append("| step | " + " | ".join(f"seed {s}" for s in r["per_seed"])
                     + " | mean ± SE over seeds |")
        lines.append("|---" * (len(r["per_seed"]) + 2) + "|")
        for j, t in enumerate(r["steps"]):
            cells = [f"{r['per_seed'][s][j]:.3f} ± {r['per_seed_se'][s][j]:.3f}"
                     for s in r["per_seed"]]
            lines.append(f"| {t} | " + " | ".join(cells)
                         + f" | {r['mean'][j]:.3f} ± {r['se'][j]:.3f} |")
        change = np.array([v[-1] - v[0] for v in r["per_seed"].values()])
        lines.append(f"\nchange step {r['steps'][0]} -> {r['steps'][-1]}: per seed "
                     + ", ".join(f"{x:+.3f}" for x in change)
                     + f"; mean {change.mean():+.3f} ± {_se(change):.3f} (SE over seeds)")
        if m != "grpo" and "grpo" in res:
            g = res["grpo"]
            common = [s for s in r["per_seed"] if s in g["per_seed"]]
            steps = [t for t in r["steps"] if t in g["steps"]]
            if common and steps:
                d = np.array([[r["per_seed"][s][r["steps"].index(t)]
                               - g["per_seed"][s][g["steps"].index(t)] for t in steps]
                              for s in common])
                lines.append(f"minus grpo (same seed: same batches, same eval draws), mean "
                             f"over seeds ± SE, per step: " + ", ".join(
                                 f"{t}: {d[:, j].mean():+.3f} ± {_se(d[:, j]):.3f}"
                                 for j, t in enumerate(steps)))
        if "first_step_at_grpo_final" in r:
            lines.append(f"\nfirst evaluated step at which the mean reaches GRPO's final mean: "
                         f"{r['first_step_at_grpo_final']}\n")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, r in res.items():
        mean, se = np.array(r["mean"]), np.nan_to_num(np.array(r["se"]))
        ax.errorbar(r["steps"], mean, yerr=se, marker="o", capsize=3,
                    label=f"{m} ({len(r['seeds'])} seeds)")
    ax.set_xlabel("RL step (8 prompts x 16 rollouts)")
    ax.set_ylabel("held-out pass@1 (mean ± SE over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="rlcsd,grpo,rlsd,opsd")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--plot", default="")
    p.add_argument("--report_only", action="store_true", help="only collect existing runs")
    args, extra = p.parse_known_args(argv)
    if any(not e.startswith("--config.") for e in extra):
        p.error(f"unknown flags: {extra}")
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        hf = build_base(args.out, [e for e in extra if e.startswith("--config.data.")])
        run_all(args.out, os.path.abspath(hf), methods, seeds, args.steps, args.eval_every,
                args.parallel, extra)
    res = collect(args.out, methods, seeds)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    table = render(res)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    if args.plot and res:
        plot(res, args.plot, "tiny_hints: RL from one hint-reading base (2-person K&K)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
