"""Which code and libraries a run used, recorded in its workdir; a resume that differs warns.

Why: "a resumed run ends bitwise equal to an uninterrupted one" holds only with the same code,
the same library versions and the same devices.  A TPU VM recreated after a preemption installs
both again (`launch_tpu.sh` pins them to one commit and a constraints file, docs/tpu.md); this
record makes any remaining difference visible in the log instead of silent.

`WORKDIR/run_env.json` is a list with one entry per start of the run:
{"time", "resumed_from_step" (None for the first start), "env": capture()}.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys

from rlcsd_jax.data import storage

log = logging.getLogger(__name__)

FILE_NAME = "run_env.json"
# Distributions whose version changes numerics or the checkpoint format.
PACKAGES = ("rlcsd_jax", "jax", "jaxlib", "libtpu", "libtpu-nightly", "jax-cuda12-plugin",
            "jax-cuda12-pjrt", "flax", "optax", "orbax-checkpoint", "tensorstore", "numpy",
            "ml-collections", "transformers", "tokenizers", "math-verify", "sympy")
REVISION_FILE = "REVISION"   # written into a --src copy by launch_tpu.sh setup (no .git there)


def code_revision(root: str | None = None) -> str:
    """The git commit of the checkout the package runs from ("+dirty" when tracked files are
    modified), else the REVISION file next to it, else "unknown"."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) == os.path.realpath(root):
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    rev = os.path.join(root, REVISION_FILE)
    if os.path.exists(rev):
        with open(rev) as f:
            return f.read().strip() or "unknown"
    return "unknown"


def capture() -> dict:
    """Code revision, Python, the versions of PACKAGES (installed ones), and the devices."""
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"code_revision": code_revision(),
            "python": ".".join(map(str, sys.version_info[:3])),
            "platform": platform.platform(),
            "packages": versions,
            "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(),
            "num_processes": jax.process_count()}


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two `capture()` results (platform text ignored)."""
    out = []
    for key in ("code_revision", "python", "backend", "device_kind", "num_devices",
                "num_processes"):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)} -> {new.get(key)}")
    old_p, new_p = old.get("packages", {}), new.get("packages", {})
    for name in sorted(set(old_p) | set(new_p)):
        if old_p.get(name) != new_p.get(name):
            out.append(f"{name}: {old_p.get(name, 'not installed')} -> "
                       f"{new_p.get(name, 'not installed')}")
    return out


def record(workdir: str, *, resumed_from_step: int | None, is_host0: bool = True) -> list[str]:
    """Append this start to WORKDIR/run_env.json; on a resume, warn about (and return) every
    difference from the start that wrote the checkpoint being resumed (the last entry)."""
    env = capture()
    path = storage.join(workdir, FILE_NAME)
    history = []
    if storage.exists(path):
        try:
            history = json.loads(storage.read_text(path))
        except json.JSONDecodeError as e:
            log.warning("%s is not valid JSON (%s); starting a new record", path, e)
    diffs = []
    if resumed_from_step is not None and history:
        diffs = differences(history[-1].get("env", {}), env)
        if diffs:
            log.warning("resuming from step %d with different code / libraries / devices than "
                        "the run that saved it, so the result may not match an uninterrupted "
                        "run bitwise:\n  %s", resumed_from_step, "\n  ".join(diffs))
    if is_host0:
        history.append({"time": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"), "resumed_from_step": resumed_from_step, "env": env})
        storage.write_text(path, json.dumps(history, indent=1) + "\n")
    return diffs
