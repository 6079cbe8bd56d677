"""Timing and memory helpers shared by the JAX and HF sides.

Memory conventions (reported with the method next to the number):
  JAX on GPU/TPU: `memory_stats()["peak_bytes_in_use"]` (process-cumulative peak; JAX cannot
    reset it) and the compiled estimate of the program;
  JAX on CPU: the compiled estimate only, `memory_analysis()` argument + output + temp - alias
    bytes of the jitted program(s);
  HF on CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`;
  HF on CPU: peak process RSS minus the RSS before the measurement, sampled every 5 ms by a
    psutil thread (includes allocator slack; "n/a" without psutil).
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import threading
import time
from collections.abc import Callable


@dataclasses.dataclass
class Timing:
    """first: seconds of the first (cold) call; times: the steady-state repeats."""

    first: float
    times: list[float]
    cores: float | None = None  # process CPU seconds / wall seconds over the repeats

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def compile(self) -> float:
        """First call minus a steady call: compile/trace/autotune overhead."""
        return max(self.first - self.median, 0.0)


def time_calls(fn: Callable[[], object], repeats: int, first: bool = True) -> Timing:
    """Call `fn` (which must block until its work is done) once cold, then `repeats` times."""
    t_first = 0.0
    if first:
        t0 = time.perf_counter()
        fn()
        t_first = time.perf_counter() - t0
    times, cpu0 = [], _cpu_seconds()
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(t_first, times, (_cpu_seconds() - cpu0) / sum(times))


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RssPeak:
    """Context manager: `.delta` = peak RSS during the block minus RSS at entry (bytes)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.delta: int | None = None

    def __enter__(self):
        try:
            import psutil
        except ImportError:  # report "n/a"
            self._proc = None
            return self
        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self._proc is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.delta = self._peak - self._base
        return False


def compiled_bytes(*compiled) -> int | None:
    """Largest argument + output + temp - alias bytes over jitted programs that run one after
    the other (e.g. prefill then decode); None if a backend does not report it."""
    sizes = []
    for c in compiled:
        try:
            m = c.memory_analysis()
            sizes.append(m.argument_size_in_bytes + m.output_size_in_bytes
                         + m.temp_size_in_bytes - m.alias_size_in_bytes)
        except Exception:  # some backends return None / raise
            return None
    return max(sizes) if sizes else None


def jax_device_peak() -> int | None:
    """peak_bytes_in_use of device 0 (GPU/TPU), None on CPU where it is not tracked."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def jax_bytes_limit() -> int | None:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    return (dev.memory_stats() or {}).get("bytes_limit")


class NotApplicable(RuntimeError):
    """A measurement that cannot run here (reported as 'n/a: reason', not as an error)."""


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "outofmemory", "oom"))


def short_error(e: BaseException, limit: int = 160) -> str:
    """One line for the results table: 'OOM: …' or 'ErrorType: first line'."""
    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, NotApplicable):
        return f"n/a: {first}"
    text = f"{'OOM' if is_oom(e) else type(e).__name__}: {first}"
    return (text[:limit] + "…") if len(text) > limit else text
