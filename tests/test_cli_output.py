"""What the command line prints: a closed pipe ends it quietly, counts have their plurals, and progress
bars go to a terminal only (``--progress`` / ``--no-progress`` / ``--quiet``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("output") / "run"
    assert main(["train", "--steps", "1", "--batch-size", "4", "--timesteps", "25", "--num-images", "1",
                 "--quiet", "--out", str(out)]) == 0
    return out


def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Run ``ddpm ARGS`` with stdout a pipe whose reader has already gone, as in ``ddpm ... | head``
    after head has exited."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "ddpm", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("command", ["inspect", "dry-run"])
def test_a_closed_pipe_ends_quietly(run_dir, command):
    args = ["inspect", "--json", str(run_dir)] if command == "inspect" else ["train", "--dry-run", "--steps", "3"]
    proc = run_into_closed_pipe(*args)
    assert proc.stderr == "" and proc.returncode == 141, proc.stderr       # 128 + SIGPIPE, no traceback


def test_one_image_is_an_image(run_dir, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(run_dir), "--num-images", "1", "--steps", "1", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote 1 image (ddpm, 1 step) from"), out
    assert main(["sample", "--checkpoint", str(run_dir), "--num-images", "2", "--steps", "2", "--out", str(tmp_path / "t")]) == 0
    assert capsys.readouterr().out.startswith("wrote 2 images (ddpm, 2 steps) from")


@pytest.mark.parametrize("flags, bar", [([], False), (["--progress"], True), (["--no-progress"], False),
                                        (["--progress", "--quiet"], False)])
def test_progress_bars_only_on_a_terminal_unless_asked(run_dir, tmp_path, capsys, flags, bar):
    """Under pytest stderr is not a terminal, as in a log file: no bar unless --progress."""
    assert not sys.stderr.isatty()
    assert main(["sample", "--checkpoint", str(run_dir), "--num-images", "1", "--steps", "3", "--out", str(tmp_path / "s"),
                 *flags]) == 0
    assert ("sampling" in capsys.readouterr().err) == bar


def test_eval_progress_follows_the_same_rule(run_dir, capsys):
    for flags, bar in (([], False), (["--progress"], True)):
        assert main(["eval", "--metric", "bpd", "--checkpoint", str(run_dir), "--data", "digits", "--num-images", "2",
                     *flags]) == 0
        assert ("bits/dim" in capsys.readouterr().err) == bar
