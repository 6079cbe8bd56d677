"""The one table of methods (`rlcsd_jax.losses.methods`): no other module of the package names a
method, and the table's properties are what the trainer does with them.

The scanner walks every module with `ast`: a string constant equal to a method name (docstrings
aside; comments are not in the tree) or an attribute named after one (`cfg.rlcsd`) outside the
table module is a failure that names file:line.  A planted literal checks the scanner itself.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcsd_jax import losses
from rlcsd_jax.losses import methods as methods_lib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rlcsd_jax"
# The modules allowed to name methods: the table itself.
TABLE_MODULES = {PACKAGE / "losses" / "methods.py"}
NAMES = frozenset(losses.METHODS)


def _docstrings(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def method_names_in(path: pathlib.Path, names=NAMES, root=PACKAGE.parent) -> list[str]:
    """`file:line: what` for each method-name string constant / attribute of a module."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and node.value in names and id(node) not in skip):
            found.append((node.lineno, f"string {node.value!r}"))
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append((node.lineno, f"attribute .{node.attr}"))
    rel = path.relative_to(root)
    return [f"{rel}:{line}: {what}" for line, what in sorted(found)]


def scan(package: pathlib.Path, allowed=frozenset(), names=NAMES) -> list[str]:
    return [hit for path in sorted(package.rglob("*.py")) if path not in allowed
            for hit in method_names_in(path, names, package.parent)]


def test_no_module_outside_the_table_names_a_method():
    hits = scan(PACKAGE, TABLE_MODULES)
    assert not hits, ("method names outside the method table (read a property of "
                      "`losses.METHODS[method]` instead):\n" + "\n".join(hits))


def test_the_scanner_finds_a_planted_method_name(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "clean.py").write_text(
        '"""Talks about rlcsd and grpo in prose only."""\n'
        "# if method == 'rlcsd': a comment\n"
        "def f(method):\n"
        '    """rlcsd"""\n'
        '    return f"{method}/rlcsd_loss"\n')
    assert scan(pkg) == []
    (pkg / "planted.py").write_text(
        "def f(method, cfg):\n"
        '    """The docstring may say rlcsd."""\n'
        '    if method in ("sdpo", "srpo"):\n'
        "        return cfg.rlcsd\n")
    assert scan(pkg) == ["pkg/planted.py:3: string 'sdpo'", "pkg/planted.py:3: string 'srpo'",
                         "pkg/planted.py:4: attribute .rlcsd"]
    assert scan(pkg, {pkg / "planted.py"}) == []


# ---------------------------------------------------------------------------------------------
# The table against today's trainer (algorithm.md §2, §3, §4.0, §4.9).

EXPECTED = {   # teacher mode, context, wrong slots at k_max=4, top-k support, grad clip, agg
    "grpo": (None, None, 0, None, 1.0, "batch"),
    "opsd": ("fixed", "gt_solution", 0, "teacher", 0.1, "per_rollout"),
    "sdpo": ("ema", "gt_solution", 0, "student", 1.0, "reference_micro_batch"),
    "srpo": ("ema", "gt_solution", 0, "student", 1.0, "reference_micro_batch"),
    "rlsd": ("snapshot", "gt_solution", 0, None, 1.0, "per_rollout"),
    "rlcsd": ("snapshot", "self_rollout", 4, None, 1.0, "per_rollout"),
    "opsd_ectr": ("fixed", "self_rollout", 1, "teacher", 0.1, "per_rollout"),
    "rlsd_ectr": ("snapshot", "self_rollout", 1, None, 1.0, "per_rollout"),
}


def test_the_table_holds_every_method_as_before():
    assert set(losses.METHODS) == set(EXPECTED) == set(losses.names())
    for name, (mode, context, slots, support, clip, agg) in EXPECTED.items():
        m = losses.METHODS[name]
        assert m.name == name and losses.get(name) is m.loss
        assert (m.teacher_mode, m.teacher_context, m.num_wrong_slots(4), m.grad_clip,
                m.aggregation) == (mode, context, slots, clip, agg), name
        assert m.has_teacher == (name != "grpo")
        assert m.uses_topk == (support is not None) and m.student_topk == (support == "student")
        assert m.teacher_entropy == (name == "srpo")
        assert m.token_mean_loss == (name not in ("rlcsd", "srpo"))
        assert m.reference_teacher_aware == (name not in ("grpo", "srpo"))
        assert m.single_wrong == name.endswith("_ectr")
        assert dict(m.defaults) == dict(losses.DEFAULTS[name])
        assert m.inputs == losses.INPUTS[name]


def test_wrong_hint_slots():
    from rlcsd_jax.trainer import batches

    for k in (1, 2, 4, 7):
        assert batches.num_wrong_slots("rlcsd", k) == k
        assert batches.num_wrong_slots("opsd_ectr", k) == batches.num_wrong_slots(
            "rlsd_ectr", k) == 1
        for name in ("grpo", "opsd", "sdpo", "srpo", "rlsd"):
            assert batches.num_wrong_slots(name, k) == 0


def _base_config(method, **over):
    from rlcsd_jax.trainer import train_config

    cfg = train_config.get_base_config()
    cfg.method = method
    cfg.teacher.k_max = 3
    cfg.train.distill_top_k = 4
    cfg.train.teacher_max_len = 4096
    for key, value in over.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_config_resolution_reads_the_table(method):
    """Teacher mode, reference model, grad clip and the teacher rows per rollout of a run."""
    from rlcsd_jax.trainer import program_shapes, setup

    m = losses.METHODS[method]
    cfg = _base_config(method, **{"rollout.max_new_tokens": 64, "data.max_prompt_len": 64,
                                  "train.micro_batch_tokens": 1024})
    spec = setup.step_spec(cfg, 16)
    assert spec.teacher_mode == setup.teacher_mode(cfg) == m.teacher_mode
    assert spec.method_spec is m and spec.grad_clip == m.grad_clip
    # the reference model is kept iff the KL term is on (grpo and the ECTR variants by default)
    assert spec.need_ref == (dict(cfg[method]).get("kl_coef", 0.0) > 0)
    assert spec.need_ref == (method in ("grpo", "opsd_ectr", "rlsd_ectr"))
    cfg[method].kl_coef = 0.0 if spec.need_ref else 0.01
    assert setup.step_spec(cfg, 16).need_ref != spec.need_ref
    slots = 3 if method == "rlcsd" else EXPECTED[method][2]      # k_max = 3 here
    assert program_shapes.step_shapes(cfg, 1).teacher_contexts == 1 + slots


def _rollouts(pattern, g):
    """Rollouts-like groups: group p's j-th answer correct iff pattern[p][j]."""
    from rlcsd_jax.data.records import Record

    records, texts, rewards = [], [], []
    for p, row in enumerate(pattern):
        records.append(Record(problem=f"What is {p} + 1?", ground_truth=str(p + 1),
                              data_source="math", index=p, solution=f"{p} + 1 = {p + 1}."))
        for j in range(g):
            ok = row[j % len(row)]
            texts.append(f"step {p}.{j}: \\boxed{{{p + 1 if ok else p + 7 + j}}}")
            rewards.append(float(ok))
    return types.SimpleNamespace(records=records, texts=texts, rewards=np.asarray(rewards),
                                 group_size=g)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_contexts_follow_the_table(method):
    """No teacher: every rollout, no contexts; GT solution: every rollout, no wrong hint;
    self-rollout: drops, and at most the table's wrong-hint slots per kept rollout."""
    from rlcsd_jax.trainer import batches

    m, k_max, g = losses.METHODS[method], 4, 6
    pattern = [[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    ro = _rollouts(pattern, g)
    encoder = types.SimpleNamespace(text_ids=lambda text: [len(text) % 97 + 1])
    rngs = [np.random.default_rng([0, i]) for i in range(len(pattern))]
    ctx = batches.build_contexts(method, ro, encoder, rngs, hint_source="self_rollout",
                                 k_max=k_max)
    everyone = list(range(len(ro.texts)))
    if not m.has_teacher:
        assert list(ctx.kept) == everyone and ctx.correct_prompts is None
        return
    counts = [len(w) for w in ctx.wrong_prompts]
    assert len(ctx.correct_prompts) == len(ctx.kept) == len(counts)
    if m.teacher_context == "gt_solution":
        assert list(ctx.kept) == everyone and set(counts) == {0}
        return
    assert len(ctx.kept) < len(everyone)          # the all-correct group is dropped
    assert 1 <= min(counts) and max(counts) <= m.num_wrong_slots(k_max)
    assert (max(counts) > 1) == (m.wrong_hints == "k_max")


def _abstract_teacher_outputs(method, k_max=2, rows=2, width=24, n=8):
    from flax import nnx

    from rlcsd_jax import models
    from rlcsd_jax.trainer import setup, update

    cfg = _base_config(method, **{"teacher.k_max": k_max})
    spec = setup.step_spec(cfg, n)
    graphdef, params = nnx.split(models.abstract_model(models.get_preset("qwen3-tiny")))
    c = 1 + losses.METHODS[method].num_wrong_slots(k_max)
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    tb = dict(input_ids=i32((c, rows, width)), attention_mask=i32((c, rows, width)),
              response_start=i32((c, rows)), wrong_valid=i32((rows, k_max)))
    ids = i32((rows, n, spec.top_k)) if spec.method_spec.student_topk else None
    return jax.eval_shape(
        lambda p, t, i: update.teacher_outputs(graphdef, p, t, i, spec, length=n), params, tb, ids)


@pytest.mark.parametrize("method", sorted(set(EXPECTED) - {"grpo"}))
def test_teacher_outputs_are_what_the_loss_takes(method):
    """The teacher passes the table selects (scoring, wrong hints, entropy) give exactly the
    teacher arrays the method's loss requires, and top-k ids iff it distils over top-k."""
    m = losses.METHODS[method]
    out = _abstract_teacher_outputs(method)
    student = {"logp", "old_logp", "advantages", "mask"} | (
        {"student_topk_logp"} if m.uses_topk else set())
    assert ("topk_ids" in out) == m.uses_topk
    teacher = set(out) - {"topk_ids"}
    assert teacher == set(m.inputs) - student, (method, sorted(out))
    assert set(m.inputs) <= teacher | student
    if m.wrong_hints == "k_max":
        assert out["teacher_wrong_logp"].shape[1] == 2      # [M, K, N]


def test_grpo_has_no_teacher():
    from rlcsd_jax.trainer import setup

    m = losses.METHODS["grpo"]
    assert not m.has_teacher and m.teacher_scoring is None and m.num_wrong_slots(4) == 0
    assert setup.teacher_mode(_base_config("grpo", **{"teacher.mode": "ema"})) is None
    with pytest.raises(ValueError, match="has no teacher"):
        _abstract_teacher_outputs("grpo")


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_reference_rules_follow_the_table(method):
    """The reference's micro-batch rule: teacher-aware methods, and one teacher row per context
    (rlcsd: the most wrong hints of the step)."""
    from rlcsd_jax.trainer import microbatch

    m = losses.METHODS[method]
    rule = microbatch.reference_rule(method, budget=100, minibatch_rows=16,
                                     has_teacher=m.has_teacher)
    assert rule.teacher_aware == (m.has_teacher and m.reference_teacher_aware)
    ctx = types.SimpleNamespace(correct_prompts=[[1] * 5, [1] * 6],
                                wrong_prompts=[[[2] * 3, [2] * 4, [2]], [[3] * 2]])
    lengths = microbatch.reference_teacher_lengths(method, ctx, [0, 1], [4, 4], budget=100)
    assert lengths.shape == (2, 1 + (3 if m.wrong_hints == "k_max" else m.num_wrong_slots(3)))


@pytest.mark.parametrize("method", sorted(set(EXPECTED) - {"grpo"}))
def test_shared_scoring_passes_follow_the_table(method):
    from rlcsd_jax.trainer import shared_programs

    m = losses.METHODS[method]
    passes = shared_programs._passes(method, 7)
    assert [p[0] for p in passes] == (["", "_wrong"] if m.uses_topk and m.wrong_hints == "one"
                                      else [""])
    suffix, kw, takes_ids, share = passes[0]
    assert takes_ids == m.student_topk
    assert kw.get("entropy", False) == m.teacher_entropy
    assert kw.get("top_k", 0) == (7 if m.teacher_scoring == "teacher_topk" else 0)
    assert sum(p[3] for p in passes) == 1.0


def test_the_analysis_picks_its_methods_from_the_table():
    from rlcsd_jax.analysis import style_drift

    assert style_drift.signal_method(True) == "rlcsd"
    assert style_drift.signal_method(False) == "rlsd"
    with pytest.raises(LookupError):
        methods_lib.find(teacher_context="gt_solution")     # four methods match


def test_config_defaults_come_from_the_table():
    from rlcsd_jax.trainer import train_config

    cfg = train_config.get_base_config()
    assert cfg.method == losses.DEFAULT_METHOD == "rlcsd"
    for name, m in losses.METHODS.items():
        assert dict(cfg[name]) == dict(m.defaults)
        assert m.needs_reference(m.defaults) == (m.defaults.get("kl_coef", 0.0) > 0)
    assert [n for n, m in losses.METHODS.items() if m.check_hparams is not None] == ["rlcsd"]
