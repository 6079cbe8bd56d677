"""Checkpoints resume exactly: round trip, retention, mismatch errors, damaged steps, resharding,
SIGTERM and async saves.  Runs on the 8 fake CPU devices set up in conftest.py."""

import dataclasses
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from rlcsd_jax.trainer import checkpointing


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ToyState:
    params: object
    opt_state: object
    teacher: object
    ref: object
    opt_step: jax.Array
    train_step: jax.Array


def _params(seed=0, embed_rows=8):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"embed": jax.random.normal(k1, (embed_rows, 4)),
            "layer": {"w": jax.random.normal(k2, (4, 8)), "b": jax.random.normal(k3, (8,))}}


def _state(seed=0, params=None):
    """A TrainState-like tree with a non-trivial adamw state (one update applied)."""
    params = _params(seed) if params is None else params
    tx = optax.adamw(1e-2)
    opt = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.sin(p) + seed, params)
    updates, opt = tx.update(grads, opt, params)
    return ToyState(params=optax.apply_updates(params, updates), opt_state=opt, teacher=None,
                    ref=None, opt_step=jnp.int32(7 + seed), train_step=jnp.int32(3 + seed))


def _assert_bitwise_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _host_state(step):
    rng = np.random.default_rng(123)
    rng.random(5)
    return {"data": {"epoch": 1, "position": step * 4}, "config": {"lr": 1e-6, "method": "rlcsd"},
            "numpy_rng": rng.bit_generator.state, "wall_time": 12.5, "seen": np.int64(9)}


def test_round_trip_bitwise_and_host_state(tmp_path):
    state = _state()
    ckpt = checkpointing.Checkpointer(tmp_path / "ck", save_every=5, async_save=False)
    assert ckpt.restore_latest(checkpointing.abstract_like(state)) is None
    assert not ckpt.maybe_save(3, state, _host_state(3))          # not on the interval
    assert ckpt.maybe_save(10, state, _host_state(10))
    assert not ckpt.maybe_save(10, state, _host_state(10), force=True)   # already saved
    assert ckpt.maybe_save(11, state, _host_state(11), force=True)
    ckpt.close()

    ckpt = checkpointing.Checkpointer(tmp_path / "ck", save_every=5, async_save=False)
    step, restored, host = ckpt.restore_latest(checkpointing.abstract_like(state))
    assert step == 11 and ckpt.latest_step() == 11
    assert isinstance(restored, ToyState) and restored.teacher is None and restored.ref is None
    _assert_bitwise_equal(restored, state)
    expected = _host_state(11)
    assert host["data"] == expected["data"] and host["config"] == expected["config"]
    assert host["seen"] == 9 and host["wall_time"] == 12.5
    # The numpy RNG continues exactly where it stopped.
    rng_a, rng_b = np.random.default_rng(), np.random.default_rng(123)
    rng_a.bit_generator.state = host["numpy_rng"]
    rng_b.random(5)
    np.testing.assert_array_equal(rng_a.random(4), rng_b.random(4))
    ckpt.close()


def test_host_state_must_be_json(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, async_save=False)
    with pytest.raises(TypeError, match=r"host_state\['bad'\]"):
        ckpt.maybe_save(1, _state(), {"bad": object()})
    ckpt.close()


def test_retention_keeps_last_k_plus_best(tmp_path):
    state = _state()
    evals = {2: 0.9, 4: 0.5, 5: float("nan")}
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, keep=2,
                                      keep_best_metric="eval/avg", async_save=False)
    for step in range(1, 7):
        metrics = {"train/loss": 0.1}
        if step in evals:
            metrics["eval/avg"] = evals[step]
        ckpt.maybe_save(step, state, {"s": step}, metrics=metrics)
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    ckpt.close()
    # The best step survives a restart: orbax re-reads its metric from disk.
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, keep=2,
                                      keep_best_metric="eval/avg", async_save=False)
    ckpt.maybe_save(7, state, {"s": 7}, metrics={"eval/avg": 0.7})
    ckpt.maybe_save(8, state, {"s": 8})
    assert ckpt.all_steps() == [2, 7, 8]
    ckpt.close()

    lowest = checkpointing.Checkpointer(tmp_path / "min", save_every=1, keep=1,
                                        keep_best_metric="loss", best_mode="min",
                                        async_save=False)
    for step, loss in [(1, 0.3), (2, 0.1), (3, 0.2), (4, 0.4)]:
        lowest.maybe_save(step, state, {}, metrics={"loss": loss})
    assert lowest.all_steps() == [2, 4]
    lowest.close()


def test_incompatible_config_names_paths_and_shapes(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.maybe_save(1, _state(), {})
    params = _params(embed_rows=16)
    params["layer"]["extra"] = jnp.zeros((2,))
    other = dataclasses.replace(_state(params=params), teacher=_params())
    with pytest.raises(checkpointing.CheckpointMismatchError) as err:
        ckpt.restore_latest(checkpointing.abstract_like(other))
    msg = str(err.value)
    assert "params/embed: saved shape (8, 4) float32, expected shape (16, 4) float32" in msg
    assert "opt_state/0/mu/embed" in msg and "params/layer/extra" in msg
    assert "teacher/layer/w: expected shape (4, 8) float32, missing in checkpoint" in msg
    ckpt.close()


def _delete_array_files(step_dir):
    for f in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True):
        os.remove(f)


def _truncate_array_files(step_dir):
    for f in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


DAMAGE = {"deleted_arrays": _delete_array_files, "truncated_arrays": _truncate_array_files,
          "no_tree_metadata": lambda d: os.remove(d / "state" / "_METADATA"),
          "no_host_state": lambda d: shutil.rmtree(d / "host")}


# Tensorstore reports the failed reads of a damaged step once more when its futures are collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_uncommitted_and_damaged_newest_step_are_skipped(tmp_path, caplog, damage):
    states = {1: _state(1), 2: _state(2)}
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, async_save=False)
    for step, st in states.items():
        ckpt.maybe_save(step, st, {"step": step})
    ckpt.close()
    # A save killed mid-write leaves only orbax's temporary folder: never a step.
    os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-1712345678" / "state")
    (tmp_path / "3.orbax-checkpoint-tmp-1712345678" / "state" / "junk").write_text("x")
    DAMAGE[damage](tmp_path / "2")

    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, async_save=False)
    assert ckpt.latest_step() == 2
    with caplog.at_level(logging.WARNING, logger="rlcsd_jax.trainer.checkpointing"):
        step, restored, host = ckpt.restore_latest(checkpointing.abstract_like(states[1]))
    assert step == 1 and host == {"step": 1}
    _assert_bitwise_equal(restored, states[1])
    assert any(f"{tmp_path}/2 is damaged" in r.getMessage() for r in caplog.records)
    # The damaged folder is moved aside, so the step can be saved again after resuming.
    assert ckpt.latest_step() == 1 and glob.glob(str(tmp_path / "2.corrupt-*"))
    assert ckpt.maybe_save(2, restored, {"step": 2})
    ckpt.close()


def test_all_steps_damaged_is_an_error(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.maybe_save(1, _state(), {})
    os.remove(tmp_path / "1" / "state" / "_METADATA")
    with pytest.raises(checkpointing.CheckpointError, match="no readable checkpoint"):
        ckpt.restore_latest(checkpointing.abstract_like(_state()))
    assert ckpt.all_steps() == [1]     # nothing is moved aside when no step is readable
    ckpt.close()


def test_unfit_target_sharding_is_the_callers_error(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.maybe_save(1, _state(), {})
    abstract = checkpointing.abstract_like(_state())
    # layer/w has 4 rows: fsdp=8 cannot split them.
    abstract.params = checkpointing.with_shardings(abstract.params, {
        "embed": None, "layer": {"w": NamedSharding(_mesh(8, 1), P("fsdp", None)), "b": None}})
    with pytest.raises(ValueError, match=r"params/layer/w: shape \(4, 8\) cannot take"):
        ckpt.restore_latest(abstract)
    assert ckpt.all_steps() == [1]
    ckpt.close()


def _mesh(fsdp, tensor):
    return Mesh(np.array(jax.devices()).reshape(1, fsdp, tensor), ("data", "fsdp", "tensor"))


def _param_specs():
    return {"embed": P("fsdp", "tensor"), "layer": {"w": P("tensor", "fsdp"), "b": P()}}


def test_sharded_save_restores_on_other_meshes(tmp_path):
    mesh8 = _mesh(8, 1)
    shard8 = jax.tree.map(lambda s: NamedSharding(mesh8, s), _param_specs())
    params = jax.device_put(_params(), shard8)
    state = _state(params=params)
    assert state.params["embed"].sharding.spec == P("fsdp", "tensor")
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.maybe_save(4, state, {})

    mesh42 = _mesh(4, 2)
    shard42 = jax.tree.map(lambda s: NamedSharding(mesh42, s), _param_specs())
    scalar = NamedSharding(mesh42, P())
    target_shardings = ToyState(params=shard42, opt_state=(optax.ScaleByAdamState(
        count=scalar, mu=shard42, nu=shard42), optax.EmptyState(), optax.EmptyState()),
        teacher=None, ref=None, opt_step=scalar, train_step=scalar)
    target = checkpointing.with_shardings(checkpointing.abstract_like(state), target_shardings)
    _, restored, _ = ckpt.restore_latest(target)
    _assert_bitwise_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(
            target, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))):
        assert got.sharding == want.sharding
    assert restored.opt_state[0].mu["embed"].sharding.spec == P("fsdp", "tensor")
    assert len(restored.params["embed"].addressable_shards) == 8

    one = SingleDeviceSharding(jax.devices()[0])
    _, single, _ = ckpt.restore_latest(
        checkpointing.with_shardings(checkpointing.abstract_like(state), one))
    _assert_bitwise_equal(single, state)
    assert all(x.sharding == one for x in jax.tree.leaves(single))
    ckpt.close()


def test_async_save_then_wait(tmp_path):
    state = _state()
    expected = jax.tree.map(np.asarray, state)
    abstract = checkpointing.abstract_like(state)
    ckpt = checkpointing.Checkpointer(tmp_path, save_every=2, keep=2, async_save=True)
    for step in (2, 4, 6):
        live = jax.tree.map(jnp.copy, state)
        assert ckpt.maybe_save(step, live, {"step": step})
        # Once maybe_save returns the device buffers may be donated / freed by the next step.
        jax.tree.map(lambda x: x.delete(), live)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]
    assert not glob.glob(str(tmp_path / "*orbax-checkpoint-tmp*"))
    step, restored, host = ckpt.restore_latest(abstract)
    assert step == 6 and host == {"step": 6}
    _assert_bitwise_equal(restored, expected)
    ckpt.close()


def test_sigterm_sets_the_stop_flag():
    before = signal.getsignal(signal.SIGTERM)
    watcher = checkpointing.PreemptionWatcher()
    try:
        assert not watcher.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not watcher.should_stop(2) and time.time() < deadline:
            time.sleep(0.01)
        assert watcher.should_stop(2)
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_second_sigterm_terminates(tmp_path):
    """The first SIGTERM only raises the flag; a second one exits at once (default action)."""
    script = (
        "import os, signal, sys\n"
        "from rlcsd_jax.trainer.checkpointing import PreemptionWatcher\n"
        "w = PreemptionWatcher()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert w.should_stop(1)\n"
        "print('flag set', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('still alive', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)),
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "flag set" in proc.stdout and "still alive" not in proc.stdout
