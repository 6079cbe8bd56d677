"""Smoke tests of benchmarks/: the quick CPU suite and the GPU-suite code path at tiny shapes.

Both run in-process, write to a tmp RESULTS file (never the repo's benchmarks/RESULTS.md) and
check that decode / scoring / train produce finite positive throughputs on both sides, and that
the markdown is well-formed.  Repeats are 1 and torch uses one thread to keep this under ~60 s.
"""

from __future__ import annotations

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import flops, measure, report, run, suites  # noqa: E402

REPO_RESULTS = os.path.join(os.path.dirname(run.__file__), "RESULTS.md")
FAST = ["--repeats", "1", "--decode-repeats", "1", "--torch-threads", "1", "--matmul-n", "256"]


def _snapshot(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


@pytest.fixture
def restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(tmp_path, *argv):
    before = _snapshot(REPO_RESULTS)
    out, js = tmp_path / "RESULTS.md", tmp_path / "rows.json"
    rows = run.main([*argv, "--out", str(out), "--json", str(js), *FAST])
    assert _snapshot(REPO_RESULTS) == before, "the repo's RESULTS.md must not be touched"
    with open(out) as f:
        markdown = f.read()
    with open(js) as f:
        raw = json.load(f)
    return rows, markdown, raw


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_rows(rows, kinds):
    by_kind = {r["kind"]: r for r in rows}
    for kind in kinds:
        row = by_kind[kind]
        for side in ("jax", "hf"):
            res = row[side]
            assert res is not None and "error" not in res, (kind, side, res)
            assert _positive(res["tok_s"]) and _positive(res["seconds"]), (kind, side, res)
    return by_kind


def test_quick_cpu_suite(tmp_path, restore_torch_threads):
    rows, markdown, raw = _run(tmp_path, "--suite", "cpu", "--quick")
    by_kind = _check_rows(rows, ["decode vs HF dynamic cache", "scoring", "scoring, 5 contexts",
                                 "train step (rlcsd)"])
    for kind in ("scoring", "train step (rlcsd)"):
        for side in ("jax", "hf"):
            m = flops.mfu(by_kind[kind][side]["flops"], by_kind[kind][side]["seconds"],
                          raw["peak_flops"])
            assert _positive(m), (kind, side)
    assert by_kind["train step (rlcsd)"]["jax"]["mem_method"] == "compiled estimate"
    assert _positive(by_kind["train step (rlcsd)"]["jax"]["mem_bytes"])
    # Static-cache decode either ran (eagerly on CPU) or says why not.
    static = by_kind["decode vs HF static cache"]["hf"]
    assert _positive(static.get("tok_s")) or static["error"].startswith("n/a")
    assert report.table_is_well_formed(markdown)
    assert markdown.startswith(report.TITLE) and "## Targets" in markdown
    assert "(in progress)" not in markdown and "logit parity" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| tiny |")]
    assert len(table) == 5 and all("pending" not in line for line in table)
    ratio_cells = [line.split("|")[6].strip() for line in table]
    assert all(c.endswith("×") and float(c[:-1].replace(",", "")) > 0 for c in ratio_cells)


def test_gpu_suite_code_path_on_cpu(tmp_path, restore_torch_threads):
    """`--suite gpu --model tiny`: bf16, remat full, largest-B search, same table."""
    rows, markdown, raw = _run(tmp_path, "--suite", "gpu", "--model", "tiny")
    by_kind = _check_rows(rows, ["decode vs HF dynamic cache", "scoring", "scoring, 2 contexts",
                                 "train step (rlcsd)", "train step, largest B"])
    assert by_kind["train step, largest B"]["jax"]["batch"] == 2
    assert by_kind["train step, largest B"]["hf"]["batch"] == 2
    assert "compute bfloat16" in markdown and "remat full" in markdown
    assert "JAX train batch search" in markdown and report.table_is_well_formed(markdown)


def test_results_file_appends_sections(tmp_path):
    path = str(tmp_path / "R.md")
    first = report.ResultsFile(path)
    first.write("## run 1\n")
    first.write("## run 1 (rewritten)\n")
    report.ResultsFile(path).write("## run 2\n")
    text = open(path).read()
    assert text.count(report.TITLE) == 1 and text.count("## Targets") == 1
    assert "## run 1 (rewritten)" in text and "## run 2" in text and "## run 1\n" not in text
    assert report.table_is_well_formed(text)
    assert not report.table_is_well_formed("| a | b |\n|---|---|\n| 1 |\n")


def test_flop_counts_by_hand():
    cfg = suites.model_config("tiny", dtype="float32")
    d, f, h, kv, hd, n_layers, v = 64, 192, 4, 2, 16, 2, 4096
    body = n_layers * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
    assert flops.body_matmul_params(cfg) == body
    assert flops.matmul_params(cfg) == body + d * v
    b, s = 3, 128
    attn = 4 * h * hd * n_layers * b * s * (s + 1) / 2   # query i sees i + 1 keys (causal)
    assert flops.forward_flops(cfg, b, s) == pytest.approx(2 * (body + d * v) * b * s + attn)
    assert flops.train_flops(cfg, b, s, 100) == pytest.approx(
        3 * (2 * body * b * s + 2 * d * v * b * 100 + attn))
    assert flops.mfu(None, 1.0, 1.0) is None


def test_error_classification():
    assert measure.short_error(RuntimeError("RESOURCE_EXHAUSTED: Out of memory")).startswith("OOM")
    assert measure.short_error(measure.NotApplicable("why")) == "n/a: why"
    assert measure.short_error(ValueError("x\ny")) == "ValueError: x"


def test_plan_table_replaces_only_the_planned_rows(tmp_path):
    """`plan_table --configs X --write F` replaces X's row between the markers, keeps the other
    configs' rows in the recommended order and takes the new header."""
    from benchmarks import plan_table

    doc = tmp_path / "tpu.md"
    doc.write_text(f"intro\n{plan_table.BEGIN}\n| config | a |\n|---|---|\n| qwen3_0p6b | 1 |\n"
                   f"| olmo3_7b_think | 3 |\n{plan_table.END}\noutro\n")
    plan_table.write(str(doc), "| config | b |\n|---|---|\n| qwen3_8b | 9 |", partial=True)
    assert doc.read_text() == (f"intro\n{plan_table.BEGIN}\n| config | b |\n|---|---|\n"
                               f"| qwen3_0p6b | 1 |\n| qwen3_8b | 9 |\n| olmo3_7b_think | 3 |\n"
                               f"{plan_table.END}\noutro\n")
    with pytest.raises(SystemExit, match="unknown"):
        plan_table.main(["--configs", "qwen3_9b"])
