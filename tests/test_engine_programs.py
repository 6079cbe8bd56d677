"""The engine's compiled programs: the decode step writes the page pool in place (no op
produces a pool-sized buffer but the token scatters), on one device and under shard_map; the
TPU Pallas attention matches the gather reference (interpret mode); the decode program
compiles for a real TPU topology with the Pallas kernel (libtpu AOT)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.hf_fixtures import olmo3_config, qwen3_config
from rlcsd_jax import models
from rlcsd_jax.distributed import sharding
from rlcsd_jax.inference import paged_attention, plan, programs

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
          "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64|u64)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([a-z][a-z0-9\-]*)\((.*)$")
IN_PLACE = {"scatter", "dynamic-update-slice"}
# Ops that only pass a buffer along (no new pool-sized buffer of their own).
PASS_ALONG = {"parameter", "get-tuple-element", "tuple", "while", "conditional", "bitcast",
              "call", "opt-barrier"}


def _largest_array_bytes(hlo_type: str) -> int:
    sizes = [_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _ARRAY.findall(hlo_type)]
    return max(sizes, default=0)


def pool_sized_writers(hlo_text: str, pool_bytes: int) -> list[str]:
    """Instructions of compiled HLO that produce a buffer at least as large as the pool other
    than in-place writes (scatter / dynamic-update-slice, or a fusion rooted in one) and ops
    that only pass a buffer along: each would be a copy (or a fresh pool) per call."""
    roots, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{\s*$", line)
        if head:
            current = head.group(1)
        m = _INSTR.match(line)
        if m and current and line.lstrip().startswith("ROOT"):
            roots[current] = m.group(3)
    bad = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m or _largest_array_bytes(m.group(2)) < pool_bytes:
            continue
        op, rest = m.group(3), m.group(4)
        if op in PASS_ALONG or op in IN_PLACE:
            continue
        called = re.search(r"calls=%([^\s,]+)", rest)
        if op == "fusion" and called and roots.get(called.group(1)) in IN_PLACE:
            continue
        bad.append(line.strip()[:160])
    return bad


def _decode_hlo(cfg, mesh, num_pages=256, page_size=4, slots=8):
    """Compiled decode program (CPU) of a tiny model and its per-device pool bytes."""
    args = plan.abstract_args(cfg, mesh, max_slots=slots, num_pages=num_pages,
                              page_size=page_size, steps_per_call=4, prompt_bucket=16,
                              max_seq_len=64, eos_ids=(2,), attention="gather")
    with jax.set_mesh(mesh):
        text = programs.decode_jit.lower(*args["decode"]).compile().as_text()
    pool = args["decode"][2]
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    heads = mesh.shape["tensor"] if paged_attention.head_axis(mesh, cfg.num_kv_heads) else 1
    return text, math.prod(pool.shape) * pool.dtype.itemsize // shards // heads


@pytest.mark.parametrize("arch,mesh_shape", [("qwen3", (1, 1, 1)), ("olmo3", (1, 1, 1)),
                                             ("qwen3", (2, 2, 2))])
def test_decode_writes_the_page_pool_in_place(arch, mesh_shape):
    """One device (Olmo-3: the sliding / full `lax.cond` too) and a 2x2x2 mesh (shard_map
    over slots and pages, kv heads over 'tensor')."""
    hf = qwen3_config() if arch == "qwen3" else olmo3_config(max_position_embeddings=256)
    cfg = models.from_hf_config(hf.to_dict())
    text, pool_bytes = _decode_hlo(cfg, sharding.make_mesh(*mesh_shape), num_pages=512)
    # The pool is the largest thing in these programs: nothing else reaches its size.
    assert pool_bytes > 4 * cfg.vocab_size * cfg.hidden_size
    assert pool_sized_writers(text, pool_bytes) == []
    # Output 0 (the pool) aliases an input: the donated pool buffer is reused.
    assert re.search(r"input_output_alias=\{ \{0\}: \(\d+, \{\}, may-alias\)", text), \
        "the pool must be donated to decode"


def test_the_in_place_check_catches_a_copying_program():
    """A layer scan that takes the pool as scan input and restacks it (the old KV cache's
    layout) makes a fresh pool-sized buffer: the check must flag it."""
    pool = jnp.zeros((4, 256, 8, 4, 32))

    def restacking(pool, new):
        def layer(carry, page):
            return carry, page.at[0, 0].set(new[0])
        return jax.lax.scan(layer, 0, pool)[1]

    def carried(pool, new):
        def layer(pool, i):
            return pool.at[i, 0, 0].set(new[0]), None
        return jax.lax.scan(layer, pool, jnp.arange(4))[0]

    new = jnp.ones((2, 4, 32))
    bytes_ = pool.size * 4
    bad = jax.jit(restacking, donate_argnums=0).lower(pool, new).compile().as_text()
    good = jax.jit(carried, donate_argnums=0).lower(pool, new).compile().as_text()
    assert pool_sized_writers(bad, bytes_)
    assert pool_sized_writers(good, bytes_) == []


@pytest.mark.parametrize("window", [None, 6])
def test_pallas_kernel_inputs_match_gather(window):
    """The arguments the engine builds for TPU ragged paged attention (layer offset into the
    flat pool, sliding-window page shift, kv lengths), fed to the kernel module's own
    reference implementation, give the gather attention's output: ragged lengths, shuffled
    pages, grouped-query heads.  (The kernel itself compiles for TPU in the test below.)"""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import (
        ref_ragged_paged_attention)

    rng = np.random.default_rng(0)
    layers_, pages_, ps, kvh, h, d, s, width = 2, 24, 4, 2, 4, 32, 3, 5
    pool = jnp.asarray(rng.normal(size=(layers_, pages_, ps, 2 * kvh, d)), jnp.float32)
    table = jnp.asarray(rng.permutation(pages_)[:s * width].reshape(s, width), jnp.int32)
    q_pos = jnp.asarray([0, 9, 19], jnp.int32)              # 1, 10 and 20 live keys
    q = jnp.asarray(rng.normal(size=(s, h, d)), jnp.float32)
    layer = jnp.int32(1)
    ref = paged_attention.gather_attention(pool, layer, q, table, q_pos, window)
    args, _ = paged_attention.kernel_inputs(pool, layer, q, table, q_pos, window)
    got = ref_ragged_paged_attention(*args, sm_scale=d ** -0.5, sliding_window=window)
    # fp32 both; the same softmax computed in a different order: rounding only.
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_decode_compiles_for_a_tpu_slice_with_the_pallas_kernel():
    """The decode program lowers and compiles for v5p (libtpu, no TPU) with the ragged paged
    attention kernel: on one chip, and on 4 chips under shard_map; the kernel calls carry the
    planner's scope names."""
    pytest.importorskip("libtpu")
    from rlcsd_jax.planner import topology

    sl = topology.get_slice("v5p-8")
    cfg = models.get_preset("olmo3-7b-think", num_layers=2, hidden_size=512, num_heads=8,
                            num_kv_heads=4, head_dim=128, intermediate_size=1024,
                            vocab_size=1024, dtype="bfloat16", sliding_window=256,
                            layer_types=("sliding_attention", "full_attention"))
    for n in (1, 4):
        mesh = sharding.make_mesh(1, n, 1, devices=list(sl.devices[:n]))
        args = plan.abstract_args(cfg, mesh, max_slots=8 * n, num_pages=128 * n, page_size=32,
                                  steps_per_call=4, prompt_bucket=256, max_seq_len=2048,
                                  num_samples=2, eos_ids=(2,))
        assert args["static"].attention == "pallas"
        with jax.set_mesh(mesh):       # heads the kernel cannot tile take the gather path
            assert paged_attention.resolve("auto", head_dim=32) == "gather"
        with jax.set_mesh(mesh), topology.persistent_cache_off(sl.devices[0]):
            compiled = programs.decode_jit.lower(*args["decode"]).compile()
        text = compiled.as_text()
        scopes = set(re.findall(r"ragged_paged_b\w+", text))
        assert scopes == {"ragged_paged_b8_h8_kv4_d128_p32_pps64_w0",
                          "ragged_paged_b8_h8_kv4_d128_p32_pps9_w256"}, scopes
        pool = args["decode"][2]
        pool_bytes = math.prod(pool.shape) * 2 // n
        assert pool_sized_writers(text, pool_bytes) == []
        assert compiled.memory_analysis().alias_size_in_bytes >= pool_bytes
