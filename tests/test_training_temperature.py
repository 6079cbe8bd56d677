"""Training log-probs at the rollout temperature (algorithm.md §1.3): the old, current, reference
and teacher log-probs are log-softmax(logits / T), the distribution the sampler drew from (before
top-p / top-k), so the importance ratios and the teacher signals compare like with like.  At
T = 1 nothing changes; these tests use T = 0.7."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.hf_fixtures import qwen3_config
from rlcsd_jax import losses, models
from rlcsd_jax.trainer import update

T = 0.7
PROMPT, RESPONSE = 6, 9


@pytest.fixture(scope="module")
def student():
    return models.build(models.from_hf_config(qwen3_config(tied=False).to_dict()), seed=3)


@pytest.fixture(scope="module")
def teacher_params():
    """Other weights (the teacher must differ from the student for the loss to see both)."""
    model = models.build(models.from_hf_config(qwen3_config(tied=False).to_dict()), seed=4)
    return nnx.split(model)[1]


def spec_for(method: str, temperature: float, top_k: int = 0) -> update.StepSpec:
    return update.StepSpec(
        method=method, hparams=tuple(sorted(losses.DEFAULTS[method].items())),
        aggregation="per_rollout", response_len=RESPONSE, chunk=4, minibatch_rows=1,
        top_k=top_k, teacher_mode="snapshot", ema_decay=0.95, sync_interval=10, grad_clip=1.0,
        adam=(0.9, 0.999, 1e-8, 0.01), rollout_is=None, temperature=temperature)


def one_row(seed=0, width=24):
    """One right-padded row: a PROMPT-token prompt and a RESPONSE-token response."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 128, PROMPT + RESPONSE)
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(tokens)] = tokens
    mask = (np.arange(width) < len(tokens)).astype(np.int32)[None]
    return dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                response_start=jnp.asarray([PROMPT]),
                response_mask=jnp.ones((1, RESPONSE), jnp.float32))


def tempered_logp(model, batch, temperature):
    """float64 log-softmax(logits / T) at the response tokens, from an unbatched forward."""
    ids = np.asarray(batch["input_ids"])[:, :PROMPT + RESPONSE]
    logits = np.asarray(model(ids), np.float64)[0] / temperature
    logp = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
    return np.array([logp[PROMPT - 1 + j, ids[0, PROMPT + j]] for j in range(RESPONSE)]), logp


def test_old_and_teacher_logprobs_are_tempered(student, teacher_params):
    graphdef, params = nnx.split(student)
    batch = one_row()
    spec = spec_for("rlsd", T)
    expected, _ = tempered_logp(student, batch, T)
    old = update.old_logprobs(graphdef, params, None, batch, spec=spec, with_ref=False)
    np.testing.assert_allclose(np.asarray(old["old_logp"][0]), expected, atol=1e-5)
    # At T = 0.7 the log-probs differ from T = 1 by far more than the tolerance.
    assert np.abs(tempered_logp(student, batch, 1.0)[0] - expected).max() > 0.05

    tbatch = {k: batch[k][None] for k in ("input_ids", "attention_mask", "response_start")}
    teacher = update.teacher_outputs(graphdef, teacher_params, tbatch, None, spec,
                                     length=RESPONSE)
    t_expected, _ = tempered_logp(nnx.merge(graphdef, teacher_params), batch, T)
    np.testing.assert_allclose(np.asarray(teacher["teacher_logp"][0]), t_expected, atol=1e-5)


def test_srpo_teacher_ids_logprobs_and_entropy_are_tempered(student, teacher_params):
    """sdpo / srpo: teacher log-probs at the student's top-k ids and the teacher's entropy, both
    of the tempered distribution."""
    graphdef, params = nnx.split(student)
    batch = one_row(1)
    spec = spec_for("srpo", T, top_k=5)
    ids = update.student_topk_ids(graphdef, params, batch, spec=spec)
    _, s_logp = tempered_logp(student, batch, T)
    rows = s_logp[PROMPT - 1:PROMPT - 1 + RESPONSE]
    np.testing.assert_array_equal(np.sort(np.asarray(ids[0]), -1),
                                  np.sort(np.argsort(-rows, -1)[:, :5], -1))
    tbatch = {k: batch[k][None] for k in ("input_ids", "attention_mask", "response_start")}
    out = update.teacher_outputs(graphdef, teacher_params, tbatch, ids, spec, length=RESPONSE)
    _, t_logp = tempered_logp(nnx.merge(graphdef, teacher_params), batch, T)
    t_rows = t_logp[PROMPT - 1:PROMPT - 1 + RESPONSE]
    np.testing.assert_allclose(np.asarray(out["teacher_topk_logp"][0]),
                               np.take_along_axis(t_rows, np.asarray(ids[0]), -1), atol=1e-5)
    entropy = -(np.exp(t_rows) * t_rows).sum(-1)
    np.testing.assert_allclose(np.asarray(out["teacher_entropy"][0]), entropy, atol=1e-5)


def test_loss_uses_tempered_current_logprobs(student, teacher_params):
    """The update's loss on one rollout (a one-row mini-batch, so any aggregation gives the
    rollout's own loss) equals the loss function fed the float64 tempered log-probs.

    old_logp is set 0.1 below the tempered current log-prob, so the PPO ratio, and with it the
    loss value, depends on the current log-prob directly; at T = 1 the loss is visibly different.
    """
    graphdef, params = nnx.split(student)
    batch = one_row(2)
    logp, _ = tempered_logp(student, batch, T)
    t_logp, _ = tempered_logp(nnx.merge(graphdef, teacher_params), batch, T)
    batch = dict(batch, advantages=jnp.asarray([0.8]),
                 old_logp=jnp.asarray(logp[None] - 0.1, jnp.float32),
                 sampler_logp=jnp.asarray(logp[None], jnp.float32))
    tbatch = {k: batch[k][None] for k in ("input_ids", "attention_mask", "response_start")}

    def update_loss(temperature):
        spec = spec_for("rlsd", temperature)
        teacher = update.teacher_outputs(graphdef, teacher_params, tbatch, None, spec,
                                         length=RESPONSE)
        loss, _ = update._loss(params, graphdef, batch, teacher, jnp.float32(RESPONSE), spec)
        return float(loss)

    expected, _ = losses.rlsd(logp=jnp.asarray(logp[None], jnp.float32),
                              old_logp=batch["old_logp"], advantages=batch["advantages"],
                              mask=batch["response_mask"],
                              teacher_logp=jnp.asarray(t_logp[None], jnp.float32))
    got = update_loss(T)
    # fp32 forward vs float64: log-prob errors ~1e-6 enter exp(logp - old) linearly.
    np.testing.assert_allclose(got, float(expected), rtol=1e-5, atol=1e-6)
    assert abs(update_loss(1.0) - got) > 1e-2 * abs(got)


def test_gradient_is_of_the_tempered_objective(student):
    """d loss / d params through the tempered log-probs: the update's gradient equals the
    gradient of the loss written directly on log_softmax(logits / T)."""
    graphdef, params = nnx.split(student)
    batch = one_row(3)
    logp, _ = tempered_logp(student, batch, T)
    batch = dict(batch, advantages=jnp.asarray([-0.6]),
                 old_logp=jnp.asarray(logp[None] + 0.05, jnp.float32),
                 ref_logp=jnp.asarray(logp[None] - 0.02, jnp.float32),
                 sampler_logp=jnp.asarray(logp[None], jnp.float32))
    spec = spec_for("grpo", T)
    ids = batch["input_ids"][:, :PROMPT + RESPONSE]

    def direct(p):
        logits = nnx.merge(graphdef, p)(ids)[0].astype(jnp.float32) / T
        lp = jax.nn.log_softmax(logits, -1)
        lp = lp[jnp.arange(PROMPT - 1, PROMPT - 1 + RESPONSE), ids[0, PROMPT:]][None]
        return losses.grpo(logp=lp, old_logp=batch["old_logp"], advantages=batch["advantages"],
                           mask=batch["response_mask"], ref_logp=batch["ref_logp"])[0]

    got = jax.grad(lambda p: update._loss(p, graphdef, batch, {}, jnp.float32(RESPONSE),
                                          spec)[0])(params)
    want = jax.grad(direct)(params)
    at_one = jax.grad(lambda p: update._loss(p, graphdef, batch, {}, jnp.float32(RESPONSE),
                                             dataclasses.replace(spec, temperature=1.0))[0])(
        params)
    diffs, scale, far = [], [], []
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(at_one)):
        diffs.append(float(jnp.max(jnp.abs(a - b))))
        far.append(float(jnp.max(jnp.abs(c - b))))
        scale.append(float(jnp.max(jnp.abs(b))))
    # Chunked fp32 log-softmax vs one dense one: differences at fp32 rounding of the logits.
    assert max(diffs) <= 1e-5 * max(scale) + 1e-7, (max(diffs), max(scale))
    assert max(far) > 1e-2 * max(scale)


def test_trainer_old_logprobs_equal_the_samplers_at_t_0_7(tmp_path, monkeypatch):
    """A real training step at rollout T = 0.7: the trainer's old log-probs of the sampled tokens
    equal the sampler's own (same fp32 weights), and scoring them at T = 1 would not."""
    from helpers import fake_rollouts
    from test_train_loop import tiny_config

    from rlcsd_jax.trainer import rl_trainer

    fake_rollouts.install(monkeypatch.setattr)
    cfg = tiny_config(tmp_path, "grpo", **{"rollout.temperature": T})
    tr = rl_trainer.Trainer(cfg, str(tmp_path))
    assert tr.spec.temperature == T
    m = tr.train_step(next(tr.iterator))
    # Mean |old - sampler| per token; same weights, both fp32 (the T = 1 test uses 1e-4 too).
    assert m["train/sampler_logp_abs_diff"] < 1e-4
    assert np.isfinite(m["train/loss"])
    tr.spec = dataclasses.replace(tr.spec, temperature=1.0)
    m = tr.train_step(next(tr.iterator))
    assert m["train/sampler_logp_abs_diff"] > 1e-2
