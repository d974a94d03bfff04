"""Pictures of every stage of a diffusion model: schedule, forward process, reverse process, training.

Charts are drawn with matplotlib (the optional extra ``ddpm[viz]``); image strips with numpy and
Pillow (:mod:`ddpm.images`). Every function writes one PNG of a fixed size, atomically, and
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

from .errors import ConfigError, DataError
from .fileio import atomic_write
from .images import make_grid, save_png

__all__ = ["require_matplotlib", "schedule_figure", "forward_strips", "forward_figure", "reverse_figure",
           "training_figure", "SCHEDULE_FIGSIZE", "TRAINING_FIGSIZE", "DPI"]

DPI = 100
SCHEDULE_FIGSIZE = (12.0, 3.6)      # inches: 1200 x 360 pixels at DPI
TRAINING_FIGSIZE = (12.0, 8.0)      # 1200 x 800 pixels


def require_matplotlib(what: str):
    """matplotlib's ``Figure`` class, or a one-line error that names the extra to install."""
    try:
        from matplotlib.figure import Figure
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
    from .schedules import NoiseSchedule

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
    from .data import to_tensor, to_uint8
    from .diffusion import from_model_range, q_sample, to_model_range
    from .schedules import NoiseSchedule

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
    from PIL import Image, ImageDraw

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

def reverse_figure(path: str | os.PathLike, diffusion, *, n: int = 4, frames: int = 10, seed: int = 0,
                   sampling=None, batch_size: int = 64, labels=None, guidance_scale: float | None = None) -> Path:
    """Progressive generation (Ho et al. 2020, Figure 6): per image, x_t over time above the x0 estimate.

    A class-conditional model samples image k at class ``labels[k]`` (with ``guidance_scale``)."""
    from .generate import progressive_frames, progressive_grid
    from .samplers import DEFAULT_SAMPLING

    _, x_t, x0_pred = progressive_frames(diffusion, n, frames=frames, sampling=sampling or DEFAULT_SAMPLING,
                                         seed=seed, batch_size=batch_size, progress=False, labels=labels,
                                         guidance_scale=guidance_scale)
    return save_png(path, progressive_grid(x_t, x0_pred))


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


def training_figure(path: str | os.PathLike, run_dir: str | os.PathLike, *, grids: int = 4) -> Path:
    """Loss curve, loss per timestep quartile, and the run's sample grids over time, as one PNG."""
    from PIL import Image

    rows = read_metrics(run_dir)
    shown = sample_grids(run_dir, grids)
    Figure = require_matplotlib("ddpm viz training")
    fig = Figure(figsize=TRAINING_FIGSIZE, layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.0, 1.1))
    ax_loss, ax_q = top.subplots(1, 2)
    steps = [r["step"] for r in rows]

    def column(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]

    ax_loss.plot(steps, column("loss"))
    ax_loss.set_title("loss (L_simple, mean over each logging window)")
    for q in range(4):
        ax_q.plot(steps, column(f"loss_q{q}"), label=f"t in quartile {q}")
    ax_q.set_title("loss per timestep quartile of [0, T)")
    ax_q.legend(fontsize="small")
    for ax in (ax_loss, ax_q):
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if shown:
        axes = np.atleast_1d(bottom.subplots(1, len(shown)))
        for ax, (step, grid_path) in zip(axes, shown):
            with Image.open(grid_path) as im:
                ax.imshow(np.asarray(im.convert("RGB")), interpolation="nearest")
            ax.set_title(f"samples at step {step} (EMA | raw)", fontsize="small")
            ax.axis("off")
    else:
        bottom.text(0.5, 0.5, "no sample grids in samples/ yet", ha="center", va="center")
    fig.suptitle(f"run {Path(run_dir).resolve().name}: training")
    return _save_figure(fig, path)


def training_to_tensorboard(run_dir: str | os.PathLike, figure: str | os.PathLike, *, grids: int = 4) -> bool:
    """The same picture in TensorBoard: the figure and the run's sample grids as images in
    ``RUN_DIR/tensorboard`` (where training logs its scalars). False when tensorboard is not installed.
    """
    from PIL import Image

    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:          # tensorboard missing or broken: the PNG has everything
        return False
    writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
    try:
        with Image.open(figure) as im:
            writer.add_image("viz/training", np.asarray(im.convert("RGB")), dataformats="HWC")
        for step, grid_path in sample_grids(run_dir, grids):
            with Image.open(grid_path) as im:
                writer.add_image("samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")
    finally:
        writer.close()
    return True
