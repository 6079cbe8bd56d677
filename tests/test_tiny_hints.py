"""configs/tiny_hints.py: the hint-reading warm-start mixture and the role-token diagnostics
(trainer/warm_start.py, analysis/role_tokens.py), and the config run end to end at smoke size."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlcsd_jax.analysis import role_tokens
from rlcsd_jax.data import prompts, tokenizer as tokenizer_lib
from rlcsd_jax.data.readers import kk_records
from rlcsd_jax.rewards import kk_reward, last_boxed
from rlcsd_jax.trainer import rollout, warm_start


def load_config():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_hints.py")
    spec = importlib.util.spec_from_file_location("tiny_hints_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    tokenizer_lib.build_tiny_tokenizer(d, vocab_size=768)
    return tokenizer_lib.load_tokenizer(d)


def test_wrong_answer_flips_at_least_one_role_and_keeps_names():
    rng = np.random.default_rng(0)
    gt = "Emma is a knight, Grace is a knave"
    seen = set()
    for _ in range(50):
        w = warm_start.wrong_answer(gt, rng)
        seen.add(w)
        assert kk_reward(f"\\boxed{{{w}}}", gt) == 0.0
        assert w.replace("knight", "R").replace("knave", "R") == "Emma is a R, Grace is a R"
    assert len(seen) == 3          # each non-empty subset of the two roles gets flipped


def test_answer_hints_mixture_follows_the_hint(tok):
    records = kk_records("kk_2to2", 20, name_pool=4)
    enc = rollout.PromptEncoder(tok)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    plain = warm_start.encode_examples(records, enc, tok, eos, "answer")
    mixed = warm_start.encode_examples(records, enc, tok, eos, "answer_hints")
    per = 1 + warm_start.HINT_EXAMPLES_PER_RECORD
    assert len(plain) == len(records) and len(mixed) == per * len(records)
    n_wrong = 0
    for i, r in enumerate(records):
        assert mixed[per * i] == plain[i]              # the student example is unchanged
        for p, y in mixed[per * i + 1: per * (i + 1)]:
            text = tok.decode(p)
            assert "=== Reference Solution Begin ===" in text
            target = last_boxed(tok.decode(y[:-1]))
            # the hint is rendered as the trainer renders a sibling rollout, and the target
            # is the hint's answer
            hint = prompts.teacher_user_message(r.problem, tok.decode(y[:-1]), target)
            assert p == enc.text_ids(hint)
            n_wrong += kk_reward(f"\\boxed{{{target}}}", r.ground_truth) == 0.0
    assert 0 < n_wrong < len(records) * (per - 1)
    with pytest.raises(ValueError, match="warm_start.target"):
        warm_start.encode_examples(records, enc, tok, eos, "hints")


def test_role_summary_separates_role_tokens(tok):
    text = "<think>\n\n</think>\n\n\\boxed{Emma is a knight, Grace is a knave}"
    ids = np.array([tok.encode(text, add_special_tokens=False)] * 2)
    strings = [tok.decode([i]) for i in ids[0]]
    role = np.array(["knight" in s or "knave" in s for s in strings])
    assert role.sum() == 2
    mask = np.ones_like(ids)
    mask[1, -3:] = 0                                    # padding is not counted
    e_ctr = np.where(role, 2.0, 0.1)[None].repeat(2, 0)
    e_c = np.full(ids.shape, -0.5)
    s = role_tokens.summarize(dict(token_ids=ids, mask=mask, e_ctr=e_ctr, e_c=e_c,
                                   num_rollouts=2), tok)
    assert s["role_tokens"] == 3 and s["other_tokens"] == 2 * len(strings) - 3 - 3
    assert s["e_ctr_abs_role"] == pytest.approx(2.0)
    assert s["e_ctr_ratio"] == pytest.approx(20.0)
    assert s["e_c_ratio"] == pytest.approx(1.0)
    assert s["e_c_share_other"] > s["e_ctr_share_other"]
    assert "x20.0" in role_tokens.format_line(s)


def test_tiny_hints_config_runs_at_smoke_size(tmp_path):
    """The README's `python -m rlcsd_jax.train --config=configs/tiny_hints.py`, shrunk: the
    summary carries the role-token diagnostics before and after RL."""
    cfg = load_config()
    assert cfg.warm_start.target == "answer_hints" and cfg.warm_start.hint_diagnostics > 0
    overrides = {
        "data.num_generated_train": 16, "data.num_generated_eval": 4,
        "rollout.prompts_per_step": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 8,
        "train.minibatch_prompts": 2, "train.num_steps": 1, "warm_start.steps": 2,
        "warm_start.batch_size": 4, "warm_start.hint_diagnostics": 2,
        "eval.before_train": False, "eval.at_end": False, "checkpoint.every": 1}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(
        [sys.executable, "-m", "rlcsd_jax.train", f"--config={root}/configs/tiny_hints.py",
         f"--workdir={tmp_path}", *(f"--config.{k}={v}" for k, v in overrides.items())],
        capture_output=True, text=True, cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1
    for key in ("diagnostics_before", "diagnostics_after"):
        d = summary[key]
        assert d["prompts"] == 2 and d["rollouts"] == 8, d
    assert "held-out role tokens" in p.stdout
