"""Standalone evaluation: mean@k against hand computations, the results table / JSON, and the
`python -m rlcsd_jax.evaluate` CLI on a model folder and on a 1-step training workdir."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from rlcsd_jax.analysis import results_table
from rlcsd_jax.analysis import checkpoint_eval
from rlcsd_jax.trainer import checkpoint_lookup
from rlcsd_jax import models
from rlcsd_jax.data.records import Record
from rlcsd_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from rlcsd_jax.trainer import evaluation, rollout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# mean@k by hand
# ---------------------------------------------------------------------------------------------

def test_mean_at_k_by_hand():
    # 3 problems from 2 sources, k = 4 binary rewards each, problem-major.
    records = [Record("p0", "1", "aime24", 0), Record("p1", "2", "aime24", 1),
               Record("p2", "A is a knight", "kk_9", 2)]
    rewards = [1, 0, 1, 1,     # p0: 3/4
               0, 0, 0, 0,     # p1: 0/4
               1, 1, 0, 1]     # p2: 3/4
    scores = evaluation.mean_at_k(records, np.asarray(rewards, np.float32), 4)
    aime24 = (3 / 4 + 0 / 4) / 2            # 0.375: mean over problems of per-problem means
    kk_9 = 3 / 4
    assert scores == pytest.approx({"aime24": aime24, "kk_9": kk_9,
                                    "avg": (aime24 + kk_9) / 2})   # unweighted over sources
    # Standard error of avg: aime24's per-problem means 0.75 and 0 have sample variance
    # 0.28125, so its mean has variance 0.28125 / 2; kk_9 has one problem (adds 0); avg halves it.
    se = evaluation.mean_at_k_stderr(records, np.asarray(rewards, np.float32), 4)
    assert se == pytest.approx(np.sqrt(0.28125 / 2) / 2)
    # k = 1 is pass@1 = the plain mean accuracy.
    one = evaluation.mean_at_k(records, np.asarray([1, 0, 1], np.float32), 1)
    assert one == pytest.approx({"aime24": 0.5, "kk_9": 1.0, "avg": 0.75})

    res = checkpoint_eval.results_dict({f"eval/{k}": v for k, v in scores.items()},
                          num_problems={"aime24": 2, "kk_9": 1}, num_samples=4,
                          sampling={"temperature": 0.6}, checkpoint="/ckpt", step=None,
                          name="fake")
    assert res["scores"] == pytest.approx({"aime24": 0.375, "kk_9": 0.75})
    assert res["group_avgs"] == pytest.approx({"Math Avg": 0.375, "Logic Avg": 0.75})
    assert res["avg"] == pytest.approx(0.5625) and res["metric"] == "mean@4"
    assert results_table.format_table([results_table.table_row(res)]).splitlines() == [
        "| Checkpoint | aime24 | Math Avg | kk_9 | Logic Avg | Avg |",
        "|:---|---:|---:|---:|---:|---:|",
        "| fake | 37.5 | 37.5 | 75.0 | 75.0 | 56.2 |"]


def _fake_generate(tokenizer, encoder, records, responses):
    """generate_fn that answers problem i's g-th sample with responses[i][g] (decoded text)."""
    by_prompt = {tuple(encoder(r)): i for i, r in enumerate(records)}

    def fn(ids, mask, key, num_samples):
        rows = [responses[by_prompt[tuple(np.asarray(p)[np.asarray(m) > 0].tolist())]][g]
                for p, m in zip(ids, mask) for g in range(num_samples)]
        toks = [tokenizer.encode(t, add_special_tokens=False) for t in rows]
        width = max(len(t) for t in toks)
        tokens = np.zeros((len(toks), width), np.int32)
        for i, t in enumerate(toks):
            tokens[i, :len(t)] = t
        lengths = np.asarray([len(t) for t in toks], np.int32)
        return {"tokens": tokens, "lengths": lengths, "logprobs": np.zeros(tokens.shape),
                "truncated": np.zeros(len(toks), bool)}
    return fn


def test_evaluate_on_fake_generations_by_hand(tmp_path):
    """evaluation.evaluate (chunking, last-chunk padding, grading) on hand-written answers."""
    tok = load_tokenizer(build_tiny_tokenizer(str(tmp_path / "tok")))
    encoder = rollout.PromptEncoder(tok)
    records = [Record("Q0", "Ann is a knight", "kk_9", 0),
               Record("Q1", "Bob is a knave", "kk_9", 1),
               Record("Q2", "Cid is a knight", "kk_10", 2)]
    right = ["\\boxed{Ann is a knight}", "\\boxed{Bob is a knave}", "\\boxed{Cid is a knight}"]
    wrong = ["\\boxed{Ann is a knave}", "Bob is a knave (no box)", "\\boxed{Cid is a knave}"]
    grid = [[1, 1, 0, 1],      # Q0: 3/4
            [0, 0, 0, 1],      # Q1: 1/4
            [1, 0, 0, 0]]      # Q2: 1/4
    responses = [[right[i] if c else wrong[i] for c in row] for i, row in enumerate(grid)]
    out = evaluation.evaluate(_fake_generate(tok, encoder, records, responses), tok, encoder,
                              records, batch_prompts=2, num_samples=4, seed=0, pad_id=0)
    kk_9, kk_10 = (3 / 4 + 1 / 4) / 2, 1 / 4
    assert out["eval/kk_9"] == pytest.approx(kk_9)
    assert out["eval/kk_10"] == pytest.approx(kk_10)
    assert out["eval/avg"] == pytest.approx((kk_9 + kk_10) / 2)

    res = checkpoint_eval.results_dict(out, num_problems={"kk_9": 2, "kk_10": 1}, num_samples=4,
                          sampling={}, checkpoint="c", step=3, name="run (step 3)")
    # Every source is a K&K one: "Logic Avg" is the average, no separate "Avg" column.
    assert results_table.format_table([results_table.table_row(res)]).splitlines()[0::2] == [
        "| Checkpoint | kk_9 | kk_10 | Logic Avg |", "| run (step 3) | 50.0 | 25.0 | 37.5 |"]


# ---------------------------------------------------------------------------------------------
# table / JSON formatting
# ---------------------------------------------------------------------------------------------

def _fake_results(**kw):
    args = {"num_problems": {"amc23": 40, "aime24": 30, "aime25": 30, "my_set": 7},
            "num_samples": 12, "sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 20},
            "checkpoint": "/runs/a/checkpoints", "step": 150, "name": "a (step 150)",
            "date": "2026-01-02T03:04:05+00:00", "extra": {"method": "rlcsd"}}
    args.update(kw)
    metrics = {"eval/amc23": 0.6, "eval/aime24": 0.3, "eval/aime25": 0.25, "eval/my_set": 0.5,
               "eval/avg": (0.6 + 0.3 + 0.25 + 0.5) / 4, "eval/response_length_mean": 99.0}
    return checkpoint_eval.results_dict(metrics, **args)


def test_results_json():
    res = _fake_results()
    assert json.loads(json.dumps(res)) == res        # plain JSON
    assert res["scores"] == {"aime24": 0.3, "aime25": 0.25, "amc23": 0.6, "my_set": 0.5}
    assert res["num_problems"] == {"aime24": 30, "aime25": 30, "amc23": 40, "my_set": 7}
    assert res["group_avgs"] == pytest.approx({"Math Avg": (0.6 + 0.3 + 0.25) / 3})
    assert res["avg"] == pytest.approx(0.4125)
    assert res["k"] == 12 and res["metric"] == "mean@12" and res["step"] == 150
    assert res["sampling"]["temperature"] == 0.6 and res["method"] == "rlcsd"
    assert res["date"] == "2026-01-02T03:04:05+00:00"
    assert res["other_metrics"] == {"eval/response_length_mean": 99.0}
    assert checkpoint_eval.results_dict({"eval/kk_9": 1.0, "eval/avg": 1.0}, num_problems={"kk_9": 2},
                           num_samples=1, sampling={}, checkpoint="c", step=None,
                           name="n")["metric"] == "pass@1"


def test_markdown_table_and_append():
    res = _fake_results()
    table = results_table.format_table([results_table.table_row(res)])
    assert table.splitlines() == [
        "| Checkpoint | amc23 | aime24 | aime25 | Math Avg | my_set | Avg |",
        "|:---|---:|---:|---:|---:|---:|---:|",
        "| a (step 150) | 60.0 | 30.0 | 25.0 | 38.3 | 50.0 | 41.2 |"]
    # A second checkpoint with a K&K source: union of columns, "-" where a row has no value.
    b = {"name": "b|x", "scores": {"amc23": 0.5, "kk_9": 0.125}}
    text = "# Comparison\n\n" + table + "\nnotes below\n"
    two = results_table.append_row(text, b)
    assert two.startswith("# Comparison\n\n") and two.endswith("\nnotes below\n")
    lines = [line for line in two.splitlines() if line.startswith("|")]
    assert lines == [
        "| Checkpoint | amc23 | aime24 | aime25 | Math Avg | kk_9 | Logic Avg | my_set | Avg |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| a (step 150) | 60.0 | 30.0 | 25.0 | 38.3 | - | - | 50.0 | 41.2 |",
        "| b\\|x | 50.0 | - | - | 50.0 | 12.5 | 12.5 | - | 31.2 |"]
    # Re-evaluating a row name replaces that row; parse_table reads the rows back.
    three = results_table.append_row(two, {"name": "a (step 150)", "scores": {"amc23": 1.0}})
    _, rows, _ = results_table.parse_table(three)
    assert [r["name"] for r in rows] == ["b|x", "a (step 150)"]
    assert rows[1]["cells"] == {"amc23": "100.0", "Math Avg": "100.0", "Avg": "100.0"}
    # Appending to an empty / missing file makes a one-row table.
    assert results_table.append_row("", results_table.table_row(res)) == table


def test_resolve_checkpoint(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "conv" / "params").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "50" / "state").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "100" / "state").mkdir(parents=True)
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert checkpoint_lookup.resolve_checkpoint(str(tmp_path / "hf")) == checkpoint_lookup.Target("model", str(tmp_path / "hf"))
    assert checkpoint_lookup.resolve_checkpoint(str(tmp_path / "conv")).kind == "model"
    assert checkpoint_lookup.resolve_checkpoint(str(tmp_path / "run")) == checkpoint_lookup.Target("train_state", ckpts)
    assert checkpoint_lookup.resolve_checkpoint(ckpts, 50) == checkpoint_lookup.Target("train_state", ckpts, 50)
    assert checkpoint_lookup.resolve_checkpoint(ckpts + "/50") == checkpoint_lookup.Target("train_state", ckpts, 50)
    assert checkpoint_lookup.Target("train_state", ckpts).workdir == str(tmp_path / "run")
    with pytest.raises(ValueError, match="model folder"):
        checkpoint_lookup.resolve_checkpoint(str(tmp_path / "hf"), 5)
    with pytest.raises(ValueError, match="neither"):
        checkpoint_lookup.resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        checkpoint_lookup.resolve_checkpoint(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------
# CLI end to end (tiny config; compile time dominates, so the runs share a compilation cache)
# ---------------------------------------------------------------------------------------------

FAST = ["--config=configs/tiny.py", "--config.warm_start.steps=0",
        "--config.data.num_generated_train=64", "--config.rollout.prompts_per_step=4",
        "--config.train.minibatch_prompts=4", "--config.rollout.group_size=2"]
FAST_EVAL = ["--config.eval.max_examples=4", "--config.eval.batch_prompts=4",
             "--config.eval.max_new_tokens=16", "--config.eval.num_samples=2"]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return env


def _run(module, args, env):
    proc = subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=REPO,
                          env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _check_outputs(out, source="kk_2to2_test"):
    res = json.loads((out / "results.json").read_text())
    assert set(res["scores"]) == {source} and res["num_problems"] == {source: 4}
    assert 0.0 <= res["scores"][source] <= 1.0 and res["k"] == 2
    assert res["sampling"]["temperature"] == 0.6 and res["sampling"]["max_new_tokens"] == 16
    table = (out / "results.md").read_text()
    assert f"| Checkpoint | {source} | Avg |" in table
    return res, table


def _tiny_model_folder(path):
    """A random qwen3-tiny HF folder + tiny tokenizer.  Weights are drawn with numpy into the
    abstract model (same result as models.build, without compiling ~40 init programs)."""
    model = models.abstract_model(models.get_preset("qwen3-tiny", vocab_size=512))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    nnx.replace_by_pure_dict(params, jax.tree.map(
        lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype),
        nnx.to_pure_dict(params)))
    os.makedirs(path, exist_ok=True)
    models.save_pretrained(nnx.merge(graphdef, params, rest), str(path))
    build_tiny_tokenizer(str(path))
    return path


def test_cli_on_model_folder(tmp_path, cli_env):
    folder = _tiny_model_folder(tmp_path / "model")
    out = tmp_path / "out"
    proc = _run("rlcsd_jax.evaluate", [*FAST, *FAST_EVAL, f"--checkpoint={folder}",
                                       f"--out={out}", "--name=tiny-random"], cli_env)
    res, table = _check_outputs(out)
    assert res["kind"] == "model" and res["step"] is None and res["checkpoint"] == str(folder)
    assert "| tiny-random |" in table and "tiny-random: mean@2" in proc.stdout


def test_cli_on_training_workdir(tmp_path, cli_env):
    work = tmp_path / "work"
    _run("rlcsd_jax.train", [*FAST, f"--workdir={work}", "--config.train.num_steps=1",
                             "--config.rollout.max_new_tokens=16",
                             "--config.eval.before_train=False", "--config.eval.at_end=False"],
         cli_env)
    out, compare = tmp_path / "out", tmp_path / "compare.md"
    compare.write_text("| Checkpoint | kk_2to2_test | Avg |\n|:---|---:|---:|\n"
                       "| base | 1.0 | 1.0 |\n")
    _run("rlcsd_jax.evaluate", [*FAST, *FAST_EVAL, f"--checkpoint={work}", f"--out={out}",
                                f"--append_to={compare}"], cli_env)
    res, table = _check_outputs(out)
    assert res["kind"] == "train_state" and res["step"] == 1
    assert res["checkpoint"] == str(work / "checkpoints")
    assert "| work (step 1) |" in table
    rows = compare.read_text().splitlines()
    assert rows[2] == "| base | 1.0 | 1.0 |" and rows[3].startswith("| work (step 1) |")
    # The saved training config (used for the hint on a method / model mismatch).
    assert checkpoint_lookup.saved_config(str(work / "checkpoints"), 1)["method"] == "rlcsd"
    # Read-only: nothing new was written into the run's checkpoint folder.
    assert sorted(os.listdir(work / "checkpoints")) == ["1"]


def test_run_summary_reports_the_change_with_its_standard_error():
    from rlcsd_jax.trainer import loop

    text = loop.format_summary({
        "steps": 45, "reward_first": 0.2, "reward_mean_last5": 0.3,
        "eval_before": {"eval/avg": 0.283, "eval/avg_stderr": 0.012},
        "eval_after": {"eval/avg": 0.320, "eval/avg_stderr": 0.016}})
    assert "0.283 ± 0.012 (before RL) -> 0.320 ± 0.016 (after RL)" in text
    assert "held-out change: +0.037 (± 0.020 standard error)" in text   # sqrt(.012² + .016²)
    # Without an "after" evaluation there is no change line.
    assert "held-out change" not in loop.format_summary(
        {"eval_before": {"eval/avg": 0.3, "eval/avg_stderr": 0.01}})
