"""The command line on every kind of data: MNIST-style IDX roots, image folders, .npz archives,
non-square images, and one-line errors for bad data that leave nothing on disk behind."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_ROOT = SHARED_DATA / "mnist"
FASHION_ROOT = SHARED_DATA / "fashion-mnist"

# Two optimizer steps of four images, T = 50, a grid of two samples.
TINY = ["--steps", "2", "--batch-size", "4", "--timesteps", "50", "--num-images", "2", "--quiet"]


def cli_error(capsys, *args: str) -> tuple[int, str]:
    """Run ``ddpm ARGS`` in-process and return (exit code, the one stderr line) of a failure."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:      # argparse usage errors exit directly
        code = exc.code
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "error:" in lines[0], lines[0]
    return code, lines[0]


def read_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def sample_images(run_dir: Path, out: Path, n: int = 3) -> np.ndarray:
    assert main(["sample", "--checkpoint", str(run_dir), "--num-images", str(n), "--out", str(out), "--quiet"]) == 0
    with np.load(out / "samples.npz") as f:
        return f["images"]


def write_idx(path: Path, magic: int, array: np.ndarray, drop_bytes: int = 0) -> None:
    """An IDX file (big-endian magic and dims, then the bytes), optionally cut short."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(data[:len(data) - drop_bytes])


def write_pngs(folder: Path, count: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(10, 12), (16, 16), (9, 20), (24, 14)]
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"img{i:02d}.png")


# ----------------------------------------------------------------------------- MNIST-style data roots

@pytest.mark.skipif(not MNIST_ROOT.is_dir(), reason="shared MNIST files not present")
def test_train_on_mnist(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--data", "mnist", "--data-root", str(MNIST_ROOT), *TINY, "--out", str(run_dir)]) == 0
    config = read_config(run_dir)
    assert config["preset"] == "mnist"
    assert config["model"]["image_size"] == [28, 28] and config["model"]["channels"] == 1
    assert config["data"]["name"] == "mnist" and config["data"]["root"] == str(MNIST_ROOT)
    assert (run_dir / "checkpoints" / "step-0000002.safetensors").is_file()
    assert Image.open(run_dir / "samples.png").mode == "L"


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="shared Fashion-MNIST files not present")
def test_fashion_mnist_dry_run(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--data", "fashion-mnist", "--data-root", str(FASHION_ROOT), "--split", "test",
                 "--dry-run", "--out", str(out)]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["preset"] == "mnist" and config["model"]["image_size"] == [28, 28]
    assert config["data"]["name"] == "fashion-mnist" and config["data"]["split"] == "test"
    assert not out.exists()


def test_truncated_idx_file_is_a_data_error(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    images = np.zeros((10, 28, 28), np.uint8)
    write_idx(root / "train-images-idx3-ubyte", 0x803, images, drop_bytes=100)
    write_idx(root / "train-labels-idx1-ubyte", 0x801, np.zeros(10, np.uint8))
    out = tmp_path / "run"
    code, line = cli_error(capsys, "train", "--data", "mnist", "--data-root", str(root), *TINY, "--out", str(out))
    assert code == 3
    assert "train-images-idx3-ubyte" in line and "truncated" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- folders and archives

def test_folder_of_colour_pngs_trains_and_samples_in_colour(tmp_path):
    folder = tmp_path / "photos"
    write_pngs(folder, 12)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--preset", "digits", "--image-size", "8", "--channels", "3",
                 *TINY, "--out", str(run_dir)]) == 0
    config = read_config(run_dir)
    assert config["model"]["channels"] == 3 and config["data"]["channels"] == 3
    assert config["model"]["image_size"] == [8, 8] and config["data"]["image_size"] == [8, 8]
    images = sample_images(run_dir, tmp_path / "samples")
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert Image.open(tmp_path / "samples" / "grid.png").mode == "RGB"


def test_non_square_npz_trains_and_samples(tmp_path):
    npz = tmp_path / "wide.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (12, 8, 16), dtype=np.uint8))
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(npz), "--preset", "digits", "--image-size", "8", "16",
                 *TINY, "--out", str(run_dir)]) == 0
    config = read_config(run_dir)
    assert config["model"]["image_size"] == [8, 16] and config["data"]["image_size"] == [8, 16]
    images = sample_images(run_dir, tmp_path / "samples", n=2)
    assert images.shape == (2, 8, 16, 1)


# ----------------------------------------------------------------------------- bad data

def test_corrupt_png_is_a_data_error_naming_the_file(tmp_path, capsys):
    folder = tmp_path / "photos"
    write_pngs(folder, 4)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    out = tmp_path / "run"
    code, line = cli_error(capsys, "train", "--data", str(folder), "--preset", "digits", "--image-size", "8",
                           "--strict", *TINY, "--out", str(out))
    assert code == 3 and "broken.png" in line
    assert not out.exists()


def test_corrupt_png_is_skipped_with_a_warning_by_default(tmp_path, capsys):
    folder = tmp_path / "photos"
    write_pngs(folder, 8)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    out = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--preset", "digits", "--image-size", "8", "--channels", "3",
                 *TINY, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped 1 unreadable image" in err and "broken.png" in err
    assert (out / "checkpoints").is_dir()


def test_corrupt_png_as_a_user_sees_it(tmp_path):
    """The same failure in a real process: exit code 3, one line on stderr, no traceback."""
    folder = tmp_path / "photos"
    write_pngs(folder, 2)
    (folder / "broken.png").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "ddpm", "train", "--data", str(folder), "--preset", "digits",
                           "--strict", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error:") and "broken.png" in lines[0], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "run").exists()


def test_empty_folder_is_a_data_error(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    code, line = cli_error(capsys, "train", "--data", str(folder), "--preset", "digits", *TINY,
                           "--out", str(tmp_path / "run"))
    assert code == 3 and "no image files" in line
    assert not (tmp_path / "run").exists()


def test_npz_without_images_is_a_data_error(tmp_path, capsys):
    npz = tmp_path / "pixels.npz"
    np.savez(npz, pixels=np.zeros((4, 8, 8), np.uint8))
    code, line = cli_error(capsys, "train", "--data", str(npz), "--preset", "digits", *TINY,
                           "--out", str(tmp_path / "run"))
    assert code == 3 and "'images'" in line and "pixels" in line
    assert not (tmp_path / "run").exists()


def test_fewer_images_than_a_batch_is_a_data_error(tmp_path, capsys):
    npz = tmp_path / "few.npz"
    np.savez(npz, images=np.zeros((3, 8, 8), np.uint8))
    code, line = cli_error(capsys, "train", "--data", str(npz), "--preset", "digits", *TINY,
                           "--out", str(tmp_path / "run"))
    assert code == 3 and "batch size" in line
    assert not (tmp_path / "run").exists()


def test_unknown_split_is_a_usage_error(capsys):
    code, line = cli_error(capsys, "train", "--split", "val", "--dry-run")
    assert code == 2 and "--split" in line and "val" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_device_is_a_config_error(tmp_path, capsys):
    code, line = cli_error(capsys, "train", "--device", "cuda:7", "--dry-run", "--out", str(tmp_path / "run"))
    assert code == 2 and "cuda:7" in line
    assert not (tmp_path / "run").exists()


def test_malformed_device_is_a_config_error(tmp_path, capsys):
    code, line = cli_error(capsys, "train", "--device", "cuda:abc", "--dry-run")
    assert code == 2 and "cuda:abc" in line
    code, line = cli_error(capsys, "train", "--device", "tpu", "--dry-run")
    assert code == 2 and "tpu" in line


def test_failed_run_leaves_an_existing_directory_as_it_was(tmp_path, capsys):
    npz = tmp_path / "pixels.npz"
    np.savez(npz, pixels=np.zeros((4, 8, 8), np.uint8))
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "precious.txt").write_text("keep me")
    for out in (empty, full):
        code, _ = cli_error(capsys, "train", "--data", str(npz), "--preset", "digits", *TINY, "--out", str(out))
        assert code == 3
    assert list(empty.iterdir()) == []
    assert [p.name for p in full.iterdir()] == ["precious.txt"]
    assert (full / "precious.txt").read_text() == "keep me"
