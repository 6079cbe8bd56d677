"""Convert between HF checkpoints, converted (orbax) folders and training runs
(`models.conversion`, `trainer.export`).

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
import sys


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
    from rlcsd_jax.models import conversion, orbax_io   # after parsing: --help stays fast
    from rlcsd_jax.trainer import export

    if args.to_hf:
        if not args.src:
            p.error("--to_hf needs --src (a converted folder or a training workdir)")
        shard = int(args.max_shard_gb * 2**30)
        if orbax_io.is_converted_dir(args.src) and args.step is None:
            conversion.orbax_to_hf(args.src, args.out, args.dtype, shard)
        else:
            try:
                step = export.workdir_to_hf(args.src, args.out, args.step, args.dtype, args.model_dir,
                                     shard)
            except (FileNotFoundError, ValueError, KeyError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"exported the policy weights of step {step}")
    else:
        if not args.hf_dir:
            p.error("--hf_dir is required (or --to_hf --src …)")
        conversion.hf_to_orbax(args.hf_dir, args.out, args.param_dtype)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
