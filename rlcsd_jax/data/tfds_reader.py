"""Reading TFDS datasets from a local ``data_dir`` (never downloading), and building the K&K one.

TensorFlow Datasets is imported inside the functions: it pulls in TensorFlow, which takes
seconds to import and is not needed by anything else in the data layer.  Both are the optional
`[tfds]` extra (`pip install 'rlcsd_jax[tfds]'`).
"""

from __future__ import annotations

import os
from typing import Mapping

from rlcsd_jax.data.readers import mapped_record
from rlcsd_jax.data.records import Record

def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"TFDS datasets need the optional extra: pip install "
                          f"'rlcsd_jax[tfds]' ({e})") from e
    return tfds


# The K&K builder's features map one-to-one onto Record fields.
KK_FIELD_MAP = {
    "problem": "problem",
    "ground_truth": "ground_truth",
    "solution": "solution",
    "data_source": "data_source",
    "index": "index",
}


def build_kk_tfds(data_dir: str, config: str = "kk_4to8", **overrides) -> str:
    """Generates and prepares the K&K TFDS dataset ``knights_knaves/<config>`` in ``data_dir``.

    ``overrides`` (``train_size``, ``test_size``, ``seed``, ``min_people``, ``max_people``) build a
    variant of ``config`` with those values, named after them (``kk_4to8-test_size5-train_size6``)
    because TFDS forbids reusing a config name — handy for tiny tests.  Returns the dataset name
    (``knights_knaves/<config name>``) to pass to ``read_tfds``.
    """
    import dataclasses

    tfds = _tfds()

    from rlcsd_jax.data.knights_knaves import tfds_builder

    configs = {c.name: c for c in tfds_builder.KnightsKnaves.BUILDER_CONFIGS}
    if config not in configs:
        raise ValueError(f"unknown K&K config {config!r}; allowed: {sorted(configs)}")
    builder_config = configs[config]
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(tfds_builder.KKConfig)}
        if unknown:
            raise ValueError(f"unknown K&K config fields {sorted(unknown)}")
        variant = "-".join([config] + [f"{k}{v}" for k, v in sorted(overrides.items())])
        builder_config = dataclasses.replace(builder_config, name=variant, **overrides)
    builder = tfds_builder.KnightsKnaves(config=builder_config, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return f"{builder.name}/{builder_config.name}"


def _builder_dir(name: str, data_dir: str) -> str:
    """``data_dir/dataset/config/version`` for ``dataset[/config][:version]`` (newest version if
    none is given)."""
    base, _, version = name.partition(":")
    folder = os.path.join(data_dir, *base.split("/"))
    if not version:
        candidates = sorted(
            (
                d
                for d in (os.listdir(folder) if os.path.isdir(folder) else [])
                if os.path.isfile(os.path.join(folder, d, "dataset_info.json"))
            ),
            key=lambda d: tuple(int(p) if p.isdigit() else 0 for p in d.split(".")),
        )
        if not candidates:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {data_dir} (no {folder}/<version>/"
                "dataset_info.json); prepare it first (for K&K: rlcsd_jax.data.build_kk_tfds) — "
                "read_tfds never downloads"
            )
        version = candidates[-1]
    return os.path.join(folder, version)


def read_tfds(
    name: str,
    split: str,
    data_dir: str,
    *,
    field_map: Mapping[str, str] | None = None,
    data_source: str | None = None,
) -> list[Record]:
    """Records of a prepared TFDS dataset ``name`` (``dataset/config[:version]``) in ``data_dir``.

    ``field_map`` maps record fields to (dotted) feature keys; the K&K builder's mapping is the
    default.  Raises FileNotFoundError if the dataset is not prepared there (nothing is fetched).
    """
    tfds = _tfds()


    # Read from the prepared files alone: works for any dataset, needs none of its builder code.
    builder = tfds.builder_from_directory(_builder_dir(name, data_dir))
    if split not in builder.info.splits:
        raise ValueError(
            f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}"
        )
    field_map = dict(KK_FIELD_MAP if field_map is None else field_map)
    where_prefix = f"{os.path.join(data_dir, name)} [{split}]"
    records = []
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    for row_number, example in enumerate(tfds.as_numpy(dataset)):
        records.append(
            mapped_record(
                example,
                field_map,
                f"{where_prefix}: row {row_number}",
                row_number,
                data_source=data_source,
            )
        )
    return records
