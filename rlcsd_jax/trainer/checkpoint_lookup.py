"""Finding and reading a training run's checkpoints without writing to them.

Shared by `evaluate` (a checkpoint's params into a Trainer) and `convert --to_hf --src WORKDIR`
(a checkpoint's policy weights to an HF folder).  A path may be a model folder (HF or converted),
a training workdir, its `checkpoints/` folder or one step folder, locally or on gs://.  The
checkpoint folder is opened read-only, so a run that is still training is not disturbed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from etils import epath

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Target:
    kind: str                 # "model" or "train_state"
    path: str                 # model folder, or the checkpoints/ folder
    step: int | None = None   # requested train-state step (None = latest)

    @property
    def workdir(self) -> str:
        return os.path.dirname(self.path.rstrip("/"))


def _is_step_dir(p) -> bool:
    return p.name.isdigit() and p.is_dir()


def resolve_checkpoint(path: str, step: int | None = None) -> Target:
    """What a `--checkpoint` / `--src` path points at (see the module docstring)."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    path = str(p) if "://" in path else os.path.abspath(path)
    if (p / "config.json").exists() or (p / "params").is_dir():
        if step is not None:
            raise ValueError(f"--step is for train-state checkpoints; {path} is a model folder")
        return Target("model", path)
    if (p / "checkpoints").is_dir():
        return Target("train_state", path.rstrip("/") + "/checkpoints", step)
    if _is_step_dir(p) and (p / "state").is_dir():
        if step is not None and step != int(p.name):
            raise ValueError(f"--step={step} contradicts the step folder {path}")
        return Target("train_state", os.path.dirname(path.rstrip("/")), int(p.name))
    if any(_is_step_dir(c) for c in p.iterdir()):
        return Target("train_state", path, step)
    raise ValueError(
        f"{path} is neither a model folder (config.json or params/) nor a training "
        "workdir / checkpoints folder (numbered step folders)")


def read_only_checkpointer(directory: str):
    """A Checkpointer that never writes: no tmp-folder cleanup (a live run may be saving
    there), no folder creation, and damaged steps are skipped but not moved aside."""
    from rlcsd_jax.trainer import checkpointing

    class ReadOnly(checkpointing.Checkpointer):
        def _make_manager(self, options):
            return super()._make_manager(dataclasses.replace(options, read_only=True))

        def _quarantine(self, step):
            log.warning("checkpoint %s/%d looks damaged; left in place (read-only)",
                        self.directory, step)

    return ReadOnly(directory, async_save=False)


def saved_host_state(checkpoints_dir: str, step: int) -> dict:
    """The JSON host state of a step (data position, counters, the run's config as JSON)."""
    return json.loads((epath.Path(checkpoints_dir) / str(step) / "host" / "metadata")
                      .read_text())


def saved_config(checkpoints_dir: str, step: int | None) -> dict | None:
    """Best effort: the training config stored in a step's host state (None if unreadable)."""
    if step is None:
        return None
    try:
        cfg = saved_host_state(checkpoints_dir, step).get("config")
        return json.loads(cfg) if isinstance(cfg, str) else cfg
    except Exception:  # noqa: BLE001 - orbax's file layout may change; callers fall back
        return None


def pick_step(checkpoints_dir: str, step: int | None = None) -> int:
    """`step` if it is a committed step of the folder, else the latest; a clear error when it
    is not there."""
    ckpt = read_only_checkpointer(checkpoints_dir)
    try:
        steps = ckpt.all_steps()
    finally:
        ckpt.close()
    if not steps:
        raise FileNotFoundError(f"no committed checkpoint step in {checkpoints_dir}")
    if step is None:
        return int(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"step {step} is not in {checkpoints_dir}; saved steps: {steps}")
    return int(step)


def restore_subtree(checkpoints_dir: str, step: int, key: str = "params") -> dict:
    """One top-level field of a step's train state (e.g. the policy `params`), restored alone
    (the optimizer state and teacher copies are not read) onto the host CPU."""
    import jax
    import orbax.checkpoint as ocp

    path = os.fspath(epath.Path(checkpoints_dir) / str(step) / "state")
    path = path if "://" in path else os.path.abspath(path)
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    if key not in tree:
        raise KeyError(f"{path} has no {key!r} (fields: {sorted(tree)})")
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = {key: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                                tree[key])}
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    return out[key]
