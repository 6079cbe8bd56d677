"""Sharded forward on 8 fake CPU devices equals the single-device forward; parameter shardings
follow the logical rules table."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers.hf_fixtures import olmo3_config, qwen3_config, save_hf_model
from rlcsd_jax import models

from rlcsd_jax.distributed import sharding
MESHES = [dict(data=1, fsdp=8, tensor=1), dict(data=1, fsdp=4, tensor=2),
          dict(data=2, fsdp=2, tensor=2)]


@pytest.fixture(scope="module", params=["qwen3", "olmo3"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    cfg = qwen3_config(tied=False) if request.param == "qwen3" else olmo3_config(
        max_position_embeddings=256)
    save_hf_model(cfg, d)
    return str(d)


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, size=(8, 48)).astype(np.int32)
    mask = np.ones_like(ids)
    for i in range(8):  # mixed left / right padding
        n = int(rng.integers(0, 20))
        if i % 2:
            mask[i, :n] = 0
        else:
            mask[i, 48 - n:] = 0
    return ids, mask


def test_make_mesh_shapes():
    mesh = sharding.make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=2, fsdp=4, tensor=2)


@pytest.mark.parametrize("shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_sharded_forward_matches_single_device(ckpt, shape):
    ids, mask = batch()
    ref = np.asarray(models.load_pretrained(ckpt)(ids, attention_mask=mask))
    mesh = sharding.make_mesh(**shape)
    model = models.load_pretrained(ckpt, mesh=mesh)
    forward = sharding.jit_forward(model, mesh)
    out = forward(nnx.state(model, nnx.Param), ids, mask)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_parameter_shardings_follow_rules(ckpt):
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    model = models.load_pretrained(ckpt, mesh=mesh)
    specs = {
        "embed_tokens": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
    }
    assert model.embed_tokens[...].sharding.spec == specs["embed_tokens"]
    assert model.lm_head[...].sharding.spec == specs["lm_head"]
    attn, mlp = model.layers.self_attn, model.layers.mlp
    assert attn.q_proj[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert attn.k_proj[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert attn.o_proj[...].sharding.spec == P(None, "tensor", None, "fsdp")
    assert mlp.gate_proj[...].sharding.spec == P(None, "fsdp", "tensor")
    assert mlp.down_proj[...].sharding.spec == P(None, "tensor", "fsdp")
    assert model.norm.weight[...].sharding.spec == P(None)
    # Every leaf agrees with the rules table applied to its logical names.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["out_sharding"]
        want = sharding.logical_to_spec(names, var.shape, mesh)
        assert var[...].sharding.spec == want, path


def test_indivisible_dims_are_replicated():
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    spec = sharding.logical_to_spec(("vocab", "embed"), (100, 60), mesh)
    assert spec == P("tensor", None)  # tensor has size 1: any dim divides it
    assert sharding.logical_to_spec(("embed", "mlp"), (60, 96), mesh) == P(None, "tensor")


def test_shard_model_places_random_model():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cfg = models.from_hf_config(qwen3_config(tied=True).to_dict())
    model = sharding.shard_model(models.build(cfg), mesh)
    assert model.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
    assert len(model.layers.mlp.up_proj[...].sharding.device_set) == 8
    assert jax.device_count() == 8
