"""Estimates of what a run costs before it runs: its memory and its time.

:func:`check_training_memory` refuses a run whose lower-bound memory
(:func:`training_bytes_at_least`) exceeds the device's, before anything is built;
:func:`estimate_seconds_per_step` times a few training steps of a chosen model on the device for
the line printed with an automatic choice (:func:`choice_line`, :func:`ddpm.recipes.choose`), and for
the warning before a run estimated to last over a day (:func:`long_run_warning`).
"""

from __future__ import annotations

import time

import torch

from .build import build_diffusion, model_bytes
from .config import RunConfig
from .device import check_fits

__all__ = ["training_bytes_at_least", "check_training_memory", "estimate_seconds_per_step", "format_duration",
           "choice_line", "LONG_RUN_SECONDS", "MIN_TIMED_IMAGES", "worth_timing", "long_run_warning",
           "duration_lines"]

# A run estimated to last longer than this says so before it starts: a warning, not a refusal (long
# runs are legitimate; the user may have meant fewer steps or a smaller model, or may want --time-limit).
LONG_RUN_SECONDS = 24 * 3600
# Runs of fewer images x steps than this are not timed: to last a day, each image would need more than
# 8.6 s per step, which no model that passes the memory check takes.
MIN_TIMED_IMAGES = 10_000


def training_bytes_at_least(config: RunConfig) -> int:
    """A lower bound on training memory: weights, gradients, Adam's two moments and the EMA (5 copies
    of the parameters), plus the activations of the top level's residual blocks kept for the backward pass."""
    m, tc = config.model, config.train
    h, w = m.image_size
    blocks = 1 if tc.grad_checkpointing else 2 * m.num_res_blocks + 1
    activations = 4 * tc.batch_size * m.dim * m.dim_mults[0] * h * w * blocks
    return 5 * model_bytes(config) + activations


def check_training_memory(config: RunConfig, device) -> None:
    """Refuse, before anything is built, a run whose lower-bound memory exceeds the device's."""
    check_fits(training_bytes_at_least(config), device, "training this model takes")


def estimate_seconds_per_step(config: RunConfig, device: torch.device, *, images: int = 2, repeats: int = 2) -> float:
    """Seconds per optimizer step of ``config`` on ``device``, timed on ``images`` random images and
    scaled to the run's global batch (a rough figure: time grows about linearly with the batch)."""
    diffusion = build_diffusion(config).to(device).train()
    x = torch.rand(images, config.model.channels, *config.model.image_size, device=device)

    def step() -> None:
        diffusion(x).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()                                            # warm-up: allocations, kernel choice
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    per_image = (time.perf_counter() - start) / (repeats * images)
    return per_image * config.train.batch_size * config.train.grad_accum


def format_duration(seconds: float) -> str:
    """``"about 3 min"``, ``"about 2.5 h"``, ``"about 4 days"``."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"about {seconds / 3600:.1f} h"
    return f"about {seconds / 86400:.0f} days"


def choice_line(reason: str, steps: int, seconds_per_step: float | None, device: str) -> str:
    """The one line that says what was chosen (``reason``, :attr:`ddpm.recipes.AutoChoice.reason`), about how long
    ``steps`` steps take, and how to override it."""
    estimate = f"; {format_duration(seconds_per_step * steps)} on {device}" if seconds_per_step is not None else ""
    return (f"ddpm: no --preset given: chose for {reason}{estimate} "
            f"(override with --preset, --steps, --batch-size or a model flag such as --dim)")


def worth_timing(config: RunConfig) -> bool:
    """Whether a run is long enough in images x steps that it could last a day (:data:`MIN_TIMED_IMAGES`)."""
    tc = config.train
    return tc.steps * tc.batch_size * tc.grad_accum >= MIN_TIMED_IMAGES


def long_run_warning(config: RunConfig, seconds_per_step: float, device: str) -> str | None:
    """A warning line when ``config.train.steps`` steps take over :data:`LONG_RUN_SECONDS`, unless a time
    limit of at most a day stops the run first; else None."""
    total = seconds_per_step * config.train.steps
    limit = config.train.time_limit * 60
    if total <= LONG_RUN_SECONDS or 0 < limit <= LONG_RUN_SECONDS:
        return None
    return (f"ddpm: warning: this run is estimated to take {format_duration(total)} on {device} "
            f"({config.train.steps:,} steps of about {seconds_per_step:.2g} s); --time-limit MINUTES stops it in "
            "time, or choose fewer --steps, a smaller --batch-size or a smaller model")


def duration_lines(config: RunConfig, device: torch.device, *, dry_run: bool = False) -> list[str]:
    """The lines ``ddpm train`` prints before a new run: the automatic choice's (with its estimate) and
    the warning of a run estimated at over a day, each ending in a newline. The run is timed on the
    device only when it could be that long (:func:`worth_timing`), and not for a dry run without a choice."""
    timed = config.choice or (worth_timing(config) and not dry_run)
    seconds_per_step = estimate_seconds_per_step(config, device) if timed else None
    lines = [choice_line(config.choice, config.train.steps, seconds_per_step, device.type)] if config.choice else []
    warning = seconds_per_step is not None and long_run_warning(config, seconds_per_step, device.type)
    return [line + "\n" for line in lines + ([warning] if warning else [])]
