"""The notebooks in colabs/: how they are stored, their install cell, and a run of each.

* quickstart.ipynb is stored WITH the outputs of a full (non-smoke) run, so a reader sees the
  plots and tables without running it; style_drift.ipynb is stored clean.
* Both share one install cell (tag "install"): plain Python, no shell magics.  It is executed
  in a clean virtualenv that has only what it installs (the package's own dependencies, not the
  test extra), then that environment trains a step; a second pass fakes a GPU runtime's JAX and
  checks that it is kept.  A placeholder REPO_URL stops it with a clear message.
* Each notebook is executed (a fresh copy, outputs cleared) with nbclient in a fresh kernel with
  RLCSD_NOTEBOOK_SMOKE=1, which its parameters cell turns into tiny sizes; the test looks for
  the figures (image/png outputs) and tables the notebook is there to show.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("quickstart.ipynb", "style_drift.ipynb")
STORED_WITH_OUTPUTS = ("quickstart.ipynb",)
BUDGET_S = 300          # each notebook, smoke mode, CPU
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/([^/\s)]+)/([^/\s)]+)/blob/"
                        r"([^/\s)]+)/(colabs/[^\s)]+\.ipynb)")

# Text each notebook's outputs must contain (figures are checked separately).
EXPECTED_TEXT = {
    "quickstart.ipynb": ["rlcsd_jax run summary", "restored step", "PROBLEM:",
                         "./launch_tpu.sh create", "python -m rlcsd_jax.train"],
    "style_drift.ipynb": ["hint source:", "## Top-10 tokens by mean |e_c|",
                          "## Top-10 tokens by mean |e_ctr|",
                          "| rank | token | count | mean \\|e_c\\|"],
}


def _read(name):
    return nbformat.read(os.path.join(COLABS, name), as_version=4)


def _install_cell(nb):
    cells = [c for c in nb.cells if "install" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and cells[0].cell_type == "code"
    return cells[0].source


def _outputs(nb):
    """(number of image/png outputs, all text of the outputs joined, error outputs)."""
    images, texts, errors = 0, [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type == "error":
                errors.append("\n".join(out.traceback))
            data = out.get("data", {})
            images += "image/png" in data
            texts += [data[k] for k in ("text/markdown", "text/plain") if k in data]
    return images, "\n".join(texts + errors), errors


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_form(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    # A parameters cell that CI shrinks through the environment.
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RLCSD_NOTEBOOK_SMOKE" in params[0].source
    if name not in STORED_WITH_OUTPUTS:
        for cell in code:
            assert cell.outputs == [], f"{name}: a code cell has stored outputs; clear them"
            assert cell.execution_count is None, f"{name}: stored execution counts; clear them"
        return
    # Stored with the outputs of one full, top-to-bottom, error-free run.
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    images, text, errors = _outputs(nb)
    assert not errors, errors[0][-2000:]
    assert images >= 1, f"{name}: no figure stored"
    assert "full demo" in text and "smoke mode" not in text
    for want in EXPECTED_TEXT[name]:
        assert want in text, f"{name}: no stored output contains {want!r}"


def test_install_cells_are_one_plain_python_cell():
    cells = [_install_cell(_read(n)) for n in NOTEBOOKS]
    assert cells[0] == cells[1]
    compile(cells[0], "install-cell", "exec")      # no `!` shell magics: runs anywhere
    assert ".[test" not in cells[0]      # never the test extra (torch)


def test_install_cell_stops_clearly_while_repo_url_is_a_placeholder(tmp_path):
    # -S: no site-packages, so rlcsd_jax is not importable, as on a fresh runtime.
    p = subprocess.run([sys.executable, "-S", "-c", _install_cell(_read(NOTEBOOKS[0]))],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "REPO_URL is still the placeholder" in p.stderr and "set it" in p.stderr
    assert os.listdir(tmp_path) == []


def test_readme_colab_links_point_at_the_notebooks():
    with open(os.path.join(REPO, "README.md")) as f:
        links = COLAB_LINK.findall(f.read())
    url = re.search(r'REPO_URL = "https://github\.com/([^/]+)/([^/"]+?)(?:\.git)?"',
                    _install_cell(_read(NOTEBOOKS[0])))
    assert sorted(link[3] for link in links) == sorted(f"colabs/{n}" for n in NOTEBOOKS)
    for owner, repo, _, path in links:
        assert os.path.exists(os.path.join(REPO, path))
        assert (owner, repo) == url.groups(), "Colab links and REPO_URL name other repositories"
    for name in NOTEBOOKS:      # each notebook's own badge opens itself
        first = _read(name).cells[0].source
        assert [m[3] for m in COLAB_LINK.findall(first)] == [f"colabs/{name}"]


# ------------------------------------------------------------------ the install cell, for real


def _run(cmd, cwd, env, timeout=900):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd[:4]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _source_repo(tmp_path):
    """A git repository of this working tree (tracked and untracked, non-ignored files), for
    REPO_URL: the install cell clones it like the published repository."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        if os.path.isfile(os.path.join(REPO, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            with open(os.path.join(REPO, rel), "rb") as a, open(src / rel, "wb") as b:
                b.write(a.read())
    git = ["git", "-C", str(src), "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "tree"]):
        subprocess.run([*git, *cmd], check=True, capture_output=True)
    return f"file://{src}"


@pytest.mark.slow
def test_install_cell_in_a_clean_virtualenv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cell = _install_cell(_read("quickstart.ipynb")).replace(
        "https://github.com/ORG/rlcsd_jax.git", _source_repo(tmp_path))
    (tmp_path / "cpu").mkdir()
    out = _run([py, "-c", cell], tmp_path / "cpu", env)
    assert "Successfully installed" in out and "rlcsd_jax" in out
    installed = json.loads(_run([py, "-m", "pip", "list", "--format=json"], tmp_path, env))
    names = {d["name"].lower().replace("_", "-") for d in installed}
    assert not {n for n in names if n.startswith("tensorflow")}, "TensorFlow was installed"
    assert not names & {"torch", "pytest", "nbclient", "ipykernel"}, "the test extra leaked in"
    # The environment trains: metrics and TensorBoard events, without TensorFlow.
    work = tmp_path / "run"
    _run([py, "-m", "rlcsd_jax.train", f"--config={tmp_path}/cpu/rlcsd_jax/configs/tiny.py",
          f"--workdir={work}", "--config.warm_start.steps=0", "--config.train.num_steps=1",
          "--config.data.num_generated_train=16", "--config.rollout.prompts_per_step=4",
          "--config.train.minibatch_prompts=4", "--config.rollout.group_size=2",
          "--config.rollout.max_new_tokens=8", "--config.eval.before_train=False",
          "--config.eval.at_end=False"], tmp_path, env, timeout=300)
    assert (work / "metrics.jsonl").read_text().count('"step": 1') == 1
    assert any((work / "tensorboard").iterdir())

    # A GPU runtime: Colab's JAX comes with its CUDA plugin.  The cell pins that stack, so
    # installing the package again (after uninstalling it) leaves JAX as it was.
    version = {d["name"]: d["version"] for d in installed}["jax"]
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                tmp_path, env).strip()
    plugin = os.path.join(site, f"jax_cuda12_plugin-{version}.dist-info")
    os.makedirs(plugin)
    with open(os.path.join(plugin, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: jax-cuda12-plugin\nVersion: {version}\n")
    open(os.path.join(plugin, "RECORD"), "w").close()
    _run([py, "-m", "pip", "uninstall", "-y", "rlcsd_jax"], tmp_path, env)
    (tmp_path / "gpu").mkdir()
    out = _run([py, "-c", cell], tmp_path / "gpu", env)
    assert (f"kept the runtime's JAX for cuda12: jax=={version}, "
            f"jax-cuda12-plugin=={version}, jaxlib==") in out, out
    after = json.loads(_run([py, "-m", "pip", "list", "--format=json"], tmp_path, env))
    assert {d["name"]: d["version"] for d in after}["jax"] == version


# ------------------------------------------------------------------------- the notebooks run


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, monkeypatch):
    monkeypatch.setenv("RLCSD_NOTEBOOK_SMOKE", "1")
    # The kernel inherits this environment (CPU platform, no network) and imports the
    # package from this checkout even where it is not pip-installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p))
    nb = _read(name)
    for cell in nb.cells:        # a fresh copy: the stored outputs play no part
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                                     resources={"metadata": {"path": REPO}})
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    images, text, errors = _outputs(nb)
    assert not errors
    assert elapsed < BUDGET_S, f"{name} took {elapsed:.0f}s in smoke mode"
    assert images >= 1, f"{name}: no figure was displayed"
    assert "smoke mode" in text
    for want in EXPECTED_TEXT[name]:
        assert want in text, f"{name}: no output contains {want!r}"
