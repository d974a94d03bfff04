"""Line charts drawn with Pillow (no plotting dependency): loss curves in run directories."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_write

__all__ = ["line_chart"]

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike, *,
               title: str = "", xlabel: str = "", ylabel: str = "", log_y: bool = False,
               size: tuple[int, int] = (800, 450)) -> Path:
    """Draw each (x, y) series as a line in one chart and save it as PNG, atomically.

    Non-finite points are dropped; with ``log_y`` the y axis is logarithmic (non-positive
    points dropped too).
    """
    width, height = size
    left, right, top, bottom = 70, 20, 30, 45
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def keep(y: float) -> bool:
        return math.isfinite(y) and (y > 0 or not log_y)

    clean = {name: [(float(x), math.log10(y) if log_y else float(y)) for x, y in zip(xs, ys) if keep(float(y))]
             for name, (xs, ys) in series.items()}
    points = [p for pts in clean.values() for p in pts]
    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if points:
        x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
        y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
        if x_hi == x_lo:
            x_hi = x_lo + 1
        if y_hi == y_lo:
            y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

        def to_px(x: float, y: float) -> tuple[float, float]:
            px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
            py = height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
            return px, py

        for v in _ticks(x_lo, x_hi):
            px, _ = to_px(v, y_lo)
            draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
            draw.text((px - 12, height - bottom + 6), _fmt(v), fill="black", font=font)
        for v in _ticks(y_lo, y_hi):
            _, py = to_px(x_lo, v)
            draw.line([left - 4, py, left, py], fill="black")
            draw.text((4, py - 6), _fmt(10 ** v if log_y else v), fill="black", font=font)
        for k, (name, pts) in enumerate(clean.items()):
            colour = COLOURS[k % len(COLOURS)]
            if len(pts) > 1:
                draw.line([to_px(x, y) for x, y in pts], fill=colour, width=2)
            elif pts:
                px, py = to_px(*pts[0])
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            draw.text((width - right - 150, top + 6 + 14 * k), f"-- {name}", fill=colour, font=font)
    draw.text(((width - len(xlabel) * 6) // 2, height - 16), xlabel, fill="black", font=font)
    draw.text((4, 8 if not title else 18), ylabel + (" (log)" if log_y else ""), fill="black", font=font)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
