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
    assert spec.aggregation == {"grpo": "batch", "sdpo": "reference_micro_batch",
                                "srpo": "reference_micro_batch"}.get(method, "per_rollout")
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


# The reference's actor_max_token_len_per_gpu, config by config (configs/<task>/<model>_<method>
# .yaml at THU-BPM/RLCSD 7eeff3c; grpo leaves it unset: max prompt 2048 + max response 16384).
REFERENCE_BUDGETS = {
    (task, model, method): 40960
    for task in ("math", "logic")
    for model in ("qwen3_1p7b", "qwen3_4b", "qwen3_8b", "olmo3_7b_think")
    for method in ("opsd", "sdpo", "srpo", "rlsd", "rlcsd")
} | {(task, "qwen3_4b", method): 40960
     for task in ("math", "logic") for method in ("opsd_ectr", "rlsd_ectr")
     } | {("logic", "qwen3_4b", "sdpo"): 32768, ("logic", "qwen3_4b", "srpo"): 32768} | {
    (task, model, "grpo"): 2048 + 16384
    for task in ("math", "logic")
    for model in ("qwen3_1p7b", "qwen3_4b", "qwen3_8b", "olmo3_7b_think")}


@pytest.mark.parametrize("task,model,method", sorted(REFERENCE_BUDGETS))
def test_teacher_budget_per_task_model_and_method(task, model, method):
    """algorithm.md §2.4: the teacher token budget is the reference config's, for the method
    given on the command line after the config file is read."""
    cfg = load(model, task)
    assert cfg.train.teacher_max_len == -1       # resolved once the method is known
    cfg.method = method
    setup.check_config(cfg)
    assert cfg.train.teacher_max_len == REFERENCE_BUDGETS[task, model, method]


def test_teacher_budget_set_by_hand_is_kept():
    cfg = load("qwen3_4b", "logic")
    cfg.method = "sdpo"
    cfg.train.teacher_max_len = 20000
    setup.check_config(cfg)
    assert cfg.train.teacher_max_len == 20000
    assert load("tiny").train.teacher_max_len == 1024


@pytest.mark.parametrize("key,value,needle", [
    ("rlcsd.delta", -0.01, "config.rlcsd.delta=-0.01 must be >= 0"),
    ("rlcsd.eta", -1.0, "config.rlcsd.eta=-1.0 must be >= 0"),
    ("rlcsd.residual_clip_low", 3.0, "config.rlcsd.residual_clip_low=3.0 is above "
                                     "config.rlcsd.residual_clip_high=2.0"),
    ("rlcsd.residual_clip_high", -3.0, "config.rlcsd.residual_clip_low=-2.0 is above "
                                       "config.rlcsd.residual_clip_high=-3.0"),
    ("teacher.k_max", 0, "config.teacher.k_max=0 must be >= 1"),
    ("teacher.k_max", -2, "config.teacher.k_max=-2 must be >= 1"),
    ("rollout.temperature", -0.5, "config.rollout.temperature=-0.5 must be >= 0"),
    ("model.param_dtype", "float16", "config.model.param_dtype='float16'; allowed: float32, "
                                     "bfloat16"),
])
def test_out_of_domain_values_name_the_key(key, value, needle):
    """The reference clamps δ, η at 0, swaps reversed clip bounds and reads k_max 0 as 4; here
    each is an error naming the key."""
    import re

    cfg = load("qwen3_1p7b")
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(ValueError, match=re.escape(needle)):
        setup.check_config(cfg)


def test_boundary_values_are_accepted():
    cfg = load("qwen3_1p7b")
    cfg.rlcsd.delta = cfg.rlcsd.eta = 0.0
    cfg.rlcsd.residual_clip_low = cfg.rlcsd.residual_clip_high = 0.5
    cfg.teacher.k_max = 1
    cfg.rollout.temperature = 0.0
    cfg.model.param_dtype = "bfloat16"
    setup.check_config(cfg)
