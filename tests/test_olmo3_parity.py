"""Olmo-3 logits and per-layer hidden states against HF transformers (fp32, eager).

Tiny configs with an 8-layer 3:1 sliding/full pattern, window 16 and YaRN with original length
32, so sequences below / at / far beyond the window and the YaRN original length are all covered
(models.md §5.6: with T <= W sliding bugs are invisible).
"""

import numpy as np
import pytest

from helpers.hf_fixtures import hf_logits, olmo3_config, padded_batch, save_hf_model
from rlcsd_jax import models
from rlcsd_jax.models import hf_compat

LENGTHS = [160, 64, 16, 9]  # >= 4x window and >= 4x YaRN original, equal to and below window


def test_transformers_reference_version():
    import transformers

    hf_compat.check_olmo3_reference(transformers.__version__)
    for bad in ["5.0.0", "5.5.3", "5.12.1"]:
        with pytest.raises(RuntimeError, match="YaRN RoPE to every Olmo-3 layer"):
            hf_compat.check_olmo3_reference(bad)
    for good in ["4.57.1", "5.13.1", "5.24.0"]:
        hf_compat.check_olmo3_reference(good)


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def olmo_pair(request, tmp_path_factory):
    hf_compat.check_olmo3_reference()
    d = tmp_path_factory.mktemp(f"olmo3_kv{request.param}")
    hf = save_hf_model(olmo3_config(num_kv_heads=request.param, max_position_embeddings=256), d)
    return hf, d


def test_config_parsed(olmo_pair):
    _, d = olmo_pair
    cfg = models.config_for(str(d))
    assert cfg.layer_types.count("full_attention") == 2 and cfg.layer_types[3] == "full_attention"
    assert cfg.rope_full.rope_type == "yarn" and cfg.rope_sliding.rope_type == "default"
    assert cfg.sliding_window == 16 and not cfg.tie_word_embeddings


@pytest.mark.parametrize("impl", ["xla", "blockwise", "auto"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_fp32_logits_and_hidden_states_match_hf(olmo_pair, side, impl):
    hf, d = olmo_pair
    model = models.load_pretrained(str(d), dtype="float32", attention_impl=impl)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 128, size=n) for n in LENGTHS]
    width = max(LENGTHS)
    ids, mask = padded_batch(seqs, width, side)
    _, _, per_layer = model.hidden_states(ids, mask, return_all=True)
    logits = np.asarray(model(ids, attention_mask=mask))
    per_layer = np.asarray(per_layer)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ref, ref_hidden = hf_logits(hf, s[None], hidden=True)
        np.testing.assert_allclose(logits[i, sl], ref[0], atol=1e-4, rtol=0)
        # HF hidden_states: [embeddings, after layer 0, …]; the last one is after the final norm.
        for layer in range(model.config.num_layers - 1):
            np.testing.assert_allclose(per_layer[layer, i, sl], ref_hidden[layer + 1][0],
                                       atol=1e-4, rtol=0, err_msg=f"layer {layer}")


def test_sliding_window_mask_boundary():
    """W keys including the current one: query i sees i-W+1 .. i (HF sliding_window_overlay)."""
    import jax.numpy as jnp

    from rlcsd_jax.models import attention_impls

    pos, seg = jnp.arange(40)[None], jnp.ones((1, 40), jnp.int32)
    mask = np.asarray(attention_impls.visible(pos, pos, seg, seg, 16))[0]
    assert mask[20, 5] and mask[20, 20] and not mask[20, 4] and not mask[20, 21]
    assert mask.sum(-1).max() == 16


def test_sliding_receptive_field(olmo_pair):
    """With every layer sliding, token 0 reaches position p iff p <= L*(W-1): exact boundary."""
    _, d = olmo_pair
    cfg = models.config_for(str(d))
    model = models.load_pretrained(str(d), layer_types=("sliding_attention",) * cfg.num_layers)
    horizon = cfg.num_layers * (cfg.sliding_window - 1)
    ids = np.random.default_rng(3).integers(3, 128, size=(1, horizon + 10))
    changed = ids.copy()
    changed[0, 0] = 3 if ids[0, 0] != 3 else 4
    diff = np.abs(np.asarray(model(changed)) - np.asarray(model(ids))).max(-1)[0]
    assert diff[horizon] > 0
    assert diff[horizon + 1:].max() == 0
