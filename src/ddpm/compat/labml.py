"""labml's annotated ``DenoiseDiffusion`` on this project's schedule tables and free functions.

Code written against ``labml_nn.diffusion.ddpm`` runs with its import changed::

    from ddpm.compat.labml import DenoiseDiffusion

    diffusion = DenoiseDiffusion(eps_model=model, n_steps=1000, device=device)
    loss = diffusion.loss(x0)                         # x0 as labml passes it
    x = diffusion.p_sample(x, t)                      # one reverse step, sigma_t^2 = beta_t

The process is the paper's with beta from 1e-4 to 0.02 and sigma_t^2 = beta_t (``variance="beta"``
here); the maths are :func:`ddpm.diffusion.q_mean_variance`, :func:`ddpm.diffusion.q_sample`,
:func:`ddpm.denoiser.p_mean_variance` and :func:`ddpm.losses.training_losses`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..denoiser import p_mean_variance
from ..diffusion import q_mean_variance
from ..diffusion import q_sample as _q_sample
from ..losses import training_losses
from ..schedules import NoiseSchedule, extract

__all__ = ["DenoiseDiffusion"]


class DenoiseDiffusion:
    """labml's names: ``beta``, ``alpha``, ``alpha_bar``, ``sigma2`` (= ``beta``), ``n_steps``;
    ``q_xt_x0``, ``q_sample``, ``p_sample`` (which, as there, adds noise at every step) and ``loss``."""

    def __init__(self, eps_model: nn.Module, n_steps: int, device: torch.device | str):
        self.eps_model, self.n_steps = eps_model, n_steps
        # beta from 1e-4 to 0.02 (Ho et al. 2020, Sec. 4), in float64 as every table here.
        self.schedule = NoiseSchedule(betas=torch.linspace(1e-4, 0.02, n_steps, dtype=torch.float64)).to(device)
        self.beta = self.schedule.betas.float()
        self.alpha = self.schedule.alphas.float()
        self.alpha_bar = self.schedule.alphas_cumprod.float()
        self.sigma2 = self.beta

    def q_xt_x0(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_t | x_0) (Eq. 4)."""
        mean, var, _ = q_mean_variance(self.schedule, x0, t)
        return mean, var

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (Eq. 4)."""
        return _q_sample(self.schedule, x0, t, torch.randn_like(x0) if eps is None else eps)

    def p_sample(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_{t-1} = mu_theta(x_t, t) + sigma_t z with sigma_t^2 = beta_t (Eq. 11; Algorithm 2, line 4)."""
        mean = p_mean_variance(self.eps_model, self.schedule, xt, t, variance="beta", clip_denoised=False)["mean"]
        return mean + extract(self.sigma2, t, xt).sqrt() * torch.randn(xt.shape, device=xt.device)

    def loss(self, x0: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """L_simple (Eq. 14): t uniform in {0, ..., n_steps - 1}, the mean squared error of the noise."""
        t = torch.randint(0, self.n_steps, (x0.shape[0],), device=x0.device, dtype=torch.long)
        noise = torch.randn_like(x0) if noise is None else noise
        return training_losses(self.eps_model, self.schedule, x0, t, noise).mean()
