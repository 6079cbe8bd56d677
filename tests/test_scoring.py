"""Multi-context scoring: per-row alignment, vmapped contexts, chunking, top-k/tail, entropy,
sharding and memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.hf_fixtures import qwen3_config
from rlcsd_jax import models, scoring


from rlcsd_jax.distributed import sharding
@pytest.fixture(scope="module")
def model():
    return models.build(models.from_hf_config(qwen3_config(tied=False).to_dict()), seed=3)


def right_padded(rows, width):
    """rows: list of (prompt, response) -> ids, mask, response_start, response_len."""
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = p + r
        mask[i, :len(p) + len(r)] = 1
    return ids, mask, np.array([len(p) for p, _ in rows]), np.array([len(r) for _, r in rows])


def direct_logprobs(model, prompt, response):
    """Unbatched reference: full forward over prompt+response, log-softmax in float64."""
    logits = np.asarray(model(np.asarray([prompt + response])), np.float64)[0]
    logp = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
    return np.array([logp[len(prompt) - 1 + j, t] for j, t in enumerate(response)])


def make_rows(seed, spec):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 128, lp).tolist(), rng.integers(3, 128, lr).tolist())
            for lp, lr in spec]


def test_alignment_per_row_regression(model):
    """algorithm.md §9 (83bbd06): different prompt and response lengths in one batch; the longest
    response is NOT in the row with the longest prompt; each row must equal its own forward."""
    rows = make_rows(0, [(30, 4), (5, 25), (12, 11), (2, 1)])
    ids, mask, start, lens = right_padded(rows, 64)
    out = scoring.response_stats(model, ids, mask, start, int(lens.max()), chunk=8)
    for i, (p, r) in enumerate(rows):
        np.testing.assert_allclose(np.asarray(out["logp"][i, :len(r)]),
                                   direct_logprobs(model, p, r), atol=1e-5, rtol=0)


def test_left_padded_student_rows(model):
    """Sampler layout: prompts left-padded to P, responses start at index P for every row."""
    rows = make_rows(1, [(9, 6), (3, 10)])
    p_width = 12
    ids = np.zeros((2, 32), np.int32)
    mask = np.zeros_like(ids)
    for i, (p, r) in enumerate(rows):
        ids[i, p_width - len(p):p_width + len(r)] = p + r
        mask[i, p_width - len(p):p_width + len(r)] = 1
    out = scoring.response_stats(model, ids, mask, np.full(2, p_width), 10)
    for i, (p, r) in enumerate(rows):
        np.testing.assert_allclose(np.asarray(out["logp"][i, :len(r)]),
                                   direct_logprobs(model, p, r), atol=1e-5, rtol=0)


def test_vmapped_contexts_equal_separate_forwards(model):
    response = make_rows(2, [(1, 9)])[0][1]
    prompts = [r[0] for r in make_rows(3, [(4, 0), (17, 0), (9, 0)])]
    packed = [right_padded([(p, response)], 40) for p in prompts]
    ids = np.stack([x[0] for x in packed])
    mask = np.stack([x[1] for x in packed])
    start = np.stack([x[2] for x in packed])
    graphdef, params = nnx.split(model)
    out = scoring.score(graphdef, params, ids, mask, start, length=9, top_k=4, entropy=True)
    assert out["logp"].shape == (3, 1, 9) and out["topk_logp"].shape == (3, 1, 9, 4)
    for c in range(3):
        single = scoring.response_stats(model, ids[c], mask[c], start[c], 9, top_k=4,
                                        entropy=True)
        for k in single:
            np.testing.assert_allclose(np.asarray(out[k][c]), np.asarray(single[k]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(out["logp"][c, 0]),
                                   direct_logprobs(model, prompts[c], response), atol=1e-5)


def test_chunking_is_exact(model):
    rows = make_rows(4, [(6, 21), (11, 17)])
    ids, mask, start, _ = right_padded(rows, 48)
    at = jnp.asarray(np.random.default_rng(5).integers(0, 128, (2, 21, 3)))
    kw = dict(top_k=5, entropy=True, at_ids=at, temperature=0.8)
    a = scoring.response_stats(model, ids, mask, start, 21, chunk=4, **kw)
    b = scoring.response_stats(model, ids, mask, start, 21, chunk=21, **kw)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-6, err_msg=k)


def test_topk_plus_tail_is_a_distribution_and_entropy_exact(model):
    rows = make_rows(6, [(7, 12)])
    ids, mask, start, _ = right_padded(rows, 24)
    out = scoring.response_stats(model, ids, mask, start, 12, top_k=10, entropy=True)
    topk = np.asarray(out["topk_logp"], np.float64)
    lse_topk = np.logaddexp.reduce(topk, -1)
    tail = np.log(-np.expm1(np.minimum(lse_topk, -1e-7)))
    total = np.logaddexp(lse_topk, tail)
    np.testing.assert_allclose(total, 0.0, atol=1e-5)
    logits = np.asarray(model(ids), np.float64)[0, 6:18]
    logp = logits - np.logaddexp.reduce(logits, -1, keepdims=True)
    ent = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(np.asarray(out["entropy"][0]), ent, atol=1e-5)
    # The ids returned are the true top-k of the full distribution.
    np.testing.assert_array_equal(np.sort(np.asarray(out["topk_ids"][0]), -1),
                                  np.sort(np.argsort(-logp, -1)[:, :10], -1))


def test_gradient_through_chunked_logprobs(model):
    rows = make_rows(7, [(5, 9), (8, 6)])
    ids, mask, start, lens = right_padded(rows, 24)
    graphdef, params = nnx.split(model)
    valid = jnp.arange(9)[None] < jnp.asarray(lens)[:, None]

    def loss(p, chunk):
        out = scoring.response_stats(nnx.merge(graphdef, p), ids, mask, start, 9, chunk=chunk)
        return jnp.sum(jnp.where(valid, out["logp"], 0.0))

    g1 = jax.grad(loss)(params, 2)
    g2 = jax.grad(loss)(params, 9)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_sharded_scoring_matches(model):
    rows = make_rows(8, [(5, 9), (8, 6), (3, 3), (9, 9)] * 2)
    ids, mask, start, _ = right_padded(rows, 24)
    ids, mask, start = ids[None], mask[None], start[None]
    graphdef, params = nnx.split(model)
    ref = scoring.score(graphdef, params, ids, mask, start, length=9)["logp"]
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sparams = jax.device_put(params, sharding.param_shardings(params, mesh))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    out = scoring.score(graphdef, sparams, jax.device_put(ids, batch), jax.device_put(mask, batch),
                        jax.device_put(start, batch), length=9)["logp"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_peak_memory_does_not_scale_with_full_vocab_logits():
    """V = 151,936 (Qwen3): chunked scoring + its gradient never hold [B, T, V] in fp32: the
    compiled program's temporary memory stays flat when the response length grows 4x, while
    the unchunked program grows by the full fp32 logits."""
    # Dense attention: at these short lengths blockwise's 512-token tiles would blur the picture.
    cfg = models.from_hf_config(qwen3_config(vocab_size=151936, hidden_size=32,
                                             intermediate_size=32, num_hidden_layers=1,
                                             head_dim=8).to_dict(), attention_impl="xla")
    graphdef, params = nnx.split(models.abstract_model(cfg))
    b = 2

    def temp_bytes(t, chunk):
        def loss(p, ids, start):
            out = scoring.response_stats(nnx.merge(graphdef, p), ids, jnp.ones_like(ids), start,
                                         t, chunk=chunk)
            return out["logp"].sum()

        ids = jax.ShapeDtypeStruct((b, t + 32), jnp.int32)
        start = jax.ShapeDtypeStruct((b,), jnp.int32)
        compiled = jax.jit(jax.grad(loss)).lower(params, ids, start).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_growth = b * (512 - 128) * cfg.vocab_size * 4          # 467 MB
    chunked_growth = temp_bytes(512, 16) - temp_bytes(128, 16)
    unchunked_growth = temp_bytes(512, 512) - temp_bytes(128, 128)
    # What remains (~29 MB) is the model's own O(S^2) attention and O(S*d) activations.
    assert chunked_growth < 0.1 * logits_growth, (chunked_growth, logits_growth)
    assert unchunked_growth > logits_growth  # the measurement can see a full [B, T, V]
