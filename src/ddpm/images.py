"""Image grids and sample files, written atomically with numpy and Pillow."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .fileio import atomic_write
from .sequence_plots import sequence_grid

__all__ = ["grid_scale", "make_grid", "class_grid_layout", "label_rows", "side_by_side", "save_png", "save_npz"]

MIN_PER_CLASS = 4        # a class-conditional grid shows at least this many images of each class it shows


def grid_scale(h: int, w: int) -> int:
    """The default magnification of :func:`make_grid`: small images brought up to at least 64 pixels."""
    return max(1, math.ceil(64 / max(h, w)))


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2, scale: int | None = None,
              pad_value: int = 255) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [rows*H, nrow*W, C] image.

    ``nrow`` defaults to a square-ish grid; ``scale`` (nearest neighbour) defaults to
    whatever brings small images up to at least 64 pixels, so 8x8 digits stay visible.
    """
    if images.ndim == 3 and images.dtype == np.float32:     # a sequence model's samples: line plots
        return sequence_grid(images, nrow=nrow)
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


def class_grid_layout(num_classes: int, num_samples: int) -> tuple[list[int], int]:
    """(label of each image, images per row) for a grid of ``num_samples`` images in which each
    class fills whole rows, so rows can be labelled by class.

    The first ``min(num_classes, num_samples // MIN_PER_CLASS)`` classes are shown (with fewer
    than 2 x MIN_PER_CLASS images, up to one class per image), each with the same number of
    images; a class with more images than twice a square grid's side wraps onto several rows of
    that side. 64 images of 2 classes: 8 rows of 8, 4 rows per class; of 10 classes: 10 rows of
    6; of 100 classes: the first 16 classes, in rows of 4.
    """
    side = max(1, math.ceil(math.sqrt(num_samples)))
    few = num_samples < 2 * MIN_PER_CLASS                 # too few to give each class MIN_PER_CLASS: one row each
    shown = max(1, min(num_classes, num_samples if few else num_samples // MIN_PER_CLASS))
    per_class = max(1, num_samples // shown)
    nrow = per_class if per_class <= 2 * side else side
    per_class -= per_class % nrow
    return [c for c in range(shown) for _ in range(per_class)], nrow


def label_rows(grid: np.ndarray, labels: list[str], padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """``grid`` (from :func:`make_grid` with the same ``padding``) with ``labels[r]`` written left of row r;
    ``labels`` has one entry per grid row (``""``: none)."""
    cell = (grid.shape[0] - padding) // max(1, len(labels)) - padding
    width = 6 * max((len(label) for label in labels), default=0) + 2 * padding
    channels = grid.shape[2]
    canvas = np.full((grid.shape[0], width + grid.shape[1], channels), pad_value, np.uint8)
    canvas[:, width:] = grid
    pil = Image.fromarray(canvas[:, :, 0] if channels == 1 else canvas)
    draw = ImageDraw.Draw(pil)
    for r, label in enumerate(labels):
        if label:
            draw.text((padding, padding + r * (cell + padding) + max(0, (cell - 10) // 2)), label,
                      fill=0 if channels == 1 else (0,) * channels)
    out = np.asarray(pil)
    return out[:, :, None] if out.ndim == 2 else out


def caption_below(image: np.ndarray, text: str, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """``image`` (uint8 [H, W, C]) with ``text`` written under it, wrapped to its width (6 pixels a character)."""
    from PIL import ImageDraw          # reason: drawing text only where a label is asked for

    lines = textwrap.wrap(text, max(8, (image.shape[1] - 2 * padding) // 6)) or [""]
    h, w, channels = image.shape
    canvas = np.full((h + 12 * len(lines) + 2 * padding, w, channels), pad_value, np.uint8)
    canvas[:h] = image
    pil = Image.fromarray(canvas[:, :, 0] if channels == 1 else canvas)
    draw = ImageDraw.Draw(pil)
    for k, line in enumerate(lines):
        draw.text((padding, h + padding + 12 * k), line, fill=0 if channels == 1 else (0,) * channels)
    out = np.asarray(pil)
    return out[:, :, None] if out.ndim == 2 else out


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
