"""A run killed (SIGKILL) after a checkpoint, or preempted (SIGTERM) between steps or during a
step's sampling phase, resumes to the bitwise-same parameters as an uninterrupted run with the
same seed; a preemption during sampling stops within seconds.

Real `python -m rlcsd_jax.train` processes (through tests/helpers/train_driver.py, which only swaps in
deterministic fake answers so rlcsd has rollouts to keep).
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS = 4
ARGS = [
    "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
    f"--config.train.num_steps={STEPS}", "--config.checkpoint.every=1",
    "--config.data.num_generated_train=16", "--config.data.shuffle=False",
    "--config.rollout.prompts_per_step=4", "--config.rollout.group_size=4",
    "--config.rollout.max_new_tokens=8", "--config.train.minibatch_prompts=2",
    "--config.teacher.k_max=2", "--config.teacher.sync_interval=3",
    "--config.train.warmup_steps=1", "--config.train.lr=0.01",
    "--config.warm_start.steps=2", "--config.warm_start.batch_size=4",
    "--config.eval.before_train=False", "--config.eval.at_end=False",
]


def start(workdir, slow=False, env=None, overrides=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **(env or {}))
    if slow:  # give the test time to signal between checkpoints
        env["RLCSD_TEST_STEP_SLEEP"] = "2"
    keys = {o.split("=", 1)[0] for o in overrides}
    args = [a for a in ARGS if a.split("=", 1)[0] not in keys] + list(overrides)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "helpers", "train_driver.py"),
                             f"--workdir={workdir}", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def committed(workdir, step):
    d = os.path.join(workdir, "checkpoints", str(step))
    return os.path.exists(os.path.join(d, "commit_success.txt")) or (
        os.path.isdir(d) and os.path.exists(os.path.join(d, "_CHECKPOINT_METADATA")))


def wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError("trainer exited early:\n" + proc.stdout.read()[-3000:])
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.2)


def final_params(workdir):
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    tree = ocp.PyTreeCheckpointer().restore(path)
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree["params"])], tree


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("uninterrupted"))
    rc, out = finish(start(wd))
    assert rc == 0, out[-3000:]
    params, tree = final_params(wd)
    assert int(np.asarray(tree["opt_step"])) > 0, "the run must have made updates"
    return params


def assert_same(params, reference):
    assert len(params) == len(reference)
    for a, b in zip(params, reference):
        np.testing.assert_array_equal(a, b)


def test_sigkill_after_checkpoint_resumes_bitwise(tmp_path, reference):
    wd = str(tmp_path)
    proc = start(wd, slow=True)
    wait_for(lambda: committed(wd, 2), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rc, out = finish(start(wd))
    assert rc == 0, out[-3000:]
    assert "resumed from step" in out
    assert_same(final_params(wd)[0], reference)


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, reference):
    wd = str(tmp_path)
    proc = start(wd, slow=True)
    wait_for(lambda: committed(wd, 1), proc)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    assert "preemption" in out
    rc, out = finish(start(wd))
    assert rc == 0, out[-3000:]
    assert_same(final_params(wd)[0], reference)


def saved_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and committed(workdir, int(n)))


def test_sigterm_during_sampling_exits_within_seconds_and_resumes_bitwise(tmp_path, reference):
    """SIGTERM while step 3 samples (steps 1-2 done, none saved: checkpoint.every=100, no
    time-based saves): the run stops after the sampling phase, before any update, saves step 2
    and exits 0 within 10 s; the resumed run ends bitwise equal to the uninterrupted one."""
    wd, marker = str(tmp_path / "run"), str(tmp_path / "sampled.txt")
    proc = start(wd, env={"RLCSD_TEST_SAMPLE_SLEEP": "3", "RLCSD_TEST_SAMPLE_MARKER": marker},
                 overrides=("--config.checkpoint.every=100",
                            "--config.checkpoint.every_minutes=0"))
    wait_for(lambda: os.path.exists(marker) and open(marker).read().count("sampled") >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rc, out = finish(proc)
    elapsed = time.monotonic() - t0
    assert rc == 0, out[-3000:]
    assert elapsed < 10, f"took {elapsed:.1f}s to stop after SIGTERM"
    assert "received during a step" in out and "last completed step (2) is saved" in out
    assert saved_steps(wd) == [2]
    rc, out = finish(start(wd))
    assert rc == 0, out[-3000:]
    assert "resumed from step 2" in out
    assert_same(final_params(wd)[0], reference)


def test_time_based_checkpoints(tmp_path):
    """checkpoint.every_minutes saves between the step interval's saves: with every=100 and
    a 1-second clock on 2-second steps every step is saved."""
    wd = str(tmp_path)
    rc, out = finish(start(wd, slow=True, overrides=(
        "--config.checkpoint.every=100", "--config.checkpoint.every_minutes=0.0167",
        "--config.checkpoint.keep=10")))
    assert rc == 0, out[-3000:]
    assert saved_steps(wd) == [1, 2, 3, 4]
