"""MetricsLogger sinks (TensorBoard, JSONL, console), hooks, and the `rlcsd_jax.analysis.plot` CLI."""

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from rlcsd_jax.trainer import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tb_scalars(logdir) -> dict[str, dict[int, float]]:
    """Scalars of the event files in `logdir`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing import event_accumulator

    files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    assert files, f"no event files in {logdir}"
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_logger_writes_tensorboard_jsonl_and_console(tmp_path, capsys):
    written = {
        1: {"train/reward_mean": 0.25, "train/response_length_mean": np.float32(212.0),
            "train/loss": 0.5, "rlcsd/e_ctr_mean": np.array(0.125)},
        2: {"train/reward_mean": 0.5, "train/response_length_mean": 230.0, "train/loss": 0.25,
            "eval/avg": 0.375, "eval/math500": 0.5, "train/entropy": float("nan")},
    }
    logger = metrics.MetricsLogger(tmp_path, total_steps=10, profile_steps=(1, 2))
    logger.write_hparams({"method": "rlcsd", "rlcsd": {"tau": 0.03, "k": 2}, "mesh": [1, 8, 1],
                          "checkpoint": None})
    for step, scalars in written.items():
        with logger.timed("sample"):
            pass
        logger.write(step, dict(scalars, text="not a number"))
        logger.on_step(step)
    logger.close()

    # JSONL: one line per write, step and time first, floats, NaN as null.
    records = metrics.read_jsonl(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2]
    for rec, (step, scalars) in zip(records, written.items()):
        assert rec["time"] > 0 and "text" not in rec
        for key, value in scalars.items():
            value = float(value)
            assert rec[key] == (None if math.isnan(value) else value)
    # TensorBoard: every scalar read back from the event files.
    tb = _tb_scalars(str(tmp_path / "tensorboard"))
    for step, scalars in written.items():
        for key, value in scalars.items():
            if not math.isnan(float(value)):
                assert tb[key][step] == pytest.approx(float(value), rel=1e-7)
    # Console: one compact progress line per write with the headline keys.
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert lines[0] == "step 1/10 | reward 0.250 | len 212 | loss 0.5"
    assert lines[1].startswith("step 2/10 | reward 0.500 | len 230 | acc 0.375 | loss 0.25 | ")
    assert "s/step | ETA " in lines[1]
    hparams = json.loads((tmp_path / "hparams.json").read_text())
    assert hparams["rlcsd.tau"] == 0.03 and hparams["mesh"] == "[1, 8, 1]"
    # The profiler window (steps 2..2) produced a trace.
    assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)


def test_non_host0_logger_writes_nothing(tmp_path, capsys):
    logger = metrics.MetricsLogger(tmp_path / "w", is_host0=False, total_steps=3)
    logger.write(1, {"train/reward_mean": 1.0})
    logger.write_hparams({"a": 1})
    logger.on_step(1)
    logger.close()
    assert not os.path.exists(tmp_path / "w") and capsys.readouterr().out == ""


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": nu')
    assert metrics.read_jsonl(str(tmp_path)) == [{"step": 1, "a": 1.0}]
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        metrics.read_jsonl(str(tmp_path / "missing"))


def test_format_duration():
    assert [metrics.format_duration(s) for s in (35, 250, 3720)] == ["35s", "4m10s", "1h02m"]


def _fake_run(workdir, seed, rlcsd: bool):
    rng = np.random.default_rng(seed)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(1, 41):
            rec = {"step": step, "time": 1000.0 + step,
                   "train/reward_mean": 0.3 + 0.01 * step + 0.05 * rng.standard_normal(),
                   "train/response_length_mean": 500 + 10 * step,
                   "train/entropy_mc": 0.5 - 0.005 * step}
            if rlcsd:
                rec.update({"rlcsd/e_ctr_mean": 0.01 * rng.standard_normal(),
                            "rlcsd/e_ctr_abs_mean": 0.02, "rlcsd/selected_token_ratio": 0.3})
            f.write(json.dumps(rec) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "time": 1000.0 + step, "eval/avg": 0.02 * step,
                                    "eval/aime24": 0.01 * step, "eval/math500": 0.03 * step,
                                    "eval/response_length_mean": 900.0}) + "\n")
        # A resumed run re-logs step 40: the plot keeps the last value.
        f.write(json.dumps({"step": 40, "train/reward_mean": None}) + "\n")


def test_plot_cli_compares_two_workdirs(tmp_path):
    _fake_run(tmp_path / "grpo", 0, rlcsd=False)
    _fake_run(tmp_path / "rlcsd", 1, rlcsd=True)
    out = tmp_path / "figs" / "dynamics.png"
    proc = subprocess.run(
        [sys.executable, "-m", "rlcsd_jax.plot", "--workdir", str(tmp_path / "grpo"),
         "--workdir", str(tmp_path / "rlcsd"), "--out", str(out), "--labels", "GRPO,RLCSD",
         "--smooth", "0.6"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in proc.stderr and "Selected-token ratio" in proc.stderr


def test_plot_skips_missing_panels_and_rejects_bad_input(tmp_path, caplog):
    from rlcsd_jax.analysis import plot

    _fake_run(tmp_path / "a", 0, rlcsd=False)
    with caplog.at_level("INFO", logger="rlcsd_jax.analysis.plot"):
        drawn = plot.render([("a", metrics.read_jsonl(str(tmp_path / "a")))],
                            str(tmp_path / "a.png"))
    assert drawn == ["Training reward", "Validation accuracy", "Response length", "Entropy"]
    assert "skipping panel 'Selected-token ratio'" in caplog.text
    steps, values = plot.series(metrics.read_jsonl(str(tmp_path / "a")), "eval/avg")
    assert steps == [10, 20, 30, 40] and values == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert plot.eval_sources(metrics.read_jsonl(str(tmp_path / "a"))) == [
        "eval/aime24", "eval/math500"]
    assert plot.main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 1
    with pytest.raises(SystemExit):
        plot.main(["--workdir", str(tmp_path / "a"), "--out", "x.png", "--labels", "a,b"])
