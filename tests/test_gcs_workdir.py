"""A run, `plot`, `evaluate` and `analyze_style` on a gs:// workdir, and parquet data read from
gs://, against a local GCS server (tests/helpers/gcs_emulator.py; offline).

The production path without TensorFlow is exercised: etils.epath -> gcsfs for files, orbax ->
tensorstore's GCS driver for arrays.  Every subprocess runs in an empty folder, which must stay
empty: a file written with open() / os.makedirs on a "gs://..." string would land in a local
folder named "gs:" there.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import gcs_emulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GS = f"gs://{gcs_emulator.BUCKET}"
STEPS = 3


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with gcs_emulator.running(str(tmp_path_factory.mktemp("gcs") / "emulator.log")) as env:
        yield env


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from rlcsd_jax.data import build_tiny_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    build_tiny_tokenizer(path, vocab_size=768)
    return path


def _cli(module, args, env, cwd, timeout=400):
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO, **env)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert os.listdir(cwd) == [], f"{module} wrote local files: {os.listdir(cwd)}"
    return proc


def _upload_kk_parquet(url, name, n, seed):
    """A verl parquet of n generated K&K puzzles at `url`."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from etils import epath

    from rlcsd_jax.data import kk_records

    rows = [{"data_source": r.data_source, "prompt": [{"role": "user", "content": r.problem}],
             "reward_model": {"style": "rule", "ground_truth": r.ground_truth},
             "extra_info": {"index": r.index, "problem": r.problem, "solution": r.solution}}
            for r in kk_records(name, n, seed=seed, name_pool=4)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    epath.Path(url).write_bytes(buf.getvalue())


def _run_args(workdir, tokenizer, steps):
    return ["--config=" + os.path.join(REPO, "configs", "tiny.py"), f"--workdir={workdir}",
            f"--config.tokenizer={tokenizer}", f"--config.train.num_steps={steps}",
            f"--config.data.train={GS}/data/kk/train.parquet",
            f"--config.data.eval={GS}/data/kk/val.parquet",
            "--config.warm_start.steps=0", "--config.rollout.prompts_per_step=4",
            "--config.train.minibatch_prompts=4", "--config.rollout.group_size=2",
            "--config.rollout.max_new_tokens=8", "--config.eval.max_new_tokens=8",
            "--config.eval.num_samples=1", "--config.eval.before_train=False",
            "--config.checkpoint.every=1"]


def test_run_plot_evaluate_on_a_gs_workdir(gcs, tokenizer, tmp_path):
    from etils import epath

    from rlcsd_jax.trainer import metrics

    work = f"{GS}/runs/tiny"
    with gcs_emulator.client_env(gcs):
        _upload_kk_parquet(f"{GS}/data/kk/train.parquet", "kk_2to2", 16, seed=0)
        _upload_kk_parquet(f"{GS}/data/kk/val.parquet", "kk_2to2_test", 4, seed=1)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = _cli("rlcsd_jax.train", _run_args(work, tokenizer, STEPS), gcs, cwd)
    assert "resolved config" in out.stdout and "rlcsd_jax run summary" in out.stdout
    # Resume with more steps: metrics.jsonl (an object: no append on GCS) keeps both runs'
    # lines, run_env.json gets a second entry.
    out = _cli("rlcsd_jax.train", _run_args(work, tokenizer, STEPS + 1), gcs, cwd)
    assert f"resumed from step {STEPS}" in out.stderr

    with gcs_emulator.client_env(gcs):
        wd = epath.Path(work)
        steps = [r["step"] for r in metrics.read_jsonl(work) if "train/reward_mean" in r]
        assert steps == list(range(1, STEPS + 2))
        assert json.loads((wd / "hparams.json").read_text())["method"] == "rlcsd"
        summary = json.loads((wd / "summary.json").read_text())
        assert summary["steps"] == STEPS + 1 and "eval_after" in summary
        env = json.loads((wd / "run_env.json").read_text())
        assert [e["resumed_from_step"] for e in env] == [None, STEPS]
        assert env[0]["env"]["packages"]["jax"]
        saved = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
        assert saved[-1] == STEPS + 1 and len(saved) == 3   # keep=3
        events = [p for p in (wd / "tensorboard").iterdir() if "tfevents" in p.name]
        assert len(events) == 2 and all(p.stat().length > 0 for p in events)

    # plot and evaluate read the workdir back (and write to gs://).
    _cli("rlcsd_jax.plot", ["--workdir", work, "--out", f"{GS}/figs/dynamics.png"], gcs, cwd)
    _cli("rlcsd_jax.evaluate", [*_run_args(work, tokenizer, STEPS)[:1],
                                f"--config.tokenizer={tokenizer}",
                                f"--config.data.eval={GS}/data/kk/val.parquet",
                                "--config.data.train=kk_2to2",
                                "--config.eval.max_new_tokens=8", "--config.eval.num_samples=1",
                                f"--checkpoint={work}", f"--out={GS}/eval"], gcs, cwd)
    with gcs_emulator.client_env(gcs):
        assert epath.Path(f"{GS}/figs/dynamics.png").read_bytes()[:4] == b"\x89PNG"
        results = json.loads(epath.Path(f"{GS}/eval/results.json").read_text())
        assert results["step"] == STEPS + 1 and results["num_problems"] == {"kk_2to2_test": 4}
        assert "| Checkpoint |" in epath.Path(f"{GS}/eval/results.md").read_text()


def test_storage_append_and_mirror_on_gcs(gcs, tmp_path):
    from etils import epath

    from rlcsd_jax.data import storage

    with gcs_emulator.client_env(gcs):
        target = f"{GS}/unit/log.jsonl"
        f = storage.AppendFile(target, sync_secs=3600)
        f.write("a\n")
        assert not epath.Path(target).exists()       # buffered until a sync
        f.flush()
        assert epath.Path(target).read_text() == "a\n"
        f.write("b\n")
        f.close()
        g = storage.AppendFile(target)                  # a resumed writer keeps the lines
        g.write("c\n")
        g.close()
        assert epath.Path(target).read_text() == "a\nb\nc\n"

        local = tmp_path / "tb"
        (local / "sub").mkdir(parents=True)
        (local / "sub" / "events").write_bytes(b"x")
        mirror = storage.DirMirror(str(local), f"{GS}/unit/tb")
        mirror.sync()
        (local / "sub" / "events").write_bytes(b"xyz")
        mirror.sync()
        assert epath.Path(f"{GS}/unit/tb/sub/events").read_bytes() == b"xyz"


def test_analyze_style_writes_to_gcs(gcs, tokenizer):
    from etils import epath

    from rlcsd_jax.analysis import style_drift

    with gcs_emulator.client_env(gcs):
        rc = style_drift.main([
            "analyze_style", "--config=" + os.path.join(REPO, "configs", "tiny.py"),
            f"--out={GS}/style", "--num_prompts=2", "--group_size=2", "--max_new_tokens=8",
            f"--config.tokenizer={tokenizer}", "--config.data.num_generated_train=8",
            "--config.data.num_generated_eval=4"])
        assert rc in (0, 1)     # 1: an untrained model may leave nothing to analyse
        out = epath.Path(f"{GS}/style")
        assert {p.name for p in out.iterdir()} == {"style_tokens.md", "style_tokens.json",
                                                   "style_drift.png"}
        assert json.loads((out / "style_tokens.json").read_text())["num_rollouts"] == 4


def test_prepare_writes_the_layout_to_gcs(gcs, tmp_path):
    from rlcsd_jax.data import prepare, readers

    with gcs_emulator.client_env(gcs):
        out = f"{GS}/data/verl"
        prepare.prepare(out, source="upstream", names=[prepare.KK_TRAIN, prepare.KK_EVAL],
                        kk_train_size=4, kk_test_size=1, hub_root=str(tmp_path))
        assert len(readers.read_records(f"{out}/kk_4to8/train.parquet")) == 4
        evals = readers.read_records(f"{out}/{prepare.KK_EVAL}/val.parquet")
        assert [r.data_source for r in evals] == ["kk_4to8_test", "kk_9", "kk_10", "kk_11"]
        from etils import epath

        assert json.loads(epath.Path(f"{out}/manifest.json").read_text())["files"][
            "kk_4to8/train.parquet"]["rows"] == 4
        epath.Path(f"{GS}/data/x.jsonl").write_text('{"q": "1+1?", "a": "2"}\n')
        (rec,) = readers.read_records(f"{GS}/data/x.jsonl", data_source="toy",
                                      field_map={"problem": "q", "ground_truth": "a"})
        assert (rec.problem, rec.ground_truth, rec.data_source) == ("1+1?", "2", "toy")
