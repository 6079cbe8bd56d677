"""A small, thread-safe pool of long-lived math-verify worker processes with a hard budget.

Why processes: math-verify's timeouts use ``signal.alarm``, which only works in the main thread,
and sympy can spend minutes inside C code (``10^{10^{10^{10}}}``) where no signal reaches it.
A call here sends one request to an idle worker and waits at most ``timeout_s`` for the reply;
when the budget runs out (or the worker dies, e.g. on the memory cap) that worker is killed and
replaced lazily, and the call reports a timeout.  Other workers, and calls running on them, are
not affected.

Workers are started with ``subprocess`` running a plain script (not ``multiprocessing``), so a
user's ``__main__`` is never re-imported and nothing of the parent (JAX, TensorFlow) is inherited.
All workers are killed at interpreter exit; a fork of the parent gets a fresh pool.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_worker.py")
_STARTUP_TIMEOUT_S = 120.0


class WorkerStartupError(RuntimeError):
    """The math-verify worker could not start (missing package, broken interpreter, …)."""


class _Worker:
    """One worker process and its line-based pipe protocol."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, _WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            bufsize=0,
            close_fds=True,
        )
        self._buffer = b""
        ready = self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
        if ready is None or not json.loads(ready).get("ready"):
            self.kill()
            raise WorkerStartupError(
                f"the math-verify worker ({_WORKER_SCRIPT}) did not start; its error is printed above "
                "on stderr (is math-verify installed for this interpreter?)"
            )

    def _read_line(self, deadline: float) -> bytes | None:
        """Reads one reply line; None on timeout or if the process died."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the worker exited (crash, memory cap)
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def request(self, gold: str, pred: str, timeout_s: float) -> dict | None:
        """Sends one request; returns the reply dict, or None on timeout / worker death."""
        try:
            self.proc.stdin.write((json.dumps([gold, pred]) + "\n").encode())
        except (BrokenPipeError, OSError):
            return None
        line = self._read_line(time.monotonic() + timeout_s)
        return None if line is None else json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class VerifyPool:
    """Up to ``max_workers`` workers, started on demand; safe to call from any thread."""

    def __init__(self, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._starting = 0
        self._closed = False

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the math-verify pool has been shut down")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) + self._starting < self.max_workers:
                    self._starting += 1
                    break
                # Every busy worker returns within its own budget, so this wait is bounded too.
                self._cond.wait()
        try:
            worker = _Worker()  # slow (imports sympy): done outside the lock
        except BaseException:
            with self._cond:
                self._starting -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._starting -= 1
            self._all.add(worker)
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._cond:
            if healthy and not self._closed:
                self._idle.append(worker)
            else:
                self._all.discard(worker)
            self._cond.notify()
        if not healthy or self._closed:
            worker.kill()

    def check(self, gold: str, pred: str, timeout_s: float) -> dict | None:
        """Runs one comparison; the reply dict, or None if the budget ran out or the worker died."""
        worker = self._acquire()
        reply = None
        try:
            reply = worker.request(gold, pred, timeout_s)
        finally:
            self._release(worker, healthy=reply is not None)
        return reply

    def shutdown(self) -> None:
        """Kills every worker, busy or idle.  Later calls raise."""
        with self._cond:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._cond.notify_all()
        for worker in workers:
            worker.kill()


_POOL: VerifyPool | None = None
_POOL_PID: int | None = None
_POOL_LOCK = threading.Lock()


def default_max_workers() -> int:
    """``RLCSD_VERIFY_WORKERS`` if set, else min(4, CPU count)."""
    env = os.environ.get("RLCSD_VERIFY_WORKERS")
    return int(env) if env else max(1, min(4, os.cpu_count() or 1))


def get_pool() -> VerifyPool:
    """The process-wide pool, created lazily (and re-created in a forked child)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL = VerifyPool(default_max_workers())
            _POOL_PID = os.getpid()
        return _POOL


def shutdown_pool() -> None:
    """Kills the process-wide pool's workers (registered with ``atexit``); a later call restarts."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
        if pool is not None and _POOL_PID == os.getpid():
            pool.shutdown()


atexit.register(shutdown_pool)
