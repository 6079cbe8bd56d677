"""Training metrics: TensorBoard, `metrics.jsonl`, optional W&B, a console progress line, hooks.

    logger = MetricsLogger(workdir, is_host0=jax.process_index() == 0, total_steps=500,
                           profile_steps=(10, 12), wandb={"project": "rlcsd_jax"})
    logger.write_hparams(config.to_dict())
    for step in range(1, 501):
        with logger.timed("sample"): ...
        logger.write(step, {"train/reward_mean": 0.4, ...})
        logger.on_step(step)            # clu ReportProgress (steps/s, ETA) + profiler window
    logger.close()

Files under `workdir`: `metrics.jsonl` (one JSON object per `write`: step, unix time, then the
scalars as floats, non-finite values as null; appended to on resume, so a re-run step appears
twice and readers keep the last), `tensorboard/` (event files, written by tensorboardX: no
TensorFlow), `hparams.json`, `profile/` (jax.profiler traces), `wandb_run_id` (with W&B, so a
resumed run continues the same W&B run).  Only process 0 writes anything; other processes'
loggers are no-ops.  The workdir may be `gs://...`: every file goes through
`rlcsd_jax.data.storage` (an object store cannot append, so metrics.jsonl and the event files are
uploaded whole at most every `sync_secs` and at every `flush()`, which the trainer calls after
each checkpoint save, and at `close()`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlcsd_jax.data import storage

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
WANDB_ID_NAME = "wandb_run_id"
# (metric key, console label, format) shown in the progress line when present.
HEADLINE = (("train/reward_mean", "reward", "{:.3f}"),
            ("train/response_length_mean", "len", "{:.0f}"),
            ("eval/avg", "acc", "{:.3f}"),
            ("train/loss", "loss", "{:.4g}"))


def format_duration(seconds: float) -> str:
    """4m10s / 1h02m / 35s."""
    seconds = max(0, round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) or (hasattr(v, "items") and callable(v.items)):
            out.update(_flatten(dict(v.items()), key + "."))
        else:
            out[key] = v
    return out


class MetricsLogger:
    """Scalars to TensorBoard + JSONL + console, and per-step hooks (progress, profiling).

    profile_steps=(start, stop): `on_step` is called after a step finishes; the trace starts
    after step `start` and stops after step `stop`, so it covers steps start+1 … stop.
    wandb: None, or keyword arguments of `writers.WandbWriter` (project, entity, name).
    """

    def __init__(self, workdir: str, *, is_host0: bool = True, console: bool = True,
                 tensorboard: bool = True, jsonl: bool = True, total_steps: int | None = None,
                 profile_steps: tuple[int, int] | None = None, progress_every_secs: float = 60.0,
                 wandb: dict | None = None, sync_secs: float = 30.0):
        self.workdir = os.fspath(workdir)
        self.is_host0 = is_host0
        self.total_steps = total_steps
        self.console = console and is_host0
        self.profile_dir = storage.join(self.workdir, "profile")
        self.tb_dir = storage.join(self.workdir, "tensorboard")
        self.sync_secs = sync_secs
        self._last_flush = time.monotonic()
        self._profile_steps = profile_steps
        if profile_steps is not None and not profile_steps[0] < profile_steps[1]:
            raise ValueError(f"profile_steps must be (start, stop) with start < stop, "
                             f"got {profile_steps}")
        self._tracing = False
        self._writer = self._progress = self._jsonl = None
        self._recent = collections.deque(maxlen=10)   # (monotonic time, step) of past writes
        self._skipped_keys: set[str] = set()
        if not is_host0:
            return
        storage.makedirs(self.workdir)
        if jsonl:
            self._jsonl = storage.AppendFile(storage.join(self.workdir, JSONL_NAME),
                                             sync_secs=sync_secs)
        sinks = []
        if tensorboard or wandb is not None:
            from rlcsd_jax.trainer import writers

            mw = writers.metric_writers()
            if tensorboard:
                sinks.append(writers.TensorBoardWriter(self.tb_dir))
            if wandb is not None:
                sinks.append(writers.WandbWriter(run_id=self._wandb_run_id(), **wandb))
            self._writer = mw.AsyncWriter(mw.MultiWriter(sinks))
            self._progress = writers.clu_periodic_actions().ReportProgress(
                num_train_steps=total_steps, writer=self._writer, every_secs=progress_every_secs)

    def _wandb_run_id(self) -> str:
        """The W&B run id stored in the workdir (a new one for a new run)."""
        path = storage.join(self.workdir, WANDB_ID_NAME)
        if storage.exists(path):
            return storage.read_text(path).strip()
        run_id = uuid.uuid4().hex[:16]
        storage.write_text(path, run_id + "\n")
        return run_id

    # -- scalars -------------------------------------------------------------------------------
    def _floats(self, scalars: Mapping[str, Any]) -> dict[str, float]:
        out = {}
        for key, value in scalars.items():
            try:
                arr = np.asarray(value)
                numeric = np.issubdtype(arr.dtype, np.number) or arr.dtype == bool
                if arr.size != 1 or not numeric:
                    raise TypeError
                out[key] = float(arr.reshape(()))
            except (TypeError, ValueError):
                if key not in self._skipped_keys:   # say it once, not every step
                    self._skipped_keys.add(key)
                    log.warning("metric %r is not a scalar number (%s); not logged", key,
                                type(value).__name__)
        return out

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Log one step's scalars (jax / numpy / Python numbers) to every enabled sink."""
        if not self.is_host0:
            return
        step = int(step)
        values = self._floats(scalars)
        if self._jsonl is not None:
            record = {"step": step, "time": round(time.time(), 3)}
            record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()
                           if k not in record})
            self._jsonl.write(json.dumps(record) + "\n")
        if self._writer is not None and values:
            self._writer.write_scalars(step, values)
        now = time.monotonic()
        if not storage.is_local(self.workdir) and now - self._last_flush >= self.sync_secs:
            self.flush()
        self._recent.append((now, step))
        if self.console:
            print(self.progress_line(step, values), flush=True)

    def progress_line(self, step: int, values: Mapping[str, float]) -> str:
        """`step 12/100 | reward 0.410 | len 212 | acc 0.530 | 3.2 s/step | ETA 4m10s`."""
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        for key, label, fmt in HEADLINE:
            if key in values:
                v = values[key]
                parts.append(f"{label} {fmt.format(v) if math.isfinite(v) else v}")
        # Seconds per step averaged over the last writes; the first write has no interval.
        (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
        if s1 > s0:
            per_step = (t1 - t0) / (s1 - s0)
            parts.append(f"{per_step:.1f} s/step")
            if self.total_steps and self.total_steps > step:
                parts.append(f"ETA {format_duration(per_step * (self.total_steps - step))}")
        return " | ".join(parts)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyper-parameters (nested dicts / ConfigDict) to `hparams.json` and TensorBoard."""
        if not self.is_host0:
            return
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                for k, v in _flatten(hparams).items()}
        storage.write_text(storage.join(self.workdir, "hparams.json"),
                           json.dumps(flat, indent=1, sort_keys=True))
        if self._writer is not None:
            self._writer.write_hparams(flat)

    # -- hooks ---------------------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        """Call once after every step: progress report (steps/s, ETA) and the profiler window."""
        if not self.is_host0:
            return
        if self._progress is not None:
            self._progress(int(step))
        if self._profile_steps is None:
            return
        start, stop = self._profile_steps
        if not self._tracing and start <= step < stop:
            import jax

            jax.profiler.start_trace(self.profile_dir)
            self._tracing = True
            log.info("profiling steps %d..%d into %s", step + 1, stop, self.profile_dir)
        elif self._tracing and step >= stop:
            self._stop_trace()

    def _stop_trace(self) -> None:
        import jax

        jax.profiler.stop_trace()
        self._tracing = False
        log.info("profile written to %s (open with TensorBoard's profile plugin / xprof)",
                 self.profile_dir)

    def timed(self, name: str):
        """Context manager timing a part of the step into the progress report (clu).

        Measures host wall time: the trainer's parts end in a device→host fetch anyway, so
        clu's extra device round-trip per block is not needed."""
        if self._progress is None:
            return contextlib.nullcontext()
        return self._progress.timed(name, wait_jax_async_dispatch=False)

    # -- lifecycle -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write everything buffered; a remote workdir gets the files uploaded."""
        self._last_flush = time.monotonic()
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._tracing:
            self._stop_trace()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(workdir: str) -> list[dict]:
    """Records of `workdir/metrics.jsonl` (or of the file itself), in file order.

    A torn last line (a crash mid-write) is skipped with a warning; nulls stay None.  Local
    paths and URLs (gs://...) alike.
    """
    path = storage.path(workdir)
    if not path.is_file():
        path = path / JSONL_NAME
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path} (is this a training workdir?)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not valid JSON (interrupted write?); skipped", path, lineno)
    return records
