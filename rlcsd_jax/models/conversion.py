"""Whole-checkpoint conversion between HF folders and converted (orbax) folders.

HF -> orbax keeps the parameters in `param_dtype` (default float32 master weights, as the trainer
keeps them); orbax -> HF writes `dtype` (default: the stored dtype, so an fp32 round trip is bit
exact).  Tokenizer and generation files travel with the weights (`orbax_io.SIDE_FILES`).
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from rlcsd_jax import models
from rlcsd_jax.models import orbax_io


def hf_to_orbax(hf_dir: str, out: str, param_dtype: str = "float32") -> None:
    model = models.load_pretrained(hf_dir, dtype=param_dtype, param_dtype=param_dtype)
    orbax_io.save_params(model, out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(models.load_hf_config_dict(hf_dir), f, indent=2)
    orbax_io.copy_side_files(hf_dir, out)


def orbax_to_hf(src: str, out: str, dtype: str | None = None,
                max_shard_bytes: int = 5 * 2**30) -> None:
    hf_config = models.load_hf_config_dict(src)
    stored = stored_param_dtype(src)
    model = orbax_io.load_converted(src, dtype=stored, param_dtype=stored)
    models.save_pretrained(model, out, hf_config=hf_config, dtype=dtype,
                           max_shard_bytes=max_shard_bytes)
    orbax_io.copy_side_files(src, out)


def stored_param_dtype(src: str) -> str:
    """The dtype the converted folder `src` stores its parameters in."""
    meta = ocp.StandardCheckpointer().metadata(os.path.abspath(os.path.join(src, "params")))
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    leaves = jax.tree.leaves(tree)
    return str(leaves[0].dtype) if leaves else "float32"
