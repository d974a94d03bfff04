"""Learning-rate schedules: each checked against its formula, written out here, and ``constant``
against the training loop's own ``lr_at`` bit for bit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from ddpm.config import TrainConfig
from ddpm.errors import ConfigError
from ddpm.lr_schedules import LR_SCHEDULES, LRSchedule, lr_at, schedule_from_train_config
from ddpm.train import lr_at as loop_lr_at


@pytest.mark.parametrize("lr, warmup", [(1e-3, 0), (1e-3, 200), (2e-4, 5000), (3e-4, 7), (2e-5, 13), (0.1, 3)])
def test_constant_is_the_loops_lr_at_bit_for_bit(lr, warmup):
    config = SimpleNamespace(train=TrainConfig(lr=lr, warmup_steps=warmup, steps=20_000))   # all lr_at reads
    schedule = schedule_from_train_config(config.train)
    assert schedule.name == "constant"
    for step in [*range(0, 6000), 9_999, 19_999]:
        assert schedule(step) == loop_lr_at(config, step), step    # ==, not approximately


def test_warmup_then_each_schedule_matches_its_formula():
    lr, lr_min, W, S = 1e-3, 1e-5, 100, 1100
    for name in LR_SCHEDULES:
        s = LRSchedule(lr=lr, warmup_steps=W, name=name, total_steps=S, lr_min=lr_min)
        for step in (0, 1, 49, 99):
            assert s(step) == pytest.approx(lr * (step + 1) / W, rel=1e-15), (name, step)
    cases = {  # step: (cosine, linear), p = (step - W) / (S - W)
        100: (lr, lr),
        350: (lr_min + (lr - lr_min) * (1 + math.cos(math.pi / 4)) / 2, lr - (lr - lr_min) / 4),
        600: ((lr + lr_min) / 2, (lr + lr_min) / 2),
        1099: (lr_min + (lr - lr_min) * (1 + math.cos(math.pi * 0.999)) / 2, lr - (lr - lr_min) * 0.999),
        1100: (lr_min, lr_min),
        5000: (lr_min, lr_min),              # past S the floor holds
    }
    for step, (cosine, linear) in cases.items():
        assert LRSchedule(lr, W, "cosine", S, lr_min)(step) == pytest.approx(cosine, rel=1e-12), step
        assert LRSchedule(lr, W, "linear", S, lr_min)(step) == pytest.approx(linear, rel=1e-12), step
        assert LRSchedule(lr, W, "constant", S, lr_min)(step) == lr


def test_inverse_sqrt_is_edm2s_decay():
    lr = 1e-2
    s = LRSchedule(lr=lr, warmup_steps=0, name="inverse-sqrt", ref_steps=400)
    for step, expected in {0: lr, 399: lr, 400: lr, 1600: lr / 2, 3600: lr / 3, 40_000: lr / 10}.items():
        assert s(step) == pytest.approx(expected, rel=1e-15), step
    # t_ref defaults to the warm-up length: Vaswani et al.'s lr * min((step + 1) / W, sqrt(W / step)) after step 0
    v = LRSchedule(lr=lr, warmup_steps=250, name="inverse-sqrt")
    for step in (0, 100, 249, 250, 251, 1000, 62_500):
        expected = lr * (step + 1) / 250 if step < 250 else lr * math.sqrt(250 / step)
        assert v(step) == pytest.approx(expected, rel=1e-14), step


def test_lr_is_a_pure_function_of_the_step():
    s = LRSchedule(lr=1e-3, warmup_steps=10, name="cosine", total_steps=500, lr_min=1e-4)
    forward = [s(k) for k in range(500)]
    assert [s(k) for k in reversed(range(500))] == forward[::-1]
    assert all(a >= b for a, b in zip(forward[10:], forward[11:]))       # decays monotonically after warm-up


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="step"), "lr schedule must be one of constant, cosine, linear, inverse-sqrt"),
    (dict(name="cosine"), "needs total steps > warmup steps"),
    (dict(name="linear", total_steps=10, warmup_steps=10), "needs total steps > warmup steps"),
    (dict(lr_min=2e-3), "lr min must be a finite number in [0, lr = 0.001]"),
    (dict(lr_min=-1.0), "lr min"),
    (dict(lr_min=float("nan")), "lr min"),
    (dict(name="inverse-sqrt", ref_steps=0), "lr reference steps must be an integer >= 1"),
    (dict(warmup_steps=-1), "warmup steps"),
])
def test_bad_schedules_are_one_line_errors(kwargs, words):
    with pytest.raises(ConfigError) as info:
        LRSchedule(lr=1e-3, **kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_function_and_dataclass_agree():
    kw = dict(warmup_steps=5, name="linear", total_steps=50, lr_min=1e-6)
    s = LRSchedule(lr=3e-4, **kw)
    assert [s(k) for k in range(60)] == [lr_at(k, 3e-4, **kw) for k in range(60)]
