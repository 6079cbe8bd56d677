"""HF -> orbax -> HF conversion (bit exact in fp32) and clear errors for bad checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy as stn

from helpers.hf_fixtures import hf_logits, olmo3_config, qwen3_config, save_hf_model
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
    from rlcsd_jax.models import conversion

    conversion.hf_to_orbax(str(good), str(tmp_path / "conv"))
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "conv" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj.*checkpoint shape \(2, 64, 96\), "
                                              r"model expects \(2, 64, 80\)"):
        models.load(str(tmp_path / "conv"))
    shutil.rmtree(tmp_path / "conv")


# ------------------------------------------------------------------ a training run -> HF


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny training run with a checkpoint at each step."""
    wd = tmp_path_factory.mktemp("run")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "rlcsd_jax.train",
                    "--config=" + os.path.join(repo, "configs", "tiny.py"), f"--workdir={wd}",
                    "--config.method=grpo", "--config.train.num_steps=2",
                    "--config.checkpoint.every=1", "--config.warm_start.steps=2",
                    "--config.warm_start.batch_size=4", "--config.data.num_generated_train=16",
                    "--config.rollout.prompts_per_step=4", "--config.train.minibatch_prompts=4",
                    "--config.rollout.group_size=2", "--config.rollout.max_new_tokens=8",
                    "--config.eval.before_train=False", "--config.eval.at_end=False"],
                   check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return wd


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "rlcsd_jax.convert", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_export_training_workdir_bit_exact_and_reloadable(tiny_run, tmp_path):
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from rlcsd_jax.trainer import checkpoint_lookup
    from rlcsd_jax.trainer.export import as_pure_dict
    from rlcsd_jax.models import hf_io

    out = tmp_path / "hf"
    p = _convert("--to_hf", "--src", tiny_run, "--out", out)
    assert p.returncode == 0 and "step 2" in p.stdout, p.stderr
    assert (out / "tokenizer.json").exists()      # the run's tiny tokenizer travels along
    mcfg = models.get_preset("qwen3-tiny", vocab_size=768, dtype="float32")
    for step, folder in ((2, out), (1, tmp_path / "hf1")):
        if step == 1:
            assert _convert("--to_hf", "--src", tiny_run / "checkpoints" / "1", "--out",
                            folder).returncode == 0
        params = as_pure_dict(
            checkpoint_lookup.restore_subtree(str(tiny_run / "checkpoints"), step))
        want, got = dict(hf_io.hf_tensors(mcfg, params)), read_all(folder)
        assert sorted(want) == sorted(got)
        for name in want:
            assert got[name].dtype == np.float32
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # transformers loads the export and computes what the trained JAX policy computes.
    model = models.build(mcfg)
    graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(abstract, as_pure_dict(checkpoint_lookup.restore_subtree(
        str(tiny_run / "checkpoints"), 2)))
    model = nnx.merge(graphdef, abstract, rest)
    ids = np.random.default_rng(0).integers(3, 700, size=(1, 24))
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(reloaded, ids), np.asarray(model(ids)), atol=1e-4)
    # The architecture can also come from a model folder given by hand (--model_dir): the
    # same tensors, and that folder's config.json kept verbatim.
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "note": "kept"}))
    p = _convert("--to_hf", "--src", tiny_run, "--model_dir", out, "--out", tmp_path / "hf2")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["note"] == "kept"
    a, b = read_all(out), read_all(tmp_path / "hf2")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_export_workdir_errors(tiny_run, tmp_path):
    p = _convert("--to_hf", "--src", tiny_run, "--step", "7", "--out", tmp_path / "x")
    assert p.returncode == 1 and "step 7 is not in" in p.stderr and "[1, 2]" in p.stderr
    p = _convert("--to_hf", "--src", tmp_path / "nothing", "--out", tmp_path / "x")
    assert p.returncode == 1 and "does not exist" in p.stderr
    p = _convert("--to_hf", "--src", tiny_run, "--model_dir", tmp_path, "--out", tmp_path / "x")
    assert p.returncode == 1 and "has no config.json" in p.stderr
