"""Noise schedules: the betas and every coefficient derived from them.

All tables are built in float64 (the products over 1000 steps lose precision in
float32) and indexed by the 0-based timestep ``t`` (paper timestep = t + 1); see
``docs/notation.md``. The diffusion maths gathers them into the dtype of its
inputs (float32) with :func:`extract`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import ConfigError

__all__ = ["NoiseSchedule", "SCHEDULES", "linear_betas", "cosine_betas", "sigmoid_betas", "extract"]


def linear_betas(timesteps: int) -> torch.Tensor:
    """Ho et al. 2020, Sec. 4: beta from 1e-4 to 0.02 at T = 1000.

    For other T the end points are scaled by 1000 / T, as improved-diffusion does,
    so that the total amount of noise stays about the same.
    """
    scale = 1000.0 / timesteps
    if scale * 0.02 >= 1.0:
        raise ConfigError(f"the linear schedule needs T >= 21 (its last beta, 0.02 * 1000 / T, must stay "
                          f"below 1); got T = {timesteps}")
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def betas_from_alpha_bar(alpha_bar: Callable[[torch.Tensor], torch.Tensor], timesteps: int,
                         max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), clipped at ``max_beta``."""
    s = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    a = alpha_bar(s)
    return (1.0 - a[1:] / a[:-1]).clamp(0.0, max_beta)


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""

    def alpha_bar(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2

    return betas_from_alpha_bar(alpha_bar, timesteps)


def sigmoid_betas(timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Jabri et al. 2022 (RIN), as in denoising-diffusion-pytorch.

    alpha_bar(u) = (sigmoid(end / tau) - sigmoid((u (end - start) + start) / tau))
                   / (sigmoid(end / tau) - sigmoid(start / tau)),  u = t / T in [0, 1],
    which falls from 1 to 0 along a sigmoid; betas are clipped at 0.999.
    """
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def alpha_bar(u: torch.Tensor) -> torch.Tensor:
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_from_alpha_bar(alpha_bar, timesteps)


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


class NoiseSchedule:
    """A discrete noise schedule with every coefficient of the forward and reverse process.

    ``NoiseSchedule("linear", 1000)`` builds, in float64, the tables below (names as in
    improved-diffusion; symbols as in Ho et al. 2020), each of length T:

    ============================== ==================================================
    ``betas``                      beta_t
    ``alphas``                     alpha_t = 1 - beta_t
    ``alphas_cumprod``             alpha_bar_t = prod_{s<=t} alpha_s
    ``alphas_cumprod_prev``        alpha_bar_{t-1} (1 at t = 0)
    ``sqrt_alphas_cumprod``        sqrt(alpha_bar_t)
    ``sqrt_one_minus_alphas_cumprod`` sqrt(1 - alpha_bar_t)
    ``sqrt_recip_alphas_cumprod``  sqrt(1 / alpha_bar_t)
    ``sqrt_recipm1_alphas_cumprod`` sqrt(1 / alpha_bar_t - 1)
    ``posterior_variance``         beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t (Eq. 7)
    ``posterior_log_variance_clipped`` log beta_tilde_t, with beta_tilde_0 (= 0) replaced by beta_tilde_1
    ``posterior_mean_coef1``       sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)  (Eq. 7, coefficient of x_0)
    ``posterior_mean_coef2``       sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)  (coefficient of x_t)
    ``snr``                        alpha_bar_t / (1 - alpha_bar_t)
    ============================== ==================================================
    """

    TABLES = (
        "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
        "posterior_mean_coef2", "snr",
    )

    def __init__(self, kind: str = "linear", timesteps: int = 1000, *, betas: torch.Tensor | None = None):
        if betas is None:
            if kind not in SCHEDULES:
                raise ConfigError(f"unknown noise schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
            if not isinstance(timesteps, int) or timesteps < 2:
                raise ConfigError(f"timesteps must be an integer >= 2, got {timesteps!r}")
            betas = SCHEDULES[kind](timesteps)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError("betas must be a 1-D table of at least 2 values in (0, 1)")
        self.kind = kind
        self.timesteps = len(betas)
        self._build(betas)

    def _build(self, betas: torch.Tensor) -> None:
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # Equation 7: q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde at t = 0 is 0; its log is clipped to the next value, as in the paper's code.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """A copy with every table on ``device`` (float32 on MPS, which has no float64)."""
        device = torch.device(device)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        out = object.__new__(NoiseSchedule)
        out.kind, out.timesteps = self.kind, self.timesteps
        for name in self.TABLES:
            setattr(out, name, getattr(self, name).to(device=device, dtype=dtype))
        return out

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def __len__(self) -> int:
        return self.timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.kind!r}, {self.timesteps})"


def extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gather ``table[t]`` for a batch of timesteps, shaped to broadcast against ``x``, in x's dtype."""
    out = table.to(x.device)[t.to(x.device)]
    return out.to(x.dtype).reshape(t.shape[0], *((1,) * (x.ndim - 1)))
