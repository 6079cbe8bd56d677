"""The shared-prefix teacher programs (`trainer.shared_programs`) lower and compile for a TPU
slice, call the functions the trainer's shared teacher pass calls with the same static
arguments, and the teacher-token simulation (benchmarks/teacher_tokens.py) counts consistently."""

import contextlib

import jax
import numpy as np
import pytest

from helpers import fake_rollouts
from benchmarks import teacher_tokens
from rlcsd_jax import scoring
from rlcsd_jax.distributed import sharding
from rlcsd_jax.trainer import shared_passes, shared_programs
from rlcsd_jax.trainer import rl_trainer
from test_shared_scoring import PATTERN, _config, _step_inputs


def _describe(tree):
    """dtype and rank of every array; static arguments (graphdef) as they are."""
    return jax.tree.map(lambda x: (str(x.dtype), len(x.shape)) if hasattr(x, "shape") else x,
                        tree)


def _run_setup(cfg, mesh):
    from rlcsd_jax import plan

    return plan.run_setup_for(cfg, mesh)


def test_programs_compile_for_a_tpu_slice(tmp_path):
    """The largest shape and the typical twin of rlcsd's shared teacher program compile for
    v5p-8 (tiny model) within the compiler's memory budget, with a roofline time; the twin
    prices attention at the estimated tile density."""
    from rlcsd_jax.planner import compile as compile_lib, topology

    cfg = _config(tmp_path, "rlcsd")
    sl = topology.get_slice("v5p-8")
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1, devices=sl.devices)
    budget = topology.hbm_budget(sl)
    progs = shared_programs.standalone(_run_setup(cfg, mesh))
    assert [p.name for p in progs] == ["score/teacher_shared"]
    (p,) = progs
    assert p.args[2].shape == (4, shared_programs.largest_width(cfg))
    assert p.kwargs["tile_density"] is None and 0 < p.typical.kwargs["tile_density"] <= 1
    for q in (p, p.typical):
        m = compile_lib.measure(q, budget)
        assert m.fits, (q.name, q.what, m.error)
        assert m.per_call(sl.chip)[2].seconds > 0
        assert q.phase == "score" and q.calls_per_step > 0 and q.tokens_per_call > 0
    assert p.typical.is_typical and not p.is_typical


def test_tile_density_counts_the_tiles_of_both_passes():
    """One group [prefix 256 | r 256 | r 256] in a 1,024-token row of 256-token tiles: pass 1
    (own segments) needs the 3 diagonal tiles, pass 2 (responses over the prefix) the 2 tiles
    of the responses' rows under the prefix's column, of 16 each."""
    seg = np.repeat([1, 2, 3, 0], 256)[None]
    pq = np.repeat([0, 1, 1, 0], 256)[None]
    pk = np.repeat([1, 0, 0, 0], 256)[None]
    assert shared_programs.tile_density(seg, pq, pk, tile=256) == (3 / 16 + 2 / 16) / 2


@contextlib.contextmanager
def _recording(monkeypatch, calls: list):
    """Within it `scoring.shared_prefix_stats` records each call's (args, kwargs) in
    `calls`; yields the real function."""
    real = scoring.shared_prefix_stats
    with monkeypatch.context() as m:
        def wrapped(*args, **kwargs):
            calls.append((args, kwargs))
            return real(*args, **kwargs)
        m.setattr(scoring, "shared_prefix_stats", wrapped)
        yield real


def _recorded_passes(tmp_path, monkeypatch, method, passes):
    """A trainer of `method` (fake rollouts installed by the caller) running passes(tr, ro,
    ctx) on one step's inputs -> (cfg, tr, the recorded shared_prefix_stats calls, the real
    function)."""
    cfg = _config(tmp_path / method, method)
    tr = rl_trainer.Trainer(cfg, str(tmp_path / method))
    calls = []
    with _recording(monkeypatch, calls) as real, jax.set_mesh(tr.mesh):
        ro, ctx = _step_inputs(tr, cfg)
        passes(tr, ro, ctx)
    return cfg, tr, calls, real


def _static(kwargs):
    """A call's static keywords (no arrays, no absent at_ids, not the planner's tile density)."""
    return tuple(sorted((k, v) for k, v in kwargs.items()
                        if not hasattr(v, "shape") and v is not None and k != "tile_density"))


# After the compile test: a trainer run in this process would make the compile-only client
# try the persistent cache's CPU entries (harmless warnings).
def test_programs_are_the_teacher_pass_calls(tmp_path, monkeypatch):
    """Same function, static keywords (but the planner-only tile density), dtypes and ranks as
    `shared_passes.teacher_pass`'s calls (rlcsd: log-probs; opsd_ectr: top-k, then at the
    correct context's ids)."""
    fake_rollouts.install(monkeypatch.setattr, PATTERN)
    def teacher_pass(tr, ro, ctx):
        rows = np.asarray(ctx.kept)
        shared_passes.teacher_pass(tr, ro, ctx, rows, np.arange(len(rows)), tr.state.params,
                                   width=ro.tokens.shape[1])

    for method in ("rlcsd", "opsd_ectr"):
        cfg, tr, calls, real = _recorded_passes(tmp_path, monkeypatch, method, teacher_pass)
        progs = shared_programs.standalone(_run_setup(cfg, tr.mesh))
        assert calls and all(p.fn is real for p in progs)
        names = ("input_ids", "positions", "segment_ids", "prefix_q_seg", "prefix_k_seg",
                 "pred_index", "targets", "at_ids")

        def arrays(args, kw):
            return _describe([kw[n] for n in names]) if not args[2:] else _describe(args[2:])

        kinds = {(_static(kw), kw["at_ids"] is None) for _, kw in calls}
        built = {(_static(p.kwargs), p.args[9] is None) for p in progs}
        assert kinds == built, (kinds, built)
        for p in progs:
            same = [(a, kw) for a, kw in calls
                    if _static(kw) == _static(p.kwargs) and (kw["at_ids"] is None) == (
                        p.args[9] is None)]
            assert all(arrays(a, kw) == _describe(list(p.args[2:])) for a, kw in same), p.name


@pytest.fixture(scope="module")
def step():
    return teacher_tokens.count_step(0)


def test_simulated_counters_are_consistent(step):
    r = step
    assert r["kept"] <= r["rollouts"] == 512
    assert r["kept"] <= r["contexts"] <= 5 * r["kept"]
    assert 0 < r["prefixes"] <= min(r["contexts"], r["rollouts"])
    assert r["useful"] == r["useful_prefix"] + r["useful_cont"]
    # full rows: padding only adds, every slot >= the valid contexts
    assert r["useful"] < r["full_valid_nopad"] <= r["full_nopad"] <= r["full_rows"]
    assert r["full_rows"] <= r["full_pow2"]
    # as filed: one pow2-wide batch per mini-batch, at least every slot's pow2 row
    assert r["full_pow2"] <= r["full_filed"] and r["full_trainer_pow2"] <= r["full_filed"]
    # shared-prefix rows: every computed token is useful, padding or a prefix computed again
    s = r["shared"]
    assert s["computed"] == pytest.approx(
        r["useful"] + s["row_end"] + s["empty_rows"] + s["duplicated_prefix"])
    assert r["useful"] <= s["computed"] <= 1.2 * r["useful"] < r["full_trainer"]
    assert 0 < s["tile_density"] < 0.5


def test_student_programs_are_the_student_pass_calls(tmp_path, monkeypatch):
    """`programs.build` with sharing on prices the student passes the trainer makes (old
    log-probs with entropies; sdpo's top-k of the live student) as shared-prefix programs with
    the same static keywords, and no full-row "score/old_logprobs"."""
    import collections

    from rlcsd_jax.trainer import programs as programs_lib

    fake_rollouts.install(monkeypatch.setattr, PATTERN)

    def student_passes(tr, ro, ctx):
        kept = np.asarray(ctx.kept)
        tr._shared_old_logprobs(ro, kept, collections.Counter())
        if tr.cfg.method == "sdpo":
            shared_passes.student_pass(tr, ro, kept, tr.state.params,
                                       width=ro.tokens.shape[1], top_k=tr.spec.top_k)

    for method in ("rlcsd", "sdpo"):
        cfg, tr, calls, real = _recorded_passes(tmp_path, monkeypatch, method, student_passes)
        built = programs_lib.build(_run_setup(cfg, tr.mesh))
        names = {p.name for p in built}
        assert "score/old_logprobs" not in names and "score/student_topk" not in names
        student = [p for p in built if p.name.startswith("score/student")]
        assert {_static(kw) for _, kw in calls} == {_static(p.kwargs) for p in student}, method
        assert student and all(p.fn is real for p in student)
