"""A local Google Cloud Storage server for tests of gs:// workdirs, offline.

`gcp-storage-emulator` (PyPI) serves the GCS JSON API in memory.  `env_for` points every GCS
client the code uses at it: gcsfs (etils.epath's gs:// backend without TensorFlow) through
STORAGE_EMULATOR_HOST, and tensorstore (orbax's array writes) through TENSORSTORE_GCS_HTTP_URL
with a fixed test token.  EPATH_USE_TF=false makes epath use gcsfs even where TensorFlow is
installed (the default install has no TensorFlow, so this is the production path).

The emulator ignores GCS's generation preconditions and sends no `x-goog-generation` header,
which tensorstore's OCDBT manifest updates rely on; `_add_generations` adds both (as GCS does:
412 when `ifGenerationMatch` fails, 304 when `ifGenerationNotMatch` matches).  Run as a script
(`python tests/helpers/gcs_emulator.py PORT BUCKET`) it serves until terminated.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

BUCKET = "rlcsd-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(url: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "EPATH_USE_TF": "false",
            # gcsfs's zonal-bucket probe calls a control-plane API the emulator lacks.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true"}


def _add_generations() -> None:
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def current(storage, bucket, name):
        try:
            return int(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return None

    def preconditions_hold(request, response, generation) -> bool:
        q = request.query
        if "ifGenerationMatch" in q and int(q["ifGenerationMatch"][0]) != (generation or 0):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return False
        if "ifGenerationNotMatch" in q and generation == int(q["ifGenerationNotMatch"][0]):
            response.status = HTTPStatus.NOT_MODIFIED
            return False
        return True

    def on_object(handler, header):
        def wrapped(request, response, storage, *args, **kwargs):
            gen = current(storage, request.params["bucket_name"], request.params["object_id"])
            if not preconditions_hold(request, response, gen):
                return None
            if header and gen is not None:
                response["x-goog-generation"] = str(gen)
            return handler(request, response, storage, *args, **kwargs)
        return wrapped

    insert = objects.insert

    def checked_insert(request, response, storage, *args, **kwargs):
        if "name" in request.query:
            gen = current(storage, request.params["bucket_name"], request.query["name"][0])
            if not preconditions_hold(request, response, gen):
                return None
        return insert(request, response, storage, *args, **kwargs)

    replace = {objects.download: on_object(objects.download, header=True),
               objects.get: on_object(objects.get, header=True),
               objects.delete: on_object(objects.delete, header=False),
               insert: checked_insert}
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            handlers[method] = replace.get(fn, fn)
    objects.insert = checked_insert


def serve(port: int, bucket: str) -> None:
    from gcp_storage_emulator.server import create_server

    _add_generations()
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


@contextlib.contextmanager
def running(log_path: str):
    """Start the emulator with bucket BUCKET; yields the environment for its clients."""
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), BUCKET],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("GCS emulator did not start:\n" + open(log_path).read())
            time.sleep(0.1)
        yield env_for(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def client_env(env: dict[str, str]):
    """Point this process's epath / gcsfs at the emulator (and back afterwards)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import gcsfs   # reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when first imported
    from etils.epath import gpath

    gpath._is_tf_installed.cache_clear()   # epath caches its TensorFlow check
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gpath._is_tf_installed.cache_clear()
        gcsfs.GCSFileSystem.clear_instance_cache()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
