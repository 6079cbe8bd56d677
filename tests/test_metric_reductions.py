"""Metrics reduce as they declare (trainer/reductions.py, losses/reductions.py): counts add up, a
mean is weighted by its denominator, a maximum is the largest; an undeclared name is an error."""

import functools

import jax
import numpy as np
import pytest

from rlcsd_jax import hints, losses
from rlcsd_jax.losses import reductions as loss_reductions
from rlcsd_jax.trainer import evaluation, reductions, rl_trainer, update
from helpers import fake_rollouts
from test_losses import arrays_for, make_data
from test_train_loop import tiny_config


@pytest.fixture
def fake_texts(monkeypatch):
    return fake_rollouts.install(monkeypatch.setattr)


def test_minibatches_of_different_sizes_by_hand():
    rng = np.random.default_rng(0)
    entropy = [rng.normal(size=10), rng.normal(size=30)]    # per-token values: 10, 30 tokens
    clipped = [rng.random(10) < 0.5, rng.random(30) < 0.2]
    parts = [{"entropy": e.mean(), "pg_clipfrac": c.mean(), "response_token_count": len(e),
              "_weight": len(e), "rlcsd/selected_token_count": s, "srpo/entropy_weight_max": mx,
              "loss": loss, "grad_norm": g, "micro_batches": mb}
             for e, c, s, mx, loss, g, mb in zip(entropy, clipped, (3, 5), (2.0, 1.5),
                                                 (0.2, 0.4), (1.0, 3.0), (2, 1))]
    out = evaluation.update_metrics(parts)
    # A token mean equals the mean over the pooled tokens, not the mean of the two means.
    np.testing.assert_allclose(out["train/entropy"], np.concatenate(entropy).mean(), rtol=1e-12)
    np.testing.assert_allclose(out["train/pg_clipfrac"], np.concatenate(clipped).mean(),
                               rtol=1e-12)
    assert not np.isclose(out["train/entropy"], np.mean([e.mean() for e in entropy]))
    assert out["rlcsd/selected_token_count"] == 8               # counts add up
    assert out["train/response_token_count"] == 40
    assert out["train/micro_batches"] == 3
    assert out["srpo/entropy_weight_max"] == 2.0               # the largest
    np.testing.assert_allclose(out["train/loss"], 0.3)          # one value per update: mean
    np.testing.assert_allclose(out["train/grad_norm"], 2.0)
    assert "_weight" not in out and "train/_weight" not in out  # private denominators
    assert evaluation.update_metrics([]) == {}


def test_undeclared_metrics_and_missing_denominators_fail():
    with pytest.raises(KeyError, match="no declared reduction"):
        reductions.reduce([{"mystery": 1.0}, {"mystery": 2.0}])
    with pytest.raises(KeyError, match="no declared reduction"):
        reductions.reduction_of("train/mystery")
    with pytest.raises(KeyError, match="response_token_count"):
        reductions.reduce([{"entropy": 1.0}])
    with pytest.raises(ValueError, match="different metrics"):
        reductions.reduce([{"loss": 1.0}, {"loss": 1.0, "lr": 0.1}])
    with pytest.raises(KeyError, match="losses/reductions.py"):
        loss_reductions.kind_of("new_loss_metric")


def test_hint_stats_reduce_like_merge_stats():
    """Hint ratios and means weigh by their counts ({dir}/group_count ...): reducing two
    parts' stats equals building the stats from both parts' counts at once."""
    def counts(groups, valid, samples, kept):
        return dict(group_count=groups, valid_group_count=valid, sample_count=samples,
                    valid_sample_count=kept, all_same_outcome_group_count=groups - valid,
                    self_negative_missing_boxed_count=1, self_excluded_sampling_skip_count=0,
                    correct_pool_size_sum=2.0 * kept, wrong_pool_size_sum=3.0 * kept + 1,
                    k_sum=1.5 * kept)

    a, b = counts(4, 3, 16, 7), counts(8, 2, 32, 5)
    prefixed = lambda d: {f"m/{k}": v for k, v in d.items()}  # noqa: E731
    got = reductions.reduce([prefixed(hints.merge_stats([a])), prefixed(hints.merge_stats([b]))])
    want = prefixed(hints.merge_stats([a, b]))
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)


def test_micro_batches_combine_by_declaration():
    """Loss shares add up, counts add up, the loss metrics' means weigh by `_weight`, which
    stays (summed) for the mini-batch -> step reduction."""
    micro = [{"loss": 0.1, "pg_clipfrac": 0.5, "response_token_count": 10.0,
              "rlcsd/selected_token_count": 2.0, "_weight": 10.0},
             {"loss": 0.3, "pg_clipfrac": 0.1, "response_token_count": 30.0,
              "rlcsd/selected_token_count": 4.0, "_weight": 30.0}]
    out = update.combine_metrics(micro)
    np.testing.assert_allclose(out["loss"], 0.4)
    np.testing.assert_allclose(out["pg_clipfrac"], (5 + 3) / 40)
    assert out["rlcsd/selected_token_count"] == 6 and out["response_token_count"] == 40
    assert out["_weight"] == 40


@pytest.mark.parametrize("method", losses.names())
def test_every_loss_metric_is_declared(method):
    arrays = arrays_for(method, make_data())
    _, metrics = jax.eval_shape(functools.partial(losses.get(method)), **arrays)
    for key in metrics:
        loss_reductions.kind_of(key)
        reductions.reduction_of(key)


def test_per_rollout_sums_counts_and_takes_maxima_over_rows():
    d = make_data()
    arrays = arrays_for("rlcsd", d)
    _, metrics = jax.jit(losses.per_rollout(losses.get("rlcsd")))(**arrays)
    rows = [losses.get("rlcsd")(**{k: v[i:i + 1] for k, v in arrays.items()})[1]
            for i in range(len(d["mask"]))]
    assert float(metrics["response_token_count"]) == d["mask"].sum()
    np.testing.assert_allclose(metrics["rlcsd/selected_token_count"],
                               sum(float(r["rlcsd/selected_token_count"]) for r in rows))
    np.testing.assert_allclose(metrics["rlcsd/e_ctr_mean"],
                               np.mean([float(r["rlcsd/e_ctr_mean"]) for r in rows]), rtol=1e-5)
    s_arrays = arrays_for("srpo", d)
    _, s_metrics = jax.jit(losses.per_rollout(losses.get("srpo")))(**s_arrays)
    s_rows = [losses.get("srpo")(**{k: v[i:i + 1] for k, v in s_arrays.items()})[1]
              for i in range(len(d["mask"]))]
    np.testing.assert_allclose(s_metrics["srpo/entropy_weight_max"],
                               max(float(r["srpo/entropy_weight_max"]) for r in s_rows),
                               rtol=1e-6)


def test_engine_metrics_are_declared():
    from rlcsd_jax.inference import scheduler

    limits = scheduler.Limits(max_slots=2, min_slots=1, shards=1, pages_per_shard=4,
                              page_size=4, steps_per_call=1, max_new_tokens=4, prefill_rows=1,
                              refill_fraction=0.5, table_widths=(4,))
    stats = scheduler.Scheduler([[1, 2]], 1, [0], limits).stats
    metrics = rl_trainer.engine_metrics(stats)
    for key in list(metrics) + [f"eval/{k}" for k in metrics]:
        reductions.reduction_of(key)
    parts = [dict(metrics, **{"engine/busy_slot_fraction": 0.5, "engine/total_slot_steps": 10}),
             dict(metrics, **{"engine/busy_slot_fraction": 1.0, "engine/total_slot_steps": 30})]
    np.testing.assert_allclose(reductions.reduce(parts)["engine/busy_slot_fraction"], 0.875)


def test_training_step_reduces_its_minibatches(tmp_path, monkeypatch, fake_texts):
    """A real tiny rlcsd step: every metric it emits has a declared reduction, and the step's
    counts are the sums over its mini-batches (of different sizes: 4 and 3 rollouts)."""
    seen = {}
    real = rl_trainer.Trainer._update

    def spy(self, ro, ctx, *args, **kwargs):
        seen["ro"], seen["ctx"] = ro, ctx
        seen["minibatches"], counts = real(self, ro, ctx, *args, **kwargs)
        return seen["minibatches"], counts

    monkeypatch.setattr(rl_trainer.Trainer, "_update", spy)
    tr = rl_trainer.Trainer(tiny_config(tmp_path), str(tmp_path))
    m = tr.train_step(next(tr.iterator))
    for key in m:
        reductions.reduction_of(key)
    parts = seen["minibatches"]
    assert len(parts) == m["train/num_updates"] == 2
    for key in ("rlcsd/selected_token_count", "response_token_count", "micro_batches",
                "teacher_prompt_truncated_tokens"):
        assert m[reductions.step_name(key)] == sum(p[key] for p in parts), key
    # Per-rollout aggregation: the count is every kept rollout's tokens (no longer a per-row mean).
    kept = seen["ctx"].kept
    assert m["train/response_token_count"] == seen["ro"].response_mask()[kept].sum()
    tokens = np.asarray([p["response_token_count"] for p in parts])
    assert tokens[0] != tokens[1]
    for key in ("entropy", "sampler_logp_abs_diff"):
        want = sum(p[key] * n for p, n in zip(parts, tokens)) / tokens.sum()
        np.testing.assert_allclose(m[f"train/{key}"], want, rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(m["train/loss"], np.mean([p["loss"] for p in parts]))
    assert "student/tokens_useful" in m and "train/_weight" not in m
