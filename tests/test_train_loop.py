"""End-to-end plumbing of the real training loop on the tiny model (algorithm.md §1.7, §2.3, §3, §5).

Answers follow fake_rollouts.PATTERN (see there for which groups / targets survive).
"""

import numpy as np
import pytest

from rlcsd_jax import losses
from helpers import fake_rollouts, references
from rlcsd_jax.trainer import rl_trainer


def tiny_config(tmp_path, method="rlcsd", **over):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    spec = importlib.util.spec_from_file_location("tiny_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.method = method
    c.data.num_generated_train = 16
    c.data.num_generated_eval = 4
    c.data.shuffle = False
    c.rollout.prompts_per_step = 4
    c.rollout.group_size = 4
    c.rollout.max_new_tokens = 8
    c.train.minibatch_prompts = 1
    c.train.warmup_steps = 2
    c.train.lr = 1e-2
    c.train.teacher_buckets = (128, 256, 512, 1024)
    c.teacher.sync_interval = 2
    c.teacher.k_max = 2
    c.warm_start.steps = 0
    c.eval.before_train = False
    c.eval.at_end = False
    for k, v in over.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


@pytest.fixture
def fake_texts(monkeypatch):
    return fake_rollouts.install(monkeypatch.setattr)


def params_of(tr):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tr.state.params))]


def test_rlcsd_plumbing(tmp_path, fake_texts):
    cfg = tiny_config(tmp_path)
    cfg.train.inject_nonfinite_grad_at = 3
    tr = rl_trainer.Trainer(cfg, str(tmp_path))
    p0 = params_of(tr)
    m1 = tr.train_step(next(tr.iterator))
    # Drops: 3 + 4 = 7 of 16 rollouts survive -> 2 mini-batches of 4 rows (1 prompt x G).
    assert m1["rlcsd/valid_sample_count"] == 7 and m1["train/kept_ratio"] == 7 / 16
    assert m1["rlcsd/aborted_ratio"] == 0.5
    assert m1["train/num_updates"] == 2
    # Step 1 of a warmup schedule runs at lr = 0: AdamW moments move, weights do not.
    assert m1["train/lr"] == 0.0
    for a, b in zip(p0, params_of(tr)):
        np.testing.assert_array_equal(a, b)
    # Snapshot teacher: refreshed after optimizer step 2 (interval 2) -> equals params.
    import jax

    assert int(tr.state.opt_step) == 2
    for t, p in zip(jax.tree.leaves(tr.state.teacher), jax.tree.leaves(tr.state.params)):
        np.testing.assert_array_equal(np.asarray(t), np.asarray(p))
    before = params_of(tr)
    m2 = tr.train_step(next(tr.iterator))
    assert m2["train/lr"] > 0
    # Optimizer step 3 had an injected NaN gradient: skipped (counted), weights unchanged by
    # it; step 4 then updated the weights and refreshed the teacher again.
    assert m2["train/skipped_steps"] == 1.0
    assert int(tr.state.opt_step) == 4
    assert any(not np.array_equal(a, b) for a, b in zip(before, params_of(tr)))
    assert np.isfinite(m2["train/loss"])
    # The trainer's old log-probs equal the sampler's for the same tokens (fp32, same weights).
    assert m1["train/sampler_logp_abs_diff"] < 1e-4
    assert m1["train/teacher_prompt_truncated_tokens"] == 0     # 1024-token teacher budget
    for key in ("rlcsd/e_ctr_mean", "rlcsd/selected_token_ratio", "train/entropy",
                "train/grad_norm", "time/sample", "time/score", "time/update"):
        assert key in m2, key


def test_teacher_prompts_over_budget_are_cut_and_counted(tmp_path, fake_texts):
    """A teacher sequence over `teacher_max_len` loses prompt tokens from the left (§2.4); the
    step reports how many, summed over the mini-batch."""
    tr = rl_trainer.Trainer(tiny_config(tmp_path, **{"train.teacher_max_len": 160}), str(tmp_path))
    m = tr.train_step(next(tr.iterator))
    assert m["train/num_updates"] > 0 and np.isfinite(m["train/loss"])
    assert m["train/teacher_prompt_truncated_tokens"] > 0


def test_all_dropped_step_makes_no_update(tmp_path, monkeypatch, fake_texts):
    monkeypatch.setattr(rl_trainer.batches_lib, "build_contexts",
                        lambda *a, **k: rl_trainer.batches_lib.Contexts(np.zeros(0, int), [], [], {}))
    tr = rl_trainer.Trainer(tiny_config(tmp_path), str(tmp_path))
    p0 = params_of(tr)
    m = tr.train_step(next(tr.iterator))
    assert m["train/num_updates"] == 0
    assert int(tr.state.train_step) == 0 and int(tr.state.opt_step) == 0
    for a, b in zip(p0, params_of(tr)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", [m for m in losses.names() if m != "rlcsd"])
def test_every_method_runs(tmp_path, fake_texts, method):
    tr = rl_trainer.Trainer(tiny_config(tmp_path, method), str(tmp_path))
    for _ in range(2):
        m = tr.train_step(next(tr.iterator))
    assert m["train/num_updates"] > 0
    assert np.isfinite(m["train/loss"]) and np.isfinite(m["train/grad_norm"])
    expected = {"grpo": ["train/pg_clipfrac", "train/kl"],
                "opsd": ["opsd/entry_clip_frac", "opsd/teacher_tail_mass"],
                "sdpo": ["sdpo/jsd_mean", "sdpo/is_weight_mean"],
                "srpo": ["srpo/teacher_entropy_mean", "srpo/grpo_token_ratio"],
                "rlsd": ["train/pg_clipfrac"],
                "opsd_ectr": ["opsd_ectr/kl_cw_mean", "opsd_ectr/kept_ratio", "train/kl"],
                "rlsd_ectr": ["rlsd_ectr/kept_ratio", "train/kl"]}[method]
    for key in expected:
        assert key in m, (key, sorted(m))


def test_sharded_run_matches_single_device(tmp_path, fake_texts):
    """The same tiny run on 8 fake devices (fsdp=4 x tensor=2) gives the same metrics as on one
    device.  Greedy rollouts keep the sampled tokens identical despite the different reduction
    order of sharded matmuls (which moves logits by ~1e-6)."""
    results = []
    for mesh in [dict(data=1, fsdp=1, tensor=1), dict(data=1, fsdp=4, tensor=2)]:
        cfg = tiny_config(tmp_path / str(mesh["fsdp"]))
        cfg.rollout.temperature = 0.0
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh["data"], mesh["fsdp"], mesh["tensor"]
        tr = rl_trainer.Trainer(cfg, str(tmp_path / str(mesh["fsdp"])))
        assert tr.mesh.size == mesh["fsdp"] * mesh["tensor"]
        results.append([tr.train_step(next(tr.iterator)) for _ in range(2)])
    for one, eight in zip(*results):
        for key in ("train/reward_mean", "train/loss", "train/grad_norm", "rlcsd/e_ctr_mean",
                    "rlcsd/selected_token_ratio", "train/entropy"):
            np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, atol=1e-5, err_msg=key)


def test_memory_is_checked_before_sampling(tmp_path):
    """With a per-device budget too small for the teacher rows, the trainer stops at start-up,
    before sampling anything, and names the program, its need, the budget and the fix."""
    cfg = tiny_config(tmp_path, **{"train.teacher_max_len": 1024,
                                   "train.teacher_buckets": (1024,)})
    cfg.train.memory_limit_gb = 0.003
    with pytest.raises(MemoryError, match=r"score/teacher_shared does NOT fit: needs .* GiB per "
                                          r"device, the budget is 0.0 GiB .*train.teacher_max_len"):
        rl_trainer.Trainer(cfg, str(tmp_path))
    cfg.train.memory_limit_gb = 1.0
    rl_trainer.Trainer(cfg, str(tmp_path))           # the same run fits a larger budget


@pytest.mark.parametrize("method", ["grpo", "rlcsd", "rlsd_ectr"])
def test_update_moves_policy_toward_positive_advantages(tmp_path, monkeypatch, fake_texts,
                                                         method):
    """One real training step raises the log-probability of the kept rollouts with A > 0 and
    lowers it for those with A < 0 (algorithm.md §4.8: e_t modulates the advantage, never flips its
    sign).  This is what a row/advantage misalignment anywhere between sampling, dropping,
    mini-batching and the loss would break, while every loss unit test still passes."""
    import jax

    from rlcsd_jax.trainer import batches, update

    captured = {}
    build = rl_trainer.batches_lib.build_contexts

    def capture_contexts(*a, **k):
        captured["ctx"] = build(*a, **k)
        return captured["ctx"]

    monkeypatch.setattr(rl_trainer.batches_lib, "build_contexts", capture_contexts)
    # One mini-batch with every prompt, no warmup, a small step: first-order behaviour.
    cfg = tiny_config(tmp_path, method, **{"train.minibatch_prompts": 4,
                                           "train.warmup_steps": 0, "train.lr": 1e-3})
    tr = rl_trainer.Trainer(cfg, str(tmp_path))

    def sequence_logp(params, ro):
        rows = np.arange(len(ro.texts))
        sb = tr.to_global(batches.student_batch(ro, rows, len(rows), 1024, ro.tokens.shape[1],
                                          tr.pad_id))
        logp = update.old_logprobs(tr.graphdef, params, None, sb, spec=tr.spec,
                                   with_ref=False)["old_logp"]
        return (np.asarray(logp) * ro.response_mask()).sum(1)

    before = jax.tree.map(np.array, jax.device_get(tr.state.params))
    m = tr.train_step(next(tr.iterator))
    assert m["train/num_updates"] == 1
    ro, kept = fake_texts["rollouts"], captured["ctx"].kept
    delta = (sequence_logp(tr.state.params, ro) - sequence_logp(before, ro))[kept]
    adv = ro.advantages[kept]
    assert (adv > 0).any() and (adv < 0).any()
    assert delta[adv > 0].mean() > 0, (delta, adv)
    assert delta[adv < 0].mean() < 0, (delta, adv)
    assert np.corrcoef(delta, adv)[0, 1] > 0.5, (delta, adv)


def test_base_seed_fixes_the_base_model_across_run_seeds(tmp_path):
    """`base_seed` pins the random init and the warm start, so `seed` varies the RL run only
    (like RL runs from one pretrained checkpoint); unset, the base follows `seed`."""
    def base_params(seed, base_seed):
        cfg = tiny_config(tmp_path / f"{seed}_{base_seed}", **{"warm_start.steps": 2,
                                                                "warm_start.batch_size": 4})
        cfg.seed, cfg.base_seed = seed, base_seed
        tr = rl_trainer.Trainer(cfg, str(tmp_path / f"{seed}_{base_seed}"))
        tr.warm_start()
        return params_of(tr)

    pinned_a, pinned_b = base_params(1, 0), base_params(2, 0)
    for a, b in zip(pinned_a, pinned_b):
        np.testing.assert_array_equal(a, b)
    unpinned = base_params(2, -1)
    assert any(not np.array_equal(a, b) for a, b in zip(pinned_b, unpinned))


def test_permute_rewards_control_removes_the_rewards_information(tmp_path, monkeypatch,
                                                                  fake_texts):
    """`rollout.permute_rewards` (a control run): the update sees the step's rewards shuffled
    across its rollouts, with advantages recomputed; the reward rate is unchanged."""
    seen = {}
    real = rl_trainer.batches_lib.build_contexts

    def spy(method, ro, *args, **kwargs):
        seen["ro"] = ro
        return real(method, ro, *args, **kwargs)

    monkeypatch.setattr(rl_trainer.batches_lib, "build_contexts", spy)
    cfg = tiny_config(tmp_path, "grpo", **{"rollout.permute_rewards": True})
    tr = rl_trainer.Trainer(cfg, str(tmp_path))
    m = tr.train_step(next(tr.iterator))
    graded, used = fake_texts["rollouts"].rewards, seen["ro"].rewards
    assert sorted(used) == sorted(graded) and not np.array_equal(used, graded)
    assert m["train/reward_mean"] == graded.mean()
    np.testing.assert_allclose(seen["ro"].advantages,
                               references.grpo_advantages(used, seen["ro"].group), rtol=1e-6)
