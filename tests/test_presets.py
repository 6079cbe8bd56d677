"""Full-size presets build abstractly (no memory) with the published parameter counts."""

import pytest

from rlcsd_jax import models

# docs/models.md §2: computed from the shape table, matching published totals.
PUBLISHED = {
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "olmo3-7b-think": 7_298_011_136,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts(name):
    assert models.num_params(models.get_preset(name)) == PUBLISHED[name]


def test_other_presets_in_published_range():
    # Qwen3-4B 4.02B, Qwen3-8B 8.19B, Olmo-3-32B 32.23B (model cards).
    assert round(models.num_params(models.get_preset("qwen3-4b")) / 1e9, 2) == 4.02
    assert round(models.num_params(models.get_preset("qwen3-8b")) / 1e9, 2) == 8.19
    assert round(models.num_params(models.get_preset("olmo3-32b-think")) / 1e9, 2) == 32.23


def test_preset_configs():
    olmo = models.get_preset("olmo3-7b-think")
    assert olmo.layer_types[:4] == ("sliding_attention",) * 3 + ("full_attention",)
    assert olmo.vocab_size == 100278 and not olmo.tie_word_embeddings
    assert models.get_preset("qwen3-0.6b").head_dim == 128
    assert not models.get_preset("qwen3-8b").tie_word_embeddings
    with pytest.raises(ValueError, match="unknown model preset"):
        models.get_preset("qwen3-3b")


def test_hf_config_round_trip():
    for name in models.PRESETS:
        cfg = models.get_preset(name)
        again = models.from_hf_config(models.to_hf_config(cfg))
        assert again.replace(hf_extra="{}") == cfg.replace(hf_extra="{}"), name
