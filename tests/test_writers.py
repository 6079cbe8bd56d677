"""Metric writers: clu's interface without TensorFlow, TensorBoard through tensorboardX, W&B
(a stand-in `wandb` module records the calls: the real client needs an account or its local
service), and the dependency promise that the default install has no TensorFlow."""

import os
import subprocess
import sys
import tomllib
import types

import pytest

from rlcsd_jax.trainer import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.runs = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run = types.SimpleNamespace(logged=[], finished=False, config=types.SimpleNamespace(
            updates=[], update=lambda d, allow_val_change=False: run.config.updates.append(d)))
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    Image = Histogram = Video = staticmethod(lambda v, **kw: ("media", v))


def test_wandb_writer_logs_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    opts = {"project": "proj", "entity": "team", "name": "run-a", "config": {"seed": 1}}
    logger = metrics.MetricsLogger(tmp_path, total_steps=4, wandb=opts, console=False)
    logger.write_hparams({"method": "rlcsd", "rlcsd": {"tau": 0.02}})
    logger.write(1, {"train/reward_mean": 0.25, "train/entropy": float("nan")})
    logger.write(2, {"train/reward_mean": 0.5})
    logger.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert fake.inits[0] == {"project": "proj", "entity": "team", "name": "run-a", "id": run_id,
                             "resume": "allow", "config": {"seed": 1}, "dir": None}
    run = fake.runs[0]
    assert run.logged == [(1, {"train/reward_mean": 0.25}), (2, {"train/reward_mean": 0.5})]
    assert run.config.updates == [{"method": "rlcsd", "rlcsd.tau": 0.02}]
    assert run.finished
    # A resumed run (same workdir) reuses the id, so W&B appends to the same run.
    logger = metrics.MetricsLogger(tmp_path, wandb={"project": "proj"}, console=False)
    logger.write(3, {"train/reward_mean": 0.75})
    logger.close()
    assert fake.inits[1]["id"] == run_id and fake.runs[1].logged == [
        (3, {"train/reward_mean": 0.75})]


def test_wandb_missing_says_which_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)    # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"rlcsd_jax\[wandb\]"):
        metrics.MetricsLogger(tmp_path, wandb={"project": "p"})


def test_run_config_selects_wandb():
    from rlcsd_jax.trainer import train_config
    from rlcsd_jax.trainer import loop

    cfg = train_config.get_base_config()
    assert loop._wandb_options(cfg, "gs://b/runs/q17") is None
    cfg.log.wandb, cfg.log.wandb_entity = True, "team"
    opts = loop._wandb_options(cfg, "gs://b/runs/q17/")
    assert opts["project"] == "rlcsd_jax" and opts["entity"] == "team"
    assert opts["name"] == "q17" and opts["config"]["method"] == "rlcsd"


NO_TF = """
import sys
sys.modules["tensorflow"] = None          # `import tensorflow` now raises ImportError
from rlcsd_jax.trainer import metrics, writers
logger = metrics.MetricsLogger(sys.argv[1], total_steps=2, console=False)
logger.write(1, {"train/reward_mean": 0.5})
logger.write(2, {"train/reward_mean": 0.75})
logger.close()
try:
    writers.metric_writers().SummaryWriter(sys.argv[1])
except ImportError as e:
    print("clu SummaryWriter:", e)
"""


def test_tensorboard_events_without_tensorflow(tmp_path):
    """clu's writer interface and the event files work when TensorFlow cannot be imported."""
    p = subprocess.run([sys.executable, "-c", NO_TF, str(tmp_path)], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "clu SummaryWriter:" in p.stdout and "rlcsd_jax[tfds]" in p.stdout
    from test_metrics_plot import _tb_scalars

    assert _tb_scalars(str(tmp_path / "tensorboard"))["train/reward_mean"] == {1: 0.5, 2: 0.75}


def test_default_install_has_no_tensorflow():
    """`pip install -e .` (no extras) must not pull TensorFlow; TFDS lives in [tfds]."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = [d.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip()
             .lower() for d in project["dependencies"]]
    assert not [n for n in names if n.startswith("tensorflow")], names
    tfds = " ".join(project["optional-dependencies"]["tfds"])
    assert "tensorflow-datasets" in tfds and "tensorflow-cpu" in tfds
    assert any("wandb" in d for d in project["optional-dependencies"]["wandb"])
    assert project["requires-python"] == ">=3.11"


def test_tfds_without_the_extra_says_which_extra(tmp_path, monkeypatch):
    from rlcsd_jax.data import read_tfds

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"rlcsd_jax\[tfds\]"):
        read_tfds("knights_knaves/kk_4to8", "train", str(tmp_path))
