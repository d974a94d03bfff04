"""``ddpm inpaint``, ``edit``, ``invert``, ``sample --latents``, ``interpolate --invert`` and ``--class``
end to end on tiny digits models (8x8, T = 50, two training steps), in process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import viz
from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.errors import ConfigError
from ddpm.sample_job import class_indices

TRAIN = ["train", "--steps", "2", "--batch-size", "8", "--timesteps", "50", "--num-images", "2", "--quiet"]
FAST = ["--sampler", "ddpm", "--steps", "6"]                 # a short ancestral run, for speed
REPAINT_FAST = [*FAST, "--jump-length", "2", "--resample", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("editing") / "run"
    assert main([*TRAIN, "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("editing") / "cond"
    assert main([*TRAIN, "--conditional", "--out", str(run)]) == 0
    return run


def digits(*indices: int) -> np.ndarray:
    """The 8x8 digits the CLI reads for ``digits:K``, uint8 [N, 8, 8, 1]."""
    return load_dataset("digits").images[list(indices)]


def results(out: Path) -> dict:
    with np.load(out / "results.npz") as f:
        return {k: f[k] for k in f.files}


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI, expect exit ``code`` and exactly one ``error:`` line on stderr, return it."""
    try:
        got = main(argv)
    except SystemExit as exc:                  # argparse's own usage errors
        got = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code and len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], (got, err)
    return err[0]


# ----------------------------------------------------------------------------- inpaint

@pytest.mark.parametrize("method", [REPAINT_FAST,
                                    ["--sampler", "ddim", "--steps", "5"], ["--sampler", "dpm-solver++", "--steps", "4"]])
def test_inpaint_writes_results_and_keeps_the_known_pixels_exactly(run_dir, tmp_path, method):
    out = tmp_path / "in"
    assert main(["inpaint", "--checkpoint", str(run_dir), "--image", "digits:0", "digits:5", "--mask", "lower-half",
                 "--num-images", "2", "--out", str(out), *method]) == 0
    r = results(out)
    assert r["images"].shape == (4, 8, 8, 1) and r["images"].dtype == np.uint8
    np.testing.assert_array_equal(r["inputs"], digits(0, 5))
    keep = r["mask"]
    assert keep.tolist() == [[True] * 8] * 4 + [[False] * 8] * 4
    for k, image in enumerate(r["images"]):
        np.testing.assert_array_equal(image[keep], digits(0, 5)[r["image_index"][k]][keep])
    assert not np.array_equal(r["images"][0], r["images"][1])             # two results of one image, two seeds
    record = json.loads((out / "record.json").read_text())
    assert record["method"] == ("repaint" if method is REPAINT_FAST else "replacement")
    assert record["unknown_pixels"] == 32 and record["n"] == 2
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[:2] == (2 + 4 * 66, 2 + 2 * 66)                       # rows: inputs, masked, 2 results
    assert r["image_index"].tolist() == [0, 0, 1, 1]
    masked = np.where(keep[None, :, :, None], digits(0, 5), 128)
    for c in range(2):                                                      # a column per input image
        cells = [grid[2 + row * 66:66 + row * 66:8, 2 + c * 66:66 + c * 66:8] for row in range(4)]
        np.testing.assert_array_equal(cells[0], digits(0, 5)[c, ..., 0])
        np.testing.assert_array_equal(cells[1], masked[c, ..., 0])
        for j in range(2):
            np.testing.assert_array_equal(cells[2 + j], r["images"][2 * c + j, ..., 0])


def test_resampling_reaches_repaint(run_dir, tmp_path):
    outs = []
    for resample in ("1", "3"):
        out = tmp_path / f"r{resample}"
        assert main(["inpaint", "--checkpoint", str(run_dir), "--image", "digits:2", "--mask", "center",
                     "--jump-length", "2", "--resample", resample, "--out", str(out), *FAST]) == 0
        outs.append(results(out)["images"])
        assert json.loads((out / "record.json").read_text())["resample"] == int(resample)
    assert not np.array_equal(*outs)


def test_png_masks_any_size_of_the_aspect_ratio(run_dir, tmp_path):
    mask = np.full((32, 32), 255, np.uint8)
    mask[:, :16] = 0                                                       # fill the left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "png"
    assert main(["inpaint", "--checkpoint", str(run_dir), "--image", "digits:1", "--mask", str(tmp_path / "mask.png"),
                 "--out", str(out), "--sampler", "ddim", "--steps", "3"]) == 0
    assert results(out)["mask"].tolist() == [[False] * 4 + [True] * 4] * 8


def test_inpaint_errors_are_one_line_and_write_nothing(run_dir, tmp_path, capsys):
    base = ["inpaint", "--checkpoint", str(run_dir), "--image", "digits:0", "--out", str(tmp_path / "e"), *REPAINT_FAST]
    Image.fromarray(np.zeros((32, 24), np.uint8)).save(tmp_path / "tall.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    assert "aspect ratio" in one_line_error(capsys, [*base, "--mask", str(tmp_path / "tall.png")], code=3)
    assert "greyscale" in one_line_error(capsys, [*base, "--mask", str(tmp_path / "rgb.png")], code=3)
    assert "cannot read mask" in one_line_error(capsys, [*base, "--mask", str(tmp_path / "broken.png")], code=3)
    assert "unknown mask" in one_line_error(capsys, [*base, "--mask", "upper-half"])
    assert "fraction" in one_line_error(capsys, [*base, "--mask", "random:1.5"])
    bad_image = ["inpaint", "--checkpoint", str(run_dir), "--image", str(tmp_path / "broken.png"), "--mask", "center",
                 "--out", str(tmp_path / "e")]
    assert "cannot read image" in one_line_error(capsys, bad_image, code=3)
    assert "unconditional" in one_line_error(capsys, [*base, "--mask", "center", "--class", "3"])
    assert "ancestral" in one_line_error(capsys, [*base[:-8], "--mask", "center", "--sampler", "ddim", "--resample", "3"])
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


# ----------------------------------------------------------------------------- edit

def test_edit_at_strength_zero_returns_the_input_and_at_one_is_sampling(run_dir, tmp_path):
    assert main(["edit", "--checkpoint", str(run_dir), "--image", "digits:3", "digits:4", "--strength", "0",
                 "--out", str(tmp_path / "s0")]) == 0
    np.testing.assert_array_equal(results(tmp_path / "s0")["images"], digits(3, 4))
    assert json.loads((tmp_path / "s0" / "record.json").read_text())["t0"] is None
    # S = 1 starts from sqrt(abar) x0 + sqrt(1 - abar) eps at t0 = T - 1 where sampling starts from eps,
    # with the same later noise: the two differ only through sqrt(abar_{T-1}) x0 = 0.0028 x0 (T = 50).
    for sampler in (["--sampler", "ddpm", "--steps", "10"], ["--sampler", "ddim", "--steps", "10"]):
        assert main(["edit", "--checkpoint", str(run_dir), "--image", "digits:3", "digits:4", "--strength", "1",
                     "--seed", "5", "--out", str(tmp_path / "s1"), "--overwrite", *sampler]) == 0
        assert main(["sample", "--checkpoint", str(run_dir), "--num-images", "2", "--seed", "5", "--quiet", "--overwrite",
                     "--out", str(tmp_path / "u"), *sampler]) == 0
        edited = results(tmp_path / "s1")["images"].astype(float) / 255
        with np.load(tmp_path / "u" / "samples.npz") as f:
            sampled = f["images"].astype(float) / 255
        assert np.abs(edited - sampled).mean() < 0.05, sampler
    assert json.loads((tmp_path / "s1" / "record.json").read_text())["t0"] == 49


def test_edit_errors(run_dir, tmp_path, capsys):
    base = ["edit", "--checkpoint", str(run_dir), "--image", "digits:3", "--out", str(tmp_path / "e")]
    assert "strength" in one_line_error(capsys, [*base, "--strength", "1.5"])
    assert "strength" in one_line_error(capsys, [*base, "--strength", "-0.1"])
    assert "unconditional" in one_line_error(capsys, [*base, "--strength", "0.5", "--class", "1"])
    assert "more than the t0 + 1" in one_line_error(capsys, [*base, "--strength", "0.1", "--sampler", "ddim",
                                                              "--steps", "20"])
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


# ----------------------------------------------------------------------------- invert, sample --latents, interpolate --invert

def test_invert_then_sample_from_the_latents_gives_the_reconstruction(run_dir, tmp_path):
    inv = tmp_path / "inv"
    assert main(["invert", "--checkpoint", str(run_dir), "--image", "digits:0", "digits:1", "--steps", "10",
                 "--out", str(inv)]) == 0
    with np.load(inv / "latents.npz") as f:
        latents = f["latents"]
        assert latents.shape == (2, 1, 8, 8) and int(f["steps"]) == 10 and str(f["spacing"]) == "trailing"
    record = json.loads((inv / "record.json").read_text())
    recon = results(inv)["images"]
    error = np.abs(recon.astype(int) - digits(0, 1).astype(int)).mean() / 255
    assert record["mean_abs_error"] == pytest.approx(error) and record["sampler"] == "ddim"
    assert main(["sample", "--checkpoint", str(run_dir), "--latents", str(inv / "latents.npz"), "--quiet",
                 "--out", str(tmp_path / "back")]) == 0                  # DDIM over the file's 10 steps
    with np.load(tmp_path / "back" / "samples.npz") as f:
        np.testing.assert_array_equal(f["images"], recon)
    sample_record = json.loads((tmp_path / "back" / "record.json").read_text())
    assert (sample_record["sampler"], sample_record["steps"], sample_record["n"]) == ("ddim", 10, 2)
    # --start-index picks latent k for image k; a stochastic sampler starts from it too
    assert main(["sample", "--checkpoint", str(run_dir), "--latents", str(inv / "latents.npz"), "--start-index", "1",
                 "--quiet", "--out", str(tmp_path / "one")]) == 0
    with np.load(tmp_path / "one" / "samples.npz") as f:
        np.testing.assert_array_equal(f["images"], recon[1:])


def test_interpolate_invert_ends_are_the_ddim_reconstructions(run_dir, tmp_path):
    inv = tmp_path / "inv"
    assert main(["invert", "--checkpoint", str(run_dir), "--image", "digits:0", "digits:1", "--steps", "10",
                 "--out", str(inv)]) == 0
    recon = results(inv)["images"].astype(int)
    runs = []
    for seed in ("0", "1"):
        out = tmp_path / f"i{seed}"
        assert main(["interpolate", "--checkpoint", str(run_dir), "--image-a", "digits:0", "--image-b", "digits:1",
                     "--invert", "--t", "49", "--sampler", "ddim", "--steps", "10", "--no-clip", "--num-images", "4",
                     "--seed", seed,
                     "--out", str(out)]) == 0
        with np.load(out / "interpolation.npz") as f:
            runs.append(f["images"].astype(int))
    assert np.abs(runs[0][[0, -1]] - recon).max() <= 1                     # batch size may move a level
    np.testing.assert_array_equal(runs[0], runs[1])                         # deterministic: no noise is drawn
    assert json.loads((tmp_path / "i0" / "record.json").read_text())["invert"] is True


def test_latents_errors(run_dir, tmp_path, capsys):
    np.savez(tmp_path / "wrong.npz", latents=np.zeros((2, 3, 8, 8), np.float32))
    np.savez(tmp_path / "two.npz", latents=np.zeros((2, 1, 8, 8), np.float32))
    base = ["sample", "--checkpoint", str(run_dir), "--quiet", "--out", str(tmp_path / "e")]
    assert "needs [N, 1, 8, 8]" in one_line_error(capsys, [*base, "--latents", str(tmp_path / "wrong.npz")], code=3)
    assert "holds 2 latents" in one_line_error(capsys, [*base, "--latents", str(tmp_path / "two.npz"), "--num-images", "3"])
    assert "no such latents" in one_line_error(capsys, [*base, "--latents", str(tmp_path / "none.npz")], code=3)


# ----------------------------------------------------------------------------- classes

def test_class_reaches_the_model_in_inpaint_edit_interpolate_and_viz(conditional_run, tmp_path):
    cond = ["--checkpoint", str(conditional_run)]
    outs = []
    for label in ("1", "7"):
        out = tmp_path / f"c{label}"
        assert main(["inpaint", *cond, "--image", "digits:0", "--mask", "lower-half", "--class", label,
                     "--guidance-scale", "3", "--out", str(out), *REPAINT_FAST]) == 0
        outs.append(results(out)["images"])
        assert json.loads((out / "record.json").read_text())["classes"] == [int(label)]
    assert not np.array_equal(*outs)
    assert main(["edit", *cond, "--image", "digits:0", "digits:1", "--strength", "0.6", "--class", "2", "5",
                 "--out", str(tmp_path / "edit"), *FAST]) == 0
    assert json.loads((tmp_path / "edit" / "record.json").read_text())["classes"] == [2, 5]
    assert main(["interpolate", *cond, "--image-a", "digits:0", "--image-b", "digits:1", "--class", "4", "--t", "20",
                 "--num-images", "3", "--out", str(tmp_path / "interp"), *FAST]) == 0
    assert main(["viz", "reverse", *cond, "--class", "0", "9", "--num-images", "1", "--frames", "3",
                 "--out", str(tmp_path / "rev.png"), *FAST]) == 0
    grid_height = 2 + 2 * 2 * 66                                                  # 2 classes x (x_t, x0) rows
    assert Image.open(tmp_path / "rev.png").size[1] == viz.HEADER_HEIGHT + grid_height + 10   # the labelled figure


def test_class_errors(run_dir, conditional_run, tmp_path, capsys):
    unconditional = [("interpolate", "--image-a", "digits:0", "--image-b", "digits:1"),
                     ("viz", "reverse", "--num-images", "1")]
    for command in unconditional:
        out = ["--out", str(tmp_path / ("r.png" if command[0] == "viz" else "e"))]
        assert "unconditional" in one_line_error(capsys, [*command, "--checkpoint", str(run_dir), "--class", "1", *out])
    base = ["inpaint", "--checkpoint", str(conditional_run), "--image", "digits:0", "digits:1", "--mask", "center",
            "--out", str(tmp_path / "e"), *REPAINT_FAST]
    assert "not a class index or name" in one_line_error(capsys, [*base, "--class", "seven"])
    assert "out of range" in one_line_error(capsys, [*base, "--class", "12"])
    assert "one per --image" in one_line_error(capsys, [*base, "--class", "1", "2", "3"])


def test_class_names_and_indices():
    assert class_indices(["3", "cat"], 4, ["ant", "bee", "cat", "dog"]) == [3, 2]
    assert class_indices(["all"], 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="its classes are ant, bee"):
        class_indices(["cow"], 2, ["ant", "bee"])
    with pytest.raises(ConfigError, match="unconditional"):
        class_indices(["1"], None)


def test_editing_api_matches_the_cli(run_dir, tmp_path):
    """``ddpm.editing.inpaint`` with the CLI's seed gives the CLI's images (image k: derive_seed(seed, k))."""
    from ddpm.editing import inpaint, named_mask
    from ddpm.generate import load_diffusion, sampling_options

    assert main(["inpaint", "--checkpoint", str(run_dir), "--image", "digits:0", "digits:1", "--mask", "left-half",
                 "--seed", "4", "--batch-size", "1", "--out", str(tmp_path / "cli"), *REPAINT_FAST]) == 0
    diffusion, _ = load_diffusion(run_dir)
    images = torch.from_numpy(digits(0, 1)).permute(0, 3, 1, 2).float() / 255
    got = inpaint(diffusion, images, named_mask("left-half", (8, 8)), sampling=sampling_options("ddpm", 6), seed=4,
                  jump_length=2, resample=2)
    np.testing.assert_array_equal(got, results(tmp_path / "cli")["images"])
