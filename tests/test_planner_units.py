"""The planner's arithmetic: slice names, loop-aware costs and the roofline, on programs whose
FLOPs and bytes are known by hand (compiled for a real TPU by libtpu, no TPU needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlcsd_jax.planner import hlo_cost, roofline, topology


@pytest.mark.parametrize("name,gen,chips,grid", [
    ("v5p-16", "v5p", 8, (2, 2, 2)), ("v5p-8", "v5p", 4, (2, 2, 1)),
    ("v4-32", "v4", 16, (2, 2, 4)), ("v5p-128", "v5p", 64, (4, 4, 4)),
    ("v5e-8", "v5e", 8, (2, 4)), ("v5litepod-16", "v5e", 16, (4, 4)), ("v6e-4", "v6e", 4, (2, 2)),
])
def test_gcloud_names(name, gen, chips, grid):
    assert topology.parse_name(name) == (gen, chips)
    assert topology.chip_grid(gen, chips) == grid


@pytest.mark.parametrize("bad", ["v5p-3", "v5p16", "v7-8", "v5e-6", "tpu"])
def test_bad_names_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="topology"):
        topology.parse_name(bad)


def test_refusal_message_parses():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. ... the total memory "
           "required for HLO temporaries (524.41G) exceeds available HBM (95.74G).")
    need, have = topology.parse_hbm_error(msg)
    assert need == pytest.approx(524.41 * 2**30) and have == pytest.approx(95.74 * 2**30)
    assert topology.parse_hbm_error("INVALID_ARGUMENT: shapes do not match") is None


@pytest.fixture(scope="module")
def v5p():
    sl = topology.get_slice("v5p-16")
    mesh = jax.sharding.Mesh(np.asarray(sl.devices).reshape(8), ("x",))
    return sl, mesh


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def test_sharded_matmul_and_add_by_hand(v5p):
    sl, mesh = v5p
    m, k, n = 8192, 4096, 2048
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None)))
    cost = hlo_cost.program_cost(_compile(lambda a, b: a @ b, x, w))
    assert cost.flops == 2 * (m // 8) * k * n          # per device: its rows of the product
    # Memory-bound case, exact bytes: read two fp32 shards, write one.
    a = jax.ShapeDtypeStruct((8 * 2**20,), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    add = hlo_cost.program_cost(_compile(lambda u, v: u + v, a, a))
    assert add.bytes_accessed == 3 * 2**20 * 4 and add.flops == 2**20
    r = roofline.roofline(add.flops, add.bytes_accessed, sl.chip)
    assert r.bound == "memory"
    assert r.seconds == pytest.approx(3 * 2**20 * 4 / 2765e9)
    r = roofline.roofline(cost.flops, 0.0, sl.chip)
    assert r.seconds == pytest.approx(2 * 1024 * k * n / 459e12) and r.bound == "compute"
    assert roofline.mfu(cost.flops, r.seconds, sl.chip) == pytest.approx(1.0)


def test_loops_are_counted_by_their_trip_counts(v5p):
    _, mesh = v5p
    x = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=NamedSharding(mesh, P()))
    w = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(mesh, P()))
    one = 2 * 1024 * 512 * 512

    def nested(h, w):
        def outer(h, _):
            return jax.lax.scan(lambda g, _: (jnp.tanh(g @ w), None), h, None, length=3)[0], None
        return jax.lax.scan(outer, h, None, length=10)[0]

    compiled = _compile(nested, x, w)
    assert compiled.cost_analysis()["flops"] < 2 * one      # XLA alone counts one body
    cost = hlo_cost.program_cost(compiled)
    assert cost.flops == pytest.approx(30 * one, rel=1e-3)
    assert sorted(loop.trip_count for loop in cost.loops) == [3, 10]

    def until_small(h, w):   # data-dependent: counted once, reported per iteration
        return jax.lax.while_loop(lambda g: jnp.sum(g) > 1.0, lambda g: jnp.tanh(g @ w), h)

    cost = hlo_cost.program_cost(_compile(until_small, x, w))
    (loop,) = cost.loops
    assert loop.trip_count is None
    assert loop.per_iteration["flops"] == pytest.approx(one, rel=1e-2)


def test_splash_kernels_are_priced(v5p):
    """XLA's cost analysis cannot see into the Pallas splash kernels; the planner prices them
    from their call-site scope: 4 + 6 + 8 FLOPs (forward, dq, dkv) per computed tile element."""
    from rlcsd_jax.models import splash

    sl, _ = v5p
    mesh = jax.sharding.Mesh(np.asarray(sl.devices[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "tensor"))
    sds = lambda s, d=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        s, d, sharding=NamedSharding(mesh, P()))
    q, kv, seg = sds((2, 2048, 16, 128)), sds((2, 2048, 8, 128)), sds((2, 2048), jnp.int32)

    def loss(q, k, v, s):
        return jnp.sum(splash.splash_attention(q, k, v, s, s).astype(jnp.float32))

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
    cost = hlo_cost.program_cost(compiled)
    kernels = 18 * 2 * 16 * 2048 * 2048 * 128 * splash.block_density(2048, 512, None)
    assert cost.custom_calls == []                       # every kernel priced
    assert kernels <= cost.flops <= kernels * 1.01       # plus XLA's own small ops


def test_ragged_paged_attention_is_priced_at_the_live_kv(v5p):
    """The rollout engine's decode kernel (TPU ragged paged attention, a Pallas custom call XLA
    prices at nothing) is priced from its scope name at the live KV length the caller assumes:
    per slot and layer each live key's k and v read once (bf16), 4 FLOPs and one exp per key,
    query head and head dim; capped at the page table and, on sliding layers, at the window."""
    from rlcsd_jax import models
    from rlcsd_jax.distributed import sharding
    from rlcsd_jax.inference import plan, programs

    sl, _ = v5p
    cfg = models.get_preset("qwen3-1.7b", num_layers=2, layer_types=("full_attention",) * 2,
                            hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=128,
                            intermediate_size=512, vocab_size=1024, dtype="bfloat16")
    mesh = sharding.make_mesh(1, 1, 1, devices=list(sl.devices[:1]))
    args = plan.abstract_args(cfg, mesh, max_slots=8, num_pages=256, page_size=32,
                              steps_per_call=4, prompt_bucket=128, max_seq_len=512,
                              eos_ids=(2,))
    with jax.set_mesh(mesh), topology.persistent_cache_off(sl.devices[0]):
        compiled = programs.decode_jit.lower(*args["decode"]).compile()
    short, long_, beyond, table = (hlo_cost.program_cost(compiled, mean_kv_len=n)
                                   for n in (100, 400, 10**6, None))
    assert "tpu_custom_call" not in short.custom_calls
    # The decode loop (data dependent) is counted once, its 2-layer scan twice; 8 slots.
    dl = 300
    assert long_.bytes_accessed - short.bytes_accessed == 2 * 8 * dl * 2 * 2 * 128 * 2
    assert long_.flops - short.flops == pytest.approx(2 * 4 * 8 * 4 * dl * 128)
    assert long_.transcendentals - short.transcendentals == pytest.approx(2 * 8 * 4 * dl)
    # past the 16-page table (512 tokens) nothing more is read; None prices the whole table
    assert beyond.bytes_accessed == table.bytes_accessed
    assert beyond.bytes_accessed - long_.bytes_accessed == 2 * 8 * 112 * 2 * 2 * 128 * 2
    line = ('%k = bf16[8,8,128]{2,1,0} custom-call(%q), custom_call_target="tpu_custom_call", '
            'metadata={op_name="jit(f)/ragged_paged_b8_h8_kv4_d128_p32_pps9_w256/x"}')
    sliding = hlo_cost._kernel_cost(line, mean_kv_len=1000)       # window 256 < 9 pages
    assert sliding["bytes accessed"] == 8 * 256 * 2 * 4 * 128 * 2 + 2 * 8 * 8 * 128 * 2
    assert sliding["flops"] == 4 * 8 * 8 * 256 * 128
