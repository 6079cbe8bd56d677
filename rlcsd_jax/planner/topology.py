"""TPU slices named as gcloud names them, mapped to the compiler's topology descriptions.

`v4-N` and `v5p-N` count TensorCores (two per chip): v5p-16 is 8 chips.  `v5e-N` (alias
`v5litepod-N`) and `v6e-N` count chips.  This is gcloud's own convention
(https://cloud.google.com/tpu/docs/system-architecture-tpu-vm).

What the compiler calls a device differs by generation: a v5p chip is one device (its two
TensorCores run as one "megacore"), while the v4 topology of libtpu's compile-only client has
one device per TensorCore (16 GiB each), so a v4 plan shards over twice as many devices as
there are chips.  Per-device figures below follow the compiler's devices.

Libtpu needs no TPU to compile: `ensure_compile_only_env` sets the environment it needs on a
CPU machine before JAX loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from functools import lru_cache

from rlcsd_jax.distributed import libtpu_flags

# Public per-chip figures (bf16 dense matmul peak, HBM capacity and bandwidth) from Google's
# Cloud TPU documentation: https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e.
_CHIP_FIGURES = {
    #        bf16 FLOP/s, HBM bytes,    HBM bytes/s
    "v4": (275e12, 32 * 2**30, 1200e9),
    "v5e": (197e12, 16 * 2**30, 819e9),
    "v5p": (459e12, 95 * 2**30, 2765e9),
    "v6e": (918e12, 32 * 2**30, 1640e9),
}
_THREE_D = ("v4", "v5p")        # 3D torus, names count TensorCores
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Per-device peak figures (a device is what the compiler shards over)."""

    generation: str
    peak_flops: float          # bf16 FLOP/s
    hbm_bytes: int             # public capacity (the compiler's own budget is `Slice.hbm_budget`)
    hbm_bandwidth: float       # bytes/s


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its gcloud name, the compiler's devices and their figures."""

    name: str                  # e.g. "v5p-16"
    topology: str              # e.g. "v5p:2x2x2"
    chips: int
    devices: tuple             # the compiler's devices (first `num_devices` of the topology)
    chip: ChipSpec

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def describe(self) -> str:
        per_chip = self.num_devices // self.chips
        unit = "devices" if per_chip == 1 else f"devices ({per_chip} per chip, one per TensorCore)"
        chips = f"{self.chips} chip" + ("s" if self.chips > 1 else "")
        return f"{self.name}: {chips} of TPU {self.chip.generation}, {self.num_devices} {unit}"


def parse_name(name: str) -> tuple[str, int]:
    """'v5p-16' -> ('v5p', 8 chips); 'v5litepod-4' -> ('v5e', 4)."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(f"topology {name!r}: expected a gcloud accelerator type such as "
                         f"v5p-16, v4-32, v5e-8 (or v5litepod-8), v6e-8")
    gen, n = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if gen not in _CHIP_FIGURES:
        raise ValueError(f"topology {name!r}: generation {gen!r} is not supported; "
                         f"supported: {', '.join(sorted(_CHIP_FIGURES))}")
    if gen in _THREE_D:
        if n < 2 or n % 2:
            raise ValueError(f"topology {name!r}: {gen}-N counts TensorCores (two per chip), "
                             "so N must be even")
        n //= 2
    if n & (n - 1):
        raise ValueError(f"topology {name!r}: {n} chips is not a power of two")
    return gen, n


def chip_grid(gen: str, chips: int) -> tuple[int, ...]:
    """The slice's chip grid: the most cubic (square for 2D generations) power-of-two shape.

    Slices smaller than one host use the host's grid (2x2x1 or 2x2) and its first devices;
    larger ones list their dimensions in ascending order (2x2x4, 2x4x4), as gcloud does.
    """
    if gen in _THREE_D and chips <= 4:
        return (2, 2, 1)
    dims = [2, 2, 2] if gen in _THREE_D else [2, 2]
    while math.prod(dims) < chips:
        dims.sort()
        dims[0] *= 2
    return tuple(sorted(dims))


def ensure_compile_only_env() -> None:
    """Environment libtpu needs to compile on a machine without a TPU (set before JAX loads),
    and the compiler flags a run uses (`distributed.libtpu_flags`)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # pytest-xdist workers share it
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")           # no metadata server off GCP
    libtpu_flags.apply()


@lru_cache(maxsize=None)
def get_slice(name: str) -> Slice:
    """The compiler's devices for a gcloud-named slice (needs libtpu: the `tpu` extra)."""
    import importlib.util

    gen, chips = parse_name(name)
    ensure_compile_only_env()
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError('the planner needs the TPU compiler (libtpu): pip install -e ".[tpu]"')
    from jax.experimental import topologies

    grid = chip_grid(gen, chips)
    topo_name = f"{gen}:{'x'.join(str(d) for d in grid)}"
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo_name)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"libtpu cannot describe the {name} slice as {topo_name}: {e}") from e
    all_devices = list(desc.devices)
    per_chip = len(all_devices) // math.prod(grid)
    devices = tuple(all_devices[:chips * per_chip])
    flops, hbm, bw = _CHIP_FIGURES[gen]
    spec = ChipSpec(gen, flops / per_chip, hbm // per_chip, bw / per_chip)
    return Slice(name=name, topology=topo_name, chips=chips, devices=devices, chip=spec)


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_hbm_error(message: str) -> tuple[float, float] | None:
    """(needed, available) bytes from the compiler's RESOURCE_EXHAUSTED message, if it is one."""
    m = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)", message)
    if not m:
        return None
    return (float(m.group(1)) * _UNITS[m.group(2)], float(m.group(3)) * _UNITS[m.group(4)])


def persistent_cache_off(device):
    """A context keeping a compile-only client's executables (a TPU program compiled on a CPU
    host) out of JAX's persistent compilation cache: they cannot be loaded back on this host, and
    every read would warn and recompile.  A no-op for real devices."""
    import contextlib

    if type(device.client).__name__ != "CompileOnlyPyClient":
        return contextlib.nullcontext()
    from jax._src import config as jax_config    # no public context manager for this flag

    return jax_config.enable_compilation_cache(False)


@lru_cache(maxsize=None)
def hbm_budget(sl: Slice) -> float:
    """Bytes of HBM the compiler lets one device use, read off its own refusal of a program that
    cannot fit (it can differ from the public capacity by what the runtime reserves)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.sharding.Mesh(np.asarray(sl.devices[:1]), ("x",))
    big = jax.ShapeDtypeStruct((2**20, 2**20), jnp.float32, sharding=NamedSharding(mesh, P()))
    try:
        with persistent_cache_off(sl.devices[0]):
            jax.jit(lambda x: x * 2 + 1).lower(big).compile()
    except Exception as e:  # noqa: BLE001 - the refusal is the answer
        parsed = parse_hbm_error(str(e))
        if parsed:
            return parsed[1]
        raise
    raise RuntimeError(f"{sl.topology}: a 4 TiB program compiled; cannot read the HBM budget")
