"""Scoring responses packed in shared-prefix rows equals scoring the whole rows (fp32, 1e-5):
log-probs, top-k ids and log-probs, log-probs at given ids and entropies, for Qwen3 and Olmo-3
(a sliding window crossed by the responses, which sit farther from their prefix in the packed row
than in their own), with prefixes of different lengths, several rows per prefix, a prefix split
over two rows, and two device blocks."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.hf_fixtures import olmo3_config, qwen3_config
from rlcsd_jax import models, scoring
from rlcsd_jax.data import packing
from rlcsd_jax.trainer import shared_scoring as shared

TOL = dict(rtol=1e-5, atol=1e-5)


def _model(arch, impl="blockwise"):
    hf = qwen3_config() if arch == "qwen3" else olmo3_config(max_position_embeddings=256)
    cfg = models.from_hf_config(hf.to_dict(), attention_impl=impl)
    return models.build(cfg, seed=3)


@pytest.mark.parametrize("arch,impl", [("qwen3", "blockwise"), ("olmo3", "blockwise"),
                                       ("qwen3", "xla")])
def test_shared_prefix_rows_equal_full_rows(arch, impl):
    model = _model(arch, impl)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    prefixes = [tuple(rng.integers(3, 128, n).tolist()) for n in (30, 9, 17, 41)]
    spec = [(0, 12), (0, 25), (1, 7), (2, 20), (3, 31), (3, 5), (3, 44), (3, 50)]  # (prefix, n)
    rows = [shared.Row(i, 0, prefixes[p], tuple(rng.integers(3, 128, n).tolist()))
            for i, (p, n) in enumerate(spec)]
    # 2 blocks, rows of 128 tokens: prefix 3 with its four responses (171 tokens) is split;
    # 291 tokens in all take two calls, the second with an empty row.
    p = shared.plan(rows, shards=2, budget=96)
    assert p.width == 128 and len(p.calls) == 2
    assert sum(len(pc.rows) for c in p.calls for m in c.packed for pc in m) == len(rows)
    k = 3
    at_ids = {i: rng.integers(0, 128, (len(r.response), k)) for i, r in enumerate(rows)}
    out = shared.run(p, score_fn=lambda **a: scoring.shared_prefix_stats(
        graphdef, params, **a, top_k=4, entropy=True), put=lambda x: x,
        get=lambda x: {key: np.asarray(v) for key, v in x.items()}, pad_id=0,
        at_ids=lambda i: at_ids[i])

    t = max(len(r.response) for r in rows)
    at = np.zeros((len(rows), t, k), np.int32)
    for i, a in at_ids.items():
        at[i, :len(a)] = a
    full_ids, full_mask, start = packing.pack_rows(
        [list(r.prefix) for r in rows], [list(r.response) for r in rows], seq_len=128)
    ref = scoring.response_stats(model, jnp.asarray(full_ids), jnp.asarray(full_mask),
                                 jnp.asarray(start), t, top_k=4, at_ids=jnp.asarray(at),
                                 entropy=True)
    for i, r in enumerate(rows):
        n = len(r.response)
        for key in ("logp", "entropy", "topk_logp", "at_ids_logp", "topk_ids"):
            np.testing.assert_allclose(out[i][key], np.asarray(ref[key])[i, :n], **TOL,
                                       err_msg=f"row {i} {key}")


def test_plan_packs_pieces_and_counts_what_the_calls_compute():
    """First-fit decreasing: every response once, no packed row past the width, a prefix cut
    into pieces only when it does not fit whole, and tokens_computed = calls x blocks x width."""
    rng = np.random.default_rng(1)
    prefixes = [tuple(rng.integers(3, 99, n).tolist()) for n in (50, 20, 70)]
    rows = [shared.Row(i, 0, prefixes[i % 3], tuple(range(1, 1 + int(n))))
            for i, n in enumerate(rng.integers(5, 60, 14))]
    p = shared.plan(rows, shards=2, budget=256)
    seen = []
    for call in p.calls:
        assert len(call.packed) == 2
        for members in call.packed:
            assert sum(len(pc.prefix) + sum(len(rows[i].response) for i in pc.rows)
                       for pc in members) <= p.width
            seen += [i for pc in members for i in pc.rows]
    assert sorted(seen) == list(range(len(rows)))
    c = p.counters()
    assert c["tokens_computed"] == len(p.calls) * 2 * p.width
    assert c["tokens_useful"] == sum(map(len, prefixes)) + sum(len(r.response) for r in rows)
    with pytest.raises(ValueError, match="row 0 .*empty prefix"):
        shared.plan([shared.Row(0, 0, (), (1, 2))], shards=1, budget=64)


def test_row_width_never_exceeds_the_planners_largest():
    """The planner's largest shared program is at least as wide as any row the plan makes."""
    for budget in (512, 4096, 40960):
        for longest in (10, 400, 5000, 40960):
            for work in (1, 300, 5000, 40000, 10 ** 6):
                w = shared.row_width(longest, work, budget)
                assert longest <= w <= shared.widest_row(longest, budget)
