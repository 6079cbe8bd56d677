"""FLOPs and bytes of a compiled program, with every loop counted as often as it runs.

XLA's `cost_analysis()` visits a `while` body once, so a program that scans over 28 layers, or
maps the LM head over 64 chunks, reports the cost of one layer and one chunk.  This module
re-runs the cost analysis on the optimised HLO one computation at a time: each loop body is
analysed as a module of its own and weighted by its trip count, read from the loop condition
(JAX lowers `scan` / `fori_loop` to `i < N` with i from 0).  A loop whose count is data
dependent (a decode `while_loop` that stops when every row is done) is reported in `loops`
with its per-iteration cost and counted once, so the caller multiplies it by its own count.

The cost model is XLA's own `HloCostAnalysis` (through the CPU client, which prices the TPU
program's HLO the same way: checked equal on loop-free programs).  Pallas kernels are custom
calls that this analysis does not price; `custom_calls` lists them so a report can say so.
"""

from __future__ import annotations

import dataclasses
import re

import jax

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*condition=%([^\s,]+), body=%([^\s,]+)")
_CONSTANT = re.compile(r"^\s*%(\S+) = s32\[\]\S* constant\((-?\d+)\)")
_COMPARE_LT = re.compile(r"compare\(%(\S+), %(\S+)\), direction=LT")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
KEYS = ("flops", "bytes accessed", "transcendentals")


@dataclasses.dataclass
class Loop:
    body: str
    trip_count: int | None       # None: data dependent (counted once in the totals)
    per_iteration: dict          # KEYS -> cost of one iteration, its own inner loops included


@dataclasses.dataclass
class ProgramCost:
    flops: float
    bytes_accessed: float
    transcendentals: float
    loops: list[Loop]
    custom_calls: list[str]      # custom-call targets (Pallas kernels) the analysis cannot price


def _print_options():
    import jaxlib._hlo as hlo

    opts = hlo.HloPrintOptions()
    opts.print_metadata = False
    opts.print_backend_config = False
    opts.print_large_constants = True       # elided constants would not parse back
    return opts


def _split(text: str):
    """Module text -> (computation name -> its lines, order, entry name)."""
    comps, order, entry, current = {}, [], None, None
    for line in text.split("\n"):
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(2)
                comps[current] = [line]
                order.append(current)
                if m.group(1):
                    entry = current
            continue
        comps[current].append(line)
        if line == "}":
            current = None
    return comps, order, entry


def _trip_count(cond_lines: list[str]) -> int | None:
    consts = {m.group(1): int(m.group(2)) for m in map(_CONSTANT.match, cond_lines) if m}
    for line in cond_lines:
        if line.lstrip().startswith("ROOT"):
            m = _COMPARE_LT.search(line)
            if m and m.group(2) in consts:
                return consts[m.group(2)]
    return None


def _as_entry(comps, order, entry_name: str) -> str:
    """Module text whose ENTRY is `entry_name` (every computation kept, unused ones are harmless)."""
    lines = ["HloModule loop_cost"]
    for name in order:
        body = list(comps[name])
        head = body[0][len("ENTRY "):] if body[0].startswith("ENTRY ") else body[0]
        body[0] = ("ENTRY " + head) if name == entry_name else head
        lines += body + [""]
    return "\n".join(lines)


def program_cost(compiled) -> ProgramCost:
    """Loop-aware cost of a `jax.stages.Compiled` (per device, as XLA reports it)."""
    import jaxlib._hlo as hlo
    from jax._src.lib import xla_client

    module = compiled.runtime_executable().hlo_modules()[0]
    text = module.to_string(_print_options())
    comps, order, entry = _split(text)
    cpu = jax.devices("cpu")[0].client
    analysed: dict[str, dict] = {}

    def analysed_once(name: str) -> dict:
        if name not in analysed:
            mod = hlo.hlo_module_from_text(_as_entry(comps, order, name))
            cost = xla_client._xla.hlo_module_cost_analysis(cpu, mod)
            analysed[name] = {k: float(cost.get(k, 0.0)) for k in KEYS}
        return analysed[name]

    loops: list[Loop] = []

    def full_cost(name: str) -> dict:
        cost = dict(analysed_once(name))
        for line in comps[name]:
            m = _WHILE.search(line)
            if not m:
                continue
            cond, body = m.group(1), m.group(2)
            n = _trip_count(comps[cond])
            inner = full_cost(body)
            loops.append(Loop(body, n, inner))
            if n is None:
                n = 1
            once = analysed_once(body)
            for k in KEYS:
                cost[k] += n * inner[k] - once[k]
        return cost

    total = full_cost(entry)
    calls = sorted(set(_CUSTOM_CALL.findall(text)))
    return ProgramCost(flops=total["flops"], bytes_accessed=total["bytes accessed"],
                       transcendentals=total["transcendentals"], loops=loops, custom_calls=calls)
