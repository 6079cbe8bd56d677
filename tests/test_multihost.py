"""Multi-host training: 2 processes on localhost (CPU, jax.distributed with the coordinator on
127.0.0.1, gloo collectives) train 2 tiny rlcsd steps and write one checkpoint; the metrics and
the parameters equal a single-process run over the same global batch.

Both runs are real `python -m rlcsd_jax.train` processes (tests/helpers/train_driver.py, with fake
answers keyed by record index so each process grades its own block).  The fake pattern makes
process 1 keep no rollout at step 1 and process 0 none at step 2, so the "a host with no
survivors still joins the global mini-batch" path runs.  One mini-batch per step, so the
mini-batch holds the same rollouts whatever the number of processes (with several mini-batches
each process fills its own blocks, which groups rollouts differently; that is by design).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS = 2
PATTERN = ([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]] + [[0, 0, 0, 0]] * 4
           + [[1, 1, 1, 1]] * 4 + [[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]])
ARGS = [
    "--config=" + os.path.join(ROOT, "configs", "tiny.py"), "--config.mesh.fsdp=-1",
    f"--config.train.num_steps={STEPS}", "--config.checkpoint.every=1",
    "--config.data.num_generated_train=16", "--config.data.shuffle=False",
    "--config.data.num_generated_eval=8", "--config.eval.batch_prompts=8",
    "--config.eval.num_samples=2", "--config.eval.max_new_tokens=8",
    "--config.rollout.prompts_per_step=8", "--config.rollout.group_size=4",
    "--config.rollout.max_new_tokens=8", "--config.train.minibatch_prompts=8",
    "--config.teacher.k_max=2", "--config.train.warmup_steps=1", "--config.train.lr=0.01",
    "--config.warm_start.steps=1", "--config.warm_start.batch_size=8",
    "--config.eval.before_train=False",
]
IGNORED = ("time/", "perf/")
# Tokens the scoring programs compute include each process's padding of its own device blocks,
# so they depend on the layout; the useful tokens (and every loss) do not.
LAYOUT_DEPENDENT = ("/tokens_computed",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, devices, env_extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", RLCSD_TEST_FAKE_PATTERN=json.dumps(PATTERN),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **env_extra)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "helpers", "train_driver.py"),
                             f"--workdir={workdir}", *ARGS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(workdir) -> dict:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            step = rec.pop("step")
            rec.pop("time", None)
            for k, v in rec.items():
                if not k.startswith(IGNORED) and not k.endswith(LAYOUT_DEPENDENT):
                    out[(step, k)] = v
    return out


def _params(workdir):
    """The final train state, read onto one local device (the 2-process checkpoint names
    devices this test process does not have)."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    ckptr = ocp.PyTreeCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          ckptr.metadata(path).item_metadata.tree)
    tree = ckptr.restore(path, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return tree, [np.asarray(x) for x in jax.tree.leaves(tree["params"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single = str(tmp_path_factory.mktemp("single"))
    multi = str(tmp_path_factory.mktemp("multi"))
    port = _free_port()
    procs = [_start(multi, 4, dict(RLCSD_DISTRIBUTED="1", JAX_NUM_PROCESSES="2",
                                   JAX_PROCESS_ID=str(i),
                                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}"))
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    ref = _start(single, 8, {})
    out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, out[-4000:]
    return single, multi, outs


def test_two_processes_ran_as_one_job(runs):
    _, multi, outs = runs
    assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
    assert "8 global devices" in outs[0]
    # Only process 0 writes logs and the summary.
    assert "rlcsd_jax run summary" in outs[0]
    assert os.path.exists(os.path.join(multi, "summary.json"))


def test_metrics_equal_a_single_process_run(runs):
    single, multi, _ = runs
    a, b = _metrics(single), _metrics(multi)
    assert a.keys() == b.keys()
    steps = {s for s, _ in a}
    assert steps == {1, 2}, steps
    assert (2, "eval/avg") in a       # the evaluation at the end ran on both processes
    # The fake pattern: 7 of 32 rollouts kept at step 1 (all on process 0), 14 at step 2 (all on
    # process 1; group 14's lone correct answer and group 15's lone wrong one lack a hint).
    assert a[(1, "train/kept_ratio")] == pytest.approx(7 / 32)
    assert a[(2, "train/kept_ratio")] == pytest.approx(14 / 32)
    assert a[(1, "train/num_updates")] == 1.0 and a[(2, "train/num_updates")] == 1.0
    for key in a:
        # The same fp32 computation on 8 devices; the reduction order differs (gradients are
        # all-reduced across processes; host blocks are padded separately).  Measured: at most
        # 2.6e-6 absolute on O(0.1) values, 1.7e-4 relative on a mean near 0.01.
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_one_consistent_checkpoint_with_the_single_process_params(runs):
    single, multi, _ = runs
    tree_a, a = _params(single)
    tree_b, b = _params(multi)
    assert int(np.asarray(tree_b["train_step"])) == STEPS
    assert int(np.asarray(tree_b["opt_step"])) == int(np.asarray(tree_a["opt_step"])) > 0
    assert len(a) == len(b)
    diff = np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b)])
    # Adam's step lr * m / sqrt(v) turns fp32 reduction-order noise into an O(lr) difference on
    # coordinates whose gradient is ~0 (measured: 8 of 200k entries differ by 1e-5..5e-5 at
    # lr 0.01); every other entry agrees to 1e-5.
    assert diff.max() < 2e-4
    assert np.mean(diff > 1e-5) < 1e-3
    host_dir = os.path.join(multi, "checkpoints", str(STEPS), "host")
    with open(os.path.join(host_dir, "metadata")) as f:   # orbax JSON handler's file
        host = json.load(f)
    assert host["step"] == STEPS


def test_single_process_helpers_are_the_identity():
    # The trainer calls these on every step; with one process they must not change anything.
    import jax

    from rlcsd_jax.distributed import multihost, sharding

    mesh = sharding.make_mesh(fsdp=-1)
    x = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    g = multihost.to_global(x, mesh)
    assert g.shape == (8, 3) and g.sharding.spec == sharding.batch_spec(2)
    np.testing.assert_array_equal(multihost.to_host_local(g, mesh), x)
    t = multihost.to_global(np.zeros((2, 8, 5)), mesh, axis=1)   # teacher rows [C, B, S]
    assert t.sharding.spec == sharding.batch_spec(3, axis=1)
    # A jit output in another layout comes back as the same rows.
    np.testing.assert_array_equal(multihost.to_host_local(jax.jit(lambda a: a.T)(g).T, mesh), x)
    np.testing.assert_array_equal(multihost.local_block(x), x)
    np.testing.assert_array_equal(multihost.allgather(x), x)
    assert multihost.global_max(3) == 3 and multihost.global_sum(2.5) == 2.5
    np.testing.assert_array_equal(multihost.global_sum([4, 0, 1]), [4.0, 0.0, 1.0])
    assert multihost.block(8) == slice(0, 8)
    r, n = multihost.allgather_columns(np.array([1.0, 0.0], np.float32), np.array([7, 9]))
    np.testing.assert_array_equal(r, [1.0, 0.0])
    np.testing.assert_array_equal(n, [7, 9])
