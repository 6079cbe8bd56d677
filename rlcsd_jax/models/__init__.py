"""Qwen3 and Olmo-3 causal LMs in Flax NNX, presets, and HF checkpoint conversion.

    model = models.load_pretrained(hf_dir, dtype="float32")      # HF folder -> CausalLM
    logits = model(input_ids, attention_mask=mask)               # [B,S] -> [B,S,V]
    models.save_pretrained(model, out_dir)                       # CausalLM -> HF folder
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from rlcsd_jax.distributed import sharding as sharding_lib
from rlcsd_jax.models import olmo3, qwen3
from rlcsd_jax.models.config import (FULL, SLIDING, ModelConfig, RopeConfig, from_hf_config,
                                     to_hf_config)
from rlcsd_jax.models.decoder import (REMAT_POLICIES, CausalLM, KVCache, abstract_model,
                                      positions_from_mask)
from rlcsd_jax.models.hf_io import (CheckpointError, SafetensorsReader, config_for,
                                    load_hf_config_dict, read_params, save_pretrained)

PRESETS: dict[str, ModelConfig] = {**qwen3.PRESETS, **olmo3.PRESETS}

__all__ = ["CausalLM", "CheckpointError", "FULL", "KVCache", "ModelConfig", "PRESETS",
           "REMAT_POLICIES", "RopeConfig", "SLIDING", "abstract_model", "build", "from_hf_config",
           "get_preset", "load", "load_hf_config_dict", "load_pretrained", "num_params",
           "positions_from_mask", "save_pretrained", "to_hf_config"]


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def build(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    """A randomly initialised model (tiny demos, tests, benchmarks).

    The initialisation runs as one compiled program instead of one dispatch per parameter.
    """
    graphdef, _ = nnx.split(abstract_model(cfg))
    state = jax.jit(lambda: nnx.split(CausalLM(cfg, rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, state)


def num_params(model_or_cfg) -> int:
    model = abstract_model(model_or_cfg) if isinstance(model_or_cfg, ModelConfig) else model_or_cfg
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def load_pretrained(hf_dir: str, dtype: str = "float32", param_dtype: str = "float32",
                    mesh=None, rules=None, **config_overrides) -> CausalLM:
    """Build a model from an HF folder (config.json + safetensors, single or sharded).

    dtype is the compute dtype, param_dtype the stored parameter dtype.  With a mesh every
    parameter is placed directly with its rule-table sharding while streaming.
    """
    reader = SafetensorsReader(hf_dir)
    cfg = config_for(hf_dir, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    graphdef, abstract_params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    shardings = None
    if mesh is not None:
        shardings = nnx.to_pure_dict(sharding_lib.param_shardings(abstract_params, mesh, rules))
    pure = read_params(reader, cfg, nnx.to_pure_dict(abstract_params), shardings)
    nnx.replace_by_pure_dict(abstract_params, pure)
    return nnx.merge(graphdef, abstract_params, rest)


def load(path: str, dtype: str = "float32", param_dtype: str = "float32", mesh=None, rules=None,
         **config_overrides) -> CausalLM:
    """Load either a converted folder (orbax `params/`) or an HF folder."""
    from rlcsd_jax.models import orbax_io

    loader = orbax_io.load_converted if orbax_io.is_converted_dir(path) else load_pretrained
    return loader(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules,
                  **config_overrides)
