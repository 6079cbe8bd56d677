"""Roofline time of a program on one device: max(FLOPs / peak FLOP/s, bytes / HBM bandwidth).

A lower bound on the time the chip needs: it assumes perfect overlap of compute and memory
traffic and ignores collectives' latency, launch gaps and host work.  Its value is the ratio
between programs and configs, and the MFU it implies is an upper bound on what the run can reach.
"""

from __future__ import annotations

import dataclasses

from rlcsd_jax.planner.topology import ChipSpec


@dataclasses.dataclass(frozen=True)
class Roofline:
    compute_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def roofline(flops: float, bytes_accessed: float, chip: ChipSpec) -> Roofline:
    """Per-device FLOPs and bytes (as XLA's cost analysis reports them) on `chip`."""
    return Roofline(compute_s=flops / chip.peak_flops, memory_s=bytes_accessed / chip.hbm_bandwidth)


def mfu(model_flops_per_device: float, seconds: float, chip: ChipSpec) -> float:
    """Useful FLOPs per second over the peak (0 when the time is 0)."""
    return model_flops_per_device / seconds / chip.peak_flops if seconds > 0 else 0.0
