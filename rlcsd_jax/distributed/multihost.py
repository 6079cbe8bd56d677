"""Multi-host plumbing: process-local host data <-> global device arrays, and host reductions.

Every process runs the same program (JAX multi-controller).  The trainer's convention:

* A global batch of P prompts is cut into contiguous blocks, process p owns block p
  (`BatchIterator` yields exactly that block), so all G rollouts of a prompt live on one process
  and the processes' blocks concatenated in process order are the single-process batch.
* Host-side work (decoding, rewards, hints, packing) is done by each process on its block only;
  `to_global` assembles the blocks into one array sharded over the batch mesh axes, and
  `to_host_local` hands each process its block of a global result back.
* Host numbers that must agree (bucket widths, mini-batch counts) or be reported globally
  (metrics) go through `allgather` / `global_max` / `global_sum`: tiny host all-gathers.

With one process every function here is the identity (or a plain `device_put`), so single-host
runs pay nothing.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlcsd_jax.distributed import libtpu_flags
from rlcsd_jax.distributed.sharding import batch_sharding


def initialize(enabled: bool) -> None:
    """The libtpu compiler flags (`libtpu_flags.apply`, always), then
    `jax.distributed.initialize()` when asked (config or RLCSD_DISTRIBUTED=1).  Call it before
    any JAX computation.

    On TPU pods (and SLURM / Open MPI) JAX finds the coordinator itself.  Elsewhere set
    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    CPU collectives use gloo, so several CPU processes (tests, a workstation) can train together.
    """
    libtpu_flags.apply()
    if not (enabled or os.environ.get("RLCSD_DISTRIBUTED") == "1"):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kw = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kw)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def block(n_global: int) -> slice:
    """This process's contiguous block of a global batch axis of n_global rows."""
    count = jax.process_count()
    if n_global % count:
        raise ValueError(f"a global batch of {n_global} rows does not split over {count} "
                         "processes")
    size = n_global // count
    return slice(jax.process_index() * size, (jax.process_index() + 1) * size)


def local_block(tree, axis: int = 0):
    """Slice host arrays that every process holds in full down to this process's block."""
    def take(x):
        x = np.asarray(x)
        index = [slice(None)] * x.ndim
        index[axis] = block(x.shape[axis])
        return x[tuple(index)]
    return jax.tree.map(take, tree)


def to_global(tree, mesh, axis: int = 0):
    """Host-local blocks -> global jax.Arrays, `axis` sharded over ('data', 'fsdp').

    Arrays with fewer than axis + 1 dims are replicated (every process must pass the same value).
    """
    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim, axis)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return multihost_utils.host_local_array_to_global_array(x, mesh, sharding.spec)
    return jax.tree.map(put, tree)


def to_host_local(tree, mesh, axis: int = 0):
    """Global jax.Arrays -> this process's block as NumPy (the inverse of `to_global`)."""
    def get(x):
        if jax.process_count() == 1:
            return np.asarray(jax.device_get(x))
        sharding = batch_sharding(mesh, x.ndim, axis)
        if x.sharding != sharding:   # e.g. a layout XLA chose for a jit output
            x = _resharder(sharding)(x)
        return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh,
                                                                           sharding.spec))
    return jax.tree.map(get, tree)


@functools.lru_cache(maxsize=None)
def _resharder(sharding):
    """One jitted identity per target sharding (a fresh jit per call would recompile)."""
    return jax.jit(lambda a: a, out_shardings=sharding)


def allgather(x) -> np.ndarray:
    """Concatenate every process's host array along axis 0 (in process order)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_columns(*columns) -> list[np.ndarray]:
    """`allgather` of several same-length per-row arrays in one collective (as float64, exact
    for the ints, bools and float32s the trainer reports)."""
    gathered = allgather(np.stack([np.asarray(c, np.float64) for c in columns], axis=1))
    return [gathered[:, i] for i in range(len(columns))]


def global_max(value: int) -> int:
    return int(allgather(np.asarray([value], np.int64)).max())


def global_sum(value):
    """Sum over processes: a float for a scalar, the elementwise sum for an array."""
    x = np.asarray(value, np.float64)
    total = allgather(x[None]).sum(0)
    return float(total) if x.ndim == 0 else total


def sync(name: str) -> None:
    """Barrier (e.g. process 0 wrote a file the others read next)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
