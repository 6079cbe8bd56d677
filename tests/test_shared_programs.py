"""The shared-prefix teacher programs (`trainer.shared_programs`) lower and compile for a TPU
slice, call the functions the trainer's shared teacher pass calls with the same static
arguments, and the teacher-token simulation (benchmarks/teacher_tokens.py) counts consistently."""

import jax
import numpy as np
import pytest

import fake_rollouts
from benchmarks import teacher_tokens
from rlcsd_jax import scoring_prefix, sharding
from rlcsd_jax.trainer import loop, shared_passes, shared_programs
from test_shared_scoring import PATTERN, _config, _step_inputs


def _describe(tree):
    """dtype and rank of every array; static arguments (graphdef) as they are."""
    return jax.tree.map(lambda x: (str(x.dtype), len(x.shape)) if hasattr(x, "shape") else x,
                        tree)


def _run_setup(cfg, mesh):
    from rlcsd_jax import plan

    return plan.run_setup_for(cfg, mesh)


def test_programs_compile_for_a_tpu_slice(tmp_path):
    """Largest shapes and typical twins of rlcsd's shared teacher programs compile for v5p-8
    (tiny model), the continuations over the prefix program's compiled outputs, within the
    compiler's memory budget, with a roofline time."""
    from rlcsd_jax.planner import compile as compile_lib, topology

    cfg = _config(tmp_path, "rlcsd")
    sl = topology.get_slice("v5p-8")
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1, devices=sl.devices)
    budget = topology.hbm_budget(sl)
    measured = {}

    def lower_dependent(p):
        m = measured[id(p)] = compile_lib.measure(p, budget)
        assert m.compiled is not None, m.error
        return compile_lib._out_info(m.compiled)

    progs = shared_programs.standalone(_run_setup(cfg, mesh), lower_dependent=lower_dependent)
    assert [p.name for p in progs] == ["score/teacher_prefix", "score/teacher_continuation"]
    assert progs[0].args[2].shape == (4, shared_programs.largest_prefix_width(cfg))
    for p in progs:
        for q in (p, p.typical):
            m = measured.get(id(q)) or compile_lib.measure(q, budget)
            assert m.fits, (q.name, q.what, m.error)
            assert m.per_call(sl.chip)[2].seconds > 0
            assert q.phase == "score" and q.calls_per_step > 0 and q.tokens_per_call > 0
        assert p.typical.is_typical and not p.is_typical


# After the compile test: a trainer run in this process would make the compile-only client
# try the persistent cache's CPU entries (harmless warnings).
def test_programs_are_the_teacher_pass_calls(tmp_path, monkeypatch):
    """Same functions, static keywords, dtypes and ranks as `shared_passes.teacher_pass`'s
    calls (rlcsd: log-probs; opsd_ectr: top-k, then at the correct context's ids)."""
    fake_rollouts.install(monkeypatch.setattr, PATTERN)
    for method in ("rlcsd", "opsd_ectr"):
        cfg = _config(tmp_path / method, method)
        tr = loop.Trainer(cfg, str(tmp_path / method))
        calls = []
        with monkeypatch.context() as m:
            for name in ("prefix_kv", "continuation_stats"):
                real = getattr(scoring_prefix, name)

                def wrapped(*args, _real=real, _name=name, **kwargs):
                    calls.append((_name, args, kwargs))
                    return _real(*args, **kwargs)
                m.setattr(scoring_prefix, name, wrapped)
            with jax.set_mesh(tr.mesh):
                ro, ctx = _step_inputs(tr, cfg)
                rows = np.asarray(ctx.kept)
                shared_passes.teacher_pass(tr, ro, ctx, rows, np.arange(len(rows)),
                                           tr.state.params, width=ro.tokens.shape[1])
        progs = shared_programs.standalone(_run_setup(cfg, tr.mesh))
        by_fn = {}
        for p in progs:
            by_fn.setdefault(p.fn, []).append(p)
        (prefix,) = by_fn[scoring_prefix.prefix_kv]
        got = [c for c in calls if c[0] == "prefix_kv"]
        assert got and all(_describe(c[1]) == _describe(prefix.args) for c in got)
        assert all(c[2] == prefix.kwargs for c in got)
        conts = [c for c in calls if c[0] == "continuation_stats"]
        # one program per kind of continuation call the pass made (static keywords, at_ids)
        kinds = {(tuple(sorted(c[2].items())), c[1][6] is None) for c in conts}
        built = {(tuple(sorted(p.kwargs.items())), p.args[6] is None)
                 for p in by_fn[scoring_prefix.continuation_stats]}
        assert kinds == built, (kinds, built)
        for p in by_fn[scoring_prefix.continuation_stats]:
            same = [c for c in conts
                    if c[2] == p.kwargs and (c[1][6] is None) == (p.args[6] is None)]
            # every argument but the cache (test_programs_compile_for_a_tpu_slice compiles it)
            drop = lambda args: [a for i, a in enumerate(args) if i != 2]  # noqa: E731
            assert all(_describe(drop(c[1])) == _describe(drop(p.args)) for c in same), p.name


@pytest.fixture(scope="module")
def step():
    return teacher_tokens.count_step(0)


def test_simulated_counters_are_consistent(step):
    r = step
    assert r["kept"] <= r["rollouts"] == 512
    assert r["kept"] <= r["contexts"] <= 5 * r["kept"]
    assert 0 < r["prefixes"] <= min(r["contexts"], r["rollouts"])
    assert r["prefixes"] <= r["prefixes_minibatch"]
    assert r["useful"] == r["useful_prefix"] + r["useful_cont"]
    # full rows: padding only adds, every slot >= the valid contexts
    assert r["useful"] < r["full_valid_nopad"] <= r["full_nopad"] <= r["full_rows"]
    assert r["full_rows"] <= r["full_pow2"]
    for kind in ("current", "proposed"):
        c = r[kind]
        assert c["computed"] == c["prefix_tokens"] + c["cont_tokens"]
        assert c["computed"] >= r["useful_minibatch"] >= r["useful"]
        b = c["breakdown"]
        assert b["prefix_real"] == r["useful_prefix"] or r["prefixes_minibatch"] > r["prefixes"]
        assert b["cont_real"] == r["useful_cont"]
    # shared_scoring.plan (the proposal, applied) computes less than full rows and keeps every
    # prefix unit within the per-device budget; the benchmark's copy of the rule agrees with it
    assert r["current"]["computed"] == r["proposed"]["computed"]
    assert r["current"]["computed"] < r["full_rows"] < r["full_trainer"]
    assert r["current"]["max_unit_tokens"] <= teacher_tokens.BUDGET
    assert r["current"]["max_cont_tokens"] <= teacher_tokens.BUDGET + 16384 + 40960


def test_proposed_plan_scores_every_row_once():
    """The benchmark's proposed plan covers each row exactly once, its prefix in its unit."""
    w = teacher_tokens.simulate(1)
    ro, enc = teacher_tokens._Rollouts(w, 8), teacher_tokens._Encoder(w, 8)
    from rlcsd_jax.trainer import batches, setup
    from rlcsd_jax.trainer import shared_scoring as shared

    ctx = batches.build_contexts("rlcsd", ro, enc, setup.group_rngs(1, 0, 0, 64),
                                 hint_source="self_rollout", k_max=4)
    rows = np.asarray(ctx.kept)[:128]
    trows = shared.teacher_rows(ro, ctx, rows, np.arange(len(rows)), max_len=40960)
    p = teacher_tokens.proposed_plan(trows, shards=8, budget=40960)
    seen = []
    for u in p.units:
        assert u.per_block * u.width <= max(40960, u.width)
        for c in u.calls:
            for b, block in enumerate(c.rows):
                assert len(block) <= c.rows_per_block
                for i in block:
                    assert trows[i].prefix in u.prefixes[b]
                    assert len(trows[i].response) <= c.width
                    seen.append(i)
    assert sorted(seen) == list(range(len(trows)))
