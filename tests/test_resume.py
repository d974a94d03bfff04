"""Trustworthy training: exact resume, crashes at any instant, non-finite steps, signals."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import list_checkpoints, load_checkpoint
from ddpm.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from ddpm.data import load_dataset
from ddpm.errors import TrainingError
from ddpm.models import Unet, preset_config
from ddpm.train import train


def small_config(steps: int, **train_options) -> RunConfig:
    """The digits preset with dropout, flips and gradient accumulation: every source of randomness on."""
    options = dict(steps=steps, batch_size=4, grad_accum=2, num_samples=2, log_every=1, checkpoint_every=3,
                   warmup_steps=4, keep_last=0)
    return RunConfig(preset="digits", model=preset_config("digits", dropout=0.1),
                     diffusion=DiffusionConfig(timesteps=50),
                     data=DataConfig(hflip=True),
                     train=TrainConfig(**{**options, **train_options}))


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run_dir)
    return tensors


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(small_config(8), run_dir, data=digits, progress=False)
    return run_dir


def test_resumed_run_is_bit_identical_to_uninterrupted_run(tmp_path, digits, uninterrupted):
    train(small_config(5), tmp_path, data=digits, progress=False)          # stops at 5: checkpoint at 3 and 5
    train(small_config(8), tmp_path, data=digits, resume=True, progress=False)
    assert_bit_identical(final_tensors(tmp_path), final_tensors(uninterrupted))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_from_an_older_checkpoint_repeats_lost_steps_exactly(tmp_path, digits, uninterrupted):
    """A crash after step 5 that left only the step-3 checkpoint: steps 4-5 are redone, identically."""
    train(small_config(5), tmp_path, data=digits, progress=False)
    (tmp_path / "checkpoints" / "step-0000005.safetensors").unlink()
    train(small_config(8), tmp_path, data=digits, resume=True, progress=False)
    assert_bit_identical(final_tensors(tmp_path), final_tensors(uninterrupted))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))                  # the lost steps' log lines were replaced, not doubled


# ----------------------------------------------------------------------------- non-finite steps

class NaNAt:
    """Make the U-Net's training forward pass return NaN at chosen call numbers (1-based)."""

    def __init__(self, calls: set[int] | None):
        self.calls, self.count = calls, 0
        self.original = Unet.forward

    def __call__(self, model, x, t):
        out = self.original(model, x, t)
        if not torch.is_grad_enabled():
            return out                                   # sampling grids are not training steps
        self.count += 1
        return out * float("nan") if self.calls is None or self.count in self.calls else out


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path, digits, monkeypatch):
    spy = NaNAt({3, 5})
    monkeypatch.setattr(Unet, "forward", lambda model, x, t: spy(model, x, t))
    result = train(small_config(6, grad_accum=1), tmp_path, data=digits, progress=False)
    assert result.counters.bad_steps == 2 and result.counters.bad_in_row == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in rows] == [0, 0, 1, 1, 2, 2]
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["ema_updates"] == 4                      # skipped steps do not update the EMA
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())


def test_too_many_bad_steps_in_a_row_stop_training_and_keep_the_last_good_checkpoint(tmp_path, digits,
                                                                                     monkeypatch):
    spy = NaNAt(set(range(5, 100)))                     # from step 5 on, every loss is NaN
    monkeypatch.setattr(Unet, "forward", lambda model, x, t: spy(model, x, t))
    config = small_config(20, grad_accum=1, checkpoint_every=2, max_bad_steps=3)
    with pytest.raises(TrainingError, match="3 steps in a row") as info:
        train(config, tmp_path, data=digits, progress=False)
    assert "step-0000006" in str(info.value)            # named as the last good checkpoint
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 6]
    for _, path in list_checkpoints(tmp_path):
        tensors, _ = load_checkpoint(path)               # checksum verified
        assert all(torch.isfinite(v.float()).all() for v in tensors.values())


# ----------------------------------------------------------------------------- real processes

CLI_RUN = ["--steps", "{steps}", "--batch-size", "8", "--timesteps", "50", "--num-images", "2", "--log-every", "1",
           "--checkpoint-every", "2", "--keep-last", "0", "--quiet"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ddpm", *args]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not list_checkpoints(run_dir):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def run_args(steps: int) -> list[str]:
    return [a.format(steps=steps) for a in CLI_RUN]


@pytest.mark.slow      # minutes of subprocesses; run with -m slow
def test_kill_9_at_random_moments_never_corrupts_and_resume_finishes_identically(tmp_path):
    steps = 24
    run_dir = tmp_path / "killed"
    rng = random.Random(1234)
    proc = start(cli("train", *run_args(steps), "--out", str(run_dir)))
    newest = 0
    for round_ in range(4):
        wait_for_checkpoint(run_dir, proc)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()                                      # SIGKILL: no handler runs
        proc.wait()
        found = list_checkpoints(run_dir)
        for _, path in found:
            load_checkpoint(path)                        # every checkpoint is complete and verified
        assert found[-1][0] >= newest                    # progress is lost only since the last checkpoint
        newest = found[-1][0]
        if newest >= steps:
            break
        proc = start(cli("train", "--resume", str(run_dir), "--quiet"))
    else:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    reference = tmp_path / "reference"
    done = subprocess.run(cli("train", *run_args(steps), "--out", str(reference)), capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list_checkpoints(run_dir)[-1][0] == steps
    assert_bit_identical(final_tensors(run_dir), final_tensors(reference))
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    proc = start(cli("train", *run_args(400), "--checkpoint-every", "1000", "--out", str(run_dir)))
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert signal.Signals(sig).name in lines[0] and "--resume" in lines[0]
    found = list_checkpoints(run_dir)
    assert len(found) == 1 and 0 < found[0][0] < 400    # written at the interrupted step, not a milestone
    load_checkpoint(found[0][1])


def test_global_rng_states_round_trip_through_json():
    import random

    import numpy as np

    from ddpm.training_state import rng_states, set_rng_states

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_states()))          # as stored in a checkpoint's metadata
    expected = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_states(saved)
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == expected


def test_metrics_are_strict_json_even_with_empty_quartiles(tmp_path, digits):
    """With one image a step, most timestep quartiles are empty: they are logged as null, not NaN."""
    config = small_config(2, batch_size=1, grad_accum=1)
    train(config, tmp_path, data=digits, progress=False)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name} in {line}"))
        quartiles = [row[f"loss_q{q}"] for q in range(4)]
        assert quartiles.count(None) == 3 and all(isinstance(v, float) for v in quartiles if v is not None)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")
def test_a_signal_the_process_was_started_to_ignore_stays_ignored():
    """``ddpm train ... &`` in a script (or under nohup) starts with SIGINT ignored: the terminal's
    Ctrl-C is for the foreground job, and must not stop the background run. SIGTERM is still handled."""
    from ddpm.signals import StopSignals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert stop.received is None
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
