"""Qwen3-1.7B with the reference hyper-parameters (algorithm.md §0, §4.0, §5).

    python -m rlcsd_jax.train --config=configs/qwen3_1p7b.py --workdir=gs://BUCKET/qwen3_1p7b_rlcsd
    python -m rlcsd_jax.train --config=configs/qwen3_1p7b.py:logic ...       # Knights & Knaves task

`model.checkpoint` is a converted folder (`python -m rlcsd_jax.convert`) or the HF download.
"""

from rlcsd_jax.trainer import train_config


def get_config(task: str = "math"):
    return train_config.reference_config(
        task=task, preset="qwen3-1.7b", checkpoint="~/checkpoints/qwen3_1p7b",
        math_train="data/verl/deepmath_filtered_level5_7/train.parquet")
