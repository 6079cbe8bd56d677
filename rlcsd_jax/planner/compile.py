"""Compile a run's programs on a mesh and measure each: memory, loop-aware cost, roofline.

Used by `python -m rlcsd_jax.plan` (a TPU slice's devices from libtpu's compile-only client) and
by the trainer's start-up check (its real devices).  A program the compiler refuses for memory
is an answer (`fits=False` with the need it reported); any other compile error is kept as such.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax

from rlcsd_jax.planner import hlo_cost, roofline as roofline_lib, topology
from rlcsd_jax.trainer import programs as programs_lib


@dataclasses.dataclass
class Measured:
    """One program's numbers, per device."""

    program: programs_lib.Program
    compiled: object = None
    argument_bytes: float = 0.0
    output_bytes: float = 0.0
    alias_bytes: float = 0.0
    temp_bytes: float = 0.0
    code_bytes: float = 0.0
    resident_bytes: float = 0.0      # train state held in HBM that is not an argument
    budget_bytes: float | None = None
    refused_need_bytes: float | None = None   # the compiler's own figure when it refused
    error: str | None = None                  # a compile error other than "does not fit"
    cost: hlo_cost.ProgramCost | None = None
    compile_s: float = 0.0
    typical: "Measured | None" = None         # the program at the mean lengths (time estimate)

    @property
    def total_bytes(self) -> float:
        if self.refused_need_bytes is not None:
            return self.refused_need_bytes + self.argument_bytes + self.resident_bytes
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes + self.resident_bytes)

    @property
    def fits(self) -> bool | None:
        if self.error is not None:
            return None
        if self.refused_need_bytes is not None or self.program.refusal:
            return False
        return self.budget_bytes is None or self.total_bytes <= self.budget_bytes

    def per_call(self, chip: topology.ChipSpec) -> tuple[float, float, roofline_lib.Roofline]:
        """(FLOPs, bytes, roofline) of one call, data-dependent loops run `loop_trips` times."""
        flops, nbytes = self.cost.flops, self.cost.bytes_accessed
        trips = self.program.loop_trips
        for loop in self.cost.loops:
            if loop.trip_count is None and trips:
                flops += (trips - 1) * loop.per_iteration["flops"]
                nbytes += (trips - 1) * loop.per_iteration["bytes accessed"]
        return flops, nbytes, roofline_lib.roofline(flops, nbytes, chip)


device_bytes = programs_lib.device_bytes     # bytes one device holds of a tree of arrays


def _out_info(compiled):
    return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding),
                        compiled.out_info)


def measure(program: programs_lib.Program, budget: float | None,
            with_cost: bool = True) -> Measured:
    m = Measured(program, budget_bytes=budget)
    m.resident_bytes = device_bytes(program.resident)
    m.argument_bytes = device_bytes(program.args)
    t0 = time.perf_counter()
    try:
        with topology.persistent_cache_off(program.mesh.devices.flat[0]), \
                jax.set_mesh(program.mesh):
            m.compiled = program.lower().compile()
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is reported, not raised
        parsed = topology.parse_hbm_error(str(e))
        if parsed is None:
            first = (str(e).splitlines() or [""])[0]
            m.error = f"{type(e).__name__}: {first[:300]}"
        else:
            m.refused_need_bytes = parsed[0]
            m.budget_bytes = budget if budget is not None else parsed[1]
        m.compile_s = time.perf_counter() - t0
        return m
    m.compile_s = time.perf_counter() - t0
    stats = m.compiled.memory_analysis()
    m.argument_bytes = float(stats.argument_size_in_bytes)
    m.output_bytes = float(stats.output_size_in_bytes)
    m.alias_bytes = float(stats.alias_size_in_bytes)
    m.temp_bytes = float(stats.temp_size_in_bytes)
    m.code_bytes = float(stats.generated_code_size_in_bytes)
    if with_cost:
        m.cost = hlo_cost.program_cost(m.compiled, mean_kv_len=program.mean_kv_len)
    return m


def _signature(program) -> str:
    """The program's identity for compilation: function, static arguments, abstract inputs."""
    def describe(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return (x.shape, str(x.dtype), str(x.sharding.spec))
        return x
    args = jax.tree.map(describe, (program.args, program.kwargs),
                        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return f"{program.name}|{id(program.fn)}|{args!r}"


def compile_programs(rs: programs_lib.RunSetup, *, budget: float | None,
                     mean_response_len: int | None = None, with_cost: bool = True,
                     log: bool = True) -> list[Measured]:
    """Build the run's programs in order and compile each once; a later program's inputs are the
    compiled outputs (shardings included) of the one that produces them.  with_cost=False (the
    trainer's start-up check) compiles only the largest shapes and skips the cost analysis."""
    results: dict[str, Measured] = {}

    def compile_once(program):
        key = _signature(program)            # a typical twin equal to its largest shape is reused
        if key not in results:
            results[key] = measure(program, budget, with_cost)
            m = results[key]
            if log:
                state = {True: "fits", False: "does NOT fit", None: "compile error"}[m.fits]
                logging.info("compiled %-22s %-18s in %5.1fs: %s", program.name,
                             program.what.split(",")[0][:18], m.compile_s, state)
        return results[key]

    def lower_dependent(program):
        if with_cost or not program.is_typical:
            m = compile_once(program)
            if m.compiled is not None:
                return _out_info(m.compiled)
        return programs_lib.like_outputs(program.fn, program.args, program.kwargs, rs.mesh)

    progs = programs_lib.build(rs, mean_response_len=mean_response_len,
                               lower_dependent=lower_dependent, memory_per_device=budget)
    out = []
    for p in progs:
        m = compile_once(p)
        if with_cost and p.typical is not None:
            m.typical = compile_once(p.typical)
        out.append(m)
    return out
