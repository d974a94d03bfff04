"""Gaussian diffusion maths (Ho et al. 2020) as free functions.

Every function takes the schedule (and, where a prediction is needed, the model) as
an argument: the maths never owns the network. Symbols follow ``docs/notation.md``:
``x0``, ``x_t``, ``eps``, ``t`` is the 0-based timestep index (paper t = index + 1).
Model outputs are interpreted according to the training ``objective``: ``"eps"``
(the paper's noise prediction), ``"x0"`` or ``"v"`` (Salimans & Ho 2022,
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0).

Improved DDPM (Nichol & Dhariwal 2021) adds, as configuration rather than new networks: a
learned reverse-process variance ("learned-range": the network has 2C output channels, the
second C interpolate log sigma^2 between log beta_t and log beta-tilde_t, their Eq. 15), the
hybrid loss L_simple + lambda L_vlb (their Eq. 16) and the pure L_vlb objective; and
self-conditioning (Chen et al. 2023, "Analog Bits"): the network takes [x_t, x0_prev] (2C
input channels), x0_prev being an earlier estimate of x0 or zeros. The network never learns
which of these it serves: ``ddpm.denoiser`` builds its input and reads its output.

The network's output is read in one place, ``ddpm.denoiser``; the losses are in ``ddpm.losses``,
the samplers in ``ddpm.samplers``, and ``ddpm.gaussian_diffusion.GaussianDiffusion`` is the thin
facade over them that holds a model and a schedule. Images in [0, 1] are mapped to the model's [-1, 1] and back by
:func:`to_model_range` and :func:`from_model_range` of ``ddpm.pixels``, where every pixel mapping is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError
from .schedules import NoiseSchedule, extract

__all__ = [
    "OBJECTIVES", "LOSS_WEIGHTINGS", "VARIANCES",
    "randn",
    "q_sample", "q_mean_variance", "q_posterior_mean_variance",
    "predict_x0_from_eps", "predict_eps_from_x0", "predict_x0_from_v", "predict_eps_from_v", "v_target",
    "prediction_to_eps_x0", "check_objective", "loss_weight",
    "LOSSES", "LEARNED_VARIANCE", "FIXED_VARIANCES", "learned_range_log_variance", "offset_noise",
    "normal_kl", "discretized_gaussian_log_likelihood", "mean_over_dims", "vb_terms_from_mean_variance",
    "p_mean_variance_from_prediction", "SampleTrajectory",
]

OBJECTIVES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min-snr")
LEARNED_VARIANCE = "learned-range"
FIXED_VARIANCES = ("posterior", "beta")
VARIANCES = (*FIXED_VARIANCES, LEARNED_VARIANCE)
LOSSES = ("simple", "hybrid", "vlb")


# ----------------------------------------------------------------------------- noise

def randn(shape: Sequence[int], *, generator: torch.Generator | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn from ``generator`` (on its own device), then moved to ``device``."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


# ----------------------------------------------------------------------------- forward process

def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)  (Eq. 4)."""
    return (extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor):
    """Mean, variance and log-variance of q(x_t | x_0)  (Eq. 4)."""
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
    variance = extract(1.0 - schedule.alphas_cumprod, t, x0)
    return mean, variance, torch.log(variance)


def q_posterior_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)  (Eqs. 6 and 7)."""
    mean = extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    variance = extract(schedule.posterior_variance, t, x_t)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


# ----------------------------------------------------------------------------- parameterisations

def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)  (Eq. 4 solved for x0; Eq. 15)."""
    return extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x_t / sqrt(alpha_bar_t) - x0) / sqrt(1 / alpha_bar_t - 1)  (Eq. 4 solved for eps)."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t))


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0  (Salimans & Ho 2022, Sec. 4)."""
    return extract(schedule.sqrt_alphas_cumprod, t, x0) * eps - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def predict_x0_from_v(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
    return extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def predict_eps_from_v(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
    return extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + extract(schedule.sqrt_alphas_cumprod, t, x_t) * v


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")


def prediction_to_eps_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
                         objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output trained with ``objective`` into the pair (eps_pred, x0_pred)."""
    if objective == "eps":
        return output, predict_x0_from_eps(schedule, x_t, t, output)
    if objective == "x0":
        return predict_eps_from_x0(schedule, x_t, t, output), output
    if objective == "v":
        return predict_eps_from_v(schedule, x_t, t, output), predict_x0_from_v(schedule, x_t, t, output)
    check_objective(objective)
    raise AssertionError("unreachable")


def learned_range_log_variance(var_values: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """log sigma^2 = v log beta_t + (1 - v) log beta-tilde_t, v = (output + 1) / 2  (Nichol & Dhariwal 2021, Eq. 15).

    v is clamped to [0, 1], so sigma^2 lies in [beta-tilde_t, beta_t] whatever the network outputs
    (the paper leaves v free and observes that it stays in the range; the clamp only acts outside it).
    ``log_beta`` and ``log_beta_tilde`` are numbers or tensors broadcastable to ``var_values``.
    """
    frac = ((var_values + 1.0) / 2.0).clamp(0.0, 1.0)
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def offset_noise(shape: Sequence[int], strength: float, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """strength * N(0, 1) drawn per (sample, channel), shape [B, C, 1, 1], to add to eps over all pixels.

    Offset noise (Guttenberg 2023, "Diffusion With Offset Noise"): the forward process also shifts
    each channel's mean, so the model learns to change an image's overall brightness.
    """
    return strength * randn((shape[0], shape[1], *([1] * (len(shape) - 2))), generator=generator, device=device)


# ----------------------------------------------------------------------------- the variational bound, term by term

LOG2 = math.log(2.0)
BIN_HALF_WIDTH = 1.0 / 255.0     # the 8-bit grid in [-1, 1] has bins of width 2 / 255


def mean_over_dims(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x0) elementwise (nats) for N(mean, exp(log_scale)^2) discretised to the 8-bit grid.

    The bin of x0 is [x0 - 1/255, x0 + 1/255], with the first bin extended down to -inf and
    the last up to +inf (Ho et al. 2020, Eq. 13). Uses the exact normal CDF in float64, and
    log CDFs in the tails so that far-off means give finite, accurate values.
    """
    x0, mean, log_scale = x0.double(), mean.double(), log_scale.double()
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x0 - mean + BIN_HALF_WIDTH)
    lower = inv_std * (x0 - mean - BIN_HALF_WIDTH)
    log_cdf_upper = torch.special.log_ndtr(upper)              # log P(z < upper): the first bin
    log_sf_lower = torch.special.log_ndtr(-lower)              # log P(z > lower): the last bin
    # Interior bin: P(lower < z < upper) computed on whichever side of 0 keeps precision.
    right = lower > 0
    mass = torch.where(right, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                       torch.special.ndtr(upper) - torch.special.ndtr(lower))
    log_mid = torch.log(mass.clamp(min=1e-300))
    # In the far tail the difference underflows: with the bin mirrored into the left tail, [lo, hi] with
    # hi <= 0, log(Phi(hi) - Phi(lo)) = log Phi(hi) + log1p(-exp(log Phi(lo) - log Phi(hi))), exactly.
    tail = mass < 1e-12
    if bool(tail.any()):
        log_hi = torch.special.log_ndtr(torch.where(right, -lower, upper))
        log_lo = torch.special.log_ndtr(torch.where(right, -upper, lower))
        log_mid = torch.where(tail, log_hi + torch.log1p(-torch.exp(log_lo - log_hi)), log_mid)
    return torch.where(x0 < -1.0 + BIN_HALF_WIDTH, log_cdf_upper,
                       torch.where(x0 > 1.0 - BIN_HALF_WIDTH, log_sf_lower, log_mid))


def vb_terms_from_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                                mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """One term of the bound (Ho et al. 2020, Eq. 5) per sample, in bits/dim, shape [B], for
    p(x_{t-1} | x_t) = N(``mean``, exp(``log_var``)), computed in ``mean``'s dtype.

    Where t >= 1: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) (Eqs. 6-7). Where t = 0: the
    decoder L_0 = -log p(x_0 | x_1), the Gaussian discretised over the 8-bit grid (Eq. 13).
    """
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    kl = mean_over_dims(normal_kl(true_mean.to(mean.dtype), true_log_var.to(mean.dtype), mean, log_var)) / LOG2
    decoder_nll = -mean_over_dims(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / LOG2
    return torch.where(t == 0, decoder_nll.to(kl.dtype), kl)


# ----------------------------------------------------------------------------- training loss

def loss_weight(schedule: NoiseSchedule, t: torch.Tensor, objective: str, weighting: str = "uniform",
                min_snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weight (shape [B]).

    ``uniform``: 1 (L_simple, Ho et al. 2020, Eq. 14). ``min-snr``: Hang et al. 2023, which
    weights the x0-space loss by min(SNR_t, gamma); expressed in the objective's own space
    that is min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and min(SNR, gamma) / (SNR + 1) for v.
    """
    if weighting == "uniform":
        return torch.ones(t.shape[0], device=t.device)
    if weighting != "min-snr":
        raise ConfigError(f"unknown loss weighting {weighting!r}; choose from {', '.join(LOSS_WEIGHTINGS)}")
    snr = schedule.snr.to(t.device)[t].float()
    clipped = snr.clamp(max=min_snr_gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[objective]


# ----------------------------------------------------------------------------- reverse process

def p_mean_variance_from_prediction(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0_pred: torch.Tensor,
                                    var_values: torch.Tensor | None = None, *,
                                    variance: str = "posterior") -> dict[str, torch.Tensor]:
    """Mean, variance and log-variance of p_theta(x_{t-1} | x_t) (Eq. 1) from the model's x0 estimate.

    The mean is the posterior mean (Eq. 7) at ``x0_pred``, which for an eps model equals Eq. 11.
    sigma_t^2 is beta-tilde_t (``"posterior"``) or beta_t (``"beta"``), the two choices of Sec. 3.2;
    at t = 0 the latter uses beta-tilde_1, as the paper's code does (no noise is added at t = 0
    either way). ``"learned-range"`` interpolates between log beta_t and the clipped log beta-tilde_t
    with a learned-variance network's ``var_values`` (Nichol & Dhariwal 2021, Eq. 15).
    """
    mean, post_var, post_log_var = q_posterior_mean_variance(schedule, x0_pred, x_t, t)
    if variance == "posterior":
        var, log_var = post_var, post_log_var
    elif variance == "beta":
        betas = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]])
        var = extract(betas, t, x_t)
        log_var = torch.log(var)
    elif variance == LEARNED_VARIANCE:
        if var_values is None:
            raise ConfigError("variance 'learned-range' needs a network trained with learned variances "
                              "(2C output channels); this one has C")
        log_var = learned_range_log_variance(var_values, torch.log(extract(schedule.betas, t, x_t)), post_log_var)
        var = torch.exp(log_var)
    else:
        raise ConfigError(f"unknown variance {variance!r}; choose from {', '.join(VARIANCES)}")
    return {"mean": mean, "variance": var, "log_variance": log_var}


@dataclass
class SampleTrajectory:
    """The result of a sampling loop with intermediates: x_t and the x0 estimate at each recorded step."""

    x0: torch.Tensor
    timesteps: list[int]
    x_t: list[torch.Tensor]
    x0_pred: list[torch.Tensor]
