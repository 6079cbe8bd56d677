"""Convert between HF checkpoints and converted (orbax) folders.

    python -m rlcsd_jax.convert --hf_dir /path/to/Qwen3-1.7B --out /path/to/qwen3_1p7b_jax
    python -m rlcsd_jax.convert --to_hf --src /path/to/qwen3_1p7b_jax --out /path/to/hf_export

HF -> orbax keeps the parameters in `--param_dtype` (default: float32 master weights, matching the
trainer); orbax -> HF writes `--dtype` (default: the stored dtype, so a round trip in fp32 is bit
exact).  Tokenizer and generation files travel with the weights.
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
    p.add_argument("--src", help="converted folder to export (with --to_hf)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--to_hf", action="store_true", help="export a converted folder back to HF")
    p.add_argument("--param_dtype", default="float32", help="stored dtype for HF -> orbax")
    p.add_argument("--dtype", default=None, help="tensor dtype for --to_hf (default: as stored)")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size")
    args = p.parse_args(argv)
    if args.to_hf:
        if not args.src:
            p.error("--to_hf needs --src (a converted folder)")
        orbax_to_hf(args.src, args.out, args.dtype, int(args.max_shard_gb * 2**30))
    else:
        if not args.hf_dir:
            p.error("--hf_dir is required (or --to_hf --src …)")
        hf_to_orbax(args.hf_dir, args.out, args.param_dtype)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
