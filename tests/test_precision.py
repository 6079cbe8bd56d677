"""`model.param_dtype=bfloat16`: bf16 weights, bf16 Adam moments and a bf16 teacher copy, as the
reference trains (torch AdamW on bf16 weights), next to the float32 default (docs/precision.md).

The AdamW arithmetic runs in float32 from the float32 gradient accumulator; every stored value is
rounded to its dtype once per optimizer step.  Checked here: one step against a float64
re-computation, the state's dtypes after steps (no silent promotion to fp32, no recompiles), the
reference's behaviour that bf16 swallows updates below half an ulp, a real trainer step,
checkpoints (resume) and the HF export."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rlcsd_jax.trainer import state as state_lib

BF16 = jnp.bfloat16
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.01


def _params(dtype, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (64, 32)).astype(dtype),
            "norm": (1.0 + 0.1 * jax.random.normal(k2, (32,))).astype(dtype)}


def _grads(seed):
    k1, k2 = jax.random.split(jax.random.key(100 + seed))
    return {"w": jax.random.normal(k1, (64, 32)) * 0.01, "norm": jax.random.normal(k2, (32,))}


def _dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree)}


def _adam_moments(opt_state):
    """(mu, nu) of the ScaleByAdamState inside the chain."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")):
        if hasattr(s, "mu"):
            return s.mu, s.nu
    raise AssertionError("no Adam state")


@pytest.mark.parametrize("teacher_mode", ["ema", "snapshot"])
def test_bf16_state_stays_bf16_and_does_not_recompile(teacher_mode):
    tx = state_lib.make_optimizer(1.0, B1, B2, EPS, WD)
    state = state_lib.init_state(_params(BF16), tx, teacher_mode, need_ref=True)
    step = jax.jit(lambda s, g: state_lib.apply_update(s, g, tx, LR, teacher_mode=teacher_mode,
                                                        ema_decay=0.95, sync_interval=2)[0])
    for i in range(3):
        state = step(state, _grads(i))
    assert step._cache_size() == 1          # one state layout: nothing was promoted to fp32
    mu, nu = _adam_moments(state.opt_state)
    for name, tree in (("params", state.params), ("mu", mu), ("nu", nu),
                       ("teacher", state.teacher), ("ref", state.ref)):
        assert _dtypes(tree) == {"bfloat16"}, name
    assert int(state.opt_step) == 3


def test_one_bf16_adamw_step_against_float64():
    """Adam in float32 from bf16 moments and an fp32 gradient, each stored value rounded once:
    within one bf16 ulp of the float64 computation (f32 vs f64 intermediates can flip a
    rounding), and equal for nearly every entry."""
    tx = state_lib.make_optimizer(1e9, B1, B2, EPS, WD)       # no clipping
    params = _params(BF16)
    state = state_lib.init_state(params, tx, "ema", need_ref=False)
    state, _ = state_lib.apply_update(state, _grads(0), tx, LR, teacher_mode="ema",
                                      ema_decay=0.95, sync_interval=10)
    mu0, nu0 = _adam_moments(state.opt_state)
    p0 = state.params
    g = _grads(1)
    new, _ = state_lib.apply_update(state, g, tx, LR, teacher_mode="ema", ema_decay=0.95,
                                    sync_interval=10)
    mu1, nu1 = _adam_moments(new.opt_state)
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    bf = lambda x: np.asarray(x, np.float64).astype(ml_dtypes.bfloat16)  # noqa: E731
    for key in ("w", "norm"):
        m = B1 * f64(mu0[key]) + (1 - B1) * f64(g[key])
        v = B2 * f64(nu0[key]) + (1 - B2) * f64(g[key]) ** 2
        u = (m / (1 - B1 ** 2)) / (np.sqrt(v / (1 - B2 ** 2)) + EPS) + WD * f64(p0[key])
        want_p = bf(f64(p0[key]) - LR * u)
        want_t = bf(0.95 * f64(state.teacher[key]) + 0.05 * want_p.astype(np.float64))
        for got, want, what in ((new.params[key], want_p, "param"), (mu1[key], bf(m), "mu"),
                                (nu1[key], bf(v), "nu"), (new.teacher[key], want_t, "ema")):
            got = np.asarray(got).astype(np.float64)
            want = want.astype(np.float64)
            ulp = np.abs(want) * 2.0 ** -7 + 1e-30
            assert np.all(np.abs(got - want) <= ulp), (key, what)
            assert np.mean(got == want) > 0.97, (key, what, np.mean(got == want))


def test_bf16_swallows_updates_below_half_an_ulp():
    """The reference's behaviour at lr 1e-6: an Adam step (~lr per weight) on a weight near 1
    is below half a bf16 ulp (2^-8) and is lost; the same step moves fp32 weights."""
    tx = state_lib.make_optimizer(1.0, B1, B2, EPS, 0.0)
    moved = {}
    for dtype in (jnp.float32, BF16):
        state = state_lib.init_state(_params(dtype), tx, None, need_ref=False)
        new, _ = state_lib.apply_update(state, _grads(0), tx, 1e-6, teacher_mode=None,
                                        ema_decay=0.95, sync_interval=10)
        moved[jnp.dtype(dtype).name] = float(np.mean(
            np.asarray(new.params["norm"], np.float32) != np.asarray(state.params["norm"],
                                                                      np.float32)))
    assert moved["float32"] == 1.0
    assert moved["bfloat16"] == 0.0


def test_trainer_steps_in_bf16(tmp_path, monkeypatch):
    """A real sdpo run (EMA teacher) with bf16 weights: weights, moments and teacher stay bf16,
    the weights move, the update program is compiled once, and the trainer's old log-probs
    equal the sampler's (both compute in fp32 from the same bf16 weights)."""
    from helpers import fake_rollouts
    from test_train_loop import tiny_config

    from rlcsd_jax.trainer import update

    from rlcsd_jax.trainer import rl_trainer
    fake_rollouts.install(monkeypatch.setattr)
    cfg = tiny_config(tmp_path, "sdpo", **{"model.param_dtype": "bfloat16",
                                           "warm_start.steps": 2, "warm_start.batch_size": 4})
    tr = rl_trainer.Trainer(cfg, str(tmp_path))
    assert _dtypes(tr.state.params) == {"bfloat16"}
    tr.warm_start()                          # fp32 SFT inside, bf16 out
    assert _dtypes(tr.state.params) == {"bfloat16"}
    before = [np.asarray(x, np.float32) for x in jax.tree.leaves(tr.state.params)]
    m1 = tr.train_step(next(tr.iterator))
    compiled = update.apply_grads._cache_size()
    m2 = tr.train_step(next(tr.iterator))
    assert update.apply_grads._cache_size() == compiled
    assert m2["train/num_updates"] > 0 and np.isfinite(m2["train/loss"])
    mu, nu = _adam_moments(tr.state.opt_state)
    for name, tree in (("params", tr.state.params), ("mu", mu), ("nu", nu),
                       ("teacher", tr.state.teacher)):
        assert _dtypes(tree) == {"bfloat16"}, name
    after = [np.asarray(x, np.float32) for x in jax.tree.leaves(tr.state.params)]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    assert m1["train/sampler_logp_abs_diff"] < 1e-4


def _train(workdir, *extra):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, "-m", "rlcsd_jax.train",
         "--config=" + os.path.join(repo, "configs", "tiny.py"), f"--workdir={workdir}",
         "--config.method=rlcsd", "--config.model.param_dtype=bfloat16",
         "--config.checkpoint.every=1", "--config.warm_start.steps=2",
         "--config.warm_start.batch_size=4", "--config.data.num_generated_train=16",
         "--config.rollout.prompts_per_step=4", "--config.train.minibatch_prompts=4",
         "--config.rollout.group_size=2", "--config.rollout.max_new_tokens=8",
         "--config.eval.before_train=False", "--config.eval.at_end=False", *extra],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_bf16_run_checkpoints_resumes_and_exports(tmp_path):
    """A bf16 run saves bf16 checkpoints, resumes from them in bf16, and exports to HF
    safetensors in bf16 (bit-equal to the checkpoint) that transformers reloads with the JAX
    policy's logits."""
    import safetensors.torch
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from helpers.hf_fixtures import hf_logits
    from rlcsd_jax import models
    from rlcsd_jax.trainer import checkpoint_lookup
    from rlcsd_jax.trainer.export import as_pure_dict
    from rlcsd_jax.models import hf_io

    wd = tmp_path / "run"
    p = _train(wd, "--config.train.num_steps=1")
    assert p.returncode == 0, p.stderr[-3000:]
    p = _train(wd, "--config.train.num_steps=2")                 # resumes from step 1
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step 1" in p.stderr
    ckpts = str(wd / "checkpoints")
    for key in ("params", "opt_state", "teacher"):
        tree = checkpoint_lookup.restore_subtree(ckpts, 2, key)
        floats = {str(np.asarray(x).dtype) for x in jax.tree.leaves(tree)
                  if np.asarray(x).dtype.kind in "fV" or "bfloat16" in str(np.asarray(x).dtype)}
        assert floats == {"bfloat16"}, (key, floats)

    out = tmp_path / "hf"
    p = subprocess.run([sys.executable, "-m", "rlcsd_jax.convert", "--to_hf", "--src", str(wd),
                        "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    params = as_pure_dict(checkpoint_lookup.restore_subtree(ckpts, 2))
    mcfg = models.get_preset("qwen3-tiny", vocab_size=768, dtype="float32",
                             param_dtype="bfloat16")
    want = dict(hf_io.hf_tensors(mcfg, params))
    got = {}
    for fn in os.listdir(out):
        if fn.endswith(".safetensors"):
            got.update(safetensors.torch.load_file(str(out / fn)))
    assert sorted(want) == sorted(got)
    for name in want:
        assert got[name].dtype == torch.bfloat16, name
        np.testing.assert_array_equal(got[name].float().numpy(),
                                      np.asarray(want[name], np.float32), err_msg=name)
    model = models.build(mcfg)
    graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract, rest)
    ids = np.random.default_rng(0).integers(3, 700, size=(1, 24))
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                    dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(reloaded, ids), np.asarray(model(ids)), atol=1e-4)
