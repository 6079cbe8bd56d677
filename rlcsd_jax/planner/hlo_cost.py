"""FLOPs and bytes of a compiled program, with every loop counted as often as it runs.

XLA's `cost_analysis()` visits a `while` body once, so a program that scans over 28 layers, or
maps the LM head over 64 chunks, reports the cost of one layer and one chunk.  This module
re-runs the cost analysis on the optimised HLO one computation at a time: each loop body is
analysed as a module of its own and weighted by its trip count, read from the loop condition
(`i < N`, with i's start and step read from the caller and the body).  A loop whose count is data
dependent (a decode `while_loop` that stops when every row is done) is reported in `loops`
with its per-iteration cost and counted once, so the caller multiplies it by its own count.

The cost model is XLA's own `HloCostAnalysis` (through the CPU client, which prices the TPU
program's HLO the same way: checked equal on loop-free programs).  Pallas kernels are custom
calls that this analysis does not see into; the splash attention kernels are priced from the
shapes and tile density their call site records in its scope name (`models.splash.SCOPE`):
forward 4, dq 6, dkv 8 matmul-FLOPs per (query, key, head dim) element of the computed tiles,
and each of q, k, v, o and their gradients read or written once.  The rollout engine's ragged
paged attention (`inference.paged_attention.SCOPE`, one query per slot) reads only each slot's
live pages, so its price needs the live KV length the caller assumes (`mean_kv_len`; None =
every page of the table): per slot min(live, table pages x page size, window) keys, each k and v
read once (4 FLOPs per key, query head and head dim; one exp per key and query head), plus q
and the output.  Other custom calls are listed in `custom_calls` as unpriced.
"""

from __future__ import annotations

import dataclasses
import re

import jax

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*condition=%([^\s,]+), body=%([^\s,]+)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r"^\s*%(\S+) = [su](?:32|64)\[\]\S* constant\((-?\d+)\)")
_COMPARE_LT = re.compile(r"compare\(%(\S+), %(\S+)\), direction=LT")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_METADATA = re.compile(r", metadata=\{[^}]*\}")
_SPLASH = re.compile(r"splash_b(\d+)_h(\d+)_kv(\d+)_t(\d+)_s(\d+)_d(\d+)_density([\d.]+)")
_SPLASH_KIND = re.compile(r"%splash_(?:mha|mqa)_(fwd|dq|dkv)")
_RAGGED = re.compile(r"ragged_paged_b(\d+)_h(\d+)_kv(\d+)_d(\d+)_p(\d+)_pps(\d+)_w(\d+)")
_RESULT_DTYPE = re.compile(r"^\s*(?:ROOT )?%\S+ = \(?([a-z]+\d*)\[")
_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "f8e4m3fn": 1, "f8e5m2": 1, "s8": 1}
_CALLED = re.compile(r"(?:body|condition|calls|to_apply)=%([^\s,)]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}|(?:true|false)_computation=%([^\s,)]+)")
KEYS = ("flops", "bytes accessed", "transcendentals")
# Matmul FLOPs per computed (query, key, head-dim) element, and tensors of [B, heads, T, D]
# moved, per splash kernel: (flops factor, q-head tensors, kv-head tensors).
_SPLASH_COST = {"fwd": (4, 2, 2), "dq": (6, 3, 2), "dkv": (8, 2, 4)}


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
    opts.print_metadata = True              # kernel call sites record their shapes in op_name
    opts.print_backend_config = True        # loops the compiler made carry known_trip_count
    opts.print_large_constants = True       # elided constants would not parse back
    return opts


_NEW_LINE = re.compile(r"^(  (ROOT )?%|ENTRY |%|\}$|$)")


def _logical_lines(text: str) -> list[str]:
    """Physical lines joined into instructions: an instruction's frontend attributes (Pallas
    kernel metadata) can span several lines."""
    out: list[str] = []
    for line in text.split("\n"):
        if out and not _NEW_LINE.match(line) and out[-1].startswith("  "):
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def _split(text: str):
    """Module text -> (computation name -> its lines, order, entry name)."""
    comps, order, entry, current = {}, [], None, None
    for line in _logical_lines(text):
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


_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_GTE_INDEX = re.compile(r"get-tuple-element\(%\S+\), index=(\d+)")
_OPERANDS = re.compile(r"\b(?:tuple|add|while)\(([^)]*)\)")


def _by_name(lines: list[str]) -> dict[str, str]:
    return {m.group(1): line for line in lines if (m := _INSTR.match(line))}


def _constant(line: str | None) -> int | None:
    m = _CONSTANT.match(line or "")
    return int(m.group(2)) if m else None


def _operands(line: str) -> list[str]:
    m = _OPERANDS.search(line)
    return [x.strip().split(" ")[-1].lstrip("%") for x in m.group(1).split(",")] if m else []


def _trip_count(cond_lines: list[str], body_lines: list[str], caller_lines: list[str],
                while_line: str) -> int | None:
    """Iterations of a counted loop: the condition is `counter < N` with the counter a tuple
    element that the body advances by a constant step (JAX's scan / fori_loop step 1; XLA's
    windowed einsum loops step 2) from its initial value in the caller (usually 0).  None for a
    data-dependent loop."""
    cond = _by_name(cond_lines)
    root = next((line for line in cond_lines if line.lstrip().startswith("ROOT")), "")
    m = _COMPARE_LT.search(root)
    if not m:
        return None
    bound = _constant(cond.get(m.group(2)))
    gte = _GTE_INDEX.search(cond.get(m.group(1), ""))
    if bound is None or not gte:
        return None
    index = int(gte.group(1))
    body = _by_name(body_lines)
    body_root = next((line for line in body_lines if line.lstrip().startswith("ROOT")), "")
    outs = _operands(body_root)
    step = 1
    if index < len(outs) and outs[index] in body:
        adds = [_constant(body.get(x)) for x in _operands(body[outs[index]])]
        adds = [x for x in adds if x is not None]
        if "add(" in body[outs[index]] and adds:
            step = adds[0]
    start = 0
    init = _operands(while_line)
    caller = _by_name(caller_lines)
    if init and init[0] in caller:
        elements = _operands(caller[init[0]])
        if index < len(elements):
            start = _constant(caller.get(elements[index])) or 0
    if step <= 0:
        return None
    return max(0, -(-(bound - start) // step))


def _ragged_cost(line: str, shape, mean_kv_len: float | None) -> dict:
    """One ragged paged attention call (decode: one query per slot) from its scope name."""
    b, h, kv, d, p, pps, w = (int(shape.group(i)) for i in range(1, 8))
    live = float(pps * p) if mean_kv_len is None else min(float(mean_kv_len), pps * p)
    if w:
        live = min(live, w)
    m = _RESULT_DTYPE.search(line)
    itemsize = _ITEMSIZE.get(m.group(1), 2) if m else 2
    return {"flops": 4.0 * b * h * live * d,
            "bytes accessed": b * live * 2 * kv * d * itemsize + 2.0 * b * h * d * itemsize,
            "transcendentals": float(b * h * live)}


def _kernel_cost(line: str, mean_kv_len: float | None = None) -> dict | None:
    """Cost of one splash or ragged paged attention custom call from its scope name, or None for
    other instructions."""
    if "custom_call_target" not in line:
        return None
    ragged = _RAGGED.search(line)
    if ragged:
        return _ragged_cost(line, ragged, mean_kv_len)
    kind, shape = _SPLASH_KIND.search(line), _SPLASH.search(line)
    if not (kind and shape):
        return None
    b, h, kv, t, s, d = (int(shape.group(i)) for i in range(1, 7))
    density = float(shape.group(7))
    flops_factor, q_tensors, kv_tensors = _SPLASH_COST[kind.group(1)]
    return {"flops": flops_factor * b * h * t * s * d * density,
            "bytes accessed": 2.0 * b * d * (q_tensors * h * t + kv_tensors * kv * s),
            "transcendentals": b * h * t * s * density if kind.group(1) != "dkv" else 0.0}


def _kernels(comps, name: str, cache: dict, mean_kv_len: float | None = None) -> dict:
    """Priced kernel cost of a computation, counting what it calls once (loops once, the
    costlier branch of a conditional), as XLA's analysis counts everything else."""
    if name in cache:
        return cache[name]
    cost = dict.fromkeys(KEYS, 0.0)
    cache[name] = cost                     # guards against cycles (there are none in HLO)
    for line in comps.get(name, ()):
        own = _kernel_cost(line, mean_kv_len)
        if own:
            for k in KEYS:
                cost[k] += own[k]
        for called in _CALLED.findall(line):
            for k, v in _kernels(comps, called, cache, mean_kv_len).items():
                cost[k] += v
        branches = [n.strip().lstrip("%") for m in _BRANCHES.finditer(line)
                    for n in (m.group(1) or m.group(2) or "").split(",") if n.strip()]
        if branches:
            priced = [_kernels(comps, n, cache, mean_kv_len) for n in branches]
            top = max(priced, key=lambda c: c["flops"])
            for k in KEYS:
                cost[k] += top[k]
    return cost


def _as_entry(comps, order, entry_name: str) -> str:
    """Module text whose ENTRY is `entry_name` (every computation kept, unused ones are harmless)."""
    lines = ["HloModule loop_cost"]
    for name in order:
        body = [_METADATA.sub("", line) for line in comps[name]]
        head = body[0][len("ENTRY "):] if body[0].startswith("ENTRY ") else body[0]
        body[0] = ("ENTRY " + head) if name == entry_name else head
        lines += body + [""]
    return "\n".join(lines)


def program_cost(compiled, mean_kv_len: float | None = None) -> ProgramCost:
    """Loop-aware cost of a `jax.stages.Compiled` (per device, as XLA reports it).
    mean_kv_len: live KV tokens per slot at which ragged paged attention kernels are priced
    (None: every page of their table)."""
    import jaxlib._hlo as hlo
    from jax._src.lib import xla_client

    module = compiled.runtime_executable().hlo_modules()[0]
    text = module.to_string(_print_options())
    comps, order, entry = _split(text)
    cpu = jax.devices("cpu")[0].client
    analysed: dict[str, dict] = {}
    kernel_cache: dict[str, dict] = {}

    def analysed_once(name: str) -> dict:
        if name not in analysed:
            mod = hlo.hlo_module_from_text(_as_entry(comps, order, name))
            cost = xla_client._xla.hlo_module_cost_analysis(cpu, mod)
            kernels = _kernels(comps, name, kernel_cache, mean_kv_len)
            analysed[name] = {k: float(cost.get(k, 0.0)) + kernels[k] for k in KEYS}
        return analysed[name]

    loops: list[Loop] = []

    def full_cost(name: str) -> dict:
        cost = dict(analysed_once(name))
        for line in comps[name]:
            m = _WHILE.search(line)
            if not m:
                continue
            cond, body = m.group(1), m.group(2)
            known = _KNOWN_TRIPS.search(line)
            n = (int(known.group(1)) if known
                 else _trip_count(comps[cond], comps[body], comps[name], line))
            inner = full_cost(body)
            loops.append(Loop(body, n, inner))
            if n is None:
                n = 1
            once = analysed_once(body)
            for k in KEYS:
                cost[k] += n * inner[k] - once[k]
        return cost

    total = full_cost(entry)
    calls = sorted({target for line in _logical_lines(text) if _kernel_cost(line) is None
                    for target in _CUSTOM_CALL.findall(line)})
    return ProgramCost(flops=total["flops"], bytes_accessed=total["bytes accessed"],
                       transcendentals=total["transcendentals"], loops=loops, custom_calls=calls)
