"""`python -m rlcsd_jax.data.prepare` on a small local stand-in of the public dataset repositories:
the exact layout and fields the configs read, the reference's filters, and clear errors."""

import importlib.util
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlcsd_jax.data import prepare, prompts, readers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("qwen3_0p6b", "qwen3_1p7b", "qwen3_4b", "qwen3_8b", "olmo3_7b_think")


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def hub(tmp_path):
    """Stand-ins with the upstream schemas (DeepMath-103K, AI-MO validation sets, AIME2025)."""
    root = tmp_path / "hub"
    deepmath = [{"question": f"Q{d}?", "final_answer": f"{d}", "difficulty": d, "topic": "t",
                 "r1_solution_1": f"<think>\nlong thought {d}\n</think>\n\nSolution {d}.",
                 "r1_solution_2": "x", "r1_solution_3": "y"}
                for d in (4.0, 5.0, 6.5, 7.0, 8.0, 9.5, 10.0)]
    _parquet(root / prepare.DEEPMATH_REPO / "data" / "train-00000-of-00002.parquet", deepmath[:4])
    _parquet(root / prepare.DEEPMATH_REPO / "data" / "train-00001-of-00002.parquet", deepmath[4:])
    _parquet(root / prepare.AMC_REPO / "data" / "train-00000-of-00001.parquet", [
        {"id": i, "problem": f"AMC {y} #{i}", "answer": float(i * 10), "url":
         f"https://artofproblemsolving.com/wiki/index.php/{y}_AMC_12A_Problems/Problem_{i}"}
        for y, i in ((2022, 1), (2023, 2), (2023, 3))])
    _parquet(root / prepare.AIME_REPO / "data" / "train-00000-of-00001.parquet", [
        {"id": i, "problem": f"AIME {y} #{i}", "solution": f"sol {i}", "answer": f"{i:03d}",
         "url": f"https://artofproblemsolving.com/wiki/index.php/{y}_AIME_I_Problems/Problem_{i}"}
        for y, i in ((2023, 1), (2024, 2), (2024, 3), (2024, 4))])
    _jsonl(root / prepare.AIME25_REPO / "aime2025-I.jsonl",
           [{"question": "AIME25 I #1", "answer": "70"}])
    _jsonl(root / prepare.AIME25_REPO / "aime2025-II.jsonl",
           [{"question": "AIME25 II #1", "answer": "588"}])
    (root / prepare.AIME25_REPO / "README.md").write_text("not data")
    return root


def _rows(path):
    return pq.read_table(path).to_pylist()


def test_upstream_build_has_the_layout_fields_and_filters_of_the_reference(hub, tmp_path):
    out = tmp_path / "data" / "verl"
    p = subprocess.run([sys.executable, "-m", "rlcsd_jax.data.prepare", "--out", str(out),
                        "--source", "upstream", "--hub_root", str(hub), "--kk_train_size", "6",
                        "--kk_test_size", "2"], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    files = sorted(os.path.relpath(os.path.join(d, f), out)
                   for d, _, fs in os.walk(out) for f in fs)
    assert files == sorted([f"{n}/{s}.parquet" for n, s in prepare.DATASETS] + ["manifest.json"])
    for name, split in prepare.DATASETS:
        for row in _rows(out / name / f"{split}.parquet"):
            assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
            assert set(row["reward_model"]) == {"style", "ground_truth"}
            assert set(row["extra_info"]) == {"split", "index", "problem", "solution"}
            assert row["prompt"] == [{"role": "user", "content": prompts.student_user_message(
                row["extra_info"]["problem"], row["data_source"])}]
    # DeepMath difficulty bands (inclusive), answers and solutions without the <think> block.
    band = {n: [(r["extra_info"]["problem"], r["reward_model"]["ground_truth"])
                for r in _rows(out / n / "train.parquet")] for n in prepare.DEEPMATH_BANDS}
    assert band["deepmath_filtered_level5_7"] == [("Q5.0?", "5.0"), ("Q6.5?", "6.5"),
                                                  ("Q7.0?", "7.0")]
    assert [q for q, _ in band["deepmath_filtered_level6_8"]] == ["Q6.5?", "Q7.0?", "Q8.0?"]
    assert [q for q, _ in band["deepmath_filtered_level7_10"]] == [
        "Q7.0?", "Q8.0?", "Q9.5?", "Q10.0?"]
    first = _rows(out / "deepmath_filtered_level5_7" / "train.parquet")[0]
    assert first["extra_info"]["solution"] == "Solution 5.0."
    assert first["data_source"] == "deepmath_filtered_level5_7"
    assert first["prompt"][0]["content"].startswith("Problem: Q5.0?")   # a training source
    # Math evaluation: AMC 2023, AIME 2024, AIME 2025 I + II, integral answers as integers.
    ev = [(r["data_source"], r["extra_info"]["problem"], r["reward_model"]["ground_truth"])
          for r in _rows(out / prepare.MATH_EVAL / "val.parquet")]
    assert ev == [("amc23", "AMC 2023 #2", "20"), ("amc23", "AMC 2023 #3", "30"),
                  ("aime24", "AIME 2024 #2", "002"), ("aime24", "AIME 2024 #3", "003"),
                  ("aime24", "AIME 2024 #4", "004"), ("aime25", "AIME25 I #1", "70"),
                  ("aime25", "AIME25 II #1", "588")]
    kk = _rows(out / prepare.KK_EVAL / "val.parquet")
    assert [r["data_source"] for r in kk] == ["kk_4to8_test"] * 2 + ["kk_9"] * 2 + [
        "kk_10"] * 2 + ["kk_11"] * 2
    assert all(r["extra_info"]["solution"] for r in kk)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["kk_4to8/train.parquet"]["rows"] == 6
    assert prepare.DEEPMATH_REPO in manifest["files"][
        "deepmath_filtered_level5_7/train.parquet"]["from"]

    # Every reference config reads its train and eval files from this layout.
    for name in CONFIGS:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs",
                                                                        f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for task in ("math", "logic"):
            cfg = module.get_config(task)
            for part in (cfg.data.train, cfg.data.eval):
                assert part.startswith("data/verl/"), part
                recs = readers.read_records(str(out / part[len("data/verl/"):]))
                assert recs and all(r.problem and r.ground_truth for r in recs)


def test_release_copies_the_published_files_and_checks_every_row(hub, tmp_path):
    built = tmp_path / "built"
    prepare.prepare(str(built), source="upstream", hub_root=str(hub), kk_train_size=3,
                    kk_test_size=1)
    release = hub / prepare.RELEASE_REPO
    for name, split in prepare.DATASETS:
        (release / name).mkdir(parents=True)
        (release / name / f"{split}.parquet").write_bytes(
            (built / name / f"{split}.parquet").read_bytes())
    out = tmp_path / "out"
    manifest = prepare.prepare(str(out), hub_root=str(hub),
                               names=["kk_4to8", prepare.MATH_EVAL])
    assert sorted(manifest["files"]) == ["amc23+aime24+aime25/val.parquet",
                                         "kk_4to8/train.parquet"]
    assert (out / "kk_4to8" / "train.parquet").read_bytes() == (
        built / "kk_4to8" / "train.parquet").read_bytes()
    # A published file with a broken row is refused, naming the file, row and field.
    rows = _rows(built / "kk_4to8" / "train.parquet")
    rows[1]["reward_model"] = {"style": "rule", "ground_truth": None}
    _parquet(release / "kk_4to8" / "train.parquet", rows)
    assert prepare.main(["--out", str(tmp_path / "bad"), "--hub_root", str(hub),
                         "--names", "kk_4to8"]) == 1
    with pytest.raises(ValueError, match=r"train.parquet: row 1: field 'reward_model.ground_tr"):
        prepare.prepare(str(tmp_path / "bad"), hub_root=str(hub), names=["kk_4to8"])


def test_bad_inputs_are_named(hub, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset names"):
        prepare.prepare(str(tmp_path), names=["deepmath"], hub_root=str(hub))
    with pytest.raises(FileNotFoundError, match="no data files"):
        prepare.prepare(str(tmp_path), source="upstream", hub_root=str(tmp_path / "empty"),
                        names=["deepmath_filtered_level5_7"])
    bad = hub / prepare.DEEPMATH_REPO / "data" / "train-00000-of-00002.parquet"
    _parquet(bad, [{"question": "q", "difficulty": 5.0, "r1_solution_1": "s"}])
    with pytest.raises(ValueError, match=r"train-00000-of-00002.parquet: row 0: field "
                                         r"'final_answer' is missing"):
        prepare.prepare(str(tmp_path), source="upstream", hub_root=str(hub),
                        names=["deepmath_filtered_level5_7"])
