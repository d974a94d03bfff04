"""The command line end to end: train -> checkpoint -> sample -> inspect, and clear errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main
from ddpm.generate import generate, load_diffusion

# A tiny but complete run: the digits data, the digits preset, T = 50.
TINY = ["--steps", "4", "--batch-size", "8", "--timesteps", "50", "--num-images", "4",
        "--checkpoint-every", "2", "--log-every", "2", "--quiet"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m ddpm ARGS`` in a subprocess, as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("train", *TINY, "--out", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    return run_dir


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error:" in lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


# ----------------------------------------------------------------------------- happy path

def test_train_writes_a_complete_run_directory(trained_run):
    board = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []      # the event files, when installed
    assert sorted(p.name for p in trained_run.iterdir()) == sorted([
        "checkpoints", "config.json", "loss.png", "metrics.jsonl", "provenance.json", "samples", "samples.png", *board])
    assert [p.name for p in sorted((trained_run / "checkpoints").iterdir())] == [
        "step-0000002.safetensors", "step-0000004.safetensors"]
    assert (trained_run / "samples" / "step-0000004.png").is_file()
    config = json.loads((trained_run / "config.json").read_text())
    assert config["preset"] == "digits" and config["diffusion"]["timesteps"] == 50
    assert config["model"]["image_size"] == [8, 8] and config["train"]["steps"] == 4
    lines = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4]
    assert all(np.isfinite(m["loss"]) and m["images_per_s"] > 0 for m in lines)
    grid = Image.open(trained_run / "samples.png")
    assert grid.size[0] > 8 and grid.mode == "L"


def test_sample_from_run_directory_writes_grid_and_npz(trained_run, tmp_path):
    out = tmp_path / "samples"
    proc = run_cli("sample", "--checkpoint", str(trained_run), "--num-images", "5", "--batch-size", "3",
                   "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    with np.load(out / "samples.npz") as f:
        images = f["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
    assert Image.open(out / "grid.png").mode == "L"
    # The checkpoint round trip reproduces the same samples from Python.
    diffusion, meta = load_diffusion(trained_run)
    assert meta["step"] == 4
    again = generate(diffusion, 5, batch_size=3, seed=0, progress=False)
    np.testing.assert_array_equal(again, images)


def test_sample_seed_changes_images(trained_run, tmp_path):
    assert main(["sample", "--checkpoint", str(trained_run), "--num-images", "4", "--seed", "1",
                 "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["sample", "--checkpoint", str(trained_run), "--num-images", "4", "--seed", "2",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["images"] for d in "ab")
    assert not np.array_equal(a, b)


def test_inspect_prints_step_config_and_tensors(trained_run, capsys):
    assert main(["inspect", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "step-0000004.safetensors" in out and "step:       4" in out
    assert "model.*" in out and "ema.*" in out and "optim.*" in out
    assert '"preset": "digits"' in out
    assert main(["inspect", str(trained_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4


def test_dry_run_prints_config_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--dry-run", "--steps", "7", "--lr", "3e-4", "--out", str(out)]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["train"]["steps"] == 7 and config["train"]["lr"] == 3e-4
    assert config["model"]["dim"] > 0 and not out.exists()


def test_help_shows_examples():
    for args in (["--help"], ["train", "--help"], ["sample", "--help"], ["inspect", "--help"], ["eval", "--help"],
                 ["interpolate", "--help"]):
        proc = run_cli(*args)
        assert proc.returncode == 0 and "examples:" in proc.stdout, args


def test_help_imports_no_torch():
    """``--help`` of every command answers without torch (or numpy): the parser's modules are light, and a
    command's own modules load only when it runs."""
    commands = [[], *([name] for name in ("train", "sample", "interpolate", "inspect", "eval", "viz", "export",
                                           "import", "distill", "inpaint", "edit", "invert", "prepare", "ema"))]
    code = ("import sys\nfrom ddpm.cli import main\n"
            f"for argv in {commands!r}:\n"
            "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
            "print('loaded:', sorted(name for name in ('torch', 'numpy') if name in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "loaded: []", proc.stdout[-300:] + proc.stderr


def test_npz_dataset_trains_with_explicit_preset(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "data.npz"
    np.savez(npz, images=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8))
    assert main(["train", "--data", str(npz), "--preset", "digits", *TINY, "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-0000004.safetensors").is_file()


# ----------------------------------------------------------------------------- bad input

def test_unknown_preset_is_a_usage_error():
    assert_one_line_error(run_cli("train", "--preset", "nonsense"), 2, "nonsense")


def test_nonsense_option_value_is_a_usage_error():
    assert_one_line_error(run_cli("train", "--steps", "-5"), 2, "--steps")


def test_missing_data_path_is_a_data_error(tmp_path):
    assert_one_line_error(run_cli("train", "--data", str(tmp_path / "missing"), "--preset", "digits"), 3, "missing")


def test_mnist_without_data_root_is_a_data_error():
    assert_one_line_error(run_cli("train", "--data", "mnist"), 3, "--data-root")


def test_own_data_without_preset_gets_a_chosen_preset(tmp_path):
    npz = tmp_path / "d.npz"
    np.savez(npz, images=np.zeros((4, 8, 8), np.uint8))
    proc = run_cli("train", "--data", str(npz), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "no --preset given" in proc.stderr and json.loads(proc.stdout)["preset"] == "digits"


def test_model_that_does_not_fit_the_data_is_a_config_error():
    # 8x8 digits resized to 9x9: the digits preset's two levels need sides that halve evenly.
    assert_one_line_error(run_cli("train", "--image-size", "9", "--dry-run"), 2, "divisible by 2")


def test_file_that_is_not_a_checkpoint_is_a_checkpoint_error(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"definitely not safetensors")
    assert_one_line_error(run_cli("sample", "--checkpoint", str(bogus), "--out", str(tmp_path / "o")), 4,
                          "not a ddpm checkpoint")
    assert_one_line_error(run_cli("inspect", str(bogus)), 4, "not a ddpm checkpoint")


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    assert_one_line_error(run_cli("inspect", str(tmp_path / "none.safetensors")), 4, "no such checkpoint")


def test_existing_run_directory_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")
    assert main(["train", *TINY, "--out", str(run_dir)]) == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["precious.txt"]
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_sample_does_not_overwrite_previous_samples(trained_run, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "grid.png").write_bytes(b"old grid")
    assert main(["sample", "--checkpoint", str(trained_run), "--num-images", "2", "--out", str(out), "--quiet"]) == 2
    assert (out / "grid.png").read_bytes() == b"old grid"
    assert main(["sample", "--checkpoint", str(trained_run), "--num-images", "2", "--out", str(out), "--quiet",
                 "--overwrite"]) == 0
    assert (out / "grid.png").read_bytes() != b"old grid"


def test_weights_from_another_architecture_are_refused(trained_run, tmp_path):
    """A checkpoint whose tensors do not fit its saved configuration is refused, not half-loaded."""
    from ddpm.checkpoint import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(trained_run)
    meta["config"]["model"]["dim"] *= 2                  # the saved weights are half as wide
    meta.pop("path"), meta.pop("format_version")
    bad = tmp_path / "mismatch.safetensors"
    save_checkpoint(bad, tensors, meta)
    assert_one_line_error(run_cli("sample", "--checkpoint", str(bad), "--out", str(tmp_path / "o")), 4,
                          "do not match")


def test_no_command_prints_help_and_fails():
    proc = run_cli()
    assert proc.returncode == 2 and "train" in proc.stdout
