"""Model configuration: one frozen dataclass for every supported architecture.

`from_hf_config` reads a raw HF `config.json` dict (transformers 4.x `rope_scaling` +
`rope_theta`, or 5.x `rope_parameters`, flat or keyed by layer type) and never relies on HF class
defaults, which differ from the released checkpoints (models.md §5.8).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any
from rlcsd_jax.models.layers import yarn_default_attention_factor

SUPPORTED_MODEL_TYPES = ("qwen3", "olmo3")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE for one layer type.  `rope_type` is 'default' or 'yarn'."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position: int = 0
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    # One entry per layer: "full_attention" or "sliding_attention".
    layer_types: tuple[str, ...]
    rope_full: RopeConfig
    rope_sliding: RopeConfig | None = None
    sliding_window: int | None = None
    max_position_embeddings: int = 40960
    # Numerics / performance knobs (not part of the checkpoint).
    dtype: str = "float32"          # compute dtype
    param_dtype: str = "float32"    # master parameter dtype
    remat_policy: str = "none"      # see decoder.REMAT_POLICIES
    scan_layers: bool = True
    attention_impl: str = "auto"    # see models/attention_impls.py
    # Extra HF config.json keys kept verbatim for export (eos ids, torch_dtype, …), as a JSON
    # string so the config stays hashable (it is static data under jit).
    hf_extra: str = "{}"

    @property
    def pre_norm(self) -> bool:
        """Qwen3 normalises sublayer inputs; Olmo-3 normalises sublayer outputs (§1.3)."""
        return self.model_type == "qwen3"

    @property
    def qk_norm_per_head(self) -> bool:
        """Qwen3: QK-norm over D per head; Olmo-3: over the whole projection (§5.2)."""
        return self.model_type == "qwen3"

    @property
    def fp32_norm_and_rope(self) -> bool:
        """Olmo-3 multiplies norm weights and applies RoPE in fp32; Qwen3 in the compute dtype."""
        return self.model_type == "olmo3"

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_types

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _rope_from_dict(d: dict, default_theta: float) -> RopeConfig:
    rope_type = d.get("rope_type", d.get("type", "default"))
    theta = float(d.get("rope_theta", default_theta))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "yarn":
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, yarn)")

    factor = float(d["factor"])
    attention_factor = d.get("attention_factor")
    if attention_factor is None:
        attention_factor = yarn_default_attention_factor(factor)
    return RopeConfig(
        theta=theta, rope_type="yarn", factor=factor,
        original_max_position=int(d["original_max_position_embeddings"]),
        attention_factor=float(attention_factor), beta_fast=float(d.get("beta_fast") or 32),
        beta_slow=float(d.get("beta_slow") or 1), truncate=bool(d.get("truncate", True)))


def _parse_rope(hf: dict, model_type: str) -> tuple[RopeConfig, RopeConfig | None]:
    """(rope for full layers, rope for sliding layers)."""
    default_theta = float(hf.get("rope_theta", 1e6 if model_type == "qwen3" else 5e5))
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        full = _rope_from_dict(params.get(FULL, {}), default_theta)
        sliding = _rope_from_dict(params[SLIDING], default_theta) if SLIDING in params else None
        return full, sliding
    scaling = params if isinstance(params, dict) else hf.get("rope_scaling")
    full = _rope_from_dict(scaling or {}, default_theta)
    # transformers 4.57 / >= 5.13.1: Olmo-3 sliding layers use default RoPE, never YaRN (§5.1).
    return full, RopeConfig(theta=full.theta)


_EXPORT_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
                "hidden_act", "initializer_range", "attention_bias", "attention_dropout",
                "use_cache", "architectures", "max_window_layers", "use_sliding_window")


def from_hf_config(hf: dict | str | os.PathLike, **overrides) -> ModelConfig:
    """ModelConfig from a config.json dict or path (a folder or the file itself)."""
    if not isinstance(hf, dict):
        path = os.fspath(hf)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        n_layers = int(hf["num_hidden_layers"])
        n_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = int(hf.get("head_dim") or hidden // n_heads)
        layer_types = tuple(hf.get("layer_types") or [FULL] * n_layers)
        rope_full, rope_sliding = _parse_rope(hf, model_type)
        cfg = ModelConfig(
            model_type=model_type, vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]), num_layers=n_layers,
            num_heads=n_heads, num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=head_dim, rms_norm_eps=float(hf["rms_norm_eps"]),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            layer_types=layer_types, rope_full=rope_full,
            rope_sliding=rope_sliding if SLIDING in layer_types else None,
            sliding_window=(int(hf["sliding_window"]) if SLIDING in layer_types else None),
            max_position_embeddings=int(hf.get("max_position_embeddings", 40960)),
            hf_extra=json.dumps({k: hf[k] for k in _EXPORT_KEYS if k in hf}, sort_keys=True))
    except KeyError as e:
        raise ValueError(f"config.json lacks required key {e.args[0]!r}") from None
    if len(layer_types) != n_layers or set(layer_types) - {FULL, SLIDING}:
        raise ValueError(f"config.json layer_types must list {n_layers} entries of "
                         f"{FULL!r}/{SLIDING!r}, got {list(layer_types)}")
    return cfg.replace(**overrides)


def _rope_to_dict(r: RopeConfig) -> dict:
    d = {"rope_type": r.rope_type, "rope_theta": r.theta}
    if r.rope_type == "yarn":
        d.update(factor=r.factor, original_max_position_embeddings=r.original_max_position,
                 attention_factor=r.attention_factor, beta_fast=r.beta_fast,
                 beta_slow=r.beta_slow)
        if not r.truncate:
            d["truncate"] = False
    return d


def to_hf_config(cfg: ModelConfig) -> dict:
    """A transformers >= 5.13 config.json dict for `cfg`."""
    arch = {"qwen3": "Qwen3ForCausalLM", "olmo3": "Olmo3ForCausalLM"}[cfg.model_type]
    hf: dict[str, Any] = {"architectures": [arch], "model_type": cfg.model_type}
    hf.update(json.loads(cfg.hf_extra))
    hf.update(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, layer_types=list(cfg.layer_types),
        max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu",
        attention_bias=False, rope_theta=cfg.rope_full.theta)
    if cfg.has_sliding_layers:
        hf["sliding_window"] = cfg.sliding_window
        hf["rope_parameters"] = {FULL: _rope_to_dict(cfg.rope_full),
                                 SLIDING: _rope_to_dict(cfg.rope_sliding)}
    else:
        hf["rope_parameters"] = _rope_to_dict(cfg.rope_full)
    return hf
