"""The lr schedule against hand-computed values."""
import math

import pytest

from ratpt.config import ScheduleConfig
from ratpt.train.schedule import LRMultiplier


def test_cosine_warms_up_linearly_then_decays_to_min_ratio():
    lr = LRMultiplier(ScheduleConfig(kind="cosine", warmup_fraction=0.1, min_lr_ratio=0.1), total_steps=100)
    assert [lr(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(100) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly():
    lr = LRMultiplier(ScheduleConfig(kind="wsd", warmup_fraction=0.1, decay_fraction=0.2, min_lr_ratio=0.0), 100)
    assert lr(50) == 1.0 and lr(79) == 1.0
    assert lr(90) == pytest.approx(0.5)
    assert lr(100) == pytest.approx(0.0)


def test_constant_after_warmup():
    lr = LRMultiplier(ScheduleConfig(kind="constant", warmup_fraction=0.0), 10)
    assert [lr(s) for s in range(10)] == [1.0] * 10
