"""HF safetensors <-> JAX parameter conversion.

Layout rules (models.md §3): HF Linear weights are [out, in]; ours are [in..., out...] with heads
split out (q: [d, H, D], o: [H, D, d]), so every Linear is transposed and reshaped.  Per-layer HF
tensors are stacked on a leading [L] axis.  Tied checkpoints that still ship `lm_head.weight`
(Qwen3 0.6B/1.7B) ignore it (§5.3).

Loading streams tensor by tensor from (possibly sharded) safetensors via memory maps: the only
full host copy is the one stacked leaf being assembled, which is then placed on devices with its
target sharding before the next leaf is read.
"""

from __future__ import annotations

import glob
import json
import math
import os

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx
from safetensors import safe_open

from rlcsd_jax.models import olmo3, qwen3
from rlcsd_jax.models.config import ModelConfig, from_hf_config, to_hf_config

HF_LAYER_NAMES = {"qwen3": qwen3.HF_LAYER_NAMES, "olmo3": olmo3.HF_LAYER_NAMES}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names file, tensor and shapes."""


# ----------------------------------------------------------------------------------------------
# Name and layout mapping
# ----------------------------------------------------------------------------------------------


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _hf_names(cfg: ModelConfig, path: tuple) -> list[str]:
    """HF tensor names feeding one JAX leaf (one per layer for stacked leaves)."""
    if path[0] == "layers":
        local = HF_LAYER_NAMES[cfg.model_type][tuple(path[1:])]
        return [f"model.layers.{i}.{local}" for i in range(cfg.num_layers)]
    return [{("embed_tokens",): "model.embed_tokens.weight",
             ("norm", "weight"): "model.norm.weight",
             ("lm_head",): "lm_head.weight"}[tuple(path)]]


def _is_linear(path) -> bool:
    return path[-1].endswith("_proj") or path[-1] == "lm_head"


def _n_in_dims(path) -> int:
    return 2 if path[-1] == "o_proj" else 1


def hf_to_jax(path, tensor: np.ndarray, jax_shape) -> np.ndarray:
    if not _is_linear(path):
        return tensor.reshape(jax_shape)
    return np.ascontiguousarray(tensor.T).reshape(jax_shape)


def jax_to_hf(path, array: np.ndarray) -> np.ndarray:
    if not _is_linear(path):
        return array
    n_in = math.prod(array.shape[:_n_in_dims(path)])
    return np.ascontiguousarray(array.reshape(n_in, -1).T)


def expected_hf_shape(path, jax_shape) -> tuple:
    if not _is_linear(path):
        return tuple(jax_shape)
    n = _n_in_dims(path)
    return (math.prod(jax_shape[n:]), math.prod(jax_shape[:n]))


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class SafetensorsReader:
    """Tensor-by-tensor access to a single-file or sharded (index.json) safetensors checkpoint."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                self.weight_map = json.load(f)["weight_map"]
        else:
            files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
            if not files:
                pickles = glob.glob(os.path.join(hf_dir, "*.bin")) + glob.glob(
                    os.path.join(hf_dir, "*.pt"))
                if pickles:
                    raise CheckpointError(
                        f"{hf_dir} holds only PyTorch pickle weights ({os.path.basename(pickles[0])}"
                        "); they are never unpickled here. Re-save the model with "
                        "`model.save_pretrained(dir, safe_serialization=True)` to get safetensors.")
                raise CheckpointError(f"no *.safetensors file in {hf_dir}")
            self.weight_map = {}
            for fn in files:
                with safe_open(fn, framework="numpy") as f:
                    for k in f.keys():
                        self.weight_map[k] = os.path.basename(fn)
        self._handles = {}

    def keys(self):
        return self.weight_map.keys()

    def _handle(self, name):
        fn = self.weight_map[name]
        if fn not in self._handles:
            path = os.path.join(self.hf_dir, fn)
            if not os.path.exists(path):
                raise CheckpointError(f"{INDEX_FILE} maps {name} to missing file {path}")
            self._handles[fn] = safe_open(path, framework="numpy")
        return self._handles[fn]

    def shape(self, name) -> tuple:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name) -> np.ndarray:
        return self._handle(name).get_tensor(name)

    def file_of(self, name) -> str:
        return os.path.join(self.hf_dir, self.weight_map[name])


def read_params(reader: SafetensorsReader, cfg: ModelConfig, abstract_pure: dict,
                shardings: dict | None) -> dict:
    """Pure dict of device arrays matching `abstract_pure` (leaves: ShapeDtypeStruct-likes)."""
    out, used = {}, set()
    for path, leaf in _flatten(abstract_pure):
        names = _hf_names(cfg, path)
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        per_layer = shape[1:] if path[0] == "layers" else shape
        want = expected_hf_shape(path, per_layer)
        host = np.empty(shape, dtype)
        for i, name in enumerate(names):
            if name not in reader.weight_map:
                raise CheckpointError(f"checkpoint {reader.hf_dir} lacks tensor {name!r} "
                                      f"(expected shape {want})")
            found = reader.shape(name)
            if found != want:
                raise CheckpointError(f"tensor {name!r} in {reader.file_of(name)} has shape "
                                      f"{found}, expected {want} for config {cfg.model_type}")
            value = hf_to_jax(path, reader.get(name), per_layer).astype(dtype)
            if path[0] == "layers":
                host[i] = value
            else:
                host[...] = value
            used.add(name)
        sharding = _lookup(shardings, path) if shardings is not None else None
        _set(out, path, jax.device_put(host, sharding) if sharding is not None
             else jax.numpy.asarray(host))
        del host
    unexpected = sorted(set(reader.keys()) - used - (
        {"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if unexpected:
        raise CheckpointError(f"checkpoint {reader.hf_dir} has unexpected tensors not used by "
                              f"{cfg.model_type}: {unexpected[:10]}"
                              + (f" … ({len(unexpected)} total)" if len(unexpected) > 10 else ""))
    return out


def _lookup(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def hf_tensors(cfg: ModelConfig, pure: dict, dtype=None):
    """Yield (hf_name, numpy array) for every tensor of an HF checkpoint."""
    for path, leaf in _flatten(pure):
        host = np.asarray(jax.device_get(leaf))
        if dtype is not None:
            host = host.astype(np.dtype(dtype))
        names = _hf_names(cfg, path)
        for i, name in enumerate(names):
            yield name, jax_to_hf(path, host[i] if path[0] == "layers" else host)


def save_hf_tensors(tensors, out_dir: str, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write tensors as safetensors shards (+ index.json when more than one); returns files."""
    import safetensors.numpy as stn

    os.makedirs(out_dir, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, arr in tensors:
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    if current:
        shards.append(current)
    if len(shards) == 1:
        stn.save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    files, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        stn.save_file(shard, os.path.join(out_dir, fn), metadata={"format": "pt"})
        files.append(fn)
        for k, v in shard.items():
            weight_map[k] = fn
            total += v.nbytes
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def save_pretrained(model: nnx.Module, out_dir: str, hf_config: dict | None = None, dtype=None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Export a model to an HF folder (config.json + safetensors), loadable by transformers.

    dtype=None keeps the parameter dtype (fp32 master weights -> bit-exact round trip).
    hf_config: the original config.json dict to preserve verbatim (else generated).
    """
    cfg: ModelConfig = model.config
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    save_hf_tensors(hf_tensors(cfg, pure, dtype), out_dir, max_shard_bytes)
    hf = dict(hf_config) if hf_config is not None else to_hf_config(cfg)
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(cfg.param_dtype)
    hf["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16",
                         "float16": "float16"}[out_dtype.name]
    hf.pop("dtype", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def load_hf_config_dict(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{hf_dir} has no config.json")
    with open(path) as f:
        return json.load(f)


def config_for(hf_dir: str, **overrides) -> ModelConfig:
    return from_hf_config(load_hf_config_dict(hf_dir), **overrides)
