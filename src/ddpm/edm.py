"""The EDM formulation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): a network F trained in sigma space with preconditioning, log-normal noise levels and a
per-level loss weight.

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))            (Eq. 7)
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)                                       (Table 1)
    c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4
    ln sigma ~ N(P_mean, P_std^2), P_mean = -1.2, P_std = 1.2                              (Table 1, training)
    L = E[ lambda(sigma) || D(x0 + sigma n; sigma) - x0 ||^2 ],
        lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2                    (Eq. 2, Table 1)

The network is ddpm's U-Net unchanged: c_noise (a float per sample) goes where a timestep goes,
into its sinusoidal embedding (``ddpm.models.unet.timestep_embedding`` takes floats), as EDM feeds
it to ADM's. The network never sees sigma_data or the loss; :class:`EDMDenoiser` is a
:class:`~ddpm.sigmas.SigmaDenoiser`, the same interface as a ddpm model read in sigma space, so the
sigma samplers and the exact likelihood serve both. :class:`EDMLoss` has the interface the training
loop calls on every loss (``ddpm.losses``), with the per-sample sigma in place of the timestep.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .denoiser import model_output
from .errors import ConfigError
from .losses import FORMULATION_LOSSES, Loss
from .sigmas import SigmaDenoiser, _column

__all__ = ["FORMULATIONS", "SIGMA_DATA", "P_MEAN", "P_STD", "SIGMA_MIN", "SIGMA_MAX", "preconditioning",
           "edm_denoise", "EDMDenoiser", "loss_weight", "draw_sigmas", "EDMLoss"]

FORMULATIONS = ("ddpm", "edm")
SIGMA_DATA = 0.5                        # Table 1: the data's standard deviation (images in [-1, 1])
P_MEAN, P_STD = -1.2, 1.2               # Table 1: ln sigma ~ N(P_mean, P_std^2) in training
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0      # Sec. 5 / Table 1: the sampling range


def preconditioning(sigma, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) at ``sigma`` (a float or a tensor), EDM Table 1."""
    if torch.is_tensor(sigma):
        total = sigma ** 2 + sigma_data ** 2
        return sigma_data ** 2 / total, sigma * sigma_data / total.sqrt(), 1.0 / total.sqrt(), sigma.log() / 4
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / math.sqrt(total), 1.0 / math.sqrt(total), math.log(sigma) / 4


def edm_denoise(net: Callable, x: torch.Tensor, sigma, *, sigma_data: float = SIGMA_DATA,
                model_kwargs: dict | None = None) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)  (Eq. 7); ``sigma`` a float or a per-sample tensor [B]."""
    sigma_b = (sigma.to(device=x.device, dtype=torch.float32).reshape(-1) if torch.is_tensor(sigma) and sigma.ndim
               else torch.full((x.shape[0],), float(sigma), device=x.device))
    if bool((sigma_b <= 0).any()):
        raise ConfigError("EDM's denoiser needs sigma > 0 (c_noise = ln(sigma) / 4)")
    c_skip, c_out, c_in, c_noise = preconditioning(sigma_b, sigma_data)
    F = model_output(net, x * _column(c_in, x), c_noise, model_kwargs=model_kwargs)
    if F.shape[1] != x.shape[1]:
        raise ConfigError(f"an EDM network predicts {x.shape[1]} channels; this one has {F.shape[1]}")
    return _column(c_skip, x) * x + _column(c_out, x) * F.to(x.dtype)


class EDMDenoiser(SigmaDenoiser):
    """An EDM-trained network as D(x; sigma) for the sigma samplers and the likelihood.

    With ``guidance_scale`` w, classifier-free guidance on the denoised image:
    D = D_uncond + w (D_cond - D_uncond) (Ho & Salimans 2022, Eq. 6 written for D, which is affine in
    eps at fixed x and sigma), D_cond with ``model_kwargs``, D_uncond with ``uncond_kwargs``.
    """

    def __init__(self, net: Callable, *, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX, model_kwargs: dict | None = None,
                 guidance_scale: float | None = None, uncond_kwargs: dict | None = None):
        if not 0.0 < sigma_min < sigma_max or sigma_data <= 0:
            raise ConfigError(f"EDM needs 0 < sigma_min < sigma_max and sigma_data > 0; got {sigma_min}, "
                              f"{sigma_max}, {sigma_data}")
        if guidance_scale is not None and uncond_kwargs is None:
            raise ConfigError("classifier-free guidance needs uncond_kwargs (the model's unconditional inputs)")
        self.net, self.sigma_data, self.sigma_min, self.sigma_max = net, sigma_data, sigma_min, sigma_max
        self.model_kwargs, self.guidance_scale, self.uncond_kwargs = model_kwargs, guidance_scale, uncond_kwargs

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        cond = edm_denoise(self.net, x, sigma, sigma_data=self.sigma_data, model_kwargs=self.model_kwargs)
        if self.guidance_scale is None:
            return cond
        uncond = edm_denoise(self.net, x, sigma, sigma_data=self.sigma_data, model_kwargs=self.uncond_kwargs)
        return uncond + self.guidance_scale * (cond - uncond)


def loss_weight(sigma, sigma_data: float = SIGMA_DATA):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2  (Table 1): 1 / c_out^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def draw_sigmas(batch_size: int, generator: torch.Generator, p_mean: float = P_MEAN,
                p_std: float = P_STD) -> torch.Tensor:
    """sigma = exp(P_mean + P_std n), n ~ N(0, 1): log-normal training levels (Table 1), float32 [B]."""
    n = torch.randn(batch_size, generator=generator, device=generator.device)
    return (p_mean + p_std * n).exp()


class EDMLoss(Loss):
    """EDM's training loss per sample: lambda(sigma) || D(x0 + sigma n; sigma) - x0 ||^2, mean over pixels.

    The training loop's interface (``ddpm.losses``): ``draw_timesteps`` returns the per-sample sigmas
    (float32 [B], log-normal) in place of timesteps, and no extra weights; ``losses(net, x0, sigma,
    noise)`` the weighted per-sample losses [B]; ``draw_extras`` and ``observe`` are the defaults
    (nothing drawn, nothing learned). There is no discrete schedule (``schedule`` is None).
    """

    def __init__(self, *, sigma_data: float = SIGMA_DATA, p_mean: float = P_MEAN, p_std: float = P_STD):
        super().__init__(None)
        if sigma_data <= 0 or p_std <= 0:
            raise ConfigError(f"EDM's loss needs sigma_data > 0 and P_std > 0; got {sigma_data}, {p_std}")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def draw_timesteps(self, batch_size: int, generator: torch.Generator,
                       device: torch.device | str) -> tuple[torch.Tensor, None]:
        return draw_sigmas(batch_size, generator, self.p_mean, self.p_std).to(device), None

    def losses(self, net: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
               model_kwargs: dict | None = None, **extras) -> torch.Tensor:
        if extras:
            raise ConfigError(f"EDM's loss takes no extras; got {', '.join(extras)}")
        sigma = t.to(device=x0.device, dtype=torch.float32)
        x = x0 + _column(sigma, x0) * noise                                        # x = y + n, n ~ N(0, sigma^2 I)
        D = edm_denoise(net, x, sigma, sigma_data=self.sigma_data, model_kwargs=model_kwargs)
        mse = (D - x0).pow(2).mean(dim=tuple(range(1, x0.ndim)))
        return loss_weight(sigma, self.sigma_data) * mse                           # Eq. 2 with lambda(sigma)


FORMULATION_LOSSES["edm"] = lambda config: EDMLoss(sigma_data=config.sigma_data, p_mean=config.p_mean,
                                                   p_std=config.p_std)        # ddpm.losses.make_loss's
