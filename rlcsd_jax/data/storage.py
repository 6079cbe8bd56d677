"""Files in local folders or object stores (`gs://`, `s3://`) through `etils.epath`.

Why: a TPU worker's disk disappears with the VM, so every file of a run lives in the workdir,
which is usually `gs://...`.  `open()` / `os.makedirs` on such a string would write into a local
folder literally named `gs:` instead.  epath talks to GCS through TensorFlow's gfile when
TensorFlow is installed and through fsspec (gcsfs) otherwise.

Object stores cannot append to an object, so `AppendFile` keeps a local copy and rewrites the
whole object (at most every `sync_secs`, and on `flush` / `close`), and `DirMirror` uploads a
local scratch folder's changed files (TensorBoard event files) the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from etils import epath

log = logging.getLogger(__name__)


def is_local(path) -> bool:
    """True for a plain filesystem path, False for a URL such as gs://bucket/x."""
    return "://" not in os.fspath(path)


def path(p) -> epath.Path:
    """An epath.Path; `~` is expanded for local paths."""
    p = os.fspath(p)
    return epath.Path(os.path.expanduser(p) if is_local(p) else p)


def makedirs(p) -> None:
    """Create a local folder (object stores have no folders: nothing to do)."""
    if is_local(p):
        os.makedirs(os.path.expanduser(os.fspath(p)), exist_ok=True)


def join(base, *parts) -> str:
    """`base/part/...` as a string, for local paths and URLs alike."""
    return os.fspath(path(base).joinpath(*parts))


def exists(p) -> bool:
    return path(p).exists()


def read_text(p) -> str:
    return path(p).read_text()


def write_text(p, text: str) -> None:
    """Write (replace) a whole text file; local parent folders are created."""
    makedirs(os.path.dirname(os.fspath(p)) or ".")
    path(p).write_text(text)


def write_bytes(p, data: bytes) -> None:
    makedirs(os.path.dirname(os.fspath(p)) or ".")
    path(p).write_bytes(data)


class AppendFile:
    """A text file that grows line by line, in a local folder or an object store.

    Local: the file opened in append mode, line-buffered (a crash loses at most the line being
    written).  Remote: the existing object (a resumed run's earlier lines) is read once, new
    lines go to a local copy, and the whole copy replaces the object when `sync_secs` have
    passed since the last upload, and on `flush()` / `close()`.
    """

    def __init__(self, target, *, sync_secs: float = 30.0):
        self.target = os.fspath(target)
        self.sync_secs = sync_secs
        self._remote = not is_local(self.target)
        self._last_sync = time.monotonic()
        self._dirty = False
        self._scratch = None
        if self._remote:
            self._scratch = tempfile.mkdtemp(prefix="rlcsd_append_")
            local = os.path.join(self._scratch, os.path.basename(self.target))
            remote = path(self.target)
            if remote.exists():
                with open(local, "wb") as f:
                    f.write(remote.read_bytes())
        else:
            makedirs(os.path.dirname(self.target) or ".")
            local = self.target
        self._file = open(local, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._local = local

    def write(self, text: str) -> None:
        self._file.write(text)
        self._dirty = True
        if self._remote and time.monotonic() - self._last_sync >= self.sync_secs:
            self.sync()

    def sync(self) -> None:
        """Upload the local copy (remote targets only)."""
        self._file.flush()
        if self._remote and self._dirty:
            with open(self._local, "rb") as f:
                path(self.target).write_bytes(f.read())
            self._dirty = False
        self._last_sync = time.monotonic()

    def flush(self) -> None:
        self.sync()

    def close(self) -> None:
        if self._file.closed:
            return
        self.sync()
        self._file.close()
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)


class DirMirror:
    """Copies the files of a local scratch folder to a remote folder when they change."""

    def __init__(self, local_dir: str, remote_dir: str):
        self.local_dir, self.remote_dir = local_dir, os.fspath(remote_dir)
        self._sizes: dict[str, int] = {}

    def sync(self) -> None:
        for root, _, files in os.walk(self.local_dir):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, self.local_dir)
                size = os.path.getsize(src)
                if self._sizes.get(rel) == size:
                    continue
                with open(src, "rb") as f:
                    path(self.remote_dir).joinpath(rel).write_bytes(f.read())
                self._sizes[rel] = size
