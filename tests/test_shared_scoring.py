"""Scoring with shared prefixes equals full-row scoring (fp32, 1e-5) for every method with a
teacher: log-probs, top-k ids and log-probs, entropies; with left-truncated teacher prompts and
rollouts with 1, 2 and 4 valid wrong hints.  A tiny training run gives the same metrics with
`train.share_teacher_prefixes` on and off, and the counters show the saving."""

import jax
import numpy as np
import pytest

from helpers import fake_rollouts
from rlcsd_jax.trainer import batches, shared_passes, update
from rlcsd_jax.trainer import rl_trainer
from test_train_loop import tiny_config

# G = 6: a lone correct rollout gets 4 wrong hints (k_max), three-correct groups give the
# correct rollouts 3 and the wrong ones 2, five-correct groups give 1.
PATTERN = [[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
TOL = dict(rtol=1e-5, atol=1e-5)


def _config(tmp_path, method, **over):
    cfg = tiny_config(tmp_path, method, **{"rollout.group_size": 6, "rollout.prompts_per_step": 3,
                                           "teacher.k_max": 4, "train.minibatch_prompts": 3,
                                           **over})
    cfg.model.dtype = "float32"
    return cfg


def _step_inputs(tr, cfg):
    """One step's rollouts and contexts, as the trainer builds them."""
    from rlcsd_jax import sampling
    from rlcsd_jax.trainer import rollout, setup

    records = next(tr.iterator)
    options = sampling.SamplingOptions(cfg.rollout.temperature, cfg.rollout.top_k,
                                       cfg.rollout.top_p)
    ro = rollout.sample(tr.generate_fn(options, cfg.rollout.max_new_tokens), tr.tokenizer,
                        tr.encoder, records, jax.random.key(0), group_size=cfg.rollout.group_size,
                        buckets=tr.prompt_buckets, pad_id=tr.pad_id)
    ctx = batches.build_contexts(cfg.method, ro, tr.encoder,
                                 setup.group_rngs(cfg.seed, 0, 0, len(records)),
                                 hint_source=cfg.teacher.correct_privileged_hint_source,
                                 k_max=cfg.teacher.k_max)
    return ro, ctx


@pytest.mark.parametrize("method", ["rlcsd", "rlsd", "rlsd_ectr", "opsd", "opsd_ectr", "sdpo",
                                    "srpo"])
def test_teacher_outputs_equal_full_rows(tmp_path, monkeypatch, method):
    fake_rollouts.install(monkeypatch.setattr, PATTERN)
    # A 200-token budget truncates the longer teacher prompts on the left.
    cfg = _config(tmp_path, method, **{"train.teacher_max_len": 200})
    tr = rl_trainer.Trainer(cfg, str(tmp_path))
    with jax.set_mesh(tr.mesh):
        ro, ctx = _step_inputs(tr, cfg)
        rows, n = np.asarray(ctx.kept), ro.tokens.shape[1]
        positions = np.arange(len(rows))
        if method == "rlcsd":
            counts = {len(w) for w in ctx.wrong_prompts}
            assert {1, 2, 4} <= counts, counts
        k_slots = batches.num_wrong_slots(method, cfg.teacher.k_max)
        s_len, _ = batches.student_lengths(ro, rows)
        sb = tr.to_global(batches.student_batch(ro, rows, len(rows), 256, n, tr.pad_id))
        ids = (update.student_topk_ids(tr.graphdef, tr.state.params, sb, spec=tr.spec)
               if method in ("sdpo", "srpo") else None)
        tb = batches.teacher_arrays(ro, ctx, positions, rows, len(rows), k_slots=k_slots,
                                    max_len=200, pad_id=tr.pad_id, width=256)
        assert tb.pop("truncated_prompt_tokens").sum() > 0          # truncation exercised
        valid = tr.to_global(tb.pop("wrong_valid"))
        full = update.teacher_outputs(tr.graphdef, tr.state.params, dict(
            tr.to_global(tb, leading_axis=1), wrong_valid=valid), ids, tr.spec, length=n)
        shared, counters, _ = shared_passes.teacher_pass(
            tr, ro, ctx, rows, positions, tr.state.params, width=n,
            student_ids=None if ids is None else np.asarray(ids))
    mask = ro.response_mask()[rows] > 0
    for key, ref in jax.device_get(full).items():
        ref, got = np.asarray(ref), np.asarray(shared[key])
        assert ref.shape == got.shape, key
        if key == "wrong_valid":
            np.testing.assert_array_equal(got, ref)
            continue
        m = mask
        if key == "teacher_wrong_logp" and "wrong_valid" in shared:   # empty slots: not computed
            m = mask[:, None, :] & np.asarray(shared["wrong_valid"])[:, :, None]
        m = m.reshape(m.shape + (1,) * (ref.ndim - m.ndim))
        np.testing.assert_allclose(np.where(m, got, 0), np.where(m, ref, 0), **TOL, err_msg=key)
    assert counters["tokens_computed"] >= counters["tokens_useful"] > 0


@pytest.mark.parametrize("method", ["rlcsd", "grpo"])
def test_training_metrics_equal_with_sharing_on_and_off(tmp_path, monkeypatch, method):
    fake_rollouts.install(monkeypatch.setattr, PATTERN)
    results = []
    for share in (True, False):
        cfg = _config(tmp_path / str(share), method, **{"train.share_teacher_prefixes": share})
        tr = rl_trainer.Trainer(cfg, str(tmp_path / str(share)))
        results.append([tr.train_step(next(tr.iterator)) for _ in range(2)])
    for on, off in zip(*results):
        for key, value in off.items():
            if key.startswith(("time/", "perf/", "student/tokens_computed",
                               "teacher/tokens_computed")):
                continue
            np.testing.assert_allclose(on[key], value, **TOL, err_msg=key)
    last_on, last_off = results[0][-1], results[1][-1]
    assert last_on["student/tokens_computed"] < last_off["student/tokens_computed"]
    if method == "rlcsd":
        assert last_on["teacher/tokens_computed"] < last_off["teacher/tokens_computed"]
