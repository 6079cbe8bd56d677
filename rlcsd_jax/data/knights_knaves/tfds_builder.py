"""A TFDS builder for generated Knights & Knaves sets (imports TensorFlow Datasets: load lazily).

Configs and splits mirror the reference's K&K files (algorithm.md §5, §7):
  kk_4to8   train (4–8 people, 1000 per size) and test (100 per size = 500; data source
            ``kk_4to8_test``)
  kk_3to7   the same for 3–7 people
  kk_8, kk_9, kk_10, kk_11   test only, 100 puzzles each (out-of-distribution evaluation)
Each example has the same content as ``readers.kk_record`` for its data source and index, so a
TFDS copy and the on-the-fly generator agree.  Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from rlcsd_jax.data.readers import kk_people_count, kk_record


@dataclasses.dataclass
class KKConfig(tfds.core.BuilderConfig):
    """People range and split sizes; ``train_size = 0`` means a test-only set."""

    min_people: int = 4
    max_people: int = 8
    train_size: int = 0
    test_size: int = 100
    seed: int = 0


def _configs() -> list[KKConfig]:
    configs = [
        KKConfig(
            name="kk_4to8",
            min_people=4,
            max_people=8,
            train_size=5000,
            test_size=500,
            description="4–8 people: the logic training set and its in-distribution test",
        ),
        KKConfig(
            name="kk_3to7",
            min_people=3,
            max_people=7,
            train_size=5000,
            test_size=500,
            description="3–7 people (Logic-RL's range)",
        ),
    ]
    for n in (8, 9, 10, 11):
        configs.append(
            KKConfig(
                name=f"kk_{n}",
                min_people=n,
                max_people=n,
                test_size=100,
                description=f"{n} people, test only",
            )
        )
    return configs


class KnightsKnaves(tfds.core.GeneratorBasedBuilder):
    """Generated Knights & Knaves puzzles with a unique solution, answer and reasoning."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = _configs()

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "problem": tfds.features.Text(),
                    "ground_truth": tfds.features.Text(),
                    "solution": tfds.features.Text(),
                    "data_source": tfds.features.Text(),
                    "index": tfds.features.Scalar(dtype=np.int64),
                    "n_people": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            supervised_keys=None,
            # Keep generation order on disk, so the TFDS copy reads back in index order.
            disable_shuffling=True,
            homepage="https://arxiv.org/abs/2502.14768",
        )

    def _data_source(self, split: str) -> str:
        config = self.builder_config
        if config.min_people == config.max_people:
            return f"kk_{config.min_people}"
        base = f"kk_{config.min_people}to{config.max_people}"
        return base if split == "train" else f"{base}_test"

    def _split_generators(self, dl_manager):
        del dl_manager  # generated locally, nothing to download
        config = self.builder_config
        splits = {}
        if config.train_size:
            splits["train"] = self._generate_examples("train", config.train_size)
        if config.test_size:
            splits["test"] = self._generate_examples("test", config.test_size)
        return splits

    def _generate_examples(self, split: str, size: int):
        source = self._data_source(split)
        for index in range(size):
            record = kk_record(source, index, seed=self.builder_config.seed)
            yield (
                index,
                {
                    "problem": record.problem,
                    "ground_truth": record.ground_truth,
                    "solution": record.solution,
                    "data_source": record.data_source,
                    "index": index,
                    "n_people": kk_people_count(source, index),
                },
            )
