"""Test set-up shared by the whole suite.

Eight fake CPU devices are created for every test process so that mesh tests (fsdp, tensor,
data axes) run next to single-device tests; arrays without an explicit sharding live on device 0,
so single-device code is unaffected.  This must run before JAX is imported anywhere.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network; make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu (the planner's TPU compiler) locks a file per machine; xdist workers each load it.  No
# TPU metadata server exists here.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

# One persistent compilation cache per test session, shared with the subprocesses that tests
# start (CLI runs, resume / preemption, notebooks): identical programs compile once.
import tempfile  # noqa: E402

_cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "rlcsd_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
