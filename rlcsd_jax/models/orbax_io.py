"""Converted-checkpoint folders: orbax params + HF config.json + tokenizer files.

Layout of a converted folder (what `python -m rlcsd_jax.convert` writes):
    params/            orbax StandardCheckpointer tree of the model's parameters
    config.json        the source HF config.json, verbatim
    tokenizer*.json, generation_config.json, chat_template.jinja, …   copied alongside
"""

from __future__ import annotations

import os
import shutil

import jax
from flax import nnx

from rlcsd_jax.distributed import sharding as sharding_lib
from rlcsd_jax.models.config import from_hf_config
from rlcsd_jax.models.decoder import abstract_model
from rlcsd_jax.models.hf_io import CheckpointError, load_hf_config_dict

PARAMS_DIR = "params"
# Files copied next to the weights so the folder is self-contained for prompts / stop ids.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json")


def is_converted_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_DIR))


def copy_side_files(src: str, dst: str) -> list[str]:
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in SIDE_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def save_params(model: nnx.Module, out_dir: str) -> None:
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(out_dir, PARAMS_DIR))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
    checkpointer.wait_until_finished()


def restore_params(path: str, abstract_params: nnx.State, shardings=None) -> dict:
    """Restore a pure param dict, placing each array with `shardings` (pure dict) if given.

    A tree or shape mismatch raises CheckpointError naming the paths and shapes.
    """
    import orbax.checkpoint as ocp

    target = nnx.to_pure_dict(abstract_params)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=default),
                              target)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              target, shardings)
    checkpointer = ocp.StandardCheckpointer()
    saved = checkpointer.metadata(os.path.abspath(path))
    saved_tree = getattr(saved, "item_metadata", saved)
    saved_tree = getattr(saved_tree, "tree", saved_tree)
    _check_compatible(path, saved_tree, target)
    return checkpointer.restore(os.path.abspath(path), target)


def _check_compatible(path, saved, target) -> None:
    flat_saved = {jax.tree_util.keystr(k): v for k, v in
                  jax.tree_util.tree_flatten_with_path(saved)[0]}
    flat_target = {jax.tree_util.keystr(k): v for k, v in
                   jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = [f"{k}: missing in checkpoint" for k in flat_target if k not in flat_saved]
    problems += [f"{k}: in checkpoint but not in model" for k in flat_saved if k not in flat_target]
    for k in flat_target.keys() & flat_saved.keys():
        s_shape = tuple(getattr(flat_saved[k], "shape", ()))
        if s_shape != tuple(flat_target[k].shape):
            problems.append(f"{k}: checkpoint shape {s_shape}, model expects "
                            f"{tuple(flat_target[k].shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model config:\n  "
                              + "\n  ".join(sorted(problems)[:20]))


def load_converted(path: str, dtype: str = "float32", param_dtype: str = "float32", mesh=None,
                   rules=None, **config_overrides):
    """Model from a converted folder (see module docstring)."""
    if not is_converted_dir(path):
        raise CheckpointError(f"{path} is not a converted checkpoint (no {PARAMS_DIR}/ folder)")
    cfg = from_hf_config(load_hf_config_dict(path), dtype=dtype, param_dtype=param_dtype,
                         **config_overrides)
    graphdef, abstract_params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    shardings = None
    if mesh is not None:
        shardings = nnx.to_pure_dict(sharding_lib.param_shardings(abstract_params, mesh, rules))
    pure = restore_params(os.path.join(path, PARAMS_DIR), abstract_params, shardings)
    nnx.replace_by_pure_dict(abstract_params, pure)
    return nnx.merge(graphdef, abstract_params, rest)
