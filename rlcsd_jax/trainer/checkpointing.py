"""Orbax checkpoints of the whole train state that resume exactly, plus preemption handling.

One step folder per saved step, written by an orbax `CheckpointManager`:

    <directory>/<step>/state/   the device pytree (TrainState), `StandardSave`, sharded arrays
                                are written by every process collectively (ocdbt)
    <directory>/<step>/host/    a JSON dict (data-iterator position, config, numpy RNG state…),
                                written by process 0 only (orbax's JsonCheckpointHandler)
    <directory>/<step>/metrics  the tracked metric, when `keep_best_metric` is set

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it on commit (GCS: a commit
marker), so an interrupted save is never listed as a step.  A committed step whose files were
later damaged is detected on restore: `restore_latest` logs a warning naming it, falls back to
the previous step and, once that one restores, moves the damaged folder aside as
`<step>.corrupt-<time>` (so it is neither picked again nor blocks a new save at that step).

Multi-host: every call here is collective; call it on all hosts with the same arguments.
Arrays are written by all processes, the JSON host state by process 0 only, so pass process
0's host state (or the same one everywhere).  Damage visible to only some hosts (a local
disk) could make hosts fall back to different steps; keep checkpoints on shared storage
(GCS).  Local paths and `gs://` paths both work, with no special code.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, Sharding
from orbax.checkpoint import checkpoint_managers as ocp_managers

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The saved tree does not fit the state the current config builds."""


class CheckpointError(RuntimeError):
    """No checkpoint in the folder could be read."""


# ---------------------------------------------------------------------------------------------
# abstract trees
# ---------------------------------------------------------------------------------------------

def _replicated() -> Sharding:
    """Fully replicated over every device of every process (the safe default for scalars)."""
    return NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def abstract_like(state, default_sharding: Sharding | None = None):
    """`jax.ShapeDtypeStruct` tree (shape, dtype, sharding) of a concrete, possibly sharded state.

    Leaves without a sharding (numpy arrays, Python scalars) get `default_sharding`, which
    defaults to fully replicated.  `None` fields stay `None`.
    """
    default = default_sharding or _replicated()

    def one(x):
        x_sharding = getattr(x, "sharding", None)
        dtype = x.dtype if hasattr(x, "dtype") else jax.numpy.result_type(x)
        return jax.ShapeDtypeStruct(np.shape(x), dtype,
                                    sharding=x_sharding if x_sharding is not None else default)

    return jax.tree.map(one, state)


def with_shardings(abstract_tree, shardings_tree):
    """Replace the shardings of an abstract tree.

    `shardings_tree` is one `Sharding` for every leaf, or a tree with the structure of
    `abstract_tree` (or a prefix of it) whose leaves are `Sharding`s; a `None` there keeps the
    abstract leaf's own sharding.  Concrete arrays are turned into `ShapeDtypeStruct`s too.
    """
    def set_one(sharding, sub):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            np.shape(a), a.dtype, sharding=sharding if sharding is not None
            else getattr(a, "sharding", None)), sub)

    if isinstance(shardings_tree, Sharding):
        return set_one(shardings_tree, abstract_tree)
    return jax.tree.map(set_one, shardings_tree, abstract_tree,
                        is_leaf=lambda x: x is None or isinstance(x, Sharding))


def _key_name(k) -> str:
    # Orbax metadata turns dataclass / namedtuple fields into dict keys; compare by name only.
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def check_compatible(saved_tree, abstract_state, where: str) -> None:
    """Raise CheckpointMismatchError naming every path whose presence, shape or dtype differs."""
    saved, target = _flat(saved_tree), _flat(abstract_state)
    problems = [f"{k}: expected {_describe(target[k])}, missing in checkpoint"
                for k in target if k not in saved]
    problems += [f"{k}: saved {_describe(saved[k])}, not in the current state"
                 for k in saved if k not in target]
    for k in sorted(saved.keys() & target.keys()):
        s, t = saved[k], target[k]
        if tuple(getattr(s, "shape", ())) != tuple(t.shape) or (
                getattr(s, "dtype", None) is not None and np.dtype(s.dtype) != np.dtype(t.dtype)):
            problems.append(f"{k}: saved {_describe(s)}, expected {_describe(t)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {where} was written by an incompatible config "
            f"({len(problems)} mismatching tensors):\n  " + "\n  ".join(sorted(problems)))


def _describe(x) -> str:
    dtype = getattr(x, "dtype", None)
    return f"shape {tuple(getattr(x, 'shape', ()))} {np.dtype(dtype).name if dtype else ''}".strip()


def _fill_shardings(abstract_state):
    """Leaves without a sharding restore fully replicated (never onto orbax's saved layout)."""
    default = _replicated()
    return jax.tree.map(lambda a: a if getattr(a, "sharding", None) is not None else
                        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=default), abstract_state)


def _check_shardings(abstract_state) -> None:
    """Every target sharding must tile its array (e.g. fsdp=4 cannot split a dim of 6)."""
    problems = []
    for path, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        try:
            a.sharding.shard_shape(a.shape)
        except Exception as e:  # noqa: BLE001 - jax raises ValueError / TypeError variants
            problems.append(f"{'/'.join(_key_name(k) for k in path)}: shape {a.shape} "
                            f"cannot take {a.sharding}: {e}")
    if problems:
        raise ValueError("restore target shardings do not fit the state:\n  "
                         + "\n  ".join(problems))


def _jsonable(x, path="host_state"):
    """Plain-JSON copy of `x`; numpy scalars / arrays become Python numbers / lists."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v, f"{path}[{k!r}]") for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist(), path)
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"{path} is a {type(x).__name__}, which JSON cannot store; convert it to "
                    "numbers / strings / lists / dicts before checkpointing")


# ---------------------------------------------------------------------------------------------
# manager
# ---------------------------------------------------------------------------------------------

class Checkpointer:
    """Save every `save_every` steps, keep the last `keep` plus the best by one metric.

    `keep_best_metric` (e.g. "eval/avg") additionally preserves the step with the best value
    of that metric (`best_mode` "max" or "min"); steps saved without a finite value for it only
    count towards the last-`keep` window.  `keep=None` keeps everything.
    """

    def __init__(self, directory: str, save_every: int = 50, keep: int | None = 3,
                 keep_best_metric: str | None = None, best_mode: str = "max",
                 async_save: bool = True):
        if save_every <= 0:
            raise ValueError(f"save_every must be a positive number of steps, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (or None = keep all), got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        directory = str(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.save_every, self.best_metric = save_every, keep_best_metric
        policy = ocp_managers.LatestN(n=keep)
        best_fn = None
        if keep_best_metric is not None:
            worst = -math.inf if best_mode == "max" else math.inf
            best_fn = lambda m: float(m.get(keep_best_metric, worst))
            # Orbax's own max_to_keep + best_fn keeps the K BEST only, dropping recent ones;
            # the union of two policies gives "last K, plus the best".  best_fn stays set
            # because orbax only writes the metrics file when it is.  Steps without the metric
            # store {} and rank worst, which also silences orbax's "no metrics" warning.
            policy = ocp_managers.AnyPreservationPolicy([policy, ocp_managers.BestN(
                get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=best_fn, best_mode=best_mode,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self._mngr = self._make_manager(options)
        self._options = options

    def _make_manager(self, options):
        # Registering handlers up front lets a fresh process read metadata before any save.
        return ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "host": ocp.JsonCheckpointHandler()})

    # -- saving --------------------------------------------------------------------------------
    def maybe_save(self, step: int, state_pytree, host_state: dict,
                   metrics: dict | None = None, force: bool = False) -> bool:
        """Save when `step % save_every == 0` or `force`; returns whether a save started.

        With async saving the call returns once arrays are copied to host memory, so the
        caller may donate / overwrite the device buffers right away.  A step that is already
        saved is skipped (e.g. a forced final save on a step the interval already covered).
        """
        step = int(step)
        if not force and step % self.save_every:
            return False
        if step in self._mngr.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving again", step,
                     self.directory)
            return False
        host = _jsonable(dict(host_state))
        tracked = None
        if self.best_metric is not None:
            value = float(np.asarray((metrics or {}).get(self.best_metric, math.nan)))
            tracked = {self.best_metric: value} if math.isfinite(value) else {}
        saved = self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_pytree), host=ocp.args.JsonSave(host)),
            metrics=tracked, force=True)
        if saved:
            log.info("checkpoint step %d -> %s%s", step, self.directory,
                     " (async)" if self._options.enable_async_checkpointing else "")
        return bool(saved)

    # -- listing -------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, ascending (temporary / uncommitted folders are never listed)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """Step with the best tracked metric (the latest step when no metric is tracked)."""
        return self._mngr.best_step()

    # -- restoring -----------------------------------------------------------------------------
    def restore(self, step: int, abstract_state):
        """(state, host_state) of `step`, each array placed with its sharding in `abstract_state`.

        Raises CheckpointMismatchError when the saved tree differs from `abstract_state`
        (checked from metadata, before any array is read).
        """
        where = f"{self.directory}/{step}"
        abstract_state = _fill_shardings(abstract_state)
        meta = self._mngr.item_metadata(step)
        tree = meta["state"] if meta is not None and "state" in meta else None
        tree = getattr(tree, "tree", tree)
        if tree is None:
            raise CheckpointError(f"checkpoint {where} has no readable state metadata")
        check_compatible(tree, abstract_state, where)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            host=ocp.args.JsonRestore()))
        return out["state"], out["host"]

    def restore_latest(self, abstract_state):
        """(step, state, host_state) of the newest readable step, or None when there is none.

        A damaged step is logged and skipped, and once an older step restores it is moved
        aside; an incompatible step raises CheckpointMismatchError (an older step of the same
        run would not fit either).  When no step is readable nothing is moved (the cause is
        more likely the storage or the environment than every file) and CheckpointError says
        why for each step.
        """
        abstract_state = _fill_shardings(abstract_state)
        _check_shardings(abstract_state)   # a bad target is the caller's bug, not a bad step
        self.wait()
        self._mngr.reload()
        damaged, failures = [], []
        for step in reversed(self.all_steps()):
            try:
                state, host = self.restore(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means a damaged step
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log.warning("checkpoint %s/%d is damaged or incomplete (%s); falling back to "
                            "the previous step", self.directory, step, reason)
                damaged.append(step)
                failures.append(f"step {step}: {reason}")
                continue
            for bad in damaged:
                self._quarantine(bad)
            log.info("restored checkpoint %s/%d", self.directory, step)
            return step, state, host
        if failures:
            raise CheckpointError(f"no readable checkpoint in {self.directory}:\n  "
                                  + "\n  ".join(failures))
        return None

    def _quarantine(self, step: int) -> None:
        """Move a damaged step aside so it is not retried and a new save can use its number."""
        src = epath.Path(self.directory) / str(step)
        dst = epath.Path(self.directory) / f"{step}.corrupt-{int(time.time())}"
        if jax.process_index() == 0:
            try:
                src.rename(dst)
                log.warning("moved damaged checkpoint %s to %s", src, dst)
            except Exception as e:  # noqa: BLE001 - read-only storage: keep going without
                log.warning("could not move damaged checkpoint %s aside: %s", src, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"rlcsd_quarantine_{step}")
        self._mngr.reload()

    # -- lifecycle -----------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until pending async saves are committed (and old steps deleted)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# preemption
# ---------------------------------------------------------------------------------------------

class PreemptionWatcher:
    """Turns SIGTERM (and the JAX preemption sync point on multi-host TPU) into a stop flag.

    The trainer calls `should_stop(step)` at step boundaries and `should_stop()` right after a
    step's sampling phase (trainer/run.py); on True it saves the last completed step and exits 0.
    A second signal terminates at once (the default action), for a run stuck in a long step.
    The handler is installed only from the main thread (Python allows no other); elsewhere
    the watcher still reports the multi-host sync point.  `close()` restores old handlers.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self._flag = threading.Event()
        self._signum: int | None = None
        self._reported = False
        self._sync_point_ok = True
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            log.warning("PreemptionWatcher created off the main thread: no signal handler")

    def _handle(self, signum, frame):
        # No logging here: the handler can interrupt the main thread inside a logging call.
        if self._flag.is_set():
            # A second signal means "now": fall back to the default action (terminate).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signum = signum
        self._flag.set()

    def should_stop(self, step: int | None = None) -> bool:
        """True once a stop signal arrived (any process) or the preemption sync point is hit.

        With several processes the answer is agreed by all of them (a tiny host all-gather),
        so every host saves at the same step; call it on every host at the same points.  JAX's
        preemption sync point is consulted only with a `step` (once per step, increasing).
        """
        stop = self._flag.is_set()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
            if step is not None and self._sync_point_ok:
                try:
                    stop = bool(multihost_utils.reached_preemption_sync_point(int(step))) or stop
                except Exception as e:  # noqa: BLE001 - preemption service off / unsupported
                    log.info("preemption sync point unavailable (%s); relying on signals", e)
                    self._sync_point_ok = False
        if stop and not self._reported:
            self._reported = True
            name = signal.Signals(self._signum).name if self._signum else "preemption notice"
            when = f"after step {step}" if step is not None else "during a step"
            log.warning("%s received %s: will checkpoint and stop (send it again to exit at "
                        "once)", name, when)
        return stop

    def close(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous = {}
