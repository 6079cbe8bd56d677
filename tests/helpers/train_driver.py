"""`python -m rlcsd_jax.train` with the fake answers of fake_rollouts (resume / preemption
tests run it as a subprocess so they can SIGKILL / SIGTERM a real training process; the
multi-host test runs several of them).

RLCSD_TEST_FAKE_PATTERN (JSON list of per-group 0/1 lists) replaces the default pattern and keys
it by the record's dataset index.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from helpers import fake_rollouts  # noqa: E402

from absl import app  # noqa: E402

from rlcsd_jax import train  # noqa: E402

def _slow_steps(seconds: float) -> None:
    """Sleep after every training step so a test can signal between checkpoints."""
    import time

    from rlcsd_jax.trainer import rl_trainer

    real = rl_trainer.Trainer.train_step

    def train_step(self, records):
        out = real(self, records)
        time.sleep(seconds)
        return out

    rl_trainer.Trainer.train_step = train_step


def _slow_sampling(seconds: float, marker: str) -> None:
    """After each step's sampling, append a line to `marker` and sleep: a test can send a
    signal while a step is in its sampling phase (before any update)."""
    import time

    from rlcsd_jax.trainer import rl_trainer

    real = rl_trainer.rollout.sample

    def sample(*args, **kwargs):
        out = real(*args, **kwargs)
        with open(marker, "a") as f:
            f.write("sampled\n")
        time.sleep(seconds)
        return out

    rl_trainer.rollout.sample = sample


if __name__ == "__main__":
    if os.environ.get("RLCSD_TEST_FAKE_PATTERN"):
        fake_rollouts.install(pattern=json.loads(os.environ["RLCSD_TEST_FAKE_PATTERN"]),
                              by_record_index=True)
    else:
        fake_rollouts.install()
    if os.environ.get("RLCSD_TEST_STEP_SLEEP"):
        _slow_steps(float(os.environ["RLCSD_TEST_STEP_SLEEP"]))
    if os.environ.get("RLCSD_TEST_SAMPLE_SLEEP"):
        _slow_sampling(float(os.environ["RLCSD_TEST_SAMPLE_SLEEP"]),
                       os.environ["RLCSD_TEST_SAMPLE_MARKER"])
    app.run(lambda argv: sys.exit(train.main(argv)))
