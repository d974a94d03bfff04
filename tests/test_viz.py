"""`ddpm viz`: each command writes a PNG of the expected size; bad input is one line and an exit code."""

from __future__ import annotations

import builtins
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm import viz
from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.generate import load_diffusion, progressive_frames, sampling_options
from ddpm.viz import progressive_grid

ROOT = Path(__file__).resolve().parents[1]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib (the viz extra) is not installed")
CHART = (int(viz.SCHEDULE_FIGSIZE[0] * viz.DPI), int(viz.SCHEDULE_FIGSIZE[1] * viz.DPI))
TRAINING = (int(viz.TRAINING_FIGSIZE[0] * viz.DPI), int(viz.TRAINING_FIGSIZE[1] * viz.DPI))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("viz") / "run"
    assert main(["train", "--steps", "2", "--batch-size", "8", "--timesteps", "50", "--num-images", "2",
                 "--log-every", "1", "--sample-every", "1", "--quiet", "--out", str(out)]) == 0
    return out


def png(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def one_line_error(capsys, fragment: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddpm") and fragment in err, err


# ----------------------------------------------------------------------------- schedule

@needs_mpl
def test_schedule_png_has_the_chart_size(tmp_path):
    out = tmp_path / "schedule.png"
    assert main(["viz", "schedule", "--timesteps", "100", "--out", str(out)]) == 0
    assert png(out).shape == (CHART[1], CHART[0], 3)


@needs_mpl
def test_schedule_figure_differs_between_schedules(tmp_path):
    pictures = {}
    for kind in ("linear", "cosine", "sigmoid"):
        out = tmp_path / f"{kind}.png"
        assert main(["viz", "schedule", "--schedules", kind, "--out", str(out)]) == 0
        pictures[kind] = png(out)
    # The same axes and titles; only the curves differ, by many pixels.
    for a, b in (("linear", "cosine"), ("cosine", "sigmoid"), ("linear", "sigmoid")):
        assert (pictures[a] != pictures[b]).any(axis=2).sum() > 500, (a, b)


def test_schedule_bad_input_is_exit_2(tmp_path, capsys):
    assert main(["viz", "schedule", "--timesteps", "10", "--out", str(tmp_path / "s.png")]) == 2   # linear needs T >= 21
    one_line_error(capsys, "T >= 21")
    assert main(["viz", "schedule", "--out", str(tmp_path / "s.jpg")]) == 2
    one_line_error(capsys, ".png")
    with pytest.raises(SystemExit) as exc:
        main(["viz", "schedule", "--schedules", "quadratic", "--out", str(tmp_path / "s.png")])
    assert exc.value.code == 2
    one_line_error(capsys, "quadratic")


def test_missing_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["viz", "schedule", "--out", str(tmp_path / "s.png")]) == 2
    one_line_error(capsys, "pip install 'ddpm[viz]'")
    assert not (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------- forward process

def test_forward_png_has_one_block_per_schedule(tmp_path):
    out = tmp_path / "forward.png"
    steps = ["0", "10", "49"]
    assert main(["viz", "forward", "--data", "digits", "--steps", *steps, "--timesteps", "50",
                 "--schedules", "linear", "cosine", "--num-images", "3", "--out", str(out)]) == 0
    image = png(out)
    cell = 8 * 8 + 2                                     # 8x8 digits shown at 8x, 2 px padding
    title = 14
    assert image.shape[:2] == (2 * (title + 3 * cell + 2), len(steps) * cell + 2)


def test_forward_strips_follow_eq4():
    images = load_dataset("digits").images[:2]
    strips = viz.forward_strips(images, [0, 999], schedule="linear", timesteps=1000, seed=0)
    assert strips.shape == (2, 2, 8, 8, 1) and strips.dtype == np.uint8
    # t = 0 keeps sqrt(alpha-bar_0) ~ 0.99995 of the image; t = 999 is almost pure noise.
    assert np.abs(strips[0].astype(int) - images.astype(int)).mean() < 3
    assert np.abs(strips[1].astype(int) - images.astype(int)).mean() > 40
    again = viz.forward_strips(images, [0, 999], schedule="linear", timesteps=1000, seed=0)
    assert np.array_equal(strips, again)                 # a fixed seed: the same picture


def test_forward_bad_input_exit_codes(tmp_path, capsys):
    out = str(tmp_path / "f.png")
    assert main(["viz", "forward", "--data", "no-such-data", "--out", out]) == 3
    one_line_error(capsys, "no-such-data")
    assert main(["viz", "forward", "--data", "digits", "--steps", "1000", "--out", out]) == 2
    one_line_error(capsys, "0..999")
    assert main(["viz", "forward", "--data", "mnist", "--data-root", str(tmp_path), "--out", out]) == 3
    one_line_error(capsys, "error")


# ----------------------------------------------------------------------------- reverse process

def synthetic_frames(frames: int, n: int, size: int = 8, channels: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (frames, n, size, size, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)


@needs_mpl
@pytest.mark.parametrize("size, channels", [(8, 1), (28, 1), (32, 3)])
def test_progressive_figure_holds_the_grid_pixel_for_pixel_beside_its_labels(tmp_path, size, channels):

    x_t, x0_pred = synthetic_frames(4, 2, size, channels)
    image = png(viz.progressive_figure(tmp_path / "p.png", x_t, x0_pred, [9, 6, 3, 0], title="a title"))
    grid = progressive_grid(x_t, x0_pred)
    grid = np.repeat(grid, 3, axis=2) if channels == 1 else grid
    top, left = viz.HEADER_HEIGHT, viz.LABEL_WIDTH
    h, w = grid.shape[:2]
    assert np.array_equal(image[top:top + h, left:left + w], grid)
    # Row labels left of each of the 2N rows (x_t, x0 estimate), column labels and title above.
    labels = image[top:top + h, :left].min(axis=2) < 128
    cell = (h - 2) / 4
    for r in range(4):
        assert labels[int(cell * r + 2):int(cell * (r + 1))].sum() > 50, f"row {r} has no label"
    header = image[:top, left:left + w].min(axis=2) < 128
    assert header[top - 25:].sum() > 50 and header[:25].sum() > 50      # the timesteps, and the title


@needs_mpl
def test_progressive_figure_column_labels_say_the_timesteps(tmp_path):
    x_t, x0_pred = synthetic_frames(4, 1)
    a = png(viz.progressive_figure(tmp_path / "a.png", x_t, x0_pred, [9, 6, 3, 0], title="t"))
    b = png(viz.progressive_figure(tmp_path / "b.png", x_t, x0_pred, [49, 33, 16, 0], title="t"))
    top = viz.HEADER_HEIGHT
    assert not np.array_equal(a[top - 25:top], b[top - 25:top])       # other timesteps, other labels
    assert np.array_equal(a[top:], b[top:])                           # the same pictures and row labels


def test_progressive_timesteps_are_those_the_sampler_visits(run_dir):
    from ddpm.generate import generate, load_diffusion, progressive_timesteps
    from ddpm.samplers import SamplingOptions

    diffusion, _ = load_diffusion(run_dir)
    sampling = SamplingOptions(sampler="ddim", steps=7)
    seen = []                                            # (step index, timestep) as the sampler reports them
    generate(diffusion, 1, sampling=sampling, progress=False,
             callback=lambda indices, info: seen.append((info["i"], int(info["t"]))))
    kept = progressive_timesteps(diffusion, 3, sampling)
    visited = dict(seen)
    assert kept == [visited[0], visited[3], visited[6]] and kept[0] > kept[-1]


@needs_mpl
def test_reverse_png_is_the_labelled_progressive_grid(run_dir, tmp_path):
    out = tmp_path / "reverse.png"
    assert main(["viz", "reverse", "--checkpoint", str(run_dir), "--num-images", "2", "--sampler", "ddim", "--steps", "4",
                 "--frames", "3", "--device", "cpu", "--out", str(out)]) == 0
    cell = 8 * 8 + 2
    grid_h, grid_w = 2 * 2 * cell + 2, 3 * cell + 2                  # per image a row of x_t and one of x0_pred
    image = png(out)
    assert image.shape[0] == viz.HEADER_HEIGHT + grid_h + 10 and image.shape[1] >= viz.LABEL_WIDTH + grid_w
    assert (image[viz.HEADER_HEIGHT:, :viz.LABEL_WIDTH].min(axis=2) < 128).sum() > 200      # row labels
    diffusion, _ = load_diffusion(run_dir)
    _, x_t, x0 = progressive_frames(diffusion, 2, frames=3, sampling=sampling_options("ddim", 4), progress=False)
    grid = image[viz.HEADER_HEIGHT:viz.HEADER_HEIGHT + grid_h, viz.LABEL_WIDTH:viz.LABEL_WIDTH + grid_w, 0]
    np.testing.assert_array_equal(grid, progressive_grid(x_t, x0)[..., 0])                  # grey: R = G = B


@needs_mpl
def test_sample_progressive_is_labelled_too(run_dir, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run_dir), "--num-images", "1", "--steps", "5", "--progressive", "--quiet",
                 "--device", "cpu", "--out", str(out)]) == 0
    image = png(out / "progressive.png")
    assert (image[viz.HEADER_HEIGHT:, :viz.LABEL_WIDTH].min(axis=2) < 128).sum() > 100
    assert (image[:viz.HEADER_HEIGHT].min(axis=2) < 128).sum() > 100


def test_reverse_bad_input_exit_codes(run_dir, tmp_path, capsys):
    out = str(tmp_path / "r.png")
    assert main(["viz", "reverse", "--checkpoint", str(tmp_path / "missing"), "--out", out]) == 4
    one_line_error(capsys, "missing")
    assert main(["viz", "reverse", "--checkpoint", str(run_dir), "--steps", "51", "--out", out]) == 2
    one_line_error(capsys, "51")
    assert not Path(out).exists()


# ----------------------------------------------------------------------------- training run

@needs_mpl
def test_training_png_is_at_least_the_figure_size(run_dir, tmp_path):
    out = tmp_path / "training.png"
    assert main(["viz", "training", str(run_dir), "--out", str(out)]) == 0
    image = png(out)
    assert image.shape[1] >= TRAINING[0] and image.shape[0] > viz.CHART_HEIGHT


def fake_training_run(root: Path, size: int, grids: int = 2, channels: int = 1) -> tuple[Path, tuple]:
    """A run directory with metrics, config.json and sample grids (as training writes them: EMA and raw
    side by side) whose first sample is one flat colour, not found anywhere else in the figure."""
    import json

    from ddpm.images import make_grid, save_png, side_by_side

    run = root / f"run-{size}"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"image_size": [size, size]}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, **{f"loss_q{q}": q + 1.0 / s
                                                                                         for q in range(4)}}) + "\n"
                                               for s in range(1, 11)))
    colour = (3, 201, 77) if channels == 3 else (77,)
    samples = np.full((4, size, size, channels), 128, np.uint8)
    samples[0] = colour
    grid = make_grid(samples)
    for step in range(1, grids + 1):
        save_png(run / "samples" / f"step-{step:07d}.png", side_by_side([grid, grid], ["EMA", "raw"]))
    return run, (colour * 3)[:3]


def longest_run(image: np.ndarray, colour: tuple) -> int:
    """The longest horizontal run of pixels of exactly ``colour``."""
    hit = (image == np.array(colour, np.uint8)).all(axis=2)
    best = 0
    for row in hit[hit.any(axis=1)]:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        best = max(best, int((edges[1::2] - edges[::2]).max()))
    return best


@needs_mpl
@pytest.mark.parametrize("size, channels", [(8, 1), (28, 1), (32, 3), (64, 3)])
def test_training_figure_draws_each_sample_at_least_3x_native(tmp_path, size, channels):
    from ddpm.images import grid_scale

    run, colour = fake_training_run(tmp_path, size, grids=1, channels=channels)
    image = png(viz.training_figure(tmp_path / "t.png", run))
    drawn = longest_run(image, colour)
    assert drawn >= 3 * size, (drawn, size)
    assert drawn == size * grid_scale(size, size) * viz.grid_display_scale((size, size))   # whole pixels


@needs_mpl
def test_training_figure_has_no_blank_band_below_the_grids(tmp_path):
    run, _ = fake_training_run(tmp_path, 28, grids=4)
    image = png(viz.training_figure(tmp_path / "t.png", run))
    drawn_rows = np.flatnonzero((image.min(axis=2) < 250).any(axis=1))
    assert image.shape[0] - drawn_rows[-1] < 40                        # the figure ends where the grids do


def test_sample_grids_are_spread_over_the_run(tmp_path):
    (tmp_path / "samples").mkdir()
    for step in range(1, 11):
        (tmp_path / "samples" / f"step-{step:07d}.png").write_bytes(b"")
    assert [step for step, _ in viz.sample_grids(tmp_path, 4)] == [1, 4, 7, 10]


def test_training_bad_input_is_exit_3(tmp_path, capsys):
    out = str(tmp_path / "t.png")
    assert main(["viz", "training", str(tmp_path / "missing"), "--out", out]) == 3
    one_line_error(capsys, "missing")
    assert main(["viz", "training", str(tmp_path), "--out", out]) == 3           # no metrics.jsonl
    one_line_error(capsys, "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "fast_fid": 3.0}\n')
    assert main(["viz", "training", str(tmp_path), "--out", out]) == 3           # evaluation rows only
    one_line_error(capsys, "no training rows")


# ----------------------------------------------------------------------------- the guide's figures

@pytest.mark.slow      # minutes of subprocesses; run with -m slow
@needs_mpl
def test_guide_script_quick_mode_writes_every_figure(tmp_path):
    out = tmp_path / "guide"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_guide_figures.py"), "--quick",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("schedule.png", "forward.png", "reverse.png", "training.png"):
        png(out / name)


def test_guide_images_are_referenced_and_present():
    guide = (ROOT / "docs" / "guide.md").read_text()
    for name in ("schedule.png", "forward.png", "reverse.png", "training.png"):
        assert f"images/guide/{name}" in guide
        assert (ROOT / "docs" / "images" / "guide" / name).is_file()


def test_viz_help_shows_examples(capsys):
    for args in (["viz", "--help"], ["viz", "reverse", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
    assert "--sampler" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["viz"])                                    # WHAT is required
    assert exc.value.code == 2
    one_line_error(capsys, "required")


def test_training_figure_and_grids_go_to_tensorboard_when_installed(run_dir, tmp_path, monkeypatch, capsys):
    """With tensorboard importable, `viz training` also logs the figure and the sample grids as images."""
    import sys
    import types

    pytest.importorskip("matplotlib")
    logged, closed = [], []

    class FakeWriter:                                 # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_image(self, tag, image, step=None, dataformats="CHW"):
            logged.append((tag, step, image.shape, dataformats, self.log_dir))

        def close(self):
            closed.append(True)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    out = tmp_path / "training.png"
    assert main(["viz", "training", str(run_dir), "--out", str(out)]) == 0
    assert "also in TensorBoard" in capsys.readouterr().out
    assert logged[0][0] == "viz/training" and logged[0][2] == png(out).shape and logged[0][3] == "HWC"
    assert [step for tag, step, *_ in logged if tag == "viz/samples"] == [s for s, _ in viz.sample_grids(run_dir, 4)]
    assert all(entry[4] == str(run_dir / "tensorboard") for entry in logged) and closed == [True]


def test_no_tensorboard_means_png_only(run_dir, tmp_path, monkeypatch, capsys):
    import sys

    pytest.importorskip("matplotlib")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails as if not installed
    out = tmp_path / "training.png"
    assert main(["viz", "training", str(run_dir), "--out", str(out)]) == 0
    assert "TensorBoard" not in capsys.readouterr().out and out.is_file()


# ----------------------------------------------------------------------------- loss.png

def test_a_run_without_matplotlib_skips_loss_png_with_one_note(tmp_path, capsys, monkeypatch):
    from ddpm import plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    plots.note_missing_matplotlib.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--batch-size", "4", "--timesteps", "25", "--num-images", "1",
                 "--checkpoint-every", "1", "--log-every", "1", "--quiet", "--out", str(out)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
    assert notes == ["ddpm: note: matplotlib is not installed, so loss.png is skipped (pip install 'ddpm[viz]')"]
    assert not (out / "loss.png").exists() and (out / "samples.png").is_file()
    plots.note_missing_matplotlib.cache_clear()


@needs_mpl
def test_loss_chart_names_its_run_and_uses_matplotlibs_ticks(tmp_path):
    """The chart is matplotlib's: steps written in full with separators, loss on a log axis when it
    falls by more than 10x (the ticks matplotlib chooses there are powers of ten)."""
    from matplotlib.figure import Figure

    from ddpm.plots import draw_series

    steps = list(range(0, 20001, 500))
    series = {"all timesteps": (steps, [1.0 / (1 + s / 100) for s in steps])}
    ax = Figure().subplots()
    draw_series(ax, series, xlabel="optimizer step", ylabel="loss", log_y=True, title="run 007: loss")
    ax.figure.canvas.draw()
    assert ax.get_yscale() == "log" and ax.get_title() == "run 007: loss"
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "10,000" in labels or "10,000" in "".join(labels), labels
    flat = Figure().subplots()
    draw_series(flat, {"loss": ([1, 2, 3], [0.91, 0.9, 0.89])}, log_y=True)
    assert flat.get_yscale() == "linear"                              # a log axis over 2% says nothing
