"""Line charts with matplotlib (the ``viz`` extra): the loss curve of a run directory, and the axes
that ``ddpm viz`` shares with it.

Ticks are matplotlib's own: its locators choose the values and its formatters write them (steps
as plain integers with thousands separators, a log axis in powers of ten). matplotlib is imported
only when a chart is drawn; without it :func:`line_chart` draws nothing and says so once.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from .fileio import atomic_write

__all__ = ["line_chart", "draw_series", "have_matplotlib", "note_missing_matplotlib", "DPI"]

DPI = 100
Series = dict[str, tuple[Sequence[float], Sequence[float]]]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def note_missing_matplotlib(what: str) -> None:
    """One line on stderr, once per process and ``what``, instead of a chart."""
    print(f"ddpm: note: matplotlib is not installed, so {what} is skipped (pip install 'ddpm[viz]')",
          file=sys.stderr)


def _finite(xs: Sequence[float], ys: Sequence[float], log_y: bool) -> tuple[list[float], list[float]]:
    """The points with a finite y (and, on a log axis, a positive one)."""
    kept = [(float(x), float(y)) for x, y in zip(xs, ys)
            if y is not None and math.isfinite(float(y)) and (float(y) > 0 or not log_y)]
    return [x for x, _ in kept], [y for _, y in kept]


def draw_series(ax, series: Series, *, xlabel: str = "", ylabel: str = "", log_y: bool = False,
                title: str = "", integer_x: bool = True) -> None:
    """Each (x, y) series as a line on ``ax``, non-finite points dropped; integer x ticks (steps) unless
    ``integer_x`` is off.

    With ``log_y`` non-positive points are dropped too, and the y axis is logarithmic when the
    values span a factor of 10 or more.
    """
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter     # here: optional dependency (viz extra)

    values = []
    for name, (xs, ys) in series.items():
        x, y = _finite(xs, ys, log_y)
        ax.plot(x, y, label=name, marker="o" if len(x) == 1 else None)
        values += y
    # A log axis only where it helps: over less than a factor of 10 its ticks are few and awkward.
    if log_y and values and max(values) >= 10 * min(values):
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", useOffset=False)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both" if log_y else "major")
    if len(series) > 1 and ax.has_data():
        ax.legend(fontsize="small")


def line_chart(series: Series, path: str | os.PathLike, *, title: str = "", xlabel: str = "", ylabel: str = "",
               log_y: bool = False, size: tuple[int, int] = (800, 450), integer_x: bool = True) -> Path | None:
    """Draw the series in one chart of ``size`` pixels and save it as PNG, atomically.

    Returns the path, or None (after a one-line note) when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure        # here: optional dependency (viz extra)
    except ImportError:
        note_missing_matplotlib(Path(path).name)
        return None
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    draw_series(fig.subplots(), series, xlabel=xlabel, ylabel=ylabel, log_y=log_y, title=title, integer_x=integer_x)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
