"""Olmo-3-7B-Think with the reference hyper-parameters (algorithm.md §0, §4.0, §5).

    python -m rlcsd_jax.train --config=configs/olmo3_7b_think.py --workdir=gs://BUCKET/olmo3_7b_think_rlcsd
    python -m rlcsd_jax.train --config=configs/olmo3_7b_think.py:logic ...       # Knights & Knaves task

`model.checkpoint` is a converted folder (`python -m rlcsd_jax.convert`) or the HF download.
"""

from rlcsd_jax.trainer import train_config


def get_config(task: str = "math"):
    return train_config.reference_config(
        task=task, preset="olmo3-7b-think", checkpoint="~/checkpoints/olmo3_7b_think",
        math_train="data/verl/deepmath_filtered_level7_10/train.parquet")
