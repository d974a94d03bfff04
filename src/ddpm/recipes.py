"""The training recipe of each preset, and the preset and recipe chosen for a user's own data.

:data:`RECIPES` holds each preset's data and train defaults, the lowest layer of a run's
configuration (:func:`ddpm.resolve.resolve_train_config`). A folder or .npz trained without
``--preset`` gets a preset and recipe that are a fixed function of the image size, channel count
and number of images, so the same data always gets the same run (:func:`choose`):

* the preset by the shorter image side s: ``digits`` up to 16 pixels, ``mnist`` up to 64
  (``cifar10`` from 50,000 images on, the paper's CIFAR-10 case), ``cifar10`` up to 128 and
  ``celebahq256`` above; a preset whose levels do not halve the image evenly gives way to the
  next smaller one that does;
* the steps from :data:`STEPS` by s and the number of images, the batch no larger than the
  dataset, the learning rate of the preset's own recipe, warm-up at most a tenth of the steps;
  the recipe's diffusion options (the ``mnist`` recipe's min-SNR weighting) come with the preset.

How long the chosen run takes is estimated in :mod:`ddpm.estimates`; it is not part of the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DataError
from .models import preset_config

__all__ = ["DEFAULT_PRESET_FOR_DATA", "RECIPES", "AutoChoice", "STEPS", "choose", "choose_sequences"]

# The U-Net preset used when --preset is not given, by dataset name.
DEFAULT_PRESET_FOR_DATA = {"digits": "digits", "mnist": "mnist", "fashion-mnist": "mnist", "cifar10": "cifar10"}

# The training recipe that goes with each preset: data and train defaults, which a TOML
# file (--config) and then command-line flags override.
RECIPES: dict[str, dict[str, dict]] = {
    "digits": {},                                  # the TrainConfig defaults are the digits run
    # lr 1e-3 (5e-4 before): faster progress on CPU budgets; min-SNR-5 weighting (Hang et al. 2023; uniform
    # L_simple before): a lower fast FID at 12 CPU-minutes and after 10,000 steps (benchmarks/RESULTS.md,
    # "Time to quality" and "min-SNR over 10,000 steps"). A constant rate after the warm-up: cosine decay won at
    # 12 CPU-minutes but not after 10,000 steps ("The learning-rate schedules over 10,000 steps").
    "mnist": {"train": dict(batch_size=64, lr=1e-3, warmup_steps=200, steps=10_000,
                            checkpoint_every=2_000, sample_every=2_000),
              "diffusion": dict(loss_weighting="min-snr")},
    # Ho et al. 2020, Appendix B: batch 128, Adam 2e-4, 5,000 warm-up steps, EMA 0.9999,
    # random horizontal flips, 800k steps (dropout 0.1 is part of the cifar10 model preset).
    "cifar10": {"train": dict(batch_size=128, lr=2e-4, warmup_steps=5_000, ema_decay=0.9999, steps=800_000,
                              log_every=100, checkpoint_every=10_000, sample_every=10_000,
                              milestone_every=100_000),
                "data": dict(hflip=True)},
    # The 256x256 models: batch 64, 2e-5 (CelebA-HQ), 0.5M steps.
    "celebahq256": {"train": dict(batch_size=64, lr=2e-5, warmup_steps=5_000, steps=500_000, log_every=100,
                                  checkpoint_every=10_000, sample_every=10_000, milestone_every=100_000),
                    "data": dict(hflip=True)},
}


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
    h, w = image_size
    side = min(h, w)
    preset, why = next((name, why) for limit, name, why in _BY_SIDE if side <= limit)
    if preset == "mnist" and num_images >= _LARGE_DATASET:
        preset, why = "cifar10", f"up to 64 pixels a side and {_LARGE_DATASET:,} images or more"
    preset, why = _fitting(preset, why, h, w)
    steps = _steps(side, num_images)
    train = _chosen_train(preset, steps, num_images)
    batch = train["batch_size"]
    reason = (f"{num_images:,} image(s) of {channels}x{h}x{w}: preset {preset!r} ({why}{_adapted(preset, channels)}), "
              f"its recipe {steps:,} steps at batch {batch}")
    return AutoChoice(preset, train, reason)


def _adapted(preset: str, channels: int) -> str:
    """What the preset is when its name alone would mislead (an MNIST-sized U-Net for RGB photos), else ""."""
    if channels == preset_config(preset, image_size=None).channels:
        return ""
    return f"; the {preset}-sized U-Net with {channels} channel{'s' if channels > 1 else ''}"


def _fitting(preset: str, why: str, h: int, w: int) -> tuple[str, str]:
    """``preset``, or the next smaller one whose levels halve an H x W image evenly."""
    chosen = preset
    while chosen is not None:
        factor = preset_config(chosen, image_size=None).downsample_factor
        if h % factor == 0 and w % factor == 0:
            return chosen, why if chosen == preset else f"{preset} would need sides divisible by " \
                f"{preset_config(preset, image_size=None).downsample_factor}"
        chosen = _SMALLER[chosen]
    raise DataError(f"images of {h}x{w} have an odd side, which no preset's levels can halve; resize them "
                    f"with --image-size (e.g. {h + h % 2} {w + w % 2})")


def _chosen_train(preset: str, steps: int, count: int) -> dict:
    """The train options of an automatic choice: ``steps``, the preset recipe's batch (at most ``count``) and
    learning rate, its warm-up capped at a tenth of the run, five checkpoints and sample grids."""
    recipe = RECIPES.get(preset, {}).get("train", {})
    return {"steps": steps, "batch_size": min(recipe.get("batch_size", 128), count), "lr": recipe.get("lr", 1e-3),
            "warmup_steps": min(recipe.get("warmup_steps", 0), steps // 10),
            "checkpoint_every": max(1, steps // 5), "sample_every": max(1, steps // 5)}


def _steps(side: int, num_images: int) -> int:
    row = next(steps for limit, steps in STEPS.items() if side <= limit)
    column = sum(num_images >= edge for edge in _COUNT_EDGES)
    return row[column]


# Sequences [N, C, L] (a 1D U-Net): the shape of the small presets, by length.
_BY_LENGTH = ((64, "digits", "up to 64 positions"), (float("inf"), "mnist", "above 64 positions"))


def choose_sequences(length: int, channels: int, num_sequences: int) -> AutoChoice:
    """The preset (its shape, as a 1D U-Net) and recipe for ``num_sequences`` sequences of ``channels`` x L:
    ``digits`` (two levels) up to 64 positions, ``mnist`` (three) above, or the smaller one whose levels
    halve L evenly; the steps of :data:`STEPS`'s first row by count (deterministic)."""
    preset, why = next((name, why) for limit, name, why in _BY_LENGTH if length <= limit)
    while preset is not None and length % preset_config(preset, image_size=None).downsample_factor:
        preset, why = _SMALLER[preset], f"{preset} would need a length divisible by 4"
    if preset is None:
        raise DataError(f"sequences of odd length {length}, which no preset's levels can halve; pad or crop "
                        f"them to an even length (e.g. {length + 1})")
    steps = _steps(1, num_sequences)
    train = _chosen_train(preset, steps, num_sequences)
    batch = train["batch_size"]
    reason = (f"{num_sequences:,} sequence(s) of {channels}x{length}: the 1D U-Net of preset {preset!r}'s shape "
              f"({why}), its recipe {steps:,} steps at batch {batch}")
    return AutoChoice(preset, train, reason)
