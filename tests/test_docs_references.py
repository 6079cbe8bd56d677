"""Everything the repository cites exists in it: `algorithm.md §N` / `models.md §N` name a
heading of that file in docs/, a `docs/....md` or `benchmarks/....md` path names a file, and no
document outside the repository is cited.

A citation is `algorithm.md §4.8` (or `docs/algorithm.md §4.8`); a bare `§4.9` refers to the
document cited last before it in the same file, or inside docs/algorithm.md and docs/models.md
to that file itself.  Headings are numbered `## 4.`, `### 4.8`,
`#### 2.3.8`.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITED_DOCS = ("algorithm", "models")
CITATION = re.compile(r"(?:(?:docs/)?(algorithm|models)\.md\s?)?§\s?(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.M)
PATH = re.compile(r"(?<![\w/.-])((?:docs|benchmarks)/\w[\w-]*\.md)\b")
# Design notes the code once cited that do not ship with the repository.
OUTSIDE = re.compile(r"\b(RLCSD_SPEC|MODEL_SPEC|ARCHITECTURE\.md|ANCHORS\.md|TPU_AOT\.md)\b")
# Records of past measurements quote old text as it was.
SKIP = {ROOT / "benchmarks" / "RESULTS.md"}


def scanned_files() -> list[pathlib.Path]:
    patterns = ["rlcsd_jax/**/*.py", "tests/**/*.py", "benchmarks/**/*.py", "benchmarks/*.md",
                "configs/*.py", "docs/*.md", "colabs/*.ipynb", "README.md", "launch_tpu.sh",
                "pyproject.toml"]
    files = {p for pattern in patterns for p in ROOT.glob(pattern)}
    return sorted(p for p in files - SKIP if "__pycache__" not in p.parts)


def sections(doc: str) -> set[str]:
    return set(HEADING.findall((DOCS / f"{doc}.md").read_text()))


def citation_problems(path: pathlib.Path, text: str, known: dict[str, set[str]]) -> list[str]:
    """`file:line: problem` for every citation of `text` that does not resolve."""
    own = path.stem if path.parent == DOCS and path.stem in CITED_DOCS else None
    current, problems = own, []
    for m in CITATION.finditer(text):
        doc, section = m.group(1), m.group(2)
        current = doc or own or current
        line = text.count("\n", 0, m.start()) + 1
        if current is None:
            problems.append(f"{path.relative_to(ROOT)}:{line}: §{section} names no document "
                            "(write algorithm.md §N or models.md §N)")
        elif section not in known[current]:
            problems.append(f"{path.relative_to(ROOT)}:{line}: {current}.md has no section "
                            f"{section}")
    return problems


def test_every_section_citation_names_an_existing_heading():
    known = {doc: sections(doc) for doc in CITED_DOCS}
    problems = [p for path in scanned_files() if path.name != "test_docs_references.py"
                for p in citation_problems(path, path.read_text(), known)]
    assert not problems, "\n".join(problems)


def test_no_document_outside_the_repository_is_cited():
    hits = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(1)}"
            for path in scanned_files() if path.name != "test_docs_references.py"
            for text in [path.read_text()] for m in OUTSIDE.finditer(text)]
    assert not hits, "\n".join(hits)


def test_every_cited_markdown_path_exists():
    missing = sorted({f"{path.relative_to(ROOT)}: {m.group(1)}" for path in scanned_files()
                      for m in PATH.finditer(path.read_text()) if not (ROOT / m.group(1)).exists()})
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("text, expected", [
    ("see algorithm.md §4.8 and §4.9", []),
    ("see models.md §1.1, then algorithm.md §2.5", []),
    ("see §4.8", ["x.py:1: §4.8 names no document (write algorithm.md §N or models.md §N)"]),
    ("algorithm.md §4.8\n(§99.1)", ["x.py:2: algorithm.md has no section 99.1"]),
])
def test_the_checker_resolves_bare_sections_to_the_last_cited_document(text, expected):
    known = {"algorithm": {"4.8", "4.9", "2.5"}, "models": {"1.1"}}
    assert citation_problems(ROOT / "x.py", text, known) == expected
