"""The preset and recipe chosen for a folder or .npz trained without ``--preset``.

The choice is a fixed function of the image size, channel count and number of images, so the
same data always gets the same run (:func:`choose`):

* the preset by the shorter image side s: ``digits`` up to 16 pixels, ``mnist`` up to 64
  (``cifar10`` from 50,000 images on, the paper's CIFAR-10 case), ``cifar10`` up to 128 and
  ``celebahq256`` above; a preset whose levels do not halve the image evenly gives way to the
  next smaller one that does;
* the steps from :data:`STEPS` by s and the number of images, the batch no larger than the
  dataset, the learning rate of the preset's own recipe, warm-up at most a tenth of the steps;
  the recipe's diffusion options (the ``mnist`` recipe's min-SNR weighting) come with the preset
  (:func:`ddpm.config.resolve_train_config`).

:func:`estimate_seconds_per_step` times a few training steps of the chosen model on the
device, for the estimate printed with the choice; it is not part of the choice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import DataError

__all__ = ["AutoChoice", "STEPS", "choose", "choice_line", "estimate_seconds_per_step", "format_duration"]

# Optimizer steps by the shorter image side (rows: up to this many pixels) and the number of
# images (columns: fewer than 1,000 / 10,000 / 100,000, then more).
STEPS: dict[float, tuple[int, int, int, int]] = {
    16: (2_000, 5_000, 10_000, 20_000),
    32: (5_000, 10_000, 30_000, 100_000),
    64: (10_000, 20_000, 50_000, 200_000),
    128: (20_000, 50_000, 100_000, 300_000),
    float("inf"): (30_000, 100_000, 200_000, 500_000),
}
_COUNT_EDGES = (1_000, 10_000, 100_000)
_BY_SIDE = ((16, "digits", "up to 16 pixels a side"), (64, "mnist", "up to 64 pixels a side"),
            (128, "cifar10", "up to 128 pixels a side"), (float("inf"), "celebahq256", "above 128 pixels a side"))
_LARGE_DATASET = 50_000            # from here on, images up to 64 pixels get the paper's CIFAR-10 model
_SMALLER = {"celebahq256": "cifar10", "cifar10": "mnist", "mnist": "digits", "digits": None}


@dataclass(frozen=True)
class AutoChoice:
    """The chosen preset, the recipe's train options, and why, in words."""

    preset: str
    train: dict = field(default_factory=dict)
    reason: str = ""


def choose(image_size: tuple[int, int], channels: int, num_images: int) -> AutoChoice:
    """The preset and recipe for ``num_images`` images of ``channels`` x H x W (deterministic)."""
    from .config import RECIPES

    h, w = image_size
    side = min(h, w)
    preset, why = next((name, why) for limit, name, why in _BY_SIDE if side <= limit)
    if preset == "mnist" and num_images >= _LARGE_DATASET:
        preset, why = "cifar10", f"up to 64 pixels a side and {_LARGE_DATASET:,} images or more"
    preset, why = _fitting(preset, why, h, w)
    steps = _steps(side, num_images)
    recipe = RECIPES.get(preset, {}).get("train", {})
    batch = min(recipe.get("batch_size", 128), num_images)
    train = {"steps": steps, "batch_size": batch, "lr": recipe.get("lr", 1e-3),
             "warmup_steps": min(recipe.get("warmup_steps", 0), steps // 10),
             "checkpoint_every": max(1, steps // 5), "sample_every": max(1, steps // 5)}
    reason = (f"{num_images:,} image(s) of {channels}x{h}x{w}: preset {preset!r} ({why}), {steps:,} steps "
              f"at batch {batch}")
    return AutoChoice(preset, train, reason)


def _fitting(preset: str, why: str, h: int, w: int) -> tuple[str, str]:
    """``preset``, or the next smaller one whose levels halve an H x W image evenly."""
    from .models import preset_config

    chosen = preset
    while chosen is not None:
        factor = preset_config(chosen, image_size=None).downsample_factor
        if h % factor == 0 and w % factor == 0:
            return chosen, why if chosen == preset else f"{preset} would need sides divisible by " \
                f"{preset_config(preset, image_size=None).downsample_factor}"
        chosen = _SMALLER[chosen]
    raise DataError(f"images of {h}x{w} have an odd side, which no preset's levels can halve; resize them "
                    f"with --image-size (e.g. {h + h % 2} {w + w % 2})")


def _steps(side: int, num_images: int) -> int:
    row = next(steps for limit, steps in STEPS.items() if side <= limit)
    column = sum(num_images >= edge for edge in _COUNT_EDGES)
    return row[column]


def estimate_seconds_per_step(config, device, *, images: int = 2, repeats: int = 2) -> float:
    """Seconds per optimizer step of ``config`` on ``device``, timed on ``images`` random images and
    scaled to the run's global batch (a rough figure: time grows about linearly with the batch)."""
    import torch

    from .gaussian_diffusion import build_diffusion

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
    """The one line that says what was chosen (``reason``, :attr:`AutoChoice.reason`), about how long
    ``steps`` steps take, and how to override it."""
    estimate = f"; {format_duration(seconds_per_step * steps)} on {device}" if seconds_per_step is not None else ""
    return (f"ddpm: no --preset given: chose for {reason}{estimate} "
            f"(override with --preset, --steps, --batch-size or a model flag such as --dim)")
