"""Device mesh, the logical-axis rules table, and shardings for parameters and batches.

Mesh axes are ('data', 'fsdp', 'tensor').  Parameters carry logical axis names (`embed`, `vocab`,
`heads`, `kv_heads`, `head_dim`, `mlp`, `layers`, `norm`) in their `out_sharding` metadata; ONE
rules table maps them to mesh axes.  A dimension whose size does not divide the mesh axis is
replicated instead (tiny test models, odd head counts), and the rule that could not apply is
logged once.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "length": None,
}

_warned: set = set()


def target_device() -> tuple[str, str]:
    """(platform, device_kind) that programs are traced for: the context mesh's abstract device
    when one is set (compiling ahead of time for a TPU slice on a CPU host, `planner`), else the
    default device's.  Kernel choice (splash, cuDNN, Pallas paged attention) follows it."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform, mesh.abstract_device.device_kind
    device = jax.devices()[0]
    return device.platform, device.device_kind


def target_platform() -> str:
    """`target_device()`'s platform: "tpu", "gpu" / "cuda" or "cpu"."""
    return target_device()[0]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 = all remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if -1 not in shape and math.prod(shape) < len(devices):
        # An explicit smaller mesh (e.g. the tiny demo on one device) uses the first devices.
        devices = devices[:math.prod(shape)]
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape data={shape[0]} fsdp={shape[1]} tensor={shape[2]} needs "
                         f"{math.prod(shape)} devices, {len(devices)} available")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU / unusual topologies: plain order is fine.
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Iterable[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=None) -> P:
    """PartitionSpec for logical axis names, replicating dims that do not divide evenly."""
    rules = LOGICAL_RULES if rules is None else rules
    used, spec = set(), []
    for i, name in enumerate(names):
        axes = rules.get(name) if name is not None else None
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            tup = tuple(a for a in tup if a not in used)
            if mesh is not None and shape is not None:
                size = math.prod(mesh.shape[a] for a in tup)
                if shape[i] % size:
                    if (name, shape[i]) not in _warned:
                        logging.info("sharding: %s dim of size %d not divisible by %s=%d; "
                                     "replicated", name, shape[i], tup, size)
                        _warned.add((name, shape[i]))
                    tup = ()
            used.update(tup)
            axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
        spec.append(axes)
    return P(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_spec(var: nnx.Variable, mesh: Mesh | None = None, rules=None) -> P:
    """PartitionSpec of one parameter from its logical names."""
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return logical_to_spec(names, var.shape, mesh, rules)


def param_shardings(state: nnx.State, mesh: Mesh, rules=None) -> nnx.State:
    """A State shaped like `state` whose leaves are each parameter's NamedSharding."""
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, param_spec(v, mesh, rules))),
                        state, is_leaf=_is_var)


def batch_spec(ndim: int, axis: int = 0) -> P:
    """Dim `axis` over ('data', 'fsdp'), the rest replicated (all replicated if ndim <= axis)."""
    spec = [None] * ndim
    if ndim > axis:
        spec[axis] = BATCH_AXES
    return P(*spec)


def batch_sharding(mesh: Mesh, ndim: int = 2, axis: int = 0) -> NamedSharding:
    """Batch dim `axis` (default the leading one) over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, batch_spec(ndim, axis))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Place every parameter of `model` with its rule-table sharding (in place); returns model."""
    params = nnx.state(model, nnx.Param)
    if jax.process_count() > 1:
        # Arrays on one local device cannot be put on other hosts' devices; every process
        # holds the same values (same seed), so each places its own shards from host memory.
        params = jax.device_get(params)
    nnx.update(model, jax.device_put(params, param_shardings(params, mesh, rules)))
    return model


def jit_forward(model: nnx.Module, mesh: Mesh, rules=None):
    """A jitted `fn(params, input_ids, attention_mask) -> logits` with explicit shardings.

    params is `nnx.state(model, nnx.Param)`; inputs and logits are sharded over the batch axes.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = batch_sharding(mesh, 2)

    def forward(params, input_ids, attention_mask):
        return nnx.merge(graphdef, params, rest)(input_ids, attention_mask)

    return jax.jit(forward, in_shardings=(param_shardings(params, mesh, rules), batch, batch),
                   out_shardings=batch_sharding(mesh, 3))
