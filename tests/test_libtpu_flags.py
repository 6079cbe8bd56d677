"""The libtpu flags a run and its plan compile with (distributed/libtpu_flags.py): set once, never
over a user's own value, and the planner's TPU programs are compiled with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rlcsd_jax.distributed import libtpu_flags
from rlcsd_jax.planner import topology


def test_apply_appends_each_flag_once_and_keeps_the_users_settings():
    env = {}
    value = libtpu_flags.apply(env)
    assert value == env["LIBTPU_INIT_ARGS"]
    for name, setting in libtpu_flags.FLAGS.items():
        assert value.split().count(f"--{name}={setting}") == 1
    assert libtpu_flags.apply(env) == value                      # idempotent

    name = next(iter(libtpu_flags.FLAGS))
    env = {"LIBTPU_INIT_ARGS": f"--xla_other=1 --{name}=true"}
    value = libtpu_flags.apply(env)
    assert f"--{name}=true" in value.split() and f"--{name}=false" not in value
    assert value.startswith("--xla_other=1 ")


def test_the_planner_sets_them_before_libtpu_starts(monkeypatch):
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    topology.ensure_compile_only_env()
    for name, setting in libtpu_flags.FLAGS.items():
        assert f"--{name}={setting}" in os.environ["LIBTPU_INIT_ARGS"].split()


_FSDP_MATMUL = """
import json
from rlcsd_jax.planner import topology, hlo_cost
sl = topology.get_slice("v5p-16")
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.sharding.Mesh(sl.devices, ("fsdp",))
rows = NamedSharding(mesh, P("fsdp", None))
# Qwen3-1.7B's MLP up-projection at 36,864 tokens per device, weight sharded on its input dim
x = jax.ShapeDtypeStruct((8 * 36864, 2048), jnp.bfloat16, sharding=rows)
w = jax.ShapeDtypeStruct((2048, 6144), jnp.bfloat16, sharding=rows)
c = jax.jit(lambda a, b: a @ b, out_shardings=rows).lower(x, w).compile()
text = c.as_text()
print(json.dumps({"windowed": "windowed_dot_general" in text,
                  "bytes": hlo_cost.program_cost(c).bytes_accessed}))
"""


def _compile_fsdp_matmul(init_args: str | None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("LIBTPU_INIT_ARGS", None)
    if init_args is not None:
        env["LIBTPU_INIT_ARGS"] = init_args
    p = subprocess.run([sys.executable, "-c", _FSDP_MATMUL], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_fsdp_matmuls_gather_the_weight_instead_of_windowing():
    """Compiled for v5p-16 with the project's flags, an FSDP matmul gathers its weight and runs
    once: it reads its activation shard, the whole weight and writes its output (~630 MB), where
    the windowed einsum (the user's override here) re-reads and re-writes an fp32 accumulator."""
    name = next(iter(libtpu_flags.FLAGS))
    ours = _compile_fsdp_matmul(None)
    windowed = _compile_fsdp_matmul(f"--{name}=true")
    assert windowed["windowed"] and not ours["windowed"]
    one_pass = (36864 * 2048 + 2048 * 6144 + 36864 * 6144) * 2
    assert ours["bytes"] < 1.5 * one_pass, ours
    assert windowed["bytes"] > 3 * ours["bytes"], (windowed, ours)
