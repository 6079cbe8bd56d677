"""The rollout engine (rlcsd_jax.inference): parity with HF generate and the static sampler,
log-probs, sampling distribution, seed invariance, utilization and KV footprint on a
long-tailed workload, and the budget errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.hf_fixtures import hf_greedy, pair, qwen3_config, strip  # noqa: F401 - pair: a fixture
from rlcsd_jax import inference, models, sampling

GREEDY = inference.SamplingOptions(temperature=0.0)


def rows_of(out):
    return [out["tokens"][r, :out["lengths"][r]].tolist() for r in range(len(out["lengths"]))]


def test_greedy_equals_hf_and_static_sampler(pair):
    """7 prompts x 2 samples on 4 slots (refill), pages of 8 (the 2nd sample copies the
    partial prompt page), 40 new tokens (Olmo-3 crosses its 16-token window)."""
    hf, model = pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 12, 20, 9, 3, 17, 8)]
    free = hf_greedy(hf, prompts, 40, None)
    firsts = {}
    for r, row in enumerate(free):
        for step, t in enumerate(row):
            firsts.setdefault(int(t), {}).setdefault(r, step)
    # An EOS the model emits in several rows at different steps: rows end at different times.
    eos = sorted(firsts, key=lambda t: (-len(set(firsts[t].values())), t))[:1] + [2]
    ref = hf_greedy(hf, prompts, 40, eos)
    graphdef, params = nnx.split(model)
    out = inference.generate_batch(graphdef, params, prompts, num_samples=2, options=GREEDY,
                                   max_new_tokens=40, eos_ids=eos, max_slots=4, page_size=8,
                                   steps_per_call=8, min_slots=4)
    ids, mask = sampling.left_pad(prompts, 32)
    static = jax.device_get(sampling.generate_arrays(
        graphdef, params, ids, mask, jax.random.key(0), max_new_tokens=40, num_samples=2,
        options=GREEDY, eos_ids=eos))
    got = rows_of(out)
    for r in range(len(got)):
        assert got[r] == strip(ref[r // 2], eos), f"row {r} vs HF"
        assert got[r] == static["tokens"][r, :static["lengths"][r]].tolist(), f"row {r}"
        assert out["truncated"][r] == static["truncated"][r]
    assert len({len(t) for t in got}) >= 2, "rows should end at different steps"
    assert (out["tokens"][np.arange(40)[None] >= out["lengths"][:, None]] == 0).all()
    st = out["stats"]
    assert st["prefill_rows"] == len(prompts), "each prompt prefilled once for its 2 samples"
    assert st["decode_calls"] > 1 and st["preemptions"] == 0
    assert st["busy_slot_steps"] == int(np.sum(out["lengths"] - 1))   # first token: prefill


def teacher_forced_logprobs(model, prompts, rows, num_samples, temperature):
    """log softmax(logits / T) of each row's tokens, from one right-padded forward [R, S]."""
    seqs = [prompts[r // num_samples] + toks for r, toks in enumerate(rows)]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    logits = np.asarray(model(ids, attention_mask=mask), np.float64) / temperature
    logp = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
    return [[logp[r, len(prompts[r // num_samples]) - 1 + j, t] for j, t in enumerate(toks)]
            for r, toks in enumerate(rows)]


def test_sampled_logprobs_and_seed_invariance(pair):
    """Sampled rows: log-probs equal a teacher-forced log-softmax; the same seed gives the same
    tokens with other slot counts, page sizes and steps per call, and under preemption."""
    _, model = pair
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=int(n)).tolist() for n in rng.integers(2, 20, 6)]
    graphdef, params = nnx.split(model)
    kw = dict(num_samples=2, options=inference.SamplingOptions(0.8, top_k=20, top_p=0.9),
              max_new_tokens=24, eos_ids=[2], seed_or_key=3)
    # 8 pages of 8: enough for any one row (up to 42 tokens + a shared partial prompt page),
    # not for 4 slots of long rows at once -> preemptions, whose rows restart and reproduce.
    a = inference.generate_batch(graphdef, params, prompts, max_slots=4, page_size=8,
                                 steps_per_call=8, kv_budget_tokens=64, min_slots=4, **kw)
    assert a["stats"]["preemptions"] > 0, "the tight budget should preempt"
    rows = rows_of(a)
    want = teacher_forced_logprobs(model, prompts, rows, 2, 0.8)
    for r, toks in enumerate(rows):
        # fp32 on both sides; paged and dense attention sum in different orders (~1e-6).
        np.testing.assert_allclose(a["logprobs"][r, :len(toks)], want[r], atol=1e-4, rtol=0)
    assert len({tuple(t) for t in rows}) > len(prompts), "samples of a prompt should differ"
    if model.config.model_type != "qwen3":
        return                          # the RNG streams do not depend on the architecture
    b = inference.generate_batch(graphdef, params, prompts, max_slots=2, page_size=4,
                                 steps_per_call=3, min_slots=2, **kw)
    assert b["stats"]["preemptions"] == 0
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["lengths"], b["lengths"])
    np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5, rtol=0)
    c = inference.generate_batch(graphdef, params, prompts, max_slots=2, page_size=4,
                                 steps_per_call=3, min_slots=2, **dict(kw, seed_or_key=4))
    assert not np.array_equal(a["tokens"], c["tokens"])


def fixed_logits_model(logits: np.ndarray):
    """A Qwen3 CausalLM whose next-token logits are `logits` [V] whatever the input: every
    token embeds to the same vector, attention and MLP outputs are zero, and the LM head maps
    the normed hidden state onto `logits`."""
    v = logits.shape[0]
    cfg = models.get_preset("qwen3-tiny", vocab_size=v, hidden_size=32, intermediate_size=64,
                            num_layers=1, layer_types=("full_attention",), num_heads=2,
                            num_kv_heads=1, head_dim=16, tie_word_embeddings=False)
    model = models.build(cfg, seed=0)
    e = np.random.default_rng(0).normal(size=32).astype(np.float32)
    model.embed_tokens[...] = jnp.tile(jnp.asarray(e), (v, 1))
    model.layers.self_attn.o_proj[...] = jnp.zeros_like(model.layers.self_attn.o_proj[...])
    model.layers.mlp.down_proj[...] = jnp.zeros_like(model.layers.mlp.down_proj[...])
    h = np.asarray(model.norm(jnp.asarray(e)[None]))[0].astype(np.float64)
    model.lm_head[...] = jnp.asarray(np.outer(h / (h @ h), logits), jnp.float32)
    return model


def test_engine_draws_follow_the_filtered_distribution():
    """tests/test_sampling.py's chi-square (top-k 5, top-p 0.9, T 0.7, 40k draws) on tokens the
    engine draws: 2,000 samples x 20 tokens of one prompt, on 256 slots."""
    from scipy import stats

    logits = np.random.default_rng(0).normal(0, 2, size=64).astype(np.float32)
    model = fixed_logits_model(logits)
    graphdef, params = nnx.split(model)
    opts = inference.SamplingOptions(temperature=0.7, top_k=5, top_p=0.9)
    out = inference.generate_batch(graphdef, params, [[3, 4, 5]], num_samples=2000,
                                   options=opts, max_new_tokens=20, max_slots=256,
                                   page_size=16, steps_per_call=32)
    assert (out["lengths"] == 20).all()
    tokens = out["tokens"].reshape(-1)
    p = np.exp(logits.astype(np.float64) / 0.7)
    order = np.argsort(-p)[:5]
    q = p[order] / p[order].sum()
    keep = (np.cumsum(q) - q) < 0.9
    support, probs = order[keep], q[keep] / q[keep].sum()
    assert set(np.unique(tokens)) <= set(support.tolist()), "token outside the filtered support"
    counts = np.array([(tokens == t).sum() for t in support])
    chi2 = ((counts - probs * len(tokens)) ** 2 / (probs * len(tokens))).sum()
    assert chi2 < stats.chi2.ppf(0.999, len(support) - 1), (chi2, counts, probs)
    # Log-probs are under softmax(logits / T) over the full vocabulary (not the filtered one).
    full = logits / 0.7 - np.logaddexp.reduce(logits.astype(np.float64) / 0.7)
    np.testing.assert_allclose(out["logprobs"].reshape(-1), full[tokens], atol=1e-4)


def test_long_tailed_workload_utilization_and_kv_footprint():
    """Log-normal lengths (mean cap/4, 4% at the cap) through a countdown model that makes them
    exact: busy / total slot-steps >= 90% (today's sampler measured on the same rows), and the
    pages held at the peak <= 1.1 x the live tokens then + one page per slot."""
    from benchmarks import engine as bench

    cap, slots, ps = 128, 16, 16
    model = bench.countdown_model(cap, layers=1)
    prompts, targets = bench.workload(160, cap, seed=0)
    want = bench.expected_lengths(targets, cap)
    out, _ = bench.run_engine(model, prompts, cap, slots=slots, page_size=ps, steps_per_call=16,
                              min_slots=4, table_buckets=False)
    np.testing.assert_array_equal(out["lengths"], want)
    np.testing.assert_array_equal(out["truncated"], targets > cap)
    st = out["stats"]
    util = st["busy_slot_steps"] / st["total_slot_steps"]
    assert util >= 0.90, st
    assert st["peak_kv_tokens"] <= 1.1 * st["live_kv_tokens_at_peak"] + slots * ps, st
    static, _ = bench.run_static(model, prompts, cap)
    np.testing.assert_array_equal(static["lengths"], want)
    static_util = static["stats"]["busy_slot_steps"] / static["stats"]["total_slot_steps"]
    assert static_util < 0.5 < util, (static_util, util)


def test_budget_errors_name_the_row_and_numbers():
    model = models.build(models.from_hf_config(qwen3_config().to_dict()))
    graphdef, params = nnx.split(model)
    prompts = [[5] * 10, [6] * 70]
    kw = dict(max_new_tokens=8, max_slots=2, page_size=16)
    with pytest.raises(ValueError, match=r"prompt row 1 has 70 tokens, longer than the whole "
                                         r"KV page budget of 64 tokens .*4 pages of 16"):
        inference.generate_batch(graphdef, params, prompts, kv_budget_tokens=64, **kw)
    with pytest.raises(ValueError, match=r"prompt row 1 \(60 tokens\) with max_new_tokens=8 "
                                         r"needs 5 KV pages of 16 tokens.* gives 4 pages"):
        inference.generate_batch(graphdef, params, [[5] * 10, [6] * 60], kv_budget_tokens=64,
                                 **kw)
    with pytest.raises(ValueError, match="prompt row 0 is empty"):
        inference.generate_batch(graphdef, params, [[]], **kw)


def test_budget_from_bytes():
    cfg = models.get_preset("qwen3-1.7b", dtype="bfloat16")
    per_token = inference.kv_bytes_per_token(cfg)
    assert per_token == 2 * 28 * 8 * 128 * 2
    assert inference.kv_budget_tokens_for_bytes(cfg, 10 * per_token) == 10
    from rlcsd_jax.distributed import sharding

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    # 4 batch shards, each device holding half the kv heads of its shard's pages.
    assert inference.kv_budget_tokens_for_bytes(cfg, 10 * per_token, mesh) == 4 * 20
