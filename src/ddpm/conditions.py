"""Image conditions: what an image-conditioned model sees beside x_t (SR3, Palette, Cascaded Diffusion).

The condition c is an image of the target's height and width, concatenated to the network's input
channels ([x_t, c], after the self-conditioning channels when those are on), as SR3 (Saharia et al.
2021, Sec. 2.1) and Palette (Saharia et al. 2022) do. Pixels are in [-1, 1], NCHW, like x_0.

* ``super-resolution``: c is the target area-downsampled by ``scale`` (the mean of each
  ``scale`` x ``scale`` block, so the low-resolution image is exactly what a camera of that
  resolution would record) and brought back to full size by bicubic interpolation (clamped to
  [-1, 1]). At sampling, the low-resolution image itself is given and upsampled the same way.
* ``colorize``: c is the target's luminance, ITU-R BT.601 (Y = 0.299 R + 0.587 G + 0.114 B).
* ``paired``: c comes from a second dataset, image for image (:func:`ddpm.data.pairs.load_pairs`).

Conditioning augmentation (Ho et al. 2021, Cascaded Diffusion Models, Sec. 3.2): in training, c is
noised with Gaussian noise of a standard deviation drawn per image uniformly in [0, ``noise``]; at
sampling a fixed level is chosen. The level is given to the network as one more constant input
channel, so it knows how much to trust c (the models of that paper are told the level as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError

TASKS = ("super-resolution", "colorize", "paired")
LUMA = (0.299, 0.587, 0.114)          # ITU-R BT.601
MAX_SCALE = 64
UPSAMPLING = "bicubic"


@dataclass(frozen=True)
class ImageCondition:
    """The image condition of a model: its task, the super-resolution scale, the condition's channel
    count, and the largest conditioning-augmentation level drawn in training (0: none)."""

    task: str
    channels: int
    scale: int | None = None
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or not 1 <= self.channels <= 64:
            raise ConfigError(f"the condition's channels must be an integer in 1..64, got {self.channels!r}")
        if self.task == "super-resolution":
            if isinstance(self.scale, bool) or not isinstance(self.scale, int) or not 2 <= self.scale <= MAX_SCALE:
                raise ConfigError(f"--scale must be an integer in 2..{MAX_SCALE} for super-resolution, "
                                  f"got {self.scale!r}")
        elif self.scale is not None:
            raise ConfigError(f"--scale is for super-resolution, not {self.task}")
        if not isinstance(self.noise, (int, float)) or not 0.0 <= float(self.noise) <= 1.0:
            raise ConfigError(f"--condition-noise must be in [0, 1], got {self.noise!r}")

    @property
    def input_channels(self) -> int:
        """Channels the condition adds to the network's input (the level's channel with augmentation)."""
        return self.channels + (1 if self.noise > 0 else 0)

    def check_image_size(self, image_size: tuple[int, int]) -> None:
        if self.task == "super-resolution" and any(side % self.scale for side in image_size):
            raise ConfigError(f"--scale {self.scale} does not divide the image size "
                              f"{image_size[0]}x{image_size[1]}")


def area_downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The mean of each ``scale`` x ``scale`` block (area resampling); H and W must be multiples of it."""
    if x.shape[-2] % scale or x.shape[-1] % scale:
        raise ConfigError(f"scale {scale} does not divide the image size {x.shape[-2]}x{x.shape[-1]}")
    return F.avg_pool2d(x, scale)


def upsample(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic interpolation to ``size``, clamped to the data range [-1, 1]."""
    return F.interpolate(low, size=tuple(size), mode=UPSAMPLING, align_corners=False).clamp(-1.0, 1.0)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]: Y = 0.299 R + 0.587 G + 0.114 B (the weights sum to 1, so [-1, 1] stays)."""
    if x.shape[1] != 3:
        raise ConfigError(f"colorize needs RGB targets (3 channels), got {x.shape[1]}")
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def condition_from_target(condition: ImageCondition, x0: torch.Tensor) -> torch.Tensor:
    """The condition a training target implies (super-resolution and colorize)."""
    if condition.task == "super-resolution":
        return upsample(area_downsample(x0, condition.scale), x0.shape[-2:])
    if condition.task == "colorize":
        return luminance(x0)
    raise ConfigError("paired conditions come from --condition-data, not from the targets")


def condition_from_input(condition: ImageCondition, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The condition of a given input at sampling: a low-resolution image is upsampled to ``size``."""
    if condition.task == "super-resolution":
        expected = (size[0] // condition.scale, size[1] // condition.scale)
        if tuple(image.shape[-2:]) == expected:
            return upsample(image, size)
        if tuple(image.shape[-2:]) != tuple(size):
            raise ConfigError(f"a super-resolution condition is {expected[0]}x{expected[1]} (or the full "
                              f"{size[0]}x{size[1]}), got {image.shape[-2]}x{image.shape[-1]}")
        return image
    if tuple(image.shape[-2:]) != tuple(size):
        raise ConfigError(f"the condition must be {size[0]}x{size[1]}, got {image.shape[-2]}x{image.shape[-1]}")
    return image


def augment(condition: ImageCondition, c: torch.Tensor, level: torch.Tensor | float | None,
            noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian conditioning augmentation: c + level * noise, and the level as one more channel.

    ``level`` is a per-image tensor [B] (training: drawn uniformly in [0, condition.noise]) or one
    float (sampling). Without augmentation (``condition.noise == 0``) c is returned unchanged.
    """
    if condition.noise <= 0:
        return c
    level = torch.as_tensor(level, dtype=c.dtype, device=c.device).reshape(-1, 1, 1, 1).expand(c.shape[0], 1, 1, 1)
    if noise is None:
        noise = torch.randn(c.shape, generator=generator, dtype=c.dtype, device=c.device)
    plane = level.expand(c.shape[0], 1, *c.shape[-2:])
    return torch.cat([c + level * noise, plane], dim=1)


def training_levels(condition: ImageCondition, batch: int, generator: torch.Generator | None = None,
                    device=None) -> torch.Tensor:
    """Per-image augmentation levels of a training batch, uniform in [0, condition.noise]."""
    return torch.rand(batch, generator=generator, device=device) * condition.noise


def check_condition(condition: ImageCondition | None, c: torch.Tensor | None, what: str = "this model") -> None:
    """One line when a condition is given to a model without one, or missing, or of the wrong channels."""
    if condition is None:
        if c is not None:
            raise ConfigError(f"{what} is not image-conditioned: it takes no condition (train with --task)")
        return
    if c is None:
        raise ConfigError(f"{what} is image-conditioned ({condition.task}): give a condition image")
    if c.ndim != 4 or c.shape[1] != condition.channels:
        raise ConfigError(f"{what} takes {condition.channels}-channel conditions ({condition.task}); got "
                          f"{c.shape[1] if c.ndim == 4 else 'a'} {'channel(s)' if c.ndim == 4 else 'tensor of shape '}"
                          f"{'' if c.ndim == 4 else list(c.shape)}")


def prepare_condition(condition: ImageCondition, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Given conditions in [0, 1] ([B, C_c, h, w]; low resolution or full size for super-resolution)
    as the network's c: model range [-1, 1], full size ``size``, not yet augmented."""
    check_condition(condition, images)
    return condition_from_input(condition, images.float() * 2.0 - 1.0, size)


def sampling_augmentation(condition: ImageCondition, c: torch.Tensor, level: float,
                          generators: list[torch.Generator] | torch.Generator | None = None) -> torch.Tensor:
    """c augmented at one fixed ``level`` for sampling (Ho et al. 2021, Sec. 3.2): the noise of image k
    from its own generator (``generators[k]``), so an image does not depend on its batch; one
    generator draws the batch's noise at once."""
    if not 0.0 <= float(level) <= 1.0:
        raise ConfigError(f"--condition-noise must be in [0, 1], got {level!r}")
    if condition.noise <= 0:
        if level:
            raise ConfigError("this model was trained without conditioning augmentation (--condition-noise 0); "
                              "it takes no sampling level")
        return c
    if generators is None or isinstance(generators, torch.Generator):
        noise = torch.randn(c.shape, generator=generators, dtype=c.dtype, device=c.device)
    else:
        noise = torch.stack([torch.randn(c.shape[1:], generator=g) for g in generators]).to(c.device, c.dtype)
    return augment(condition, c, float(level), noise)


def training_condition(condition: ImageCondition, x0: torch.Tensor, paired: torch.Tensor | None,
                       generator: torch.Generator | None = None, *, batch: int | None = None,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
    """The network's c for training targets x0 (model range): the paired rows, else implied by x0
    (:func:`condition_from_target`), augmented at levels uniform in [0, ``condition.noise``].

    The levels and noise are drawn from ``generator`` for the whole batch of ``batch`` images, then
    ``rows`` of them kept (the rows of x0 in that batch; None: all), as the training loop draws for
    its global batch.
    """
    c = paired if paired is not None else condition_from_target(condition, x0)
    if condition.noise <= 0:
        return c
    levels = training_levels(condition, x0.shape[0] if batch is None else batch, generator, x0.device)
    noise = torch.randn((levels.shape[0], *c.shape[1:]), generator=generator, device=x0.device, dtype=c.dtype)
    if rows is not None:
        levels, noise = levels[rows], noise[rows]
    return augment(condition, c, levels, noise)


def given_condition(condition: ImageCondition, targets: torch.Tensor) -> torch.Tensor:
    """The condition a user would give for ``targets`` (in [0, 1]), in [0, 1]: the low-resolution image
    (super-resolution) or the luminance (colorize). Both maps are linear with weights summing to 1,
    so they commute with the map [0, 1] -> [-1, 1] and equal the training condition's source."""
    if condition.task == "super-resolution":
        return area_downsample(targets, condition.scale)
    return luminance(targets)


def shown_condition(condition: ImageCondition, given: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A given condition in [0, 1] at the samples' size, as the network sees it (before augmentation)."""
    return (condition_from_input(condition, given.float() * 2.0 - 1.0, size) + 1.0) / 2.0
