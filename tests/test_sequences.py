"""Sequence models through the CLI: an .npz of float sequences [N, C, L] trains the 1D U-Net with the image
runs' machinery (exact resume included), ``ddpm sample`` writes float sequences, and what has no meaning for
sequences is refused in one line. Tiny sizes: 24 sequences of 2 x 16, dim 8, 32 timesteps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpm import generate as generate_module
from ddpm.build import build_model
from ddpm.cli import main
from ddpm.config import RunConfig
from ddpm.data import load_dataset
from ddpm.models.unet1d import Unet1D
from ddpm.pixels import to_model_range, uint8_to_unit

TINY = ["--dim", "8", "--batch-size", "8", "--timesteps", "32", "--device", "cpu", "--precision", "fp32",
        "--tracker", "none", "--num-images", "2", "--quiet"]


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def seqs(tmp_path_factory) -> Path:
    """24 two-channel sequences of length 16 in [-1, 1]: shifted sines and cosines."""
    rng = np.random.default_rng(0)
    t = np.linspace(0, 2 * np.pi, 16)
    x = np.stack([np.stack([np.sin(t + p), 0.5 * np.cos(2 * t + p)]) for p in rng.uniform(0, 6, 24)])
    path = tmp_path_factory.mktemp("seq") / "seqs.npz"
    np.savez(path, sequences=(0.9 * x).astype(np.float64))
    return path


@pytest.fixture(scope="module")
def straight(seqs, tmp_path_factory) -> Path:
    """Four steps in one go."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run("train", "--data", seqs, "--steps", 4, "--out", out, *TINY) == 0
    return out


def _weights(run_dir: Path) -> dict:
    return load_file(str(sorted((run_dir / "checkpoints").glob("step-*.safetensors"))[-1]))


def test_a_sequence_archive_trains_the_1d_unet_on_the_files_values(seqs, straight):
    config = RunConfig.from_dict(json.loads((straight / "config.json").read_text()))
    assert config.model.kind == "unet1d" and tuple(config.model.image_size) == (16,) and config.model.channels == 2
    assert isinstance(build_model(config), Unet1D)
    data = load_dataset(str(seqs))                          # what training reads: x0 = the file's values
    x0 = to_model_range(uint8_to_unit(torch.from_numpy(data.images[:3])))
    expected = torch.from_numpy(np.load(seqs)["sequences"][:3]).float()
    assert x0.shape == (3, 2, 16) and torch.allclose(x0, expected, atol=1e-6)
    assert any(k.startswith("ema.") for k in _weights(straight))


def test_a_resumed_sequence_run_is_bit_identical(seqs, straight, tmp_path):
    out = tmp_path / "run"
    assert run("train", "--data", seqs, "--steps", 2, "--out", out, *TINY) == 0
    assert run("train", "--resume", out, "--steps", 4, "--quiet") == 0
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model.", "ema.")))


def test_sample_writes_float_sequences_with_the_chosen_sampler(straight, tmp_path):
    out = tmp_path / "samples"
    assert run("sample", "--checkpoint", straight, "--num-images", 3, "--sampler", "ddim", "--steps", 4,
               "--out", out, "--device", "cpu", "--quiet") == 0
    with np.load(out / "samples.npz") as z:
        x = z["sequences"]
    assert x.shape == (3, 2, 16) and x.dtype == np.float32 and np.abs(x).max() <= 1.0
    assert json.loads((out / "record.json").read_text())["sampler"] == "ddim"
    assert (out / "grid.png").stat().st_size > 0


def test_sampled_sequences_are_not_quantised():
    u = torch.rand(2, 3, 8, generator=torch.Generator().manual_seed(0))       # the samplers' [0, 1] view
    x = generate_module._as_output(u)
    assert x.dtype == np.float32 and x.shape == (2, 3, 8)
    assert np.array_equal(x, (u * 2 - 1).numpy())                             # x0 itself, no 8-bit levels


@pytest.mark.parametrize("argv, words", [
    (["train", "--data", "{seqs}", "--hflip", "--steps", "2", "--out", "{tmp}/r"], "--hflip flips images"),
    (["train", "--data", "{seqs}", "--image-size", "8", "--steps", "2", "--out", "{tmp}/r"], "--image-size resizes"),
    (["train", "--data", "{seqs}", "--eval-every", "1", "--steps", "2", "--out", "{tmp}/r"], "--eval-every scores"),
    (["export", "--checkpoint", "{run}", "--out", "{tmp}/e"], "sequence model"),
    (["eval", "--checkpoint", "{run}", "--data", "{seqs}", "--metric", "fast"], "sequence model"),
    (["sample", "--checkpoint", "{run}", "--progressive", "--out", "{tmp}/s", "--quiet"], "--progressive draws images"),
    (["edit", "--checkpoint", "{run}", "--image", "{seqs}:0", "--strength", "0.5", "--out", "{tmp}/e"],
     "takes no input images"),
])
def test_what_has_no_meaning_for_sequences_is_one_line(argv, words, seqs, straight, tmp_path, capsys):
    argv = [a.format(seqs=seqs, run=straight, tmp=tmp_path) for a in argv]
    assert run(*argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error: ") and words in err[0], err
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_values_outside_the_data_range_are_refused(tmp_path, capsys):
    np.savez(tmp_path / "big.npz", sequences=np.full((4, 1, 8), 3.0, np.float32))
    assert run("train", "--data", tmp_path / "big.npz", "--steps", 2, "--out", tmp_path / "r", *TINY) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must lie in [-1, 1]" in err[0]


def test_fine_tuning_a_sequence_model_keeps_its_length(seqs, straight, tmp_path, capsys):
    tiny = ["--batch-size", "8", *TINY[6:]]             # the checkpoint's width and T kept
    assert run("train", "--init", straight, "--data", seqs, "--steps", 1, "--out", tmp_path / "ft", *tiny) == 0
    assert RunConfig.from_dict(json.loads((tmp_path / "ft" / "config.json").read_text())).model.kind == "unet1d"
    np.savez(tmp_path / "short.npz", sequences=np.zeros((8, 2, 8), np.float32))
    assert run("train", "--init", straight, "--data", tmp_path / "short.npz", "--steps", 1,
               "--out", tmp_path / "r", *tiny) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes 2x16" in err[0] and not (tmp_path / "r").exists()


def test_a_sequence_run_says_what_it_trains_on(seqs, tmp_path, capsys):
    assert run("train", "--data", seqs, "--steps", 1, "--out", tmp_path / "r", *TINY[:-1]) == 0
    assert "2x16" in capsys.readouterr().err                    # channels x length, where images say C x H x W
