"""`python -m rlcsd_jax.plan` compiles the trainer's own programs, at the shapes the trainer
runs, for a TPU slice this machine does not have; a config that cannot fit exits 1 naming the
program."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import fake_rollouts
from rlcsd_jax import plan, sampling
from rlcsd_jax.planner import hlo_cost
from rlcsd_jax.trainer import loop, update as update_lib
from test_train_loop import tiny_config

ROOT = os.path.join(os.path.dirname(__file__), "..")

# One bucket per kind of row, so the trainer's real step runs exactly the planner's worst case.
SINGLE_BUCKETS = {"data.max_prompt_len": 128, "rollout.prompt_buckets": (128,),
                  "train.teacher_max_len": 256, "train.teacher_buckets": (256,)}


def _describe(tree):
    """Shapes and dtypes of the arrays; static arguments (graphdef, spec) as they are, with a
    mesh by its axes (the planner's mesh is made of TPU devices)."""
    import dataclasses

    def one(x):
        if hasattr(x, "shape"):
            return x.shape, str(x.dtype)
        if isinstance(x, sampling._Static):
            return dataclasses.replace(x, mesh=dict(x.mesh.shape))
        return x
    return jax.tree.map(one, tree)


def test_planner_compiles_the_trainers_own_programs(tmp_path, monkeypatch):
    fake_rollouts.install(monkeypatch.setattr)
    cfg = tiny_config(tmp_path, **SINGLE_BUCKETS)
    calls = {}

    def record(module, attr, name):
        real = getattr(module, attr)

        def wrapped(*args, **kwargs):
            # new containers: the trainer adds keys to its batch dict after the call
            calls.setdefault(name, jax.tree.map(lambda x: x, (args, kwargs)))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, attr, wrapped)

    record(sampling, "prefill_jit", "rollout/prefill")
    record(sampling, "decode_jit", "rollout/decode")
    record(update_lib, "old_logprobs", "score/old_logprobs")
    record(update_lib, "teacher_outputs", "score/teacher")
    record(update_lib, "accumulate_grads", "update/grad")
    record(update_lib, "apply_grads", "update/apply")
    tr = loop.Trainer(cfg, str(tmp_path))
    tr.train_step(next(tr.iterator))
    monkeypatch.undo()

    _, table, _, measured = plan.plan(cfg, "v5p-8")
    assert [r.name for r in table] == ["rollout/prefill", "rollout/decode", "score/old_logprobs",
                                       "score/teacher", "update/grad", "update/apply",
                                       "eval/prefill", "eval/decode"]
    assert all(r.fits for r in table) and all(r.seconds_per_call > 0 for r in table)
    by_name = {m.program.name: m for m in measured}
    functions = {"rollout/prefill": sampling.prefill_jit, "rollout/decode": sampling.decode_jit,
                 "score/old_logprobs": update_lib.old_logprobs,
                 "score/teacher": update_lib.teacher_outputs,
                 "update/grad": update_lib.accumulate_grads,
                 "update/apply": update_lib.apply_grads}
    assert sorted(calls) == sorted(functions)
    for name, (args, kwargs) in calls.items():
        program = by_name[name].program
        # The same function, the same static arguments, the same shapes and dtypes.
        assert program.fn is functions[name]
        assert _describe(program.args) == _describe(args), name
        assert _describe(program.kwargs) == _describe(kwargs), name

    # A direct compile of the trainer's gradient step, from the arrays it really passed (placed
    # on the planner's mesh), gives the planner's numbers.
    args, kwargs = calls["update/grad"]
    planned = by_name["update/grad"]
    mesh_args = jax.tree.map(
        lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding)
        if hasattr(x, "shape") else x, args, planned.program.args)
    with jax.set_mesh(planned.program.mesh):
        direct = update_lib.accumulate_grads.lower(*mesh_args, **kwargs).compile()
    stats = direct.memory_analysis()
    assert stats.temp_size_in_bytes == planned.temp_bytes
    assert stats.argument_size_in_bytes == planned.argument_bytes
    assert hlo_cost.program_cost(direct).flops == planned.cost.flops


def _plan_cli(*overrides, timeout=300):
    cmd = [sys.executable, "-m", "rlcsd_jax.plan", "--config=configs/tiny.py",
           "--topology=v5e-1", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


SMALL = ["--config.rollout.prompts_per_step=2", "--config.rollout.group_size=2",
         "--config.train.minibatch_prompts=1", "--config.data.max_prompt_len=128",
         "--config.rollout.prompt_buckets=()", "--config.train.teacher_max_len=256",
         "--config.train.teacher_buckets=()", "--config.eval.batch_prompts=2",
         "--config.eval.num_samples=2", "--config.eval.max_new_tokens=8"]


def test_impossible_config_exits_1_naming_the_program(tmp_path):
    # 2 prompts x 16384 samples x (128 + 512) cache slots of the tiny model (1 KiB per slot):
    # 20 GiB of KV cache on a 16 GiB v5e chip; short rows keep the other programs quick to
    # compile.
    out = _plan_cli(*SMALL, "--config.method=grpo", "--config.rollout.group_size=16384",
                    "--config.rollout.max_new_tokens=512", "--config.train.micro_batch_tokens=2048",
                    f"--json={tmp_path}/plan.json")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rollout/decode does NOT fit: needs" in out.stdout
    assert "the budget is 15.8 GiB" in out.stdout
    assert "rollout.max_new_tokens" in out.stdout and "COMPILE ERROR" not in out.stdout
    import json

    report = json.load(open(tmp_path / "plan.json"))
    fits = {p["name"]: p["fits"] for p in report["programs"]}
    assert fits["rollout/decode"] is False and fits["eval/decode"] is True
    assert report["step_seconds"]["step"] is None


def test_fitting_config_exits_0_with_a_step_estimate():
    out = _plan_cli(*SMALL, "--config.rollout.max_new_tokens=8", "--mean_response_len=4")
    assert out.returncode == 0, out.stdout + out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("one training step")][0]
    assert "mean response of 4 tokens" in line and "n/a" not in line
    assert np.isfinite(float(line.split("(roofline): ")[1].split(" s")[0]))
