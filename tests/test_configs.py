"""Every shipped config parses, is locked, and builds abstractly (shapes + shardings only) on an
8-device mesh, so a typo in a config fails CI instead of a TPU job."""

import importlib.util
import os

import jax
import pytest

from rlcsd_jax import losses
from rlcsd_jax.trainer import setup

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
LARGE = ["qwen3_0p6b", "qwen3_1p7b", "qwen3_4b", "qwen3_8b", "olmo3_7b_think"]


def load(name, *args):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(*args)
    cfg.lock()
    return cfg


@pytest.mark.parametrize("name", LARGE)
@pytest.mark.parametrize("task", ["math", "logic"])
def test_large_config_builds_abstractly(name, task):
    cfg = load(name, task)
    assert cfg.rollout.group_size == 8 and cfg.rollout.prompts_per_step == 64
    assert cfg.train.lr == 1e-6 and cfg.train.warmup_steps == 50
    assert cfg.rlcsd.tau == 0.02 and cfg.rlcsd.beta == 1.0 and cfg.teacher.k_max == 4
    built = setup.abstract_build(cfg)
    assert built["num_params"] > 5e8
    for path, sh in jax.tree_util.tree_flatten_with_path(built["shardings"])[0]:
        assert sh.mesh.size == jax.device_count(), path
    # the optimizer state mirrors the parameters (adam mu / nu) and is sharded the same way
    assert built["opt_state_bytes"] >= 2 * built["param_bytes"]


@pytest.mark.parametrize("method", losses.names())
def test_every_method_resolves(method):
    cfg = load("qwen3_1p7b")
    cfg.method = method
    spec = setup.step_spec(cfg, response_len=16)
    assert spec.aggregation == ("batch" if method == "grpo" else "per_rollout")
    assert spec.grad_clip == (0.1 if method in ("opsd", "opsd_ectr") else 1.0)
    assert spec.teacher_mode == {"grpo": None, "opsd": "fixed", "opsd_ectr": "fixed",
                                 "sdpo": "ema", "srpo": "ema"}.get(method, "snapshot")


def test_typos_fail():
    cfg = load("qwen3_1p7b")
    with pytest.raises(AttributeError):
        cfg.rlcsd.tua = 0.1
    cfg.method = "rlcds"
    with pytest.raises(ValueError, match="allowed"):
        setup.check_config(cfg)
    with pytest.raises(ValueError, match="task must be"):
        load("qwen3_1p7b", "coding")


def test_tiny_config():
    cfg = load("tiny")
    assert cfg.model.preset == "qwen3-tiny" and not cfg.model.checkpoint
