"""`python -m benchmarks.attention [--lengths 1024,8192] [--out benchmarks/RESULTS.md]`.

Blockwise (flash) attention against the dense `xla` reference on this machine's default JAX
device, in one run: forward and forward+backward of one causal attention layer (GQA, fp32) at
each length; wall time (median of repeats after warm-up) and the compiled temporaries
(`memory_analysis()`), which show blockwise's memory growing linearly where xla's grows with the
square of the length.  The result goes into RESULTS.md as its own section.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from rlcsd_jax.models import attention_impls

IMPLS = ("xla", "blockwise")


def _inputs(t: int, heads: int, kv_heads: int, dim: int):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, t, heads, dim), jnp.float32)
    k = jax.random.normal(ks[1], (1, t, kv_heads, dim), jnp.float32)
    v = jax.random.normal(ks[2], (1, t, kv_heads, dim), jnp.float32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    seg = jnp.ones((1, t), jnp.int32)
    return q, k, v, pos, seg


def _programs(impl: str):
    fn = attention_impls.get(impl)

    def forward(q, k, v, pos, seg):
        return fn(q, k, v, pos, pos, seg, seg, right_padded=True)

    def grad(q, k, v, pos, seg):
        return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v, pos, seg) ** 2),
                        argnums=(0, 1, 2))(q, k, v)
    return {"forward": jax.jit(forward), "forward+backward": jax.jit(grad)}


def measure(t: int, repeats: int, heads: int = 8, kv_heads: int = 4, dim: int = 64) -> list:
    args = _inputs(t, heads, kv_heads, dim)
    rows = []
    for impl in IMPLS:
        for kind, fn in _programs(impl).items():
            compiled = fn.lower(*args).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            jax.block_until_ready(compiled(*args))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                times.append(time.perf_counter() - t0)
            rows.append(dict(length=t, impl=impl, kind=kind, seconds=statistics.median(times),
                             temp_bytes=temp))
    return rows


def format_section(rows: list, args) -> str:
    device = jax.devices()[0]
    lines = [f"## {datetime.datetime.now():%Y-%m-%d %H:%M} · attention: blockwise vs xla · "
             f"{device.platform} ({os.cpu_count()} cores)", "",
             f"- command: python -m benchmarks.attention --lengths {args.lengths} "
             f"--repeats {args.repeats}",
             "- one causal layer, batch 1, 8 query heads over 4 kv heads, head dim 64, fp32; "
             "blockwise blocks 512; median wall time after warm-up; temp = compiled temporaries",
             f"- host load (1-min avg): {os.getloadavg()[0]:.2f}", "",
             "| length | pass | xla s | blockwise s | blockwise / xla time | xla temp | "
             "blockwise temp |", "|---|---|---|---|---|---|---|"]
    by = {(r["length"], r["kind"], r["impl"]): r for r in rows}
    for t in sorted({r["length"] for r in rows}):
        for kind in ("forward", "forward+backward"):
            x, b = by[(t, kind, "xla")], by[(t, kind, "blockwise")]
            lines.append(f"| {t:,} | {kind} | {x['seconds']:.4f} | {b['seconds']:.4f} | "
                         f"{b['seconds'] / x['seconds']:.2f}× | {report.fmt_bytes(x['temp_bytes'])}"
                         f" | {report.fmt_bytes(b['temp_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,8192")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = p.parse_args(argv)
    rows = []
    for t in (int(x) for x in args.lengths.split(",")):
        rows += measure(t, args.repeats)
    section = format_section(rows, args)
    print(section)
    if args.out:
        report.ResultsFile(args.out).write(section)
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
