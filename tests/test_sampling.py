"""`sampling.generate` (on the rollout engine): greedy parity with HF generate, logprob
consistency, filter correctness, determinism, shared prefill, sharding and recompilation
bounds.  The static sampler's own parity is in tests/test_engine.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.hf_fixtures import hf_greedy, pair, qwen3_config, strip  # noqa: F401 - pair: a fixture
from rlcsd_jax import models, sampling


from rlcsd_jax.data import packing
from rlcsd_jax.distributed import sharding
def test_greedy_matches_hf_generate(pair):
    hf, model = pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 12, 20, 9)]
    # 40 new tokens: Olmo-3 decode crosses its 16-token window.  Pick EOS ids the model
    # actually emits at different steps in different rows, so rows stop at different times.
    free = hf_greedy(hf, prompts, 40, None)
    firsts = {}
    for r, row in enumerate(free):
        for step, t in enumerate(row):
            firsts.setdefault(int(t), {}).setdefault(r, step)
    eos = sorted(firsts, key=lambda t: (-len(firsts[t]), -len(set(firsts[t].values()))))[:1]
    eos += [2]
    ref = hf_greedy(hf, prompts, 40, eos)
    out = sampling.generate(model, prompts, max_new_tokens=40, temperature=0, eos_ids=eos)
    stops = set()
    for r in range(len(prompts)):
        assert out.tokens[r] == strip(ref[r], eos), f"row {r}"
        assert out.truncated[r] == (out.tokens[r][-1] not in eos)
        stops.add(len(out.tokens[r]))
    assert len(stops) >= 2, "rows should stop at different steps"


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 20, 0.95), (0.7, 0, 0.9),
                                                     (1.3, 5, 1.0)])
def test_logprobs_equal_teacher_forced_forward(pair, temperature, top_k, top_p):
    _, model = pair
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (7, 15, 3)]
    out = sampling.generate(model, prompts, max_new_tokens=24, temperature=temperature,
                            top_k=top_k, top_p=top_p, eos_ids=[2], seed=3)
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        seq = np.asarray(p + toks)[None]
        logits = np.asarray(model(seq), np.float64)[0] / temperature
        logp = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
        want = [logp[len(p) - 1 + j, t] for j, t in enumerate(toks)]
        np.testing.assert_allclose(lps, want, atol=1e-4, rtol=0)


def test_filtered_distribution_chi_square():
    """top-k=5 / top-p=0.9 / T=0.7 on a fixed logit vector: empirical vs analytic, 40k draws."""
    from scipy import stats

    logits = jnp.asarray(np.random.default_rng(0).normal(0, 2, size=64), jnp.float32)
    opts = sampling.SamplingOptions(temperature=0.7, top_k=5, top_p=0.9)
    keys = jax.random.split(jax.random.key(0), 40_000)
    draw = jax.jit(jax.vmap(lambda k: sampling.select_tokens(logits[None], k, opts)[0][0]))
    tokens = np.asarray(draw(keys))
    # Analytic: softmax(l/T), keep top 5, renormalise, keep smallest prefix with mass >= 0.9.
    p = np.exp(np.asarray(logits, np.float64) / 0.7)
    order = np.argsort(-p)[:5]
    q = p[order] / p[order].sum()
    keep = (np.cumsum(q) - q) < 0.9
    support, probs = order[keep], q[keep] / q[keep].sum()
    assert set(np.unique(tokens)) <= set(support.tolist()), "token outside the filtered support"
    counts = np.array([(tokens == t).sum() for t in support])
    chi2 = ((counts - probs * len(tokens)) ** 2 / (probs * len(tokens))).sum()
    assert chi2 < stats.chi2.ppf(0.999, len(support) - 1), (chi2, counts, probs)


def test_seeds_and_shared_prefill(pair):
    _, model = pair
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95, num_samples=4)
    before = dict(sampling.PREFILL_CALLS)
    a = sampling.generate(model, prompts, seed=1, **kw)
    calls = sampling.PREFILL_CALLS["count"] - before["count"]
    rows = sampling.PREFILL_CALLS["rows"] - before["rows"]
    assert calls == 1 and rows == 2, "4 samples per prompt must share one prefill of 2 rows"
    assert len(a.tokens) == 8 and a.prompt_index == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({tuple(t) for t in a.tokens[:4]}) > 1, "samples of one prompt should differ"
    b = sampling.generate(model, prompts, seed=1, **kw)
    c = sampling.generate(model, prompts, seed=2, **kw)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens


def test_sharded_greedy_equals_single_device(pair):
    _, model = pair
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 128, size=int(n)).tolist() for n in rng.integers(2, 20, size=8)]
    ref = sampling.generate(model, prompts, max_new_tokens=16, temperature=0)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = sharding.shard_model(models.build(model.config), mesh)
    from flax import nnx

    nnx.update(sharded, jax.device_put(nnx.state(model, nnx.Param),
                                       sharding.param_shardings(nnx.state(sharded, nnx.Param),
                                                                mesh)))
    out = sampling.generate(sharded, prompts, max_new_tokens=16, temperature=0, mesh=mesh)
    assert out.tokens == ref.tokens


def test_recompilation_bounded_by_buckets():
    cfg = models.from_hf_config(qwen3_config().to_dict())
    model = models.build(cfg, seed=1)
    rng = np.random.default_rng(5)
    buckets = (8, 16, 32)
    before = sampling.compile_counts()
    used = set()
    for _ in range(20):
        prompts = [rng.integers(3, 128, size=int(n)).tolist() for n in rng.integers(1, 30, 4)]
        used.add(packing.bucket_length(max(map(len, prompts)), buckets))
        sampling.generate(model, prompts, max_new_tokens=4, temperature=1.0, top_k=5,
                          buckets=buckets, seed=int(rng.integers(1 << 30)))
    after = sampling.compile_counts()
    # generate() runs on the engine: one prefill and one decode program per prompt bucket
    # (4 rows fit in 4 slots: one prefill row count, one slot count, one page-table width).
    assert after["engine_prefill"] - before["engine_prefill"] <= len(used)
    assert after["engine_decode"] - before["engine_decode"] <= len(used)
    assert after["decode"] == before["decode"], "the static sampler is not used by generate()"


def test_cache_memory_check_is_clear():
    cfg = models.get_preset("qwen3-8b")
    with pytest.raises(MemoryError, match=r"KV cache needs 18\.00 GiB .*only 16\.00 GiB"):
        sampling.check_cache_memory(cfg, 128, 1024, 16 * 2**30, dtype="bfloat16")
    assert sampling.check_cache_memory(cfg, 1, 1024, None) > 0
