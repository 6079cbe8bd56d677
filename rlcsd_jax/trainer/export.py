"""Export a training run's policy weights to an HF folder (verl's "model merger"):
`python -m rlcsd_jax.convert --to_hf --src WORKDIR [--step N] --out DIR`.

The architecture and tokenizer come from the run's config stored in the checkpoint: the
`model.checkpoint` folder's config.json and tokenizer files (`model_dir` names a local copy when
that folder is not on this machine), or, for a randomly initialised `model.preset`, the preset
with the checkpoint's vocabulary and the run's tokenizer (WORKDIR/tokenizer for the tiny demo).
Only the `params` of the train state are read (not the optimizer state or teacher).
"""

from __future__ import annotations

import json
import os
import sys

import jax
from flax import nnx

from rlcsd_jax import models
from rlcsd_jax.data import storage
from rlcsd_jax.models import orbax_io
from rlcsd_jax.trainer import checkpoint_lookup as lookup


def as_pure_dict(tree):
    """An orbax-restored nnx state ({..., "weight": {"value": array}}) as a pure dict."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: as_pure_dict(v) for k, v in tree.items()}
    return tree


def _match(pure: dict, abstract: dict, path: str = "") -> dict:
    """`pure` restricted to the model's parameters; a missing one or a shape mismatch raises."""
    out, problems = {}, []
    for key, want in abstract.items():
        where = f"{path}/{key}"
        if key not in pure:
            problems.append(f"{where}: not in the checkpoint")
        elif isinstance(want, dict):
            out[key] = _match(pure[key], want, where)
        elif tuple(pure[key].shape) != tuple(want.shape):
            problems.append(f"{where}: checkpoint {tuple(pure[key].shape)}, model "
                            f"{tuple(want.shape)}")
        else:
            out[key] = pure[key]
    if problems:
        raise ValueError("the checkpoint's params do not fit the run's model config:\n  "
                         + "\n  ".join(problems))
    return out


def _copy_side_files(src: str, out: str) -> list[str]:
    copied = []
    for name in orbax_io.SIDE_FILES:
        path = storage.join(src, name)
        if storage.exists(path):
            storage.write_bytes(os.path.join(out, name), storage.path(path).read_bytes())
            copied.append(name)
    return copied


def workdir_to_hf(src: str, out: str, step: int | None = None, dtype: str | None = None,
                  model_dir: str | None = None, max_shard_bytes: int = 5 * 2**30) -> int:
    """Export the policy weights of a training run's checkpoint to an HF folder (see the
    module docstring); returns the exported step."""
    target = lookup.resolve_checkpoint(src, step)
    if target.kind != "train_state":
        raise ValueError(f"{src} is a model folder, not a training run")
    step = lookup.pick_step(target.path, target.step)
    run = lookup.saved_config(target.path, step)
    if run is None:
        raise ValueError(f"{target.path}/{step} holds no readable run config (host state)")
    model_cfg = run.get("model", {})
    params = as_pure_dict(lookup.restore_subtree(target.path, step, "params"))
    stored = str(jax.tree.leaves(params)[0].dtype)
    kw = dict(dtype=stored, param_dtype=stored,
              scan_layers=bool(model_cfg.get("scan_layers", True)))
    source = model_dir or model_cfg.get("checkpoint") or ""
    if source:
        if not storage.exists(storage.join(source, "config.json")):
            raise FileNotFoundError(
                f"the run's model folder {source} (model.checkpoint) has no config.json here; "
                "pass --model_dir with a copy of it (config.json and tokenizer files)")
        hf_config = json.loads(storage.read_text(storage.join(source, "config.json")))
        mcfg = models.from_hf_config(hf_config, **kw)
        tokenizer_dir = run.get("tokenizer") or source
    else:
        vocab = params["embed_tokens"].shape[0]
        mcfg = models.get_preset(model_cfg.get("preset", ""), vocab_size=vocab, **kw)
        hf_config = None
        tokenizer_dir = run.get("tokenizer") or storage.join(target.workdir, "tokenizer")
    graphdef, abstract, rest = nnx.split(models.abstract_model(mcfg), nnx.Param, ...)
    nnx.replace_by_pure_dict(abstract, _match(params, nnx.to_pure_dict(abstract)))
    model = nnx.merge(graphdef, abstract, rest)
    models.save_pretrained(model, out, hf_config=hf_config, dtype=dtype,
                           max_shard_bytes=max_shard_bytes)
    copied = _copy_side_files(tokenizer_dir, out)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        print(f"warning: no tokenizer files in {tokenizer_dir}; add them to {out} by hand",
              file=sys.stderr)
    return step
