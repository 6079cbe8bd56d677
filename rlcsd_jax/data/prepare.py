"""Build the reference's dataset layout, `OUT/<name>/{train,val}.parquet`, which the configs read.

    python -m rlcsd_jax.data.prepare --out data/verl                 # the reference's release
    python -m rlcsd_jax.data.prepare --out gs://BUCKET/data/verl --source upstream

Why: the configs point at `data/verl/<name>/{train,val}.parquet` (algorithm.md §7 in the design
notes; docs/tpu.md, "Data"), and the reference's download script is not part of this repository.
Two ways to get the files, both from public Hugging Face dataset repositories (so run this where
the internet is; `--hub_root DIR` reads a local mirror laid out as `DIR/<owner>/<repo>/...`):

* `--source release` (default): the reference's own parquet files, HF dataset `Leyiii/RLCSD`,
  file `<name>/<split>.parquet` for every name in DATASETS.  Authoritative.
* `--source upstream`: rebuilt from the sources the reference names, with its filters:
    - `deepmath_filtered_level{5_7,6_8,7_10}`: `zwhe99/DeepMath-103K` rows whose `difficulty`
      lies in [5, 7], [6, 8], [7, 10]; problem = `question`, answer = `final_answer`, solution =
      `r1_solution_1` without its `<think>` block (which R1 solution the reference kept is not
      known; the written solution after the thinking is the one a hint can use);
    - `amc23+aime24+aime25` (val, `data_source` amc23 / aime24 / aime25 per row):
      `AI-MO/aimo-validation-amc` rows whose `url` names 2023 (40 problems),
      `AI-MO/aimo-validation-aime` rows whose `url` names 2024 (30), `opencompass/AIME2025`
      (parts I and II, 30);
    - `kk_4to8` (train) and `kk_4to8_test+kk_9+kk_10+kk_11` (val): Knights & Knaves puzzles from
      this package's generator (`readers.kk_records`, after Logic-RL / Xie et al. 2024; the
      reference's generator script is not public), `--kk_train_size` / `--kk_test_size` each.

Every row has the verl fields the readers use: `data_source`, `prompt` (one user message, the
student prompt), `ability`, `reward_model` {style, ground_truth}, `extra_info` {split, index,
problem, solution}.  Each written file is read back with `readers.read_verl_parquet`, and
`OUT/manifest.json` records the source, filter and row count of every file.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable

from rlcsd_jax.data import storage
from rlcsd_jax.data import prompts, readers

log = logging.getLogger("rlcsd_jax.data.prepare")

RELEASE_REPO = "Leyiii/RLCSD"
DEEPMATH_REPO = "zwhe99/DeepMath-103K"
AMC_REPO = "AI-MO/aimo-validation-amc"
AIME_REPO = "AI-MO/aimo-validation-aime"
AIME25_REPO = "opencompass/AIME2025"
DEEPMATH_BANDS = {"deepmath_filtered_level5_7": (5, 7), "deepmath_filtered_level6_8": (6, 8),
                  "deepmath_filtered_level7_10": (7, 10)}
MATH_EVAL = "amc23+aime24+aime25"
KK_TRAIN, KK_EVAL = "kk_4to8", "kk_4to8_test+kk_9+kk_10+kk_11"
# (name, split) of every file the configs read (config_base.MATH_EVAL / LOGIC_*, configs/*.py).
DATASETS = tuple((n, "train") for n in DEEPMATH_BANDS) + (
    (MATH_EVAL, "val"), (KK_TRAIN, "train"), (KK_EVAL, "val"))
HF_ROOT = "hf://datasets"
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


# ---------------------------------------------------------------------------------------------
# reading a dataset repository (the HF hub through fsspec, or a local mirror)
# ---------------------------------------------------------------------------------------------

def repo_files(root: str, repo: str) -> list[str]:
    """Data files (parquet / jsonl / json) of `repo` under `root`, as full paths, sorted."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(f"{root.rstrip('/')}/{repo}")
    found = sorted(p for p in fs.find(base) if p.endswith(DATA_SUFFIXES)
                   and not os.path.basename(p).startswith("."))
    if not found:
        raise FileNotFoundError(f"no data files (parquet / jsonl) in {root}/{repo}")
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if proto in ("file", "local") else f"{proto}://{p}" for p in found]


def read_rows(path: str) -> list[dict]:
    """Rows of a parquet, JSON-lines or JSON-list file."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        data = f.read()
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8")
    if path.endswith(".jsonl") or not text.lstrip().startswith("["):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _field(row: dict, name: str, where: str):
    if row.get(name) is None:
        raise ValueError(f"{where}: field '{name}' is missing (fields: {sorted(row)})")
    return row[name]


def answer_text(value) -> str:
    """A ground truth as text: 142.0 -> "142", " 3/4 " -> "3/4"."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return str(int(value))
    return str(value).strip()


_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def strip_thinking(text: str) -> str:
    return _THINK.sub("", text).strip()


# ---------------------------------------------------------------------------------------------
# verl rows
# ---------------------------------------------------------------------------------------------

def verl_row(problem: str, answer: str, data_source: str, split: str, index: int,
             solution: str | None, ability: str) -> dict:
    return {"data_source": data_source,
            "prompt": [{"role": "user",
                        "content": prompts.student_user_message(problem, data_source)}],
            "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": split, "index": index, "problem": problem,
                           "solution": solution}}


def deepmath_rows(root: str, name: str) -> tuple[list[dict], str]:
    low, high = DEEPMATH_BANDS[name]
    out = []
    for path in repo_files(root, DEEPMATH_REPO):
        for i, row in enumerate(read_rows(path)):
            where = f"{path}: row {i}"
            if not low <= float(_field(row, "difficulty", where)) <= high:
                continue
            out.append(verl_row(_field(row, "question", where).strip(),
                                answer_text(_field(row, "final_answer", where)), name, "train",
                                len(out), strip_thinking(_field(row, "r1_solution_1", where)),
                                "math"))
    return out, f"{DEEPMATH_REPO}, difficulty in [{low}, {high}]"


def math_eval_rows(root: str) -> tuple[list[dict], str]:
    out = []
    sources = ((AMC_REPO, "amc23", "2023", "problem", "answer"),
               (AIME_REPO, "aime24", "2024", "problem", "answer"),
               (AIME25_REPO, "aime25", None, "question", "answer"))
    for repo, source, year, problem_key, answer_key in sources:
        before = len(out)
        for path in repo_files(root, repo):
            for i, row in enumerate(read_rows(path)):
                where = f"{path}: row {i}"
                if year is not None and year not in str(_field(row, "url", where)):
                    continue
                out.append(verl_row(_field(row, problem_key, where).strip(),
                                    answer_text(_field(row, answer_key, where)), source, "test",
                                    len(out) - before, row.get("solution"), "math"))
        if len(out) == before:
            raise ValueError(f"{root}/{repo} gave no {source} problems")
    return out, (f"{AMC_REPO} (url 2023) as amc23, {AIME_REPO} (url 2024) as aime24, "
                 f"{AIME25_REPO} as aime25")


def kk_rows(sources: Iterable[str], size: int, seed: int) -> tuple[list[dict], str]:
    out = []
    for source in sources:
        split = readers.parse_kk_source(source)[2]
        for r in readers.kk_records(source, size, seed=seed):
            out.append(verl_row(r.problem, r.ground_truth, source, split, r.index, r.solution,
                                "logic"))
    return out, f"rlcsd_jax K&K generator (seed {seed}, {size} puzzles per source)"


def upstream_builders(root: str, kk_train_size: int, kk_test_size: int,
                      seed: int) -> dict[str, Callable[[], tuple[list[dict], str]]]:
    builders = {name: (lambda n=name: deepmath_rows(root, n)) for name in DEEPMATH_BANDS}
    builders[MATH_EVAL] = lambda: math_eval_rows(root)
    builders[KK_TRAIN] = lambda: kk_rows([KK_TRAIN], kk_train_size, seed)
    builders[KK_EVAL] = lambda: kk_rows(KK_EVAL.split("+"), kk_test_size, seed)
    return builders


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def write_parquet(rows: list[dict], target: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(target, buf.getvalue())


def prepare(out: str, *, source: str = "release", names: Iterable[str] | None = None,
            hub_root: str = HF_ROOT, kk_train_size: int = 5000, kk_test_size: int = 100,
            seed: int = 0) -> dict:
    """Write the files of `names` (default: all of DATASETS) under `out`; returns the
    manifest (also written to OUT/manifest.json)."""
    wanted = dict(DATASETS)
    names = list(names or wanted)
    unknown = [n for n in names if n not in wanted]
    if unknown:
        raise ValueError(f"unknown dataset names {unknown}; known: {list(wanted)}")
    if source not in ("release", "upstream"):
        raise ValueError(f"--source must be 'release' or 'upstream', got {source!r}")
    builders = upstream_builders(hub_root, kk_train_size, kk_test_size, seed)
    manifest = {"source": source, "hub_root": hub_root, "files": {}}
    for name in names:
        split = wanted[name]
        rel = f"{name}/{split}.parquet"
        target = storage.join(out, name, f"{split}.parquet")
        if source == "release":
            origin = f"{hub_root.rstrip('/')}/{RELEASE_REPO}/{rel}"
            import fsspec

            with fsspec.open(origin, "rb") as f:
                storage.write_bytes(target, f.read())
            how = f"{RELEASE_REPO}: {rel}"
        else:
            rows, how = builders[name]()
            if not rows:
                raise ValueError(f"{name}: no rows ({how})")
            write_parquet(rows, target)
        records = readers.read_verl_parquet(target)    # what the configs will read
        manifest["files"][rel] = {"rows": len(records), "from": how,
                                  "data_sources": sorted({r.data_source for r in records})}
        log.info("wrote %s: %d rows from %s", target, len(records), how)
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlcsd_jax.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder, local or gs:// (e.g. data/verl)")
    p.add_argument("--source", choices=("release", "upstream"), default="release")
    p.add_argument("--names", default="", help="comma-separated subset of: "
                   + ", ".join(n for n, _ in DATASETS))
    p.add_argument("--hub_root", default=HF_ROOT,
                   help="where dataset repositories are read (default: the HF hub); a local "
                        "mirror folder holds <owner>/<repo>/... ")
    p.add_argument("--kk_train_size", type=int, default=5000, help="upstream: kk_4to8 puzzles")
    p.add_argument("--kk_test_size", type=int, default=100,
                   help="upstream: puzzles per K&K evaluation source")
    p.add_argument("--seed", type=int, default=0, help="upstream: K&K generator seed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = prepare(args.out, source=args.source,
                           names=[n for n in args.names.split(",") if n] or None,
                           hub_root=args.hub_root, kk_train_size=args.kk_train_size,
                           kk_test_size=args.kk_test_size, seed=args.seed)
    except (OSError, ValueError) as e:   # OSError: missing files, no network
        print(f"error: {e}", file=sys.stderr)
        return 1
    for rel, info in manifest["files"].items():
        print(f"{rel}: {info['rows']} rows ({', '.join(info['data_sources'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
