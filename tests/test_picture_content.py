"""What the pictures show, not only their size: the rows of `viz reverse` and `sample --progressive`
hold what their labels say (x_T is the sampler's starting noise, the last x0 estimate is the final
sample), `viz training` shows the run's own grids beside a drawn chart, `loss.png` plots the logged
losses under its title, and the `--nn-grid` rows pair each sample with its true nearest training images.

Tiles are cut out of the figures at the positions the layout gives (an 8x8 digit is shown 8x larger
with 2 pixels of padding) and compared with values computed another way.
"""

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
from ddpm.pixels import from_model_range, to_uint8
from ddpm.seeding import derive_seed

pytest.importorskip("matplotlib")

CELL = 8 * 8 + 2
TINY = ["--steps", "3", "--batch-size", "4", "--timesteps", "25", "--num-images", "2", "--dim", "8",
        "--dim-mults", "1", "2", "--log-every", "1", "--sample-every", "1", "--precision", "fp32", "--device", "cpu",
        "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pictures") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def tile(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    """The 8x8 image in cell (row, col) of a make_grid picture of 8x8 images, grey values [8, 8]."""
    y, x = 2 + row * CELL, 2 + col * CELL
    return grid[y:y + CELL - 2:8, x:x + CELL - 2:8, 0]


def starting_noise(seed: int, k: int) -> np.ndarray:
    """x_T of image k: its first draw from the generator seeded with derive_seed(seed, k), as uint8 [8, 8]."""
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(derive_seed(seed, k)))
    return to_uint8(from_model_range(x_T))[0, ..., 0]


def dark(image: np.ndarray) -> np.ndarray:
    return image.min(axis=2) < 128


# ----------------------------------------------------------------------------- progressive pictures

def check_progressive_picture(image: np.ndarray, n: int, frames: int, seed: int, final: np.ndarray) -> None:
    """Per image a row of x_t and a row of x0 estimates, labelled on the left, timesteps on top."""
    top, left = viz.HEADER_HEIGHT, viz.LABEL_WIDTH
    grid = image[top:top + 2 * n * CELL + 2, left:left + frames * CELL + 2]
    assert (grid[..., 0] == grid[..., 1]).all()                       # grey digits, drawn without a colour map
    for k in range(n):
        x_T, last_x0 = tile(grid, 2 * k, 0), tile(grid, 2 * k + 1, frames - 1)
        # The x_t row starts at x_T, the sampler's own starting noise: pure, spatially white noise.
        np.testing.assert_array_equal(x_T, starting_noise(seed, k))
        assert x_T.astype(float).std() > 60
        # The x0 row ends at the final sample.
        np.testing.assert_allclose(last_x0.astype(int), final[k, ..., 0].astype(int), atol=1)
        assert not np.array_equal(tile(grid, 2 * k, frames - 1), last_x0)    # x_t there is not x0 yet
        for r in (2 * k, 2 * k + 1):                                      # each row has its label beside it
            band = image[top + 2 + r * CELL:top + (r + 1) * CELL, :left]
            assert dark(band).sum() > 40, f"row {r} has no label"
    assert dark(image[top - 20:top, left:left + grid.shape[1]]).sum() > 30 * frames   # a "t = ..." per column
    assert dark(image[:25]).sum() > 200                                    # the title


def test_viz_reverse_rows_hold_what_their_labels_say(run_dir, tmp_path):
    from ddpm.generate import generate, load_diffusion, sampling_options

    out = tmp_path / "reverse.png"
    assert main(["viz", "reverse", "--checkpoint", str(run_dir), "--num-images", "2", "--sampler", "ddim", "--steps", "4",
                 "--frames", "3", "--seed", "5", "--device", "cpu", "--out", str(out)]) == 0
    diffusion, _ = load_diffusion(run_dir)
    final = generate(diffusion, 2, seed=5, sampling=sampling_options("ddim", 4), progress=False)
    check_progressive_picture(rgb(out), n=2, frames=3, seed=5, final=final)


def test_sample_progressive_rows_hold_what_their_labels_say(run_dir, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run_dir), "--num-images", "2", "--steps", "6", "--progressive", "--seed", "3",
                 "--quiet", "--device", "cpu", "--out", str(out)]) == 0        # the ancestral sampler
    with np.load(out / "samples.npz") as f:
        final = f["images"]
    check_progressive_picture(rgb(out / "progressive.png"), n=2, frames=6, seed=3, final=final)


# ----------------------------------------------------------------------------- viz training

def find(picture: np.ndarray, part: np.ndarray) -> list[tuple[int, int]]:
    """Every (row, column) where ``part`` appears in ``picture`` pixel for pixel."""
    h, w = part.shape[:2]
    y0, x0 = np.unravel_index(np.argmin(part.min(axis=2)), part.shape[:2])   # a dark pixel of part: few matches
    hits = np.argwhere((picture == part[y0, x0]).all(axis=2))
    return [(y - y0, x - x0) for y, x in hits
            if 0 <= y - y0 and 0 <= x - x0 and y - y0 + h <= picture.shape[0] and x - x0 + w <= picture.shape[1]
            and np.array_equal(picture[y - y0:y - y0 + h, x - x0:x - x0 + w], part)]


def test_viz_training_shows_the_runs_own_grids_below_a_drawn_chart(run_dir, tmp_path):
    out = tmp_path / "training.png"
    assert main(["viz", "training", str(run_dir), "--out", str(out)]) == 0
    image = rgb(out)
    band = 40 + viz.CHART_HEIGHT
    for step in (1, 2, 3):
        grid = rgb(run_dir / "samples" / f"step-{step:07d}.png")
        # EMA and raw grids of 2 digits under 14-pixel titles, 12 apart: cells of 64 pixels, 8x native...
        assert grid.shape[:2] == (14 + CELL + 2, 2 * (2 * CELL + 2) + 12)
        # ...and the figure holds each grid pixel for pixel, so each digit is drawn at 8x (at least 3x).
        places = find(image, grid)
        assert len(places) == 1 and places[0][0] >= band, (step, places)     # below the chart band
    charts = image[40:band]
    coloured = (charts.max(axis=2).astype(int) - charts.min(axis=2)) > 60     # the curves, not the black axes
    half = image.shape[1] // 2                                                 # a legend alone has ~250 of them
    assert coloured[:, :half].sum() > 1000 and coloured[:, half:].sum() > 1000   # loss, and loss per quartile


# ----------------------------------------------------------------------------- loss.png

def test_loss_png_plots_the_logged_losses_under_a_title_naming_the_run(run_dir, tmp_path, monkeypatch):
    import matplotlib.figure

    import ddpm.tracking

    drawn = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **kw: (drawn.append(fig), save(fig, *a, **kw))[1])
    ddpm.tracking.draw_loss_curve(run_dir)                                       # as every checkpoint draws it
    (ax,) = drawn[0].axes
    assert run_dir.name in ax.get_title() and "loss" in ax.get_title()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["all timesteps"].get_xdata(), [r["step"] for r in rows])
    np.testing.assert_allclose(lines["all timesteps"].get_ydata(), [r["loss"] for r in rows])

    image = rgb(run_dir / "loss.png")
    assert image.shape[:2] == (450, 800)
    coloured = (image.max(axis=2).astype(int) - image.min(axis=2)) > 60
    assert coloured.sum() > 1000                                  # the curves are drawn (a legend alone: ~250)
    # The title: dark text above the axes' top edge (the first row that is mostly dark).
    frame = np.flatnonzero(dark(image).sum(axis=1) > 0.5 * image.shape[1])
    assert frame.size and dark(image[:frame[0] - 2]).sum() > 150


# ----------------------------------------------------------------------------- the nearest-neighbour grid

def test_nn_grid_rows_pair_each_sample_with_its_true_nearest_training_images(tmp_path):
    train = load_dataset("digits", split="train").images
    rng = np.random.default_rng(0)
    picked = rng.choice(len(train), 4, replace=False)
    noise = rng.integers(-40, 41, (4, 8, 8, 1))
    samples = np.clip(train[picked].astype(int) + noise, 0, 255).astype(np.uint8)   # near, not equal to, a training image
    np.savez(tmp_path / "samples.npz", images=samples)
    out = tmp_path / "nn.png"
    assert main(["eval", "--metric", "fast", "--samples", str(tmp_path / "samples.npz"), "--data", "digits",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json"), "--nn-grid", str(out)]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape[:2] == (4 * CELL + 2, 4 * CELL + 2)                       # a row per sample: it, then 3 neighbours
    distances = ((samples.reshape(4, 1, -1).astype(float) - train.reshape(1, len(train), -1)) ** 2).sum(axis=2)
    for r in range(4):
        np.testing.assert_array_equal(tile(grid, r, 0), samples[r, ..., 0])
        nearest = np.argsort(distances[r], kind="stable")[:3]
        assert nearest[0] == picked[r]                                          # the test's own premise
        for k in range(3):
            np.testing.assert_array_equal(tile(grid, r, 1 + k), train[nearest[k], ..., 0], err_msg=f"row {r}, {k}")
