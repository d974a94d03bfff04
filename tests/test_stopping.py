"""SIGTERM ends every long phase within seconds, with its one-line message: the final sample grids and the
in-training evaluation (after a checkpoint of the step) and ``ddpm eval``. Real subprocesses, tiny models,
long samplers (many timesteps or images) so that the signal lands inside the phase."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ddpm.checkpoint import list_checkpoints

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")

TINY = ["--preset", "digits", "--dim", "8", "--batch-size", "4", "--device", "cpu", "--checkpoint-every", "0",
        "--sample-every", "0"]
PROMPT_S = 8.0          # "within a few seconds" of the signal, with room for a loaded machine


class Running:
    """``python -m ddpm ARGS`` with its stderr read as it comes (tqdm's carriage returns included)."""

    def __init__(self, argv: list):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "ddpm", *map(str, argv)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while chunk := self.proc.stderr.read(1):
            self.err += chunk

    def stop_during(self, phrase: str, timeout: float = 240) -> float:
        """SIGTERM once ``phrase`` is on stderr; the seconds from the signal to the exit."""
        deadline = time.time() + timeout
        while phrase not in self.err:
            assert self.proc.poll() is None, f"ended before {phrase!r}:\n{self.err}"
            assert time.time() < deadline, f"no {phrase!r} in time:\n{self.err}"
            time.sleep(0.02)
        time.sleep(0.3)                                  # inside the phase, past its first line
        assert self.proc.poll() is None, f"the phase ended before the signal:\n{self.err}"
        sent = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(timeout=5)
        return time.time() - sent

    def last_line(self) -> str:
        return self.err.replace("\r", "\n").strip().splitlines()[-1]


def test_sigterm_during_the_final_sample_grids_stops_within_seconds_in_process(tmp_path, capsys):
    """In this process (no interpreter start): the signal is sent once the last step's checkpoint is on disk,
    that is, inside the final grids (64 images, 4,000 steps each: far longer than the test allows)."""
    from ddpm.cli import main

    run_dir = tmp_path / "run"
    sent = []

    def send_when_saved():
        deadline = time.time() + 120
        while not list_checkpoints(run_dir) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        sent.append(time.time())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_when_saved, daemon=True).start()
    code = main([*map(str, ["train", *TINY, "--steps", "2", "--timesteps", "4000", "--num-images", "64",
                            "--out", run_dir])])
    assert code == 128 + signal.SIGTERM and sent and time.time() - sent[0] < PROMPT_S
    err = capsys.readouterr().err.strip().splitlines()
    assert "final sample grids (EMA and raw) at step 2..." in err
    assert err[-1].startswith("ddpm: SIGTERM received during the final sample grids (EMA and raw) at step 2: "
                              "stopped, saved") and err[-1].endswith(f"--resume {run_dir}")
    assert [step for step, _ in list_checkpoints(run_dir)] == [2] and not (run_dir / "samples.png").exists()


@pytest.mark.slow
def test_sigterm_during_the_final_sample_grids_stops_within_seconds(tmp_path):
    run_dir = tmp_path / "run"
    run = Running(["train", *TINY, "--steps", "2", "--timesteps", "4000", "--num-images", "64", "--out", run_dir])
    seconds = run.stop_during("final sample grids")
    assert run.proc.returncode == 128 + signal.SIGTERM, run.err
    assert seconds < PROMPT_S, (seconds, run.err)
    line = run.last_line()
    assert line.startswith("ddpm: SIGTERM received during the final sample grids") and "--resume" in line, run.err
    assert [step for step, _ in list_checkpoints(run_dir)] == [2]      # the run is resumable at its last step
    assert not (run_dir / "samples.png").exists()


@pytest.mark.slow
def test_sigterm_during_the_evaluation_in_training_saves_the_step_and_stops(tmp_path):
    run_dir = tmp_path / "run"
    run = Running(["train", *TINY, "--steps", "3", "--timesteps", "100", "--eval-every", "1", "--eval-samples",
                   "20000", "--num-images", "4", "--out", run_dir])
    seconds = run.stop_during("evaluating at step 1")
    assert run.proc.returncode == 128 + signal.SIGTERM, run.err
    assert seconds < PROMPT_S, (seconds, run.err)
    line = run.last_line()
    assert line.startswith("ddpm: SIGTERM received during the evaluation at step 1") and "--resume" in line, run.err
    assert [step for step, _ in list_checkpoints(run_dir)] == [1]      # saved where training was


@pytest.mark.slow
def test_sigterm_during_ddpm_eval_stops_within_seconds(tmp_path):
    from ddpm.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", *map(str, TINY), "--steps", "1", "--timesteps", "1000", "--num-images", "4", "--quiet",
                 "--out", str(run_dir)]) == 0
    run = Running(["eval", "--checkpoint", run_dir, "--data", "digits", "--metric", "fast", "--num-images", "2000",
                   "--steps", "1000", "--device", "cpu", "--progress", "--out", tmp_path / "scores.json"])
    seconds = run.stop_during("sampling")
    assert run.proc.returncode == 128 + signal.SIGTERM, run.err
    assert seconds < PROMPT_S, (seconds, run.err)
    assert run.last_line() == "ddpm: SIGTERM received: stopped while sampling", run.err
    assert not (tmp_path / "scores.json").exists()
