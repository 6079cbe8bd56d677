"""`python -m benchmarks.run --suite cpu|gpu [--model qwen3-1.7b] [--out benchmarks/RESULTS.md]`.

Times rlcsd_jax and HF transformers (PyTorch) in one process, on the same device, shapes and
dtype, with the same random weights.  Per model: every HF measurement first (then torch's cache
is emptied), then every JAX one (JAX's allocator never hands memory back, so it goes last; the
JAX train step donates the master weights, so it is the last JAX measurement).  Each measurement
is guarded: an error or OOM is recorded in its table cell and the run continues; the results
section is rewritten after every measurement.  See benchmarks/README.md.
"""

from __future__ import annotations

import os

# Share the GPU with torch: no up-front grab, but let JAX grow to most of the device once torch
# has emptied its cache (the JAX phase runs last).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import flops, phases, report, suites  # noqa: E402
from rlcsd_jax import models  # noqa: E402

KINDS = ("decode", "scoring", "train")
_SHAPE_FLAGS = [f.name for f in dataclasses.fields(suites.Shapes)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("cpu", "gpu"), required=True)
    p.add_argument("--model", action="append", help="preset or tiny/small; repeatable")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    p.add_argument("--json", help="also dump the raw rows as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny model only (CI smoke test)")
    p.add_argument("--only", default=",".join(KINDS), help="comma list of decode,scoring,train")
    p.add_argument("--sides", default="jax,hf", help="comma list of jax,hf")
    p.add_argument("--repeats", type=int, help="timed repeats (median); default cpu 3, gpu 5")
    p.add_argument("--decode-repeats", type=int, help="default 2")
    p.add_argument("--dtype", help="compute dtype; default cpu float32, gpu bfloat16")
    p.add_argument("--param-dtype", default="float32", help="master weights")
    p.add_argument("--infer-params", choices=("compute", "master"), default="compute",
                   help="decode/scoring weights: cast to the compute dtype, or the fp32 masters")
    p.add_argument("--remat", choices=sorted(models.REMAT_POLICIES), help="default cpu none, "
                   "gpu full")
    p.add_argument("--attention-impl", default="auto", help="rlcsd_jax attention_impl")
    p.add_argument("--no-scan", action="store_true", help="unrolled layers (scan_layers=False)")
    p.add_argument("--no-hf-static", action="store_true", help="skip HF static-cache decode")
    p.add_argument("--hf-static-budget-s", type=float, default=120.0,
                   help="CPU: skip the (eager) static-cache decode if it would take longer")
    p.add_argument("--matmul-n", type=int, help="peak matmul size; default 1024 on a CPU "
                   "device, 8192 on an accelerator")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's "
                   "choice); 1 avoids OpenMP spin-waits on a shared, oversubscribed CPU")
    p.add_argument("--cpu-cores", type=int, help="pin the process (JAX and torch threads alike) "
                   "to the first N allowed cores before either creates its thread pool; also "
                   "sets torch threads to N unless --torch-threads is given")
    p.add_argument("--seed", type=int, default=0)
    for name in _SHAPE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, dest=name,
                       help=f"override Shapes.{name}")
    args = p.parse_args(argv)
    gpu = args.suite == "gpu"
    args.models = args.model or (["tiny"] if args.quick else list(suites.SUITE_MODELS[args.suite]))
    args.repeats = args.repeats or (5 if gpu else 3)
    args.decode_repeats = args.decode_repeats or 2
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.remat = args.remat or ("full" if gpu else "none")
    args.kinds = [k for k in args.only.split(",") if k]
    args.side_list = [s for s in args.sides.split(",") if s]
    bad = (set(args.kinds) - set(KINDS)) | (set(args.side_list) - {"jax", "hf"})
    if bad:
        p.error(f"unknown --only/--sides entries {sorted(bad)}")
    return args


class Run:
    """Rows, details and metadata of one invocation; `save()` rewrites the results section."""

    def __init__(self, args, device: str, bullets: dict):
        self.args, self.rows, self.details, self.peak = args, [], [], None
        self.meta = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                         suite=args.suite, device=device, bullets=bullets)
        self.file = report.ResultsFile(args.out)

    def row(self, model: str, kind: str, shape: str) -> dict:
        r = dict(model=model, kind=kind, shape=shape, jax=None, hf=None, notes=[])
        self.rows.append(r)
        return r

    def save(self, done: bool = False):
        self.file.write(report.render_section(self.meta, self.rows, self.details, self.peak, done))
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(dict(meta=self.meta, peak_flops=self.peak, rows=self.rows,
                               details=self.details), f, indent=1, default=_jsonable)


def _jsonable(x):
    return x.tolist() if isinstance(x, np.ndarray) else str(x)


def _pin_cores(n: int | None) -> str:
    """Restrict this process to n cores (threads created later inherit it); '' when not asked.

    Only effective before JAX's backend and torch's OpenMP pool start (the CLI case); in a
    process where they already run (tests), existing pool threads keep their old mask.
    """
    if not n:
        return ""
    cores = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cores)
    return f"; process pinned to CPU cores {cores}"


def main(argv=None) -> list[dict]:
    """Run the suite; returns the rows (also written to --out and --json)."""
    args = parse_args(argv)
    import flax
    import optax
    import torch
    import transformers

    pinned = _pin_cores(args.cpu_cores)
    if args.torch_threads or args.cpu_cores:
        torch.set_num_threads(args.torch_threads or args.cpu_cores)
    dev = jax.devices()[0]
    args.matmul_n = args.matmul_n or (1024 if dev.platform == "cpu" else 8192)
    torch_device = "cuda" if dev.platform == "gpu" and torch.cuda.is_available() else "cpu"
    desc = (f"{dev.device_kind}" if dev.platform != "cpu"
            else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    bullets = {
        "versions": f"python {platform.python_version()}, jax {jax.__version__}, flax "
                    f"{flax.__version__}, optax {optax.__version__}, torch {torch.__version__}, "
                    f"transformers {transformers.__version__}",
        "devices": f"JAX {dev.platform} ({dev.device_kind}), torch {torch_device} "
                   f"({torch.get_num_threads()} threads){pinned}",
        "numerics": f"compute {args.dtype}, master params {args.param_dtype}, inference params "
                    f"{args.infer_params}, remat {args.remat}, scan_layers {not args.no_scan}, "
                    f"JAX attention {args.attention_impl}, HF sdpa",
        "timing": f"median of {args.repeats} (decode {args.decode_repeats}) after warm-up",
        "host load (1-min avg) at start": f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    run = Run(args, desc, bullets)
    run.meta["cpu"] = dev.platform == "cpu"
    mm_dtype = args.dtype
    run.peak = flops.jax_matmul_peak(mm_dtype, args.matmul_n)
    try:
        tpeak = flops.torch_matmul_peak(mm_dtype, args.matmul_n, torch_device)
    except Exception as e:  # noqa: BLE001
        tpeak = None
        print(f"torch matmul peak failed: {e}", file=sys.stderr)
    bullets["MFU peak"] = (f"jnp.matmul {args.matmul_n}³ {mm_dtype}: {run.peak / 1e12:.3f} "
                           f"TFLOP/s (torch.matmul: "
                           f"{'n/a' if tpeak is None else f'{tpeak / 1e12:.3f}'} TFLOP/s)")
    run.save()
    for name in args.models:
        print(f"[benchmarks] {name} …", file=sys.stderr)
        phases.ModelRun(run, args, name, torch_device).execute()
    bullets["host load (1-min avg) at end"] = f"{os.getloadavg()[0]:.2f}"
    run.save(done=True)
    print(report.render_section(run.meta, run.rows, run.details, run.peak, True))
    return run.rows


if __name__ == "__main__":
    main()
