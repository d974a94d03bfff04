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
from ddpm.generate import load_diffusion, progressive_frames, progressive_grid, sampling_options

ROOT = Path(__file__).resolve().parents[1]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib (the viz extra) is not installed")
CHART = (int(viz.SCHEDULE_FIGSIZE[0] * viz.DPI), int(viz.SCHEDULE_FIGSIZE[1] * viz.DPI))
TRAINING = (int(viz.TRAINING_FIGSIZE[0] * viz.DPI), int(viz.TRAINING_FIGSIZE[1] * viz.DPI))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("viz") / "run"
    assert main(["train", "--steps", "2", "--batch-size", "8", "--timesteps", "50", "--num-samples", "2",
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
                 "--schedules", "linear", "cosine", "--n", "3", "--out", str(out)]) == 0
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

def test_reverse_png_is_the_progressive_grid(run_dir, tmp_path):
    out = tmp_path / "reverse.png"
    assert main(["viz", "reverse", "--checkpoint", str(run_dir), "--n", "2", "--sampler", "ddim", "--steps", "4",
                 "--frames", "3", "--device", "cpu", "--out", str(out)]) == 0
    cell = 8 * 8 + 2
    assert png(out).shape[:2] == (2 * 2 * cell + 2, 3 * cell + 2)   # per image a row of x_t and one of x0_pred
    diffusion, _ = load_diffusion(run_dir)
    _, x_t, x0 = progressive_frames(diffusion, 2, frames=3, sampling=sampling_options("ddim", 4), progress=False)
    np.testing.assert_array_equal(png(out)[..., 0], progressive_grid(x_t, x0)[..., 0])    # grey: R = G = B


def test_reverse_bad_input_exit_codes(run_dir, tmp_path, capsys):
    out = str(tmp_path / "r.png")
    assert main(["viz", "reverse", "--checkpoint", str(tmp_path / "missing"), "--out", out]) == 4
    one_line_error(capsys, "missing")
    assert main(["viz", "reverse", "--checkpoint", str(run_dir), "--steps", "51", "--out", out]) == 2
    one_line_error(capsys, "51")
    assert not Path(out).exists()


# ----------------------------------------------------------------------------- training run

@needs_mpl
def test_training_png_has_the_figure_size(run_dir, tmp_path):
    out = tmp_path / "training.png"
    assert main(["viz", "training", str(run_dir), "--out", str(out)]) == 0
    assert png(out).shape == (TRAINING[1], TRAINING[0], 3)


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
    assert [step for tag, step, *_ in logged if tag == "samples"] == [s for s, _ in viz.sample_grids(run_dir, 4)]
    assert all(entry[4] == str(run_dir / "tensorboard") for entry in logged) and closed == [True]


def test_no_tensorboard_means_png_only(run_dir, tmp_path, monkeypatch, capsys):
    import sys

    pytest.importorskip("matplotlib")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails as if not installed
    out = tmp_path / "training.png"
    assert main(["viz", "training", str(run_dir), "--out", str(out)]) == 0
    assert "TensorBoard" not in capsys.readouterr().out and out.is_file()
