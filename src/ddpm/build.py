"""Building a run's network and diffusion from its configuration.

:func:`build_model` is the U-Net a :class:`~ddpm.config.RunConfig` describes (the diffusion options
decide its channel counts), refused before any weight is allocated when it cannot fit the machine
(:func:`model_bytes`, counted on the meta device); :func:`build_diffusion` puts a
:class:`~ddpm.gaussian_diffusion.GaussianDiffusion` around it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .config import RunConfig
from .device import check_fits
from .errors import ConfigError
from .gaussian_diffusion import GaussianDiffusion
from .models import Unet, UnetConfig
from .models.unet1d import Unet1D, Unet1DConfig

__all__ = ["build_model", "build_diffusion", "model_bytes"]


def _unet1d(m: UnetConfig) -> Unet1D:
    """The sequence U-Net (``kind = "unet1d"``) with the shape fields of ``m``: the same dim, levels, blocks,
    attention levels, heads, dropout, GroupNorm groups and channel counts, over [B, C, L]."""
    return Unet1D(Unet1DConfig(channels=m.channels, dim=m.dim, dim_mults=m.dim_mults, num_res_blocks=m.num_res_blocks,
                               attention_levels=m.attention_levels, attention_heads=m.attention_heads,
                               dropout=m.dropout, norm_groups=m.norm_groups, in_channels=m.in_channels,
                               out_channels=m.out_channels))


def _unet(config: RunConfig) -> Unet | Unet1D:
    """The U-Net of ``config`` (images, or sequences when ``config.model.kind`` is unet1d), built on the
    current default device."""
    c, d, m = config.model.channels, config.diffusion, config.model
    extra = config.condition.input_channels if config.condition is not None else 0    # [x_t, (x0_prev), c]
    io = {"in_channels": (2 * c if d.self_condition else c) + extra, "out_channels": 2 * c if d.learned_variance else c}
    for key, value in io.items():
        if getattr(m, key) not in (None, value):
            raise ConfigError(f"model {key} = {getattr(m, key)} contradicts the diffusion options, which need {value}")
    network = _unet1d if m.kind == "unet1d" else Unet
    if io == {"in_channels": c, "out_channels": c}:
        return network(m)
    return network(replace(m, **io))


def model_bytes(config: RunConfig) -> int:
    """Bytes of the model's float32 parameters, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = _unet(config)
    return 4 * sum(p.numel() for p in model.parameters())


def build_model(config: RunConfig) -> Unet | Unet1D:
    """The U-Net that ``config`` describes (:class:`~ddpm.models.unet1d.Unet1D` for sequences).

    The diffusion options decide its channel counts, the network never learns why: 2C outputs
    with a learned variance (prediction, then the variance interpolation), 2C inputs with
    self-conditioning ([x_t, x0_prev]), and the image condition's channels after those
    (``config.condition.input_channels``). It is built on the CPU, so its weights must fit the
    machine's memory: that is checked first, on the meta device.
    """
    check_fits(model_bytes(config), "cpu", "this model's weights take")
    return _unet(config)


def build_diffusion(config: RunConfig, model: nn.Module | None = None, *, precision: str = "fp32") -> GaussianDiffusion:
    """A :class:`~ddpm.gaussian_diffusion.GaussianDiffusion` for ``config`` around ``model`` (built if None), with
    the checkpoint's sampler defaults (``config.sampling``) and the network's autocast ``precision``."""
    return GaussianDiffusion(model if model is not None else build_model(config), config=config.diffusion,
                             image_size=config.model.image_size, channels=config.model.channels,
                             sampling=config.sampling,
                             precision=precision, condition=config.condition)
