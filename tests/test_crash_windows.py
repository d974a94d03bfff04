"""Every moment of a crash is recoverable: before the first checkpoint, after the final one, and
never two processes in one run directory.

The kills are real (SIGKILL of a ``python -m ddpm train`` subprocess); recovery runs in-process
through ``ddpm.cli.main`` and must reproduce an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import list_checkpoints, load_checkpoint
from ddpm.cli import main
from ddpm.fileio import LOCK_FILE, RunLock

STEPS = 60
RUN = ["--steps", str(STEPS), "--batch-size", "4", "--timesteps", "30", "--num-images", "2", "--log-every", "1",
       "--checkpoint-every", "0", "--quiet"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> list[str]:
    path = tmp_path_factory.mktemp("cfg") / "small.toml"
    path.write_text("[model]\ndim = 8\n")
    return [*RUN, "--config", str(path)]


def _main(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert _main(["train", *small, "--out", run_dir]) == (0, "")
    return load_checkpoint(run_dir)[0]


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ddpm", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _training_started(run_dir: Path):
    metrics = run_dir / "metrics.jsonl"
    return lambda: metrics.exists() and metrics.read_text().strip() != ""


@pytest.mark.parametrize("recover", ["resume", "same-command"])
def test_kill_9_before_the_first_checkpoint_leaves_a_run_that_resumes_or_restarts(tmp_path, small, reference,
                                                                                 recover):
    run_dir = tmp_path / "run"
    for _ in range(2):                             # killed twice in the window, then recovered
        proc = _start(["train", *small, "--out", run_dir] if not run_dir.exists() or recover == "same-command"
                      else ["train", "--resume", run_dir, "--quiet"])
        _wait_for(_training_started(run_dir), proc)
        proc.kill()
        proc.wait()
        assert not list_checkpoints(run_dir), "the kill came too late to test the window"
    argv = ["train", "--resume", run_dir, "--quiet"] if recover == "resume" else ["train", *small, "--out", run_dir]
    code, err = _main(argv)
    assert code == 0, err
    assert _same(load_checkpoint(run_dir)[0], reference)
    assert (run_dir / "samples.png").is_file() and not (run_dir / LOCK_FILE).exists()


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")
def test_sigterm_during_set_up_is_handled(tmp_path, small, reference):
    """A SIGTERM as soon as the run directory exists (before any step) still ends in a checkpoint and 143."""
    run_dir = tmp_path / "run"
    proc = _start(["train", *small, "--out", run_dir])
    _wait_for(run_dir.exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err
    code, err = _main(["train", "--resume", run_dir, "--quiet"])
    assert code == 0, err
    assert _same(load_checkpoint(run_dir)[0], reference)


def test_a_run_killed_after_its_final_checkpoint_is_completed_by_resume(tmp_path, small, reference):
    run_dir = tmp_path / "run"
    assert _main(["train", *small, "--out", run_dir])[0] == 0
    (run_dir / "samples.png").unlink()             # as if killed between the final checkpoint and samples.png
    final = sorted((run_dir / "samples").iterdir())[-1]
    final.unlink()
    before = (run_dir / "metrics.jsonl").read_text()
    code, err = _main(["train", "--resume", run_dir, "--quiet"])
    assert code == 0, err
    assert (run_dir / "samples.png").is_file() and final.is_file()
    assert [s for s, _ in list_checkpoints(run_dir)] == [STEPS]
    assert (run_dir / "metrics.jsonl").read_text() == before
    code, err = _main(["train", "--resume", run_dir, "--quiet"])          # now complete: refused, one line
    assert code == 2 and "already at step" in err and len(err.strip().splitlines()) == 1


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, small, reference):
    run_dir = tmp_path / "run"
    assert _main(["train", *small, "--steps", "40", "--checkpoint-every", "20", "--keep-last", "0",
                  "--out", run_dir])[0] == 0
    newest = list_checkpoints(run_dir)[-1][1]
    newest.write_bytes(newest.read_bytes()[:-50])                           # truncated
    code, err = _main(["train", "--resume", run_dir, "--steps", str(STEPS), "--quiet"])
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: warning: skipped") and str(newest) in lines[0]
    assert _same(load_checkpoint(run_dir)[0], reference)


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(tmp_path, small):
    run_dir = tmp_path / "run"
    assert _main(["train", *small, "--steps", "2", "--out", run_dir])[0] == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with RunLock(run_dir):
        code, err = _main(["train", "--resume", run_dir, "--steps", "4", "--quiet"])
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        with RunLock(fresh):
            code2, err2 = _main(["train", *small, "--out", fresh])
    for c, e in ((code, err), (code2, err2)):
        assert c == 2 and len(e.strip().splitlines()) == 1, e
        assert f"in use by another ddpm process (PID {os.getpid()} on host" in e
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    assert after == {p: b for p, b in before.items()}


def test_claimed_holds_the_run_lock_for_its_block_only_even_when_the_block_fails(tmp_path):
    """run_dir.claimed (what ddpm train trains inside): a new --out and a resumed directory are locked
    while the block runs and free again after it, also after an error in the block."""
    from ddpm.errors import RunLocked
    from ddpm.run_dir import claimed

    for out, resume_dir in ((tmp_path / "new", None), (None, tmp_path / "new")):
        with pytest.raises(RuntimeError, match="in the block"):
            with claimed(out, resume_dir) as run_dir:
                assert run_dir == tmp_path / "new" and run_dir.is_dir()
                with pytest.raises(RunLocked):
                    RunLock(run_dir).acquire()
                raise RuntimeError("in the block")
        RunLock(run_dir).acquire().release()


def test_out_accepts_only_what_a_run_writes_before_its_first_checkpoint(tmp_path):
    from ddpm.errors import ConfigError
    from ddpm.run_dir import prepare_run_dir

    run_dir = tmp_path / "run"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    for name in ("config.json", "provenance.json", "metrics.jsonl", "loss.png", LOCK_FILE, "samples/step-0000002.png"):
        (run_dir / name).write_text("x")
    assert prepare_run_dir(run_dir) == run_dir
    (run_dir / "checkpoints" / "step-0000004.safetensors").write_text("x")
    with pytest.raises(ConfigError, match="not empty \\(checkpoints\\)"):
        prepare_run_dir(run_dir)
    (run_dir / "checkpoints" / "step-0000004.safetensors").unlink()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty \\(notes.txt\\)"):
        prepare_run_dir(run_dir)
