"""The argparse types of the ``ddpm`` command: each value is checked and converted where it is parsed,
once, and a bad one is one usage line (the ``ddpm.cli.parser*`` modules, ``ddpm.cli.ema``)."""

from __future__ import annotations

import argparse

__all__ = ["number", "positive_int", "nonneg_int", "nonneg_float", "positive_float", "finite_nonneg",
           "finite_positive", "timesteps_type", "seed_type"]


def number(kind: type, ok, expected: str):
    """An argparse type: ``kind(text)`` for which ``ok(value)`` holds, else a one-line usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = number(int, lambda v: v >= 1, "a positive integer")
nonneg_int = number(int, lambda v: v >= 0, "an integer >= 0")
nonneg_float = number(float, lambda v: v >= 0, "a number >= 0")
positive_float = number(float, lambda v: v > 0, "a positive number")
finite_nonneg = number(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
finite_positive = number(float, lambda v: 0 < v < float("inf"), "a finite positive number")

# T and seeds are bounded as they are parsed: a schedule of 10^9 steps would exhaust the memory before
# any message. The bounds are those of ddpm.config (MAX_TIMESTEPS, SEED_LIMIT).
timesteps_type = number(int, lambda v: 2 <= v <= 100_000, "an integer T from 2 to 100,000")
seed_type = number(int, lambda v: 0 <= v < 2 ** 63, "an integer seed from 0 to 2^63 - 1")
