"""Pictures of every stage of a diffusion model: schedule, forward process, reverse process, training.

Charts and labelled image grids are drawn with matplotlib (the optional extra ``ddpm[viz]``),
image strips with numpy and Pillow (:mod:`ddpm.images`). Image grids are shown pixel for pixel
(or magnified by whole pixels), never shrunk. Every function writes one PNG, atomically, and
returns its path. Timesteps are 0-based (paper t = index + 1), as everywhere in the code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .diffusion import q_sample
from .errors import ConfigError, DataError
from .fileio import atomic_write
from .generate import progressive_frames, progressive_timesteps
from .images import grid_scale, make_grid, save_png
from .pixels import from_model_range, to_model_range, to_tensor, to_uint8
from .plots import draw_series, have_matplotlib, note_missing_matplotlib
from .sampling import SamplingPlan, resolve_plan
from .schedules import NoiseSchedule

__all__ = ["require_matplotlib", "schedule_figure", "forward_strips", "forward_figure", "progressive_grid",
           "progressive_figure", "progressive_png", "reverse_figure", "training_figure", "grid_display_scale",
           "SCHEDULE_FIGSIZE", "TRAINING_FIGSIZE", "DPI"]

DPI = 100
SCHEDULE_FIGSIZE = (12.0, 3.6)      # inches: 1200 x 360 pixels at DPI
TRAINING_FIGSIZE = (12.0, 8.0)      # at least 1200 pixels wide; as tall (and wider) as the sample grids need


def require_matplotlib(what: str):
    """matplotlib's ``Figure`` class, or a one-line error that names the extra to install."""
    try:
        from matplotlib.figure import Figure        # here: optional dependency (viz extra)
    except ImportError:
        raise ConfigError(f"{what} needs matplotlib, which is not installed: pip install 'ddpm[viz]' "
                          "(or pip install matplotlib)") from None
    return Figure


def _save_figure(fig, path: str | os.PathLike) -> Path:
    # No bbox_inches="tight": the PNG keeps exactly figsize * DPI pixels.
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


# ----------------------------------------------------------------------------- the noise schedule

def schedule_figure(path: str | os.PathLike, *, timesteps: int = 1000,
                    schedules: Sequence[str] = ("linear", "cosine", "sigmoid")) -> Path:
    """alpha-bar_t, beta_t and log SNR(t) = log(alpha-bar_t / (1 - alpha-bar_t)) against t, one line per schedule."""
    if not schedules:
        raise ConfigError("name at least one schedule")
    tables = {kind: NoiseSchedule(kind, timesteps) for kind in dict.fromkeys(schedules)}   # validates T and names
    Figure = require_matplotlib("ddpm viz schedule")
    fig = Figure(figsize=SCHEDULE_FIGSIZE, layout="constrained")
    axes = fig.subplots(1, 3)
    t = np.arange(timesteps)
    for kind, schedule in tables.items():
        axes[0].plot(t, schedule.alphas_cumprod.numpy(), label=kind)
        axes[1].plot(t, schedule.betas.numpy(), label=kind)
        axes[2].plot(t, schedule.snr.log().numpy(), label=kind)
    titles = ("alpha-bar_t (signal kept)", "beta_t (noise added per step)", "log SNR(t)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("t (0-based)")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"noise schedules, T = {timesteps}")
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------- the forward process

def forward_strips(images: np.ndarray, steps: Sequence[int], *, schedule: str = "linear", timesteps: int = 1000,
                   seed: int = 0) -> np.ndarray:
    """x_t ~ q(x_t | x_0) (Eq. 4) of each image at each step: uint8 [len(steps), N, H, W, C].

    Image k uses the same noise at every step and for every schedule (drawn from ``seed``), so
    strips differ only by how much of x_0 the schedule keeps.
    """
    noise_schedule = NoiseSchedule(schedule, timesteps)
    bad = [s for s in steps if not 0 <= s < timesteps]
    if bad:
        raise ConfigError(f"steps must be in 0..{timesteps - 1} (0-based); got {', '.join(map(str, bad))}")
    x0 = to_model_range(to_tensor(images))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = [to_uint8(from_model_range(q_sample(noise_schedule, x0, torch.full((len(x0),), s), eps)))
           for s in steps]
    return np.stack(out)


def _title_strip(width: int, text: str, channels: int, height: int = 14) -> np.ndarray:
    pil = Image.new("L", (width, height), 255)
    ImageDraw.Draw(pil).text((2, 1), text, fill=0)
    strip = np.asarray(pil)[:, :, None]
    return np.repeat(strip, channels, axis=2)


def forward_figure(path: str | os.PathLike, images: np.ndarray, steps: Sequence[int], *,
                   schedules: Sequence[str] = ("linear", "cosine", "sigmoid"), timesteps: int = 1000,
                   seed: int = 0) -> Path:
    """One block per schedule: a titled grid with a row per image and a column per step."""
    blocks = []
    for kind in dict.fromkeys(schedules):
        frames = forward_strips(images, steps, schedule=kind, timesteps=timesteps, seed=seed)   # [S, N, ...]
        grid = make_grid(frames.transpose(1, 0, 2, 3, 4).reshape(-1, *frames.shape[2:]), nrow=len(steps))
        title = f"{kind}: t = {', '.join(map(str, steps))}"
        blocks += [_title_strip(grid.shape[1], title, grid.shape[2]), grid]
    return save_png(path, np.concatenate(blocks, axis=0))


# ----------------------------------------------------------------------------- the reverse process

LABEL_WIDTH = 150      # pixels left of an image grid for its row labels
HEADER_HEIGHT = 70     # pixels above it for the title, its explanation and the column labels


def _grid_axes(fig, image: np.ndarray, left: int, top: int, scale: int = 1):
    """Axes showing ``image`` at exactly ``scale`` figure pixels per image pixel, its top-left corner
    ``left`` and ``top`` pixels from the figure's; returns them."""
    width, height = fig.bbox.width, fig.bbox.height
    h, w = image.shape[0] * scale, image.shape[1] * scale
    ax = fig.add_axes((left / width, 1 - (top + h) / height, w / width, h / height))
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]    # RGB: no colour map
    ax.imshow(rgb, interpolation="nearest", aspect="auto")
    return ax


def progressive_grid(x_t: np.ndarray, x0_pred: np.ndarray) -> np.ndarray:
    """One grid: for each image a row of x_t over time, then a row of x0_pred over time (Figure 6)."""
    f, n = x_t.shape[:2]
    rows = np.stack([x_t.transpose(1, 0, 2, 3, 4), x0_pred.transpose(1, 0, 2, 3, 4)], axis=1)   # [N, 2, F, ...]
    return make_grid(rows.reshape(n * 2 * f, *x_t.shape[2:]), nrow=f)



def progressive_figure(path: str | os.PathLike, x_t: np.ndarray, x0_pred: np.ndarray, timesteps: Sequence[int],
                       *, title: str) -> Path:
    """Progressive generation (Ho et al. 2020, Figure 6) with its labels: per image a row of x_t and a
    row of the x0 estimate made from it, one column per 0-based timestep t (labelled on top).

    ``x_t`` and ``x0_pred`` are uint8 [F, N, H, W, C] (:func:`~ddpm.generate.progressive_frames`).
    """
    Figure = require_matplotlib("a labelled progressive figure")
    frames, n = x_t.shape[:2]
    if len(timesteps) != frames:
        raise ValueError(f"{len(timesteps)} timesteps for {frames} frames")
    grid = progressive_grid(x_t, x0_pred)                      # [2N rows of F cells]
    width = max(LABEL_WIDTH + grid.shape[1] + 20, 560)
    height = HEADER_HEIGHT + grid.shape[0] + 10
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = _grid_axes(fig, grid, LABEL_WIDTH, HEADER_HEIGHT)
    cell_w, cell_h = (grid.shape[1] - 2) / frames, (grid.shape[0] - 2) / (2 * n)     # make_grid pads 2 px
    labels = [f"sigma = {t:.3g}" if isinstance(t, float) else f"t = {t}" for t in timesteps]   # floats: Sigmas
    ax.set_xticks([1 + cell_w * (f + 0.5) for f in range(frames)], labels)
    ax.xaxis.tick_top()
    ax.tick_params(axis="x", labelsize="small", length=0)
    ax.set_yticks([1 + cell_h * (r + 0.5) for r in range(2 * n)],
                  [f"image {r // 2 + 1}: x_t" if r % 2 == 0 else "x0 estimate" for r in range(2 * n)])
    ax.tick_params(axis="y", length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.text(0.5, 1 - 6 / height, title, ha="center", va="top", fontsize="medium")
    fig.text(0.5, 1 - 26 / height, "left to right: x_t at timestep t (0-based), and below it the x0 estimate "
             "made from it", ha="center", va="top", fontsize="small", color="0.3")
    return _save_figure(fig, path)


def checkpoint_label(meta: dict | None) -> str:
    """'run NAME, step S' (or the checkpoint file's name) for a figure's title."""
    if not meta or "path" not in meta:
        return "checkpoint"
    path = Path(meta["path"])
    name = f"run {path.parent.parent.name}" if path.parent.name == "checkpoints" else path.name
    return f"{name}, step {meta['step']:,}" if isinstance(meta.get("step"), int) else name


def progressive_title(plan: SamplingPlan, seed: int, meta: dict | None = None) -> str:
    return f"{checkpoint_label(meta)}: reverse process, {plan.sampler} sampler over {plan.steps} steps, seed {seed}"


def progressive_png(path: str | os.PathLike, x_t: np.ndarray, x0_pred: np.ndarray, timesteps: Sequence[int],
                    *, title: str) -> Path:
    """:func:`progressive_figure`, or without matplotlib the unlabelled grid (after a one-line note)."""
    if have_matplotlib():
        return progressive_figure(path, x_t, x0_pred, timesteps, title=title)
    note_missing_matplotlib(f"labelling {Path(path).name}")
    return save_png(path, progressive_grid(x_t, x0_pred))


def reverse_figure(path: str | os.PathLike, diffusion, *, n: int = 4, frames: int = 10, seed: int = 0,
                   sampling=None, batch_size: int = 64, meta: dict | None = None, labels=None,
                   guidance_scale: float | None = None) -> Path:
    """Progressive generation (Ho et al. 2020, Figure 6): per image, x_t over time above the x0 estimate,
    rows and timesteps labelled (:func:`progressive_figure`); ``meta`` (the checkpoint's) names it.

    A class-conditional model samples image k at class ``labels[k]`` (with ``guidance_scale``)."""
    plan = resolve_plan(diffusion) if sampling is None else resolve_plan(diffusion, sampling)
    require_matplotlib("ddpm viz reverse")                     # before sampling, not after
    _, x_t, x0_pred = progressive_frames(diffusion, n, frames=frames, sampling=plan, seed=seed,
                                         batch_size=batch_size, progress=False, labels=labels,
                                         guidance_scale=guidance_scale)
    return progressive_figure(path, x_t, x0_pred, progressive_timesteps(diffusion, frames, plan),
                              title=progressive_title(plan, seed, meta))


# ----------------------------------------------------------------------------- training

def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The training rows of ``RUN_DIR/metrics.jsonl`` (evaluation rows, which carry ``fast_fid``, left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise DataError(f"{run_dir} is not a directory (expected a run directory written by ddpm train)")
    if not path.is_file():
        raise DataError(f"{run_dir} has no metrics.jsonl; is it a run directory written by ddpm train?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{number} is not valid JSON") from None
        if isinstance(row, dict) and "loss" in row and "step" in row:
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no training rows yet")
    return rows


def sample_grids(run_dir: str | os.PathLike, most: int = 4) -> list[tuple[int, Path]]:
    """Up to ``most`` of the run's ``samples/step-NNNNNNN.png``, evenly spread, the last one included."""
    found = sorted((int(m.group(1)), p) for p in (Path(run_dir) / "samples").glob("step-*.png")
                   if (m := re.fullmatch(r"step-(\d+)\.png", p.name)))
    if len(found) <= most:
        return found
    keep = sorted({round(j * (len(found) - 1) / (most - 1)) for j in range(most)})
    return [found[j] for j in keep]


MIN_SAMPLE_SCALE = 3        # a sample in viz training is drawn at least this many times its native size
CHART_HEIGHT = 380          # pixels of the loss charts' band
GRID_TITLE = 26             # pixels above each sample grid for its title


def _native_size(run_dir: Path) -> tuple[int, int] | None:
    """(H, W) of the run's images, from its config.json; None when unreadable."""
    try:
        size = json.loads((run_dir / "config.json").read_text())["model"]["image_size"]
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def grid_display_scale(native: tuple[int, int] | None) -> int:
    """Figure pixels per pixel of a sample-grid PNG, so each sample shows at >= MIN_SAMPLE_SCALE x native.

    The grids are stored magnified by :func:`~ddpm.images.grid_scale` already (8x for 8x8 digits,
    3x for 28x28 MNIST), so most are drawn pixel for pixel.
    """
    if native is None:
        return 1
    return max(1, -(-MIN_SAMPLE_SCALE // grid_scale(*native)))


def _loss_charts(fig, rows: list[dict], width: int, height: int) -> None:
    """The loss curve and the loss per timestep quartile, side by side in the band below the title."""
    steps = [r["step"] for r in rows]

    def column(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]

    left, gap, right = 80, 110, 20                   # pixels, room for the tick labels
    top, bottom = 40 + 35, 40 + CHART_HEIGHT - 55    # below the figure's title; above the grids
    w = (width - left - gap - right) / 2
    specs = [({"all timesteps": (steps, column("loss"))}, "loss (mean over each logging window)"),
             ({f"t in quartile {q}": (steps, column(f"loss_q{q}")) for q in range(4)},
              "loss per timestep quartile of [0, T)")]
    for k, (series, title) in enumerate(specs):
        ax = fig.add_axes(((left + k * (w + gap)) / width, 1 - bottom / height, w / width, (bottom - top) / height))
        draw_series(ax, series, xlabel="optimizer step", ylabel="loss", log_y=True, title=title)


def training_figure(path: str | os.PathLike, run_dir: str | os.PathLike, *, grids: int = 4) -> Path:
    """Loss curve, loss per timestep quartile, and the run's sample grids over time, as one PNG.

    The grids are drawn large enough to read -- each sample at least 3x its native size
    (:func:`grid_display_scale`), two grids a row -- and the figure grows to hold them.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    shown = sample_grids(run_dir, grids)
    Figure = require_matplotlib("ddpm viz training")
    pictures = []
    for step, grid_path in shown:
        with Image.open(grid_path) as im:
            pictures.append((step, np.asarray(im.convert("RGB"))))
    scale, gap = grid_display_scale(_native_size(run_dir)), 20
    cols = min(2, max(1, len(pictures)))
    cell_w = max((p.shape[1] for _, p in pictures), default=0) * scale
    cell_h = max((p.shape[0] for _, p in pictures), default=0) * scale + GRID_TITLE
    width = max(int(TRAINING_FIGSIZE[0] * DPI), cols * cell_w + (cols + 1) * gap)
    grid_rows = -(-len(pictures) // cols)
    height = 40 + CHART_HEIGHT + max(grid_rows * (cell_h + gap), 60)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    _loss_charts(fig, rows, width, height)
    x0 = (width - cols * cell_w - (cols - 1) * gap) // 2
    for k, (step, picture) in enumerate(pictures):
        r, c = divmod(k, cols)
        left, top = x0 + c * (cell_w + gap), 40 + CHART_HEIGHT + r * (cell_h + gap) + GRID_TITLE
        ax = _grid_axes(fig, picture, left, top, scale)
        ax.set_title(f"samples at step {step:,} (EMA weights left, raw right)", fontsize="small")
        ax.axis("off")
    if not pictures:
        fig.text(0.5, 1 - (40 + CHART_HEIGHT + 30) / height, "no sample grids in samples/ yet", ha="center")
    fig.text(0.5, 1 - 10 / height, f"run {run_dir.resolve().name}: training to step {rows[-1]['step']:,}",
             ha="center", va="top", fontsize="large")
    return _save_figure(fig, path)


def training_to_tensorboard(run_dir: str | os.PathLike, figure: str | os.PathLike, *, grids: int = 4) -> bool:
    """The same picture in TensorBoard: the figure (``viz/training``) and the grids it shows (``viz/samples``,
    EMA and raw side by side, at their steps) as images in ``RUN_DIR/tensorboard``, where training logs.
    False when tensorboard is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter     # here: optional dependency (tensorboard extra)
    except Exception:          # tensorboard missing or broken: the PNG has everything
        return False
    writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
    try:
        with Image.open(figure) as im:
            writer.add_image("viz/training", np.asarray(im.convert("RGB")), dataformats="HWC")
        for step, grid_path in sample_grids(run_dir, grids):
            with Image.open(grid_path) as im:
                writer.add_image("viz/samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")
    finally:
        writer.close()
    return True
