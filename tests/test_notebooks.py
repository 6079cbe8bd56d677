"""The notebooks in colabs/ run top to bottom on CPU (smoke sizes) and are stored clean.

Each notebook is executed with nbclient in a fresh kernel with RLCSD_NOTEBOOK_SMOKE=1, which its
parameters cell turns into tiny sizes; the test then looks for the figures (image/png outputs)
and tables (markdown / text outputs with the table headers) the notebook is there to show.
"""

import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("quickstart.ipynb", "style_drift.ipynb")
BUDGET_S = 300          # each notebook, smoke mode, CPU

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


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], f"{name}: a code cell has stored outputs; clear them"
        assert cell.execution_count is None, f"{name}: stored execution counts; clear them"
    # A parameters cell that CI shrinks through the environment.
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RLCSD_NOTEBOOK_SMOKE" in params[0].source


def _outputs(nb):
    """(number of image/png outputs, all text of the outputs joined)."""
    images, texts = 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type == "error":
                texts.append("\n".join(out.traceback))
            data = out.get("data", {})
            images += "image/png" in data
            texts += [data[k] for k in ("text/markdown", "text/plain") if k in data]
    return images, "\n".join(texts)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, monkeypatch):
    monkeypatch.setenv("RLCSD_NOTEBOOK_SMOKE", "1")
    # The kernel inherits this environment (CPU platform, no network) and imports the
    # package from this checkout even where it is not pip-installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p))
    nb = _read(name)
    client = nbclient.NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                                     resources={"metadata": {"path": REPO}})
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    images, text = _outputs(nb)
    assert elapsed < BUDGET_S, f"{name} took {elapsed:.0f}s in smoke mode"
    assert images >= 1, f"{name}: no figure was displayed"
    for want in EXPECTED_TEXT[name]:
        assert want in text, f"{name}: no output contains {want!r}"
