"""Scoring responses over cached shared prefixes equals scoring the whole rows (fp32, 1e-5):
log-probs, top-k ids and log-probs, log-probs at given ids and entropies, for Qwen3 and Olmo-3
(a sliding window crossed by the response), with prefixes of different lengths, several rows per
prefix and two device blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import olmo3_config, qwen3_config
from rlcsd_jax import models, scoring, scoring_prefix, teacher_batch

TOL = dict(rtol=1e-5, atol=1e-5)


def _model(arch):
    hf = qwen3_config() if arch == "qwen3" else olmo3_config(max_position_embeddings=256)
    cfg = models.from_hf_config(hf.to_dict(), attention_impl="blockwise")
    return models.build(cfg, seed=3)


@pytest.mark.parametrize("arch", ["qwen3", "olmo3"])
def test_continuations_over_shared_prefixes_equal_full_rows(arch):
    model = _model(arch)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    # Two device blocks of 2 prefixes; 6 rows, each using a prefix of its own block.
    prefixes = [rng.integers(3, 128, n).tolist() for n in (30, 9, 17, 41)]
    rows = [(0, 12), (0, 25), (1, 7), (2, 20), (3, 31), (3, 5)]       # (prefix, response length)
    responses = [rng.integers(3, 128, n).tolist() for _, n in rows]
    width, t = 48, 32
    pre_ids = np.zeros((4, width), np.int32)
    pre_mask = np.zeros((4, width), np.int32)
    for i, p in enumerate(prefixes):                                   # left padded
        pre_ids[i, width - len(p):], pre_mask[i, width - len(p):] = p, 1
    ids = np.zeros((6, t), np.int32)
    mask = np.zeros((6, t), np.int32)
    for i, r in enumerate(responses):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    local_index = np.asarray([0, 0, 1, 0, 1, 1], np.int32)             # rows 0-2 block 0
    at_ids = jnp.asarray(rng.integers(0, 128, (6, t, 3)), jnp.int32)

    cache = scoring_prefix.prefix_kv(graphdef, params, pre_ids, pre_mask)
    got = scoring_prefix.continuation_stats(graphdef, params, cache, local_index, ids, mask,
                                            at_ids, shards=2, top_k=4, entropy=True)

    full_ids, full_mask, start = teacher_batch.pack_rows(
        [prefixes[p] for p, _ in rows], responses, seq_len=width + t)
    ref = scoring.response_stats(model, jnp.asarray(full_ids), jnp.asarray(full_mask),
                                 jnp.asarray(start), t, top_k=4, at_ids=at_ids, entropy=True)
    live = mask[..., None] > 0
    for key in ("logp", "entropy", "topk_logp", "at_ids_logp", "topk_ids"):
        a, b = np.asarray(got[key]), np.asarray(ref[key])
        m = live if a.ndim == 3 else live[..., 0]
        np.testing.assert_allclose(np.where(m, a, 0), np.where(m, b, 0), **TOL, err_msg=key)
