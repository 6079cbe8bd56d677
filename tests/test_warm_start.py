"""The supervised warm start's learning-rate schedule (trainer/warm_start.py)."""

import numpy as np
import pytest

from rlcsd_jax.trainer import warm_start


def lrs(schedule, steps=100, lr=1e-3, warmup=10):
    return np.array([warm_start.learning_rate(s, steps=steps, lr=lr, warmup_steps=warmup,
                                              schedule=schedule) for s in range(steps)])


def test_constant_schedule_warms_up_then_holds():
    x = lrs("constant")
    np.testing.assert_allclose(x[:10], 1e-3 * np.arange(1, 11) / 10)
    np.testing.assert_allclose(x[10:], 1e-3)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    x = lrs("cosine")
    np.testing.assert_allclose(x[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-6)
    assert np.all(np.diff(x[9:]) <= 0)
    # Half-way through the decay (step 55 of 10..100) the cosine is at half the peak.
    np.testing.assert_allclose(x[54], 5e-4, rtol=1e-6)
    assert x[-1] < 1e-9


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="warm_start.schedule"):
        warm_start.learning_rate(0, steps=10, lr=1e-3, warmup_steps=1, schedule="linear")
