"""Pictures of sequences [N, C, L] (a sequence model's samples): line plots instead of image grids.

:func:`sequence_grid` draws each sequence as a small panel of lines (one colour per channel, the
y axis spanning [-1, 1], the data range of :mod:`ddpm.data.sequences`), tiled like an image grid:
it needs only Pillow, and is what training's sample grids and TensorBoard show. :func:`plot_sequences`
writes a labelled matplotlib figure of the first few (the ``viz`` extra), or the grid without it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .fileio import atomic_write
from .plots import DPI, have_matplotlib

__all__ = ["sequence_grid", "plot_sequences", "COLOURS", "PLOTTED"]

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PLOTTED = 8                          # sequences drawn in plot_sequences' figure


def _panel(x: np.ndarray, height: int, width: int) -> Image.Image:
    """One sequence [C, L] as lines on white, y = 1 at the top and -1 at the bottom, a grey zero line."""
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    draw.line([(0, height // 2), (width, height // 2)], fill=(220, 220, 220))
    length = x.shape[1]
    xs = np.linspace(0, width - 1, length) if length > 1 else np.array([width / 2])
    for c, row in enumerate(x):
        ys = (1.0 - np.clip(row, -1.0, 1.0)) / 2.0 * (height - 1)
        points = list(zip(xs.tolist(), ys.tolist()))
        colour = COLOURS[c % len(COLOURS)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=1)
        else:
            draw.point(points, fill=colour)
    return panel


def sequence_grid(sequences: np.ndarray, nrow: int | None = None, padding: int = 2, height: int = 48) -> np.ndarray:
    """Float sequences [N, C, L] in [-1, 1] as one uint8 RGB grid [rows * H, nrow * W, 3] of line plots."""
    if sequences.ndim != 3 or not np.issubdtype(sequences.dtype, np.floating):
        raise ValueError(f"expected float sequences [N, C, L], got {sequences.dtype} {sequences.shape}")
    n, _, length = sequences.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    width = min(max(2 * length, 96), 256)
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (height + padding) + padding, nrow * (width + padding) + padding, 3), 160, np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (height + padding), padding + col * (width + padding)
        grid[y:y + height, x:x + width] = np.asarray(_panel(sequences[k], height, width))
    return grid


def plot_sequences(path: str | os.PathLike, sequences: np.ndarray, title: str = "") -> Path:
    """A labelled figure of the first :data:`PLOTTED` sequences (one axis each: position against value,
    a line per channel) with matplotlib; without it, :func:`sequence_grid` saved as PNG."""
    shown = sequences[:PLOTTED]
    if not have_matplotlib():
        image = Image.fromarray(sequence_grid(shown))
        return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    from matplotlib.figure import Figure     # here: optional dependency (viz extra), loaded when a figure is drawn

    n, channels, _ = shown.shape
    fig = Figure(figsize=(7, 1.4 * n + 0.8))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)
    for k, ax in enumerate(axes[:, 0]):
        for c in range(channels):
            ax.plot(shown[k, c], lw=1, color=np.array(COLOURS[c % len(COLOURS)]) / 255, label=f"channel {c}")
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel(f"sample {k}")
    axes[-1, 0].set_xlabel("position")
    if channels > 1:
        axes[0, 0].legend(loc="upper right", fontsize="small")
    if title:
        fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
