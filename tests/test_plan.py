"""`python -m rlcsd_jax.plan` compiles the trainer's own programs, at the shapes the trainer
runs, for a TPU slice this machine does not have; a config that cannot fit exits 1 naming the
program.  Rollouts and evaluation are the rollout engine's programs (`cfg.engine`, the default)
or, with engine.enabled=False, the static sampler's."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from helpers import fake_rollouts
from rlcsd_jax import plan, sampling
from rlcsd_jax.inference import programs as engine_programs
from rlcsd_jax.planner import compile as compile_lib, hlo_cost, report
from rlcsd_jax.trainer import programs as programs_lib, update as update_lib
from rlcsd_jax.trainer import rl_trainer
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
        if isinstance(x, sampling.SamplerSettings):
            return dataclasses.replace(x, mesh=dict(x.mesh.shape))
        return x
    return jax.tree.map(one, tree)


def _trainer_calls(tmp_path, monkeypatch, cfg, targets):
    """(trainer, {name: (args, kwargs) of the first call}) of one real training step."""
    fake_rollouts.install(monkeypatch.setattr)
    calls = {}

    def record(module, attr, name):
        real = getattr(module, attr)

        def wrapped(*args, **kwargs):
            # new containers: the trainer adds keys to its batch dict after the call
            calls.setdefault(name, jax.tree.map(lambda x: x, (args, kwargs)))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, attr, wrapped)

    for target in targets:
        record(*target)
    tr = rl_trainer.Trainer(cfg, str(tmp_path))
    tr.train_step(next(tr.iterator))
    monkeypatch.undo()
    return tr, calls


def test_planner_compiles_the_trainers_own_programs(tmp_path, monkeypatch):
    """Static sampler (engine.enabled=False): every program the planner compiles for v5p-8 is
    the function the trainer calls, with its static arguments, shapes and dtypes."""
    cfg = tiny_config(tmp_path, **SINGLE_BUCKETS)
    cfg.engine.enabled = False
    if "share_teacher_prefixes" in cfg.train:   # the planner compiles the unshared scoring
        cfg.train.share_teacher_prefixes = False
    tr, calls = _trainer_calls(tmp_path, monkeypatch, cfg, [
        (sampling, "prefill_jit", "rollout/prefill"), (sampling, "decode_jit", "rollout/decode"),
        (update_lib, "old_logprobs", "score/old_logprobs"),
        (update_lib, "teacher_outputs", "score/teacher"),
        (update_lib, "accumulate_grads", "update/grad"),
        (update_lib, "apply_grads", "update/apply")])

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


def test_engine_programs_are_the_trainers_own(tmp_path, monkeypatch):
    """With the rollout engine (the default) the rollout programs that the start-up check and
    the planner compile are the engine's prefill and decode with the arguments of the trainer's
    own calls: its first admission wave (every prompt, rows per shard in a power of 4) and its
    decode call (every slot, the longest row's page table, the pool from `engine_options`)."""
    cfg = tiny_config(tmp_path, **SINGLE_BUCKETS)
    tr, calls = _trainer_calls(tmp_path, monkeypatch, cfg, [
        (engine_programs, "prefill_jit", "rollout/prefill"),
        (engine_programs, "decode_jit", "rollout/decode")])
    assert sorted(calls) == ["rollout/decode", "rollout/prefill"], "the trainer ran no engine"
    # What `Trainer.check_memory` compiles on the trainer's devices (no memory limit on CPU:
    # the engine's default pool, every slot at the longest row).
    rs = programs_lib.run_setup(cfg, tr.mesh, eos_ids=tr.eos_ids, pad_id=tr.pad_id,
                                model_config=tr.model_config)
    built = {p.name: p for p in programs_lib.build(rs)}
    assert [n for n in built if n.split("/")[0] in ("rollout", "eval")] == [
        "rollout/prefill", "rollout/decode", "eval/prefill", "eval/decode"]
    fns = {"rollout/prefill": engine_programs.prefill_jit,
           "rollout/decode": engine_programs.decode_jit}
    for name, (args, kwargs) in calls.items():
        program = built[name]
        assert program.fn is fns[name] and not kwargs
        assert _describe(program.args) == _describe(args), name
    assert built["rollout/decode"].loop_trips == cfg.engine.steps_per_call


def test_engine_pool_too_small_for_a_row_is_refused():
    """A memory budget that leaves the engine a page pool smaller than one longest row is a
    refusal naming the pool (the engine would raise at the first rollout), before anything
    runs; a budget with room fits."""
    import importlib.util

    from rlcsd_jax.distributed import sharding
    from rlcsd_jax.trainer import setup

    spec = importlib.util.spec_from_file_location("tiny_cfg", os.path.join(ROOT, "configs",
                                                                            "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    rs = programs_lib.run_setup(cfg, sharding.make_mesh(1, 1, 1),
                                model_config=setup.model_config(cfg, 768))
    decode = {p.name: p for p in programs_lib.build(rs)}["rollout/decode"]
    # the train state and the compute-dtype weights; one row needs 17 pages of 32 x 1 KiB
    held = (programs_lib.device_bytes(decode.resident)
            + programs_lib.device_bytes(decode.args[1]))
    for budget, refused in ((held + 2**19, True), (held + 2**26, False)):
        progs = {p.name: p for p in programs_lib.build(rs, memory_per_device=budget)}
        assert bool(progs["rollout/decode"].refusal) is refused
        assert bool(progs["rollout/prefill"].refusal) is refused
    small = {p.name: p for p in programs_lib.build(rs, memory_per_device=held + 2**19)}
    m = compile_lib.measure(small["rollout/decode"], held + 2**19, with_cost=False)
    assert m.fits is False and m.error is None
    text = report.refusals([m])
    assert text.startswith("rollout/decode does NOT fit: the KV page pool left to the engine")
    assert "cannot hold one row of 512 prompt + 32 new tokens (17 pages)" in text, text
    assert "engine.kv_memory_fraction" in text


def _plan_cli(*overrides, topology="v5e-1", timeout=300):
    cmd = [sys.executable, "-m", "rlcsd_jax.plan", "--config=configs/tiny.py",
           f"--topology={topology}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


SMALL = ["--config.rollout.prompts_per_step=2", "--config.rollout.group_size=2",
         "--config.train.minibatch_prompts=1", "--config.data.max_prompt_len=128",
         "--config.rollout.prompt_buckets=()", "--config.train.teacher_max_len=256",
         "--config.train.teacher_buckets=()", "--config.eval.batch_prompts=2",
         "--config.eval.num_samples=2", "--config.eval.max_new_tokens=8"]


def test_impossible_config_exits_1_naming_the_program(tmp_path):
    # Static sampler: 2 prompts x 16384 samples x (128 + 512) cache slots of the tiny model
    # (1 KiB per slot): 20 GiB of KV cache on a 16 GiB v5e chip; short rows keep the other
    # programs quick to compile.
    out = _plan_cli(*SMALL, "--config.engine.enabled=False", "--config.method=grpo",
                    "--config.rollout.group_size=16384", "--config.rollout.max_new_tokens=512",
                    "--config.train.micro_batch_tokens=2048", f"--json={tmp_path}/plan.json")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rollout/decode does NOT fit: needs" in out.stdout
    assert "the budget is 15.8 GiB" in out.stdout
    assert "rollout.max_new_tokens" in out.stdout and "COMPILE ERROR" not in out.stdout
    plan_json = json.load(open(tmp_path / "plan.json"))
    fits = {p["name"]: p["fits"] for p in plan_json["programs"]}
    assert fits["rollout/decode"] is False and fits["eval/decode"] is True
    assert plan_json["step_seconds"]["step"] is None


def small_model_dir(path) -> str:
    """config.json of a 2-layer Qwen3 with 128-wide heads: the TPU ragged paged attention
    kernel works on 128-lane head dims, which the tiny preset's 32 are not."""
    from helpers.hf_fixtures import qwen3_config

    qwen3_config(vocab_size=1024, hidden_size=256, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                 max_position_embeddings=4096).save_pretrained(path)
    return str(path)


def test_fitting_config_exits_0_with_a_step_estimate(tmp_path):
    """The default plan (rollout engine) of a small model: every program fits, the rollout and
    eval programs are the engine's, the decode rows carry their bytes-per-token ratio."""
    out = _plan_cli(*SMALL, f"--config.model.checkpoint={small_model_dir(tmp_path / 'm')}",
                    "--config.rollout.max_new_tokens=8", "--mean_response_len=4",
                    f"--json={tmp_path}/plan.json")
    assert out.returncode == 0, out.stdout + out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("one training step")][0]
    assert "mean response of 4 tokens" in line and "n/a" not in line
    assert np.isfinite(float(line.split("(roofline): ")[1].split(" s")[0]))
    rows = {p["name"]: p for p in json.load(open(tmp_path / "plan.json"))["programs"]}
    assert all(r["fits"] for r in rows.values())
    assert "slots x 16 steps" in rows["rollout/decode"]["what"]
    assert "pool 1 x" in rows["eval/prefill"]["what"]
    assert rows["rollout/decode"]["floor_ratio"] > 0 and rows["eval/decode"]["floor_ratio"] > 0
    assert "rollout/decode: " in out.stdout and "MB/token vs floor" in out.stdout


def test_engine_decode_reads_near_its_floor(tmp_path):
    """The engine's decode program compiled for v5p-8 (4 chips over fsdp) by the planner: the
    bytes accessed per generated token (the TPU compiler's HLO, loops counted, the ragged paged
    attention kernel priced at the mean live KV) are within 1.5x of the floor = weights per
    device / slots per device + live KV per token.  A pool-sized read or write per step, or the
    kernel priced at its whole page table, would be several times the floor here (pool and
    page table are 4x the live KV)."""
    from rlcsd_jax.distributed import sharding
    from rlcsd_jax.planner import topology

    cfg = tiny_config(tmp_path, method="grpo", **{
        "rollout.prompts_per_step": 16, "rollout.group_size": 16, "rollout.max_new_tokens": 2048,
        "data.max_prompt_len": 256, "rollout.prompt_buckets": (256,),
        "train.teacher_buckets": ()})
    cfg.model.checkpoint = small_model_dir(tmp_path / "m")
    cfg.model.dtype = "bfloat16"
    sl = topology.get_slice("v5p-8")
    mesh = sharding.make_mesh(1, -1, 1, devices=sl.devices)
    rs = plan.run_setup_for(cfg, mesh)
    budget = topology.hbm_budget(sl)
    progs = {p.name: p for p in programs_lib.build(rs, mean_response_len=1024,
                                                   memory_per_device=budget)}
    decode = progs["rollout/decode"]
    assert decode.fn is engine_programs.decode_jit
    assert progs["rollout/prefill"].fn is engine_programs.prefill_jit
    # 256 rows on 256 slots (64 per device), every slot can hold the longest row
    assert decode.what.startswith("256 slots x 16 steps, table 72 pages, mean live KV 576")
    m = compile_lib.measure(decode, budget)
    assert m.fits and m.cost.custom_calls.count("tpu_custom_call") == 0   # the kernel is priced
    (row,) = report.rows([m], sl.chip, mesh.devices.size)
    print(f"rollout/decode: {row.bytes_per_token / 1e6:.3f} MB/token, floor "
          f"{row.floor_bytes_per_token / 1e6:.3f} MB, ratio {row.floor_ratio:.3f}")
    assert 1.0 <= row.floor_ratio <= 1.5, row
    pool = decode.args[2]
    pool_per_device = programs_lib.device_bytes(pool)
    live_per_device = decode.decode_floor.kv_bytes_per_token * decode.decode_floor.slots
    assert pool_per_device > 4 * live_per_device
