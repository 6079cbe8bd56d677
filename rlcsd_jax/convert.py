"""Convert between HF checkpoints, converted (orbax) folders and training runs.

    python -m rlcsd_jax.convert --hf_dir /path/to/Qwen3-1.7B --out /path/to/qwen3_1p7b_jax
    python -m rlcsd_jax.convert --to_hf --src /path/to/qwen3_1p7b_jax --out /path/to/hf_export
    python -m rlcsd_jax.convert --to_hf --src WORKDIR [--step N] --out /path/to/hf_export

HF -> orbax keeps the parameters in `--param_dtype` (default: float32 master weights, matching the
trainer); -> HF writes `--dtype` (default: the stored dtype, so a round trip in fp32 is bit
exact).  Tokenizer and generation files travel with the weights.

`--src WORKDIR` (a training workdir, local or gs://, its `checkpoints/` folder or one step folder)
exports the policy weights of the latest checkpoint (or `--step N`) — verl's "model merger".
The architecture and tokenizer come from the run's config stored in the checkpoint: the
`model.checkpoint` folder's config.json and tokenizer files (`--model_dir` names a local copy
when that folder is not on this machine), or, for a randomly initialised `model.preset`, the
preset with the checkpoint's vocabulary and the run's tokenizer (WORKDIR/tokenizer for the tiny
demo).  Only the `params` of the train state are read (not the optimizer state or teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def hf_to_orbax(hf_dir: str, out: str, param_dtype: str = "float32") -> None:
    from rlcsd_jax import models
    from rlcsd_jax.models import orbax_io

    model = models.load_pretrained(hf_dir, dtype=param_dtype, param_dtype=param_dtype)
    orbax_io.save_params(model, out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(models.load_hf_config_dict(hf_dir), f, indent=2)
    orbax_io.copy_side_files(hf_dir, out)


def orbax_to_hf(src: str, out: str, dtype: str | None = None,
                max_shard_bytes: int = 5 * 2**30) -> None:
    from rlcsd_jax import models
    from rlcsd_jax.models import orbax_io

    hf_config = models.load_hf_config_dict(src)
    stored = _stored_param_dtype(src)
    model = orbax_io.load_converted(src, dtype=stored, param_dtype=stored)
    models.save_pretrained(model, out, hf_config=hf_config, dtype=dtype,
                           max_shard_bytes=max_shard_bytes)
    orbax_io.copy_side_files(src, out)


def _pure(tree):
    """An orbax-restored nnx state ({..., "weight": {"value": array}}) as a pure dict."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _pure(v) for k, v in tree.items()}
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
    from rlcsd_jax.data import storage
    from rlcsd_jax.models import orbax_io

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
    import jax
    from flax import nnx

    from rlcsd_jax import models

    from rlcsd_jax.trainer import checkpoint_lookup as lookup
    from rlcsd_jax.data import storage
    target = lookup.resolve_checkpoint(src, step)
    if target.kind != "train_state":
        raise ValueError(f"{src} is a model folder, not a training run")
    step = lookup.pick_step(target.path, target.step)
    run = lookup.saved_config(target.path, step)
    if run is None:
        raise ValueError(f"{target.path}/{step} holds no readable run config (host state)")
    model_cfg = run.get("model", {})
    params = _pure(lookup.restore_subtree(target.path, step, "params"))
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


def _stored_param_dtype(src: str) -> str:
    import orbax.checkpoint as ocp
    import jax

    meta = ocp.StandardCheckpointer().metadata(os.path.abspath(os.path.join(src, "params")))
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    leaves = jax.tree.leaves(tree)
    return str(leaves[0].dtype) if leaves else "float32"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlcsd_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_dir", help="HF folder (config.json + *.safetensors) to convert")
    p.add_argument("--src", help="with --to_hf: a converted folder, or a training workdir / "
                   "its checkpoints/ folder / one step folder (local or gs://)")
    p.add_argument("--step", type=int, default=None,
                   help="with --src WORKDIR: the checkpoint step (default: the latest)")
    p.add_argument("--model_dir", default=None,
                   help="with --src WORKDIR: a local copy of the run's model.checkpoint folder "
                        "(config.json + tokenizer files) when that path is not on this machine")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--to_hf", action="store_true",
                   help="export a converted folder or a training run's policy weights to HF")
    p.add_argument("--param_dtype", default="float32", help="stored dtype for HF -> orbax")
    p.add_argument("--dtype", default=None, help="tensor dtype for --to_hf (default: as stored)")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size")
    args = p.parse_args(argv)
    if args.to_hf:
        if not args.src:
            p.error("--to_hf needs --src (a converted folder or a training workdir)")
        from rlcsd_jax.models import orbax_io

        shard = int(args.max_shard_gb * 2**30)
        if orbax_io.is_converted_dir(args.src) and args.step is None:
            orbax_to_hf(args.src, args.out, args.dtype, shard)
        else:
            try:
                step = workdir_to_hf(args.src, args.out, args.step, args.dtype, args.model_dir,
                                     shard)
            except (FileNotFoundError, ValueError, KeyError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"exported the policy weights of step {step}")
    else:
        if not args.hf_dir:
            p.error("--hf_dir is required (or --to_hf --src …)")
        hf_to_orbax(args.hf_dir, args.out, args.param_dtype)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
