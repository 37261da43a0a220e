"""The learning-rate schedules of `apd.training.optim`."""

import ml_collections as mc
import numpy as np
import pytest

from apd.training import optim
from experiments import common


def _cfg(**overrides):
    cfg = common.optimizer(lr=1.0, warmup_steps=10)
    cfg.update(overrides)
    return cfg


def test_constant_and_cosine_after_a_linear_warmup():
    constant = optim.learning_rate(_cfg(), 100)
    np.testing.assert_allclose(
        [constant(0), constant(5), constant(10), constant(99)], [0, 0.5, 1, 1]
    )
    cosine = optim.learning_rate(_cfg(decay="cosine"), 110)
    np.testing.assert_allclose([cosine(10), cosine(60), cosine(110)], [1, 0.5, 0], atol=1e-6)


def test_cooldown_is_constant_then_linear_to_zero_at_the_end():
    lr = optim.learning_rate(_cfg(decay="cooldown", cooldown_steps=40), 110)
    values = [float(lr(s)) for s in (5, 10, 69, 70, 90, 110)]
    np.testing.assert_allclose(values, [0.5, 1, 1, 1, 0.5, 0], atol=1e-6)
    # Extending the run keeps the constant phase: the cooldown moves to the new end.
    longer = optim.learning_rate(_cfg(decay="cooldown", cooldown_steps=40), 210)
    np.testing.assert_allclose([longer(90), longer(170), longer(190)], [1, 1, 0.5], atol=1e-6)


@pytest.mark.parametrize("steps", [0, -5, 101, None])
def test_cooldown_length_must_fit_after_the_warmup(steps):
    with pytest.raises(ValueError, match=r"cooldown_steps, an int in \(0, total_steps"):
        optim.learning_rate(_cfg(decay="cooldown", cooldown_steps=steps), 110)


def test_unknown_decay_is_named():
    with pytest.raises(ValueError, match=r"unknown optimizer\.decay 'linear'"):
        optim.learning_rate(mc.ConfigDict(_cfg(decay="linear")), 100)
