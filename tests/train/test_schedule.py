"""Learning-rate shapes: warm-up, cosine, multistep, CycleGAN's constant-then-linear, and the warm-up length."""

import pytest

from vitlab.config import OptimConfig
from vitlab.train.schedule import constant_then_linear, lr_factor, warmup_steps


def test_multistep_halves_at_30_60_90_percent():
    cfg = OptimConfig(schedule="multistep", milestones=(0.3, 0.6, 0.9), gamma=0.5)
    factors = [lr_factor(s, 100, 0, cfg) for s in (0, 29, 30, 59, 60, 89, 90, 99)]
    assert factors == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, cfg) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, cfg) == pytest.approx(0.1)


def test_lr_constant_then_linear_to_zero() -> None:
    factors = [constant_then_linear(s, 100, 200) for s in (0, 99, 100, 150, 199, 200)]
    assert factors == pytest.approx([1, 1, 1, 0.5, 0.01, 0])


def test_warmup_steps_overrides_warmup_epochs():
    assert warmup_steps(OptimConfig(warmup_epochs=2), 50) == 100
    assert warmup_steps(OptimConfig(warmup_epochs=2, warmup_steps=7), 50) == 7
