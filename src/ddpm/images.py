"""Image grids and sample files, written atomically with numpy and Pillow."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import atomic_write

__all__ = ["grid_scale", "make_grid", "side_by_side", "save_png", "save_npz"]


def grid_scale(h: int, w: int) -> int:
    """The default magnification of :func:`make_grid`: small images brought up to at least 64 pixels."""
    return max(1, math.ceil(64 / max(h, w)))


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2, scale: int | None = None,
              pad_value: int = 255) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [rows*H, nrow*W, C] image.

    ``nrow`` defaults to a square-ish grid; ``scale`` (nearest neighbour) defaults to
    whatever brings small images up to at least 64 pixels, so 8x8 digits stay visible.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    if scale is None:
        scale = grid_scale(h, w)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[k]
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Save a uint8 [H, W, C] (C in 1, 3, 4) or [H, W] array as PNG, atomically."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    pil = Image.fromarray(image)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Save arrays to an uncompressed ``.npz``, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(path, write)


def side_by_side(images: list[np.ndarray], titles: list[str], gap: int = 12, title_height: int = 14) -> np.ndarray:
    """Place uint8 [H, W, C] images next to each other on white, each under its title."""
    from PIL import ImageDraw

    channels = max(im.shape[2] for im in images)
    images = [np.repeat(im, channels, axis=2) if im.shape[2] != channels else im for im in images]
    height = max(im.shape[0] for im in images) + title_height
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, channels), 255, np.uint8)
    x = 0
    for im in images:
        canvas[title_height:title_height + im.shape[0], x:x + im.shape[1]] = im
        x += im.shape[1] + gap
    pil = Image.fromarray(canvas[:, :, 0] if channels == 1 else canvas)
    draw = ImageDraw.Draw(pil)
    x = 0
    for im, title in zip(images, titles):
        draw.text((x + 2, 1), title, fill=0 if channels == 1 else (0,) * channels)
        x += im.shape[1] + gap
    out = np.asarray(pil)
    return out[:, :, None] if out.ndim == 2 else out
