"""``ddpm sample`` and ``ddpm interpolate`` end to end on a tiny trained run (T = 50), in process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddpm
from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.generate import interpolate, load_diffusion, progressive_frames, sampling_options
from ddpm.pixels import to_uint8
from ddpm.sample_job import load_image
from ddpm.viz import progressive_grid
from ddpm.samplers import DEFAULT_SAMPLING

CELL = 8 * 8 + 2                      # an 8x8 digit is shown 8x larger, with 2 pixels of padding (make_grid)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sample") / "run"
    assert main(["train", "--steps", "2", "--batch-size", "8", "--timesteps", "50", "--num-images", "2",
                 "--quiet", "--out", str(run)]) == 0
    return run


def sample(run_dir: Path, out: Path, *args: str) -> np.ndarray:
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(out), "--quiet", *args]) == 0
    with np.load(out / "samples.npz") as f:
        return f["images"]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr, return it."""
    try:
        code = main(argv)
    except SystemExit as exc:                  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], (code, err)
    return err[0]


def test_sample_writes_images_pngs_and_a_complete_record(run_dir, tmp_path):
    out = tmp_path / "s"
    images = sample(run_dir, out, "--num-images", "5", "--batch-size", "2", "--seed", "3", "--sampler", "ddim",
                    "--steps", "5", "--eta", "0.5", "--png")
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    record = json.loads((out / "record.json").read_text())
    checkpoint = Path(record["checkpoint"])
    assert checkpoint == (run_dir / "checkpoints" / "step-0000002.safetensors").resolve()
    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert {k: record[k] for k in ("step", "seed", "n", "start_index", "sampler", "steps", "eta", "spacing",
                                   "clip", "dynamic_thresholding", "variance", "weights", "timesteps")} == {
        "step": 2, "seed": 3, "n": 5, "start_index": 0, "sampler": "ddim", "steps": 5, "eta": 0.5,
        "spacing": "trailing", "clip": True, "dynamic_thresholding": False, "variance": None, "weights": "ema",
        "timesteps": 50}
    assert record["ddpm_version"] == ddpm.__version__
    pngs = sorted((out / "images").iterdir())
    assert [p.name for p in pngs] == [f"{k:06d}.png" for k in range(5)]
    for k, path in enumerate(pngs):
        np.testing.assert_array_equal(np.asarray(Image.open(path))[..., None], images[k])
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["indices"], np.arange(5))


def test_the_default_is_one_named_constant(run_dir, tmp_path):
    sample(run_dir, tmp_path / "d", "--num-images", "1")
    record = json.loads((tmp_path / "d" / "record.json").read_text())
    assert record["sampler"] == DEFAULT_SAMPLING.sampler == "ddpm"
    assert record["steps"] == 50 and record["variance"] == "posterior"          # the paper's: all T steps


@pytest.mark.parametrize("options", [[], ["--sampler", "ddpm", "--steps", "7", "--variance", "beta"],
                                     ["--sampler", "dpm-solver++", "--steps", "6", "--spacing", "linspace"]])
def test_start_index_regenerates_the_same_images(run_dir, tmp_path, options):
    whole = sample(run_dir, tmp_path / "all", "--num-images", "5", "--batch-size", "5", "--seed", "9", *options)
    tail = sample(run_dir, tmp_path / "tail", "--num-images", "2", "--batch-size", "1", "--seed", "9", "--start-index", "3",
                  *options)
    np.testing.assert_array_equal(tail, whole[3:])
    assert json.loads((tmp_path / "tail" / "record.json").read_text())["start_index"] == 3


def test_progressive_grid_has_x_t_and_x0_rows_for_each_image(run_dir, tmp_path):
    out = tmp_path / "p"
    sample(run_dir, out, "--num-images", "3", "--progressive", "--sampler", "ddim", "--steps", "12")
    from ddpm import viz

    image = np.asarray(Image.open(out / "progressive.png").convert("RGB"))      # the grid beside its labels
    grid_h, grid_w = 2 * 3 * CELL + 2, 10 * CELL + 2                             # 10 frames; x_t and x0 rows
    assert image.shape[:2] == (viz.HEADER_HEIGHT + grid_h + 10, viz.LABEL_WIDTH + grid_w + 20)
    diffusion, _ = load_diffusion(run_dir)
    _, x_t, x0 = progressive_frames(diffusion, 3, sampling=sampling_options("ddim", 12), progress=False)
    grid = image[viz.HEADER_HEIGHT:viz.HEADER_HEIGHT + grid_h, viz.LABEL_WIDTH:viz.LABEL_WIDTH + grid_w, 0]
    np.testing.assert_array_equal(grid, progressive_grid(x_t, x0)[..., 0])      # the library's frames, in its layout
    assert not np.array_equal(x_t[-1], x0[-1]) or not np.array_equal(x_t[0], x0[0])


def test_interpolate_writes_a_row_from_a_to_b(run_dir, tmp_path):
    out = tmp_path / "i"
    assert main(["interpolate", "--checkpoint", str(run_dir), "--image-a", "digits:0", "--image-b", "digits:1",
                 "--num-images", "5", "--t", "20", "--out", str(out)]) == 0
    row = np.asarray(Image.open(out / "interpolation.png"))
    assert row.shape == (CELL + 2, 7 * CELL + 2)
    digits = load_dataset("digits")
    a, b = (load_image(spec, (8, 8), 1) for spec in ("digits:0", "digits:1"))
    diffusion, _ = load_diffusion(run_dir)
    expected = interpolate(diffusion, a, b, t=20, n_interp=5)
    with np.load(out / "interpolation.npz") as f:
        np.testing.assert_array_equal(f["images"], expected)
    # The row is A, the five interpolants from A to B, then B (each 8x8 image shown 8x larger).
    tiles = [row[2:CELL, 2 + k * CELL:k * CELL + CELL][::8, ::8] for k in range(7)]
    np.testing.assert_array_equal(tiles[0], digits.images[0][..., 0])
    np.testing.assert_array_equal(tiles[-1], digits.images[1][..., 0])
    for k in range(5):
        np.testing.assert_array_equal(tiles[1 + k], expected[k][..., 0])
    record = json.loads((out / "record.json").read_text())
    assert record["t"] == 20 and record["image_a"] == "digits:0" and record["steps"] == 21


def test_interpolate_reads_image_files_of_any_size_and_mode(run_dir, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(tmp_path / name)
    out = tmp_path / "f"
    assert main(["interpolate", "--checkpoint", str(run_dir), "--image-a", str(tmp_path / "a.png"),
                 "--image-b", str(tmp_path / "b.png"), "--method", "slerp", "--sampler", "dpm-solver++",
                 "--steps", "5", "--out", str(out)]) == 0
    row = np.asarray(Image.open(out / "interpolation.png"))
    assert row.shape == (CELL + 2, 10 * CELL + 2)
    tiles = [row[2:CELL, 2 + k * CELL:k * CELL + CELL][::8, ::8] for k in range(10)]   # A, 8 interpolants, B
    for k, spec in ((0, "a.png"), (9, "b.png")):
        np.testing.assert_array_equal(tiles[k], to_uint8(load_image(str(tmp_path / spec), (8, 8), 1)[None])[0, ..., 0])
    with np.load(out / "interpolation.npz") as f:
        for k, image in enumerate(f["images"]):
            np.testing.assert_array_equal(tiles[1 + k], image[..., 0])


@pytest.mark.parametrize("argv,phrase", [
    (["--steps", "51"], "between 1 and T = 50"),
    (["--sampler", "dpm-solver++", "--eta", "0.5"], "eta only applies"),
    (["--sampler", "ddim", "--eta", "1.5"], "eta must be between 0 and 1"),
    (["--sampler", "ddim", "--variance", "beta"], "only applies to the ddpm sampler"),
    (["--clip", "--dynamic-threshold"], "exclude each other"),
    (["--sampler", "eulr"], "invalid choice"),
    (["--start-index", "-1"], "--start-index"),
])
def test_nonsense_sample_options_are_one_line_errors(run_dir, tmp_path, capsys, argv, phrase):
    line = one_line_error(capsys, ["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "x"), "--quiet",
                                   *argv])
    assert phrase in line
    assert not (tmp_path / "x" / "samples.npz").exists()


@pytest.mark.parametrize("argv,phrase", [
    (["--t", "50"], "0..49"),
    (["--image-a", "digits:5000"], "indices 0..1499"),
    (["--spacing", "leading", "--steps", "4"], "does not start at t"),
    (["--t", "3", "--steps", "9"], "more than the t + 1 = 4 steps"),
])
def test_nonsense_interpolate_options_are_one_line_errors(run_dir, tmp_path, capsys, argv, phrase):
    base = ["interpolate", "--checkpoint", str(run_dir), "--image-a", "digits:0", "--image-b", "digits:1",
            "--out", str(tmp_path / "x")]
    assert phrase in one_line_error(capsys, base + argv)


def test_sample_refuses_to_overwrite_a_record(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "record.json").write_text("{}")
    assert "record.json" in one_line_error(capsys, ["sample", "--checkpoint", str(run_dir), "--out", str(out)])
    assert (out / "record.json").read_text() == "{}"


def test_help_shows_examples(capsys):
    for command in ("sample", "interpolate"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0 and "examples:" in capsys.readouterr().out
