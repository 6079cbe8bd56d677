"""HF -> orbax -> HF conversion (bit exact in fp32) and clear errors for bad checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy as stn

from hf_fixtures import hf_logits, olmo3_config, qwen3_config, save_hf_model
from rlcsd_jax import models
from rlcsd_jax.models import CheckpointError, orbax_io


def read_all(d):
    out = {}
    for fn in os.listdir(d):
        if fn.endswith(".safetensors"):
            out.update(stn.load_file(os.path.join(d, fn)))
    return out


@pytest.mark.parametrize("arch", ["qwen3_tied", "qwen3_untied", "olmo3"])
def test_round_trip_bit_exact(tmp_path, arch):
    src, conv, back = tmp_path / "hf", tmp_path / "jax", tmp_path / "hf_back"
    cfg = olmo3_config(max_position_embeddings=256) if arch == "olmo3" else qwen3_config(
        tied=arch == "qwen3_tied")
    hf = save_hf_model(cfg, src, max_shard_size="60KB")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "rlcsd_jax.convert", "--hf_dir", str(src), "--out",
                    str(conv)], check=True, env=env, capture_output=True)
    assert orbax_io.is_converted_dir(str(conv))
    assert (conv / "tokenizer_config.json").exists()
    subprocess.run([sys.executable, "-m", "rlcsd_jax.convert", "--to_hf", "--src", str(conv),
                    "--out", str(back), "--max_shard_gb", "0.00005"], check=True, env=env,
                   capture_output=True)
    a, b = read_all(src), read_all(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert (back / "model.safetensors.index.json").exists()
    assert json.loads((back / "config.json").read_text())["model_type"] == cfg.model_type
    # transformers itself loads the export and gives the same logits as the source model.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager")
    ids = np.random.default_rng(0).integers(3, 128, size=(1, 40))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))
    # and the converted folder loads directly
    jax_model = models.load(str(conv))
    np.testing.assert_allclose(np.asarray(jax_model(ids)), hf_logits(hf, ids), atol=1e-4)


def test_export_bf16(tmp_path):
    save_hf_model(qwen3_config(), tmp_path / "hf")
    model = models.load_pretrained(str(tmp_path / "hf"))
    models.save_pretrained(model, str(tmp_path / "bf16"), dtype="bfloat16")
    t = read_all(tmp_path / "bf16")
    assert all(v.dtype.name == "bfloat16" for v in t.values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.fixture
def good(tmp_path):
    d = tmp_path / "good"
    save_hf_model(qwen3_config(tied=False), d)
    return d


def test_missing_tensor_named(good):
    t = stn.load_file(str(good / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]
    stn.save_file(t, str(good / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj"):
        models.load_pretrained(str(good))


def test_unexpected_tensor_named(good):
    t = stn.load_file(str(good / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(128, np.float32)
    stn.save_file(t, str(good / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*q_proj\.bias"):
        models.load_pretrained(str(good))


def test_shape_mismatch_names_tensor_and_shapes(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' in .*"
                                              r"model\.safetensors has shape \(64, 96\), "
                                              r"expected \(64, 80\)"):
        models.load_pretrained(str(good))


def test_unsupported_model_type(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg["model_type"] = "llama"
    (good / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        models.load_pretrained(str(good))


def test_pickle_checkpoint_refused(good):
    os.remove(good / "model.safetensors")
    (good / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="pickle.*pytorch_model.bin.*safetensors"):
        models.load_pretrained(str(good))


def test_converted_checkpoint_with_other_config_names_paths(tmp_path, good):
    from rlcsd_jax import convert

    convert.hf_to_orbax(str(good), str(tmp_path / "conv"))
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "conv" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj.*checkpoint shape \(2, 64, 96\), "
                                              r"model expects \(2, 64, 80\)"):
        models.load(str(tmp_path / "conv"))
    shutil.rmtree(tmp_path / "conv")
