"""`python -m rlcsd_jax.analyze_style` (Figure 1a): outputs, hint-source fallbacks, and that the
e_ctr it reports is the trainer's own scoring + `losses.signal_diagnostics` on the same batch.

The tiny random model writes gibberish (no \\boxed{} answer, so no hint survives), so most
tests replace the decoded TEXT with scripted boxed answers; the token ids that are scored are
still the model's own samples.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlcsd_jax import losses
from rlcsd_jax.analysis import style_drift, style_report
from helpers import fake_rollouts
from rlcsd_jax.trainer import batches, update

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
# Small and fast: 4 prompts x 4 rollouts x 24 tokens.
OVERRIDES = {"data.num_generated_train": 16, "data.num_generated_eval": 4,
             "rollout.prompts_per_step": 4, "rollout.group_size": 4,
             "rollout.max_new_tokens": 24, "train.minibatch_prompts": 1,
             "warm_start.steps": 0}
# Per group (prompt): which of the 4 rollouts answer correctly.
MIXED = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
ALL_WRONG = [[0, 0, 0, 0]]


def tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_cfg_style", TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for k, v in OVERRIDES.items():
        section, key = k.split(".")
        c[section][key] = v
    return c


def script_texts(monkeypatch, pattern):
    """Decoded texts follow `pattern` (boxed GT answer or a boxed wrong answer)."""
    fake_rollouts.install(monkeypatch.setattr, pattern)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return style_drift.build_trainer(tiny_config(), str(tmp_path_factory.mktemp("style_tr")))


def recompute(trainer, signals):
    """e_c / e_ctr straight from the trainer's scoring code on the batch `signals` came from."""
    ro, ctx = signals["rollouts"], signals["contexts"]
    rows = np.asarray(ctx.kept)
    m = len(rows)
    n = ro.tokens.shape[1]
    spec = dataclasses.replace(trainer.spec, method="rlcsd", response_len=n)
    sb = batches.student_batch(ro, rows, m, 1024, n, trainer.pad_id)
    logp = update.student_stats(trainer.graphdef, trainer.state.params, sb, spec)["logp"]
    tb = batches.teacher_arrays(ro, ctx, np.arange(m), rows, m,
                                k_slots=trainer.cfg.teacher.k_max,
                                max_len=trainer.cfg.train.teacher_max_len, pad_id=trainer.pad_id,
                                width=2048)
    t = update.teacher_outputs(trainer.graphdef, trainer.state.params, tb, None, spec, length=n)
    d = losses.signal_diagnostics(logp=logp, teacher_correct_logp=t["teacher_correct_logp"],
                                  teacher_wrong_logp=t["teacher_wrong_logp"],
                                  wrong_valid=t["wrong_valid"], mask=sb["response_mask"])
    return np.asarray(d["e_c"]), np.asarray(d["e_ctr"]), np.asarray(sb["response_mask"])


def per_token(tokenizer, ids, mask, values):
    """{decoded token: (count, mean |value|)} by a plain loop."""
    acc = {}
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if mask[r, t]:
                s = tokenizer.decode([int(ids[r, t])], skip_special_tokens=False)
                acc.setdefault(s, []).append(abs(float(values[r, t])))
    return {s: (len(v), float(np.mean(v))) for s, v in acc.items()}


def test_cli_writes_table_and_png_with_the_trainers_e_ctr(tmp_path, monkeypatch):
    script_texts(monkeypatch, MIXED)
    captured = {}
    real = style_drift.analyze
    monkeypatch.setattr(style_drift, "analyze",
                        lambda *a, **k: captured.setdefault("res", real(*a, **k)))
    out = tmp_path / "out"
    argv = ["analyze_style", f"--config={TINY}", f"--out={out}", "--num_prompts=4",
            f"--workdir={tmp_path / 'work'}", "--min_count=2",
            *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
    assert style_drift.main(argv) == 0

    table = (out / "style_tokens.md").read_text()
    assert "## Top-10 tokens by mean |e_c|" in table
    assert "## Top-10 tokens by mean |e_ctr|" in table
    assert table.count("| rank | token | count | mean \\|e_c\\|") == 2
    png = (out / "style_drift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rep = json.loads((out / "style_tokens.json").read_text())
    assert rep["source"] == "self_rollout" and rep["has_e_ctr"]
    # MIXED, G=4: group 0 keeps 4; group 1 drops its lone correct target (3 kept); group 2
    # drops its lone wrong target (no other wrong hint, 3 kept); group 3 is all wrong (0).
    assert rep["num_rollouts"] == 16 and rep["num_kept"] == 10
    assert len(rep["top_e_c"]) == len(rep["top_e_ctr"]) == 10

    # The reported per-token means equal a direct recomputation on the same batch.
    res = captured["res"]
    tr, sig = res["trainer"], res["signals"]
    e_c, e_ctr, mask = recompute(tr, sig)
    ids = sig["rollouts"].tokens[np.asarray(sig["contexts"].kept)]
    want_ctr = per_token(tr.tokenizer, ids, mask, e_ctr)
    want_c = per_token(tr.tokenizer, ids, mask, e_c)
    assert rep["tokens"], "no token reached min_count"
    for d in rep["tokens"]:
        assert d["count"] == want_ctr[d["token"]][0] >= 2
        assert d["mean_abs_e_ctr"] == pytest.approx(want_ctr[d["token"]][1], rel=1e-4, abs=1e-5)
        assert d["mean_abs_e_c"] == pytest.approx(want_c[d["token"]][1], rel=1e-4, abs=1e-5)
    top = rep["top_e_ctr"][0]
    eligible = {s: v for s, v in want_ctr.items() if v[0] >= 2}
    assert top["mean_abs_e_ctr"] == pytest.approx(max(v[1] for v in eligible.values()),
                                                  rel=1e-4)
    assert f"{top['mean_abs_e_ctr']:.4f}" in table
    # The two signals are different quantities (guards against a swapped key).
    assert not np.allclose(e_c[mask > 0], e_ctr[mask > 0])


def test_all_wrong_falls_back_to_gt_cot(trainer, monkeypatch):
    script_texts(monkeypatch, ALL_WRONG)
    records = trainer.train_records[:2]
    sig = style_drift.collect_signals(trainer, records, seed=3)
    assert sig["source"] == "gt_cot" and sig["has_e_ctr"]
    assert "every rollout was dropped under self_rollout" in sig["message"]
    assert "falling back to gt_cot" in sig["message"]
    assert len(sig["rows"]) == 8          # gt_cot keeps all-wrong groups (A = 0)
    e_c, e_ctr, mask = recompute(trainer, sig)
    np.testing.assert_allclose(sig["e_ctr"], e_ctr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sig["e_c"], e_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sig["mask"], mask)
    # Strict self_rollout: nothing to analyse, and the outputs say so.
    strict = style_drift.collect_signals(trainer, records, seed=3, hint_source="self_rollout")
    assert strict["source"] == "none" and len(strict["rows"]) == 0
    md = style_report.render_table([], [], source="none", message=strict["message"],
                                    num_rollouts=8)
    assert "no rollout survived" in md and "every rollout was dropped" in md


def test_untrained_model_still_gives_e_c(trainer, tmp_path):
    """Gibberish (no box anywhere): no wrong hint under any source -> e_c only, e_ctr n/a."""
    sig = style_drift.collect_signals(trainer, trainer.train_records[:2], seed=1)
    assert sig["source"] == style_drift.SOURCE_CORRECT_ONLY and not sig["has_e_ctr"]
    assert "every rollout was dropped under gt_cot" in sig["message"]
    assert len(sig["rows"]) == 8
    m = sig["mask"] > 0
    assert np.isfinite(sig["e_c"][m]).all() and np.isnan(sig["e_ctr"]).all()
    assert np.abs(sig["e_c"][m]).max() > 0
    tok = trainer.tokenizer
    assert style_report.top_tokens(sig, tok, by="e_ctr") == []
    top_c = style_report.top_tokens(sig, tok, by="e_c", min_count=1)
    assert len(top_c) == 10
    md = style_report.render_table(top_c, [], source=sig["source"], num_rollouts=8,
                                    num_kept=8, num_tokens=int(m.sum()))
    assert "no wrong hint exists" in md and "## Top-10 tokens by mean |e_ctr|" in md
    out = style_report.render_png(sig, tok, str(tmp_path / "drift.png"))
    with open(out, "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_token_stats_aggregate_by_string():
    class Tok:   # ids 1 and 2 decode to the same string
        def decode(self, ids, skip_special_tokens=False):
            return {1: "a", 2: "a", 3: "\n", 4: " b"}[ids[0]]

    sig = {"token_ids": np.array([[1, 2, 3, 4], [3, 3, 1, 0]]),
           "mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
           "e_c": np.array([[1.0, -3.0, 0.5, 9.0], [0.5, -0.5, 2.0, 99.0]]),
           "e_ctr": np.array([[0.1, 0.1, -2.0, 0.0], [2.0, -2.0, -0.3, 99.0]])}
    stats = {d["token"]: d for d in style_report.token_stats(sig, Tok(), min_count=2)}
    assert set(stats) == {"a", "\n"}                  # " b" seen once; padding ignored
    assert stats["a"]["count"] == 3 and stats["a"]["mean_abs_e_c"] == pytest.approx(2.0)
    assert stats["a"]["mean_e_c"] == pytest.approx(0.0)
    assert stats["\n"]["mean_abs_e_ctr"] == pytest.approx(2.0)
    assert [d["token"] for d in style_report.top_tokens(sig, Tok(), by="e_ctr", k=1,
                                                         min_count=2)] == ["\n"]
    assert style_report.display_token(" x\n|\x1b") == "␣x⏎|\\x1b"
    md = style_report.render_table(style_report.top_tokens(sig, Tok(), by="e_c", min_count=2),
                                    [], min_count=2, num_kept=2)
    assert "| 1 | `a` | 3 | 2.0000 | 0.0000 |" in md


def test_module_cli_usage_error():
    proc = subprocess.run([sys.executable, "-m", "rlcsd_jax.analyze_style", "--out=/tmp/x"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "--config and --out are required" in proc.stderr
