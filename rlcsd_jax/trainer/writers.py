"""Metric writers behind clu's `MetricWriter` interface: TensorBoard without TensorFlow, and
Weights & Biases.

* `metric_writers()` imports `clu.metric_writers` (interface, AsyncWriter, MultiWriter, ...) and
  `clu_periodic_actions()` clu's ReportProgress.  Why a wrapper: clu 0.0.12 imports its
  TensorFlow SummaryWriter in the package `__init__`, so without TensorFlow (now the optional
  `[tfds]` extra) nothing of clu's metric writers could be imported.  A lazy stand-in takes
  that one module's place; it imports TensorFlow only when clu's own SummaryWriter is made.
* `TensorBoardWriter` writes event files with tensorboardX (no TensorFlow).  For a `gs://`
  logdir the events go to a local scratch folder and are uploaded by `storage.DirMirror` on
  `flush()` (the logger flushes at most every `sync_secs` and at every checkpoint).
* `WandbWriter` (`config.log.wandb=True`, extra `[wandb]`): `wandb.init(..., id=RUN_ID,
  resume="allow")`, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import importlib
import logging
import math
import shutil
import sys
import tempfile
import types
from collections.abc import Mapping
from typing import Any

from rlcsd_jax.data import storage

log = logging.getLogger(__name__)

_CLU_TF_MODULE = "clu.metric_writers.summary_writer"


def _lazy_tf_summary_writer_module() -> types.ModuleType:
    module = types.ModuleType(_CLU_TF_MODULE)
    module.__doc__ = "rlcsd_jax stand-in: imports clu's TensorFlow SummaryWriter when used."

    class SummaryWriter:  # noqa: D401 - a factory with the real class's name
        """clu's TensorFlow SummaryWriter, imported (with TensorFlow) on first use."""

        def __new__(cls, *args, **kwargs):
            try:
                real = importlib.import_module("clu.metric_writers.tf.summary_writer")
            except ImportError as e:
                raise ImportError(
                    "clu's SummaryWriter needs TensorFlow (pip install 'rlcsd_jax[tfds]'); "
                    "rlcsd_jax.trainer.writers.TensorBoardWriter writes TensorBoard events without "
                    f"it ({e})") from e
            return real.SummaryWriter(*args, **kwargs)

    module.SummaryWriter = SummaryWriter
    return module


def metric_writers():
    """`clu.metric_writers`, importable with or without TensorFlow (see the module doc)."""
    if "clu.metric_writers" not in sys.modules:
        sys.modules.setdefault(_CLU_TF_MODULE, _lazy_tf_summary_writer_module())
    from clu import metric_writers as mw

    return mw


def clu_periodic_actions():
    metric_writers()
    from clu import periodic_actions

    return periodic_actions


def _base():
    return metric_writers().MetricWriter


class TensorBoardWriter(_base()):
    """clu MetricWriter writing TensorBoard event files through tensorboardX (no TensorFlow).

    Scalars, texts, images and histograms are written; hparams become one markdown text
    summary ("hparams") since every key is in `hparams.json` too.  Audio, video and raw
    summaries are not supported (warned once).
    """

    def __init__(self, logdir: str, *, flush_secs: float = 30.0):
        super().__init__()
        from tensorboardX import SummaryWriter

        self.logdir = str(logdir)
        self._mirror = None
        if storage.is_local(self.logdir):
            storage.makedirs(self.logdir)
            local = self.logdir
        else:
            local = tempfile.mkdtemp(prefix="rlcsd_tb_")
            self._mirror = storage.DirMirror(local, self.logdir)
        self._local = local
        # tensorboardX warns on every NaN; a NaN metric is logged as such (null in the JSONL).
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        self._writer = SummaryWriter(logdir=local, flush_secs=flush_secs)
        self._warned: set[str] = set()

    def _unsupported(self, what: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("TensorBoardWriter does not write %s; skipped", what)

    def write_summaries(self, step, values, metadata=None):
        self._unsupported("raw summaries")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, Any]):
        for key, value in images.items():
            self._writer.add_image(key, value, global_step=int(step), dataformats="HWC")

    def write_videos(self, step, videos):
        self._unsupported("videos")

    def write_audios(self, step, audios, *, sample_rate):
        self._unsupported("audio")

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=int(step))

    def write_histograms(self, step, arrays, num_buckets=None):
        for key, value in arrays.items():
            self._writer.add_histogram(key, value, global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]):
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(hparams.items()))
        self._writer.add_text("hparams", "| key | value |\n|---|---|\n" + rows, global_step=0)

    def flush(self):
        self._writer.flush()
        if self._mirror is not None:
            self._mirror.sync()

    def close(self):
        self._writer.close()
        if self._mirror is not None:
            self._mirror.sync()
            shutil.rmtree(self._local, ignore_errors=True)


class WandbWriter(_base()):
    """clu MetricWriter logging to Weights & Biases (`pip install 'rlcsd_jax[wandb]'`).

    `run_id` fixes the W&B run so a resumed training run appends to it; W&B drops a step that
    is not larger than the last one it has (a step re-run after a resume), with a warning.
    """

    def __init__(self, *, project: str, run_id: str, entity: str = "", name: str = "",
                 config: Mapping[str, Any] | None = None, local_dir: str | None = None):
        super().__init__()
        try:
            import wandb
        except ImportError as e:
            raise ImportError("config.log.wandb=True needs wandb: pip install "
                              f"'rlcsd_jax[wandb]' ({e})") from e
        self._wandb = wandb
        self._run = wandb.init(project=project or None, entity=entity or None,
                               name=name or None, id=run_id, resume="allow",
                               config=dict(config or {}), dir=local_dir)

    def write_summaries(self, step, values, metadata=None):
        self.write_scalars(step, values)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in scalars.items()}
        self._run.log({k: v for k, v in clean.items() if v is not None}, step=int(step))

    def write_images(self, step: int, images: Mapping[str, Any]):
        self._run.log({k: self._wandb.Image(v) for k, v in images.items()}, step=int(step))

    def write_videos(self, step, videos):
        self._run.log({k: self._wandb.Video(v) for k, v in videos.items()}, step=int(step))

    def write_audios(self, step, audios, *, sample_rate):
        self._run.log({k: self._wandb.Audio(v, sample_rate=sample_rate)
                       for k, v in audios.items()}, step=int(step))

    def write_texts(self, step: int, texts: Mapping[str, str]):
        self._run.log(dict(texts), step=int(step))

    def write_histograms(self, step, arrays, num_buckets=None):
        self._run.log({k: self._wandb.Histogram(v) for k, v in arrays.items()}, step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._run.config.update(dict(hparams), allow_val_change=True)

    def flush(self):
        pass

    def close(self):
        self._run.finish()
