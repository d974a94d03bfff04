"""The time estimate of an automatic choice: the run after every override, a stable median, monotonic in size;
and the progress lines with an ETA when stderr is not a terminal."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.config import RunConfig
from ddpm.estimates import choice_line, estimate_seconds_per_step, format_duration, median_seconds
from ddpm.models import preset_config
from ddpm.recipes import choose


class FakeClock:
    """A timer that a fake step advances by the seconds it says it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _config(side: int, channels: int = 3, steps: int = 100, batch: int = 16) -> RunConfig:
    config = RunConfig(preset="mnist", model=preset_config("mnist", image_size=side, channels=channels))
    config.train.steps, config.train.batch_size = steps, batch
    return config


def test_the_printed_duration_is_that_of_the_run_after_its_overrides():
    choice = choose((32, 32), 3, 1000)
    config = _config(32, steps=10, batch=4)
    config.train.grad_accum = 2
    line = choice_line(choice.reason, config, 3.0, "cpu")
    assert "this run: 10 steps at batch 4 (x2 accumulated), precision fp32, about 30 s on cpu" in line
    assert "its recipe " in line and " steps at batch " in line                       # the choice's recipe, named as such
    assert format_duration(3.0 * 5_000) not in line


def test_the_rgb_choice_names_its_mnist_sized_model_for_what_it_is():
    reason = choose((32, 32), 3, 1000).reason
    assert "'mnist' (up to 64 pixels a side; the mnist-sized U-Net with 3 channels)" in reason
    assert "U-Net with" not in choose((28, 28), 1, 1000).reason


def test_the_median_ignores_an_outlier_and_stops_when_two_timings_agree():
    clock, costs = FakeClock(), iter([5.0, 1.0, 5.0, 1.05, 1.0, 9.0, 9.0])
    calls = []

    def step():
        calls.append(1)
        clock.now += next(costs)

    assert median_seconds(step, timer=clock) == pytest.approx(1.025)   # median of 1, 5, 1.05, 1.0
    assert len(calls) == 5                                              # warm-up + 4: stopped at 1.05 ~ 1.0


def test_the_time_cap_ends_the_repeats():
    clock = FakeClock()
    costs = itertools.cycle([1.0, 2.0])                   # never two within 10 %

    def step():
        clock.now += next(costs)

    median_seconds(step, timer=clock, budget_s=6.0, max_repeats=100)
    assert clock.now <= 6.0 + 2.0
    clock.now = 0.0
    costs = itertools.repeat(30.0)                        # one step longer than the budget: timed once
    assert median_seconds(step, timer=clock, budget_s=20.0) == 30.0 and clock.now == 30.0


def test_the_estimate_grows_with_the_image_size_and_the_batch():
    """A fake step costing per pixel of the batch (plus a fixed overhead and noise): the estimate is monotonic."""
    rng = np.random.default_rng(0)
    clock = FakeClock()

    def make_step(config, device):
        h, w = config.model.image_size
        cost = 0.01 + 1e-6 * config.train.batch_size * config.model.channels * h * w

        def step():
            clock.now += cost * float(rng.uniform(0.97, 1.03))
        return step

    def estimate(side, channels=3, batch=16):
        return estimate_seconds_per_step(_config(side, channels, batch=batch), torch.device("cpu"), timer=clock,
                                         make_step=make_step)

    by_size = [estimate(side) for side in (8, 16, 32, 48, 64)]
    assert by_size == sorted(by_size) and by_size[-1] > 10 * by_size[0]
    assert estimate(32, batch=32) > estimate(32, batch=16) and estimate(32, channels=1) < estimate(32)


def test_the_real_step_is_timed_at_the_runs_batch(monkeypatch):
    """The images reaching the network have the run's batch size (not two images scaled up)."""
    from ddpm.build import build_diffusion as real_build
    import ddpm.estimates as estimates

    seen = []

    def spying_build(config):
        diffusion = real_build(config)
        forward = diffusion.model.forward

        def spy(x, *args, **kwargs):
            seen.append(x.shape[0])
            return forward(x, *args, **kwargs)
        diffusion.model.forward = spy
        return diffusion

    monkeypatch.setattr(estimates, "build_diffusion", spying_build)
    config = RunConfig(preset="digits", model=preset_config("digits", image_size=8, channels=1, dim=8))
    config.train.batch_size = 6
    assert estimates.estimate_seconds_per_step(config, torch.device("cpu"), budget_s=0.5) > 0
    assert seen and set(seen) == {6}


def test_the_dry_run_line_describes_the_overridden_run(tmp_path, capsys):
    from PIL import Image
    from ddpm.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    assert main(["train", "--data", str(folder), "--steps", "10", "--batch-size", "3", "--dim", "8",
                 "--device", "cpu", "--dry-run", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "no --preset given" in line)
    assert "its recipe" in line and "this run: 10 steps at batch 3, precision fp32, about" in line


def test_progress_lines_outside_a_terminal_carry_an_eta_from_the_first_steps(tmp_path, capsys):
    from ddpm.tracking import Tracker

    clock = FakeClock()
    tracker = Tracker(tmp_path, {}, total_steps=1000, start_step=0, progress=True, main=True, clock=clock)
    assert not tracker.interactive                              # pytest captures stderr: not a terminal
    for step in range(1, 8):
        clock.now += 10.0                                       # 10 s a step
        tracker.window.add(torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long), 1000, 1.0)
        tracker.progress_line(step, None)
    tracker.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert lines and lines[0].startswith("step 2/1000")          # an ETA as soon as a step's time is known
    assert "loss 0.5000" in lines[0] and "ETA" in lines[0] and "img/s" in lines[0]
    assert "ETA 2.8 h" in lines[0]                              # 998 steps x 10 s
    assert len(lines) <= 4                                      # then every ~30 s, not every step
