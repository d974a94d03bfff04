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
which of these it serves: :func:`model_output` builds its input, :func:`split_output` reads
its output.

:class:`GaussianDiffusion` is a thin facade holding a model and a schedule; it is
the one place where images in [0, 1] are mapped to the model's [-1, 1] and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .schedules import NoiseSchedule, extract

__all__ = [
    "OBJECTIVES", "LOSS_WEIGHTINGS", "VARIANCES",
    "to_model_range", "from_model_range", "randn",
    "q_sample", "q_mean_variance", "q_posterior_mean_variance",
    "predict_x0_from_eps", "predict_eps_from_x0", "predict_x0_from_v", "predict_eps_from_v", "v_target",
    "prediction_to_eps_x0", "loss_weight", "training_losses",
    "LOSSES", "LEARNED_VARIANCE", "FIXED_VARIANCES", "model_output", "split_output", "learned_range_log_variance", "offset_noise",
    "normal_kl", "discretized_gaussian_log_likelihood", "mean_over_dims", "p_mean_variance_from_output",
    "vb_terms_from_mean_variance", "self_condition_estimate",
    "p_mean_variance", "p_sample", "p_sample_loop", "SampleTrajectory", "GaussianDiffusion",
]

OBJECTIVES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min-snr")
LEARNED_VARIANCE = "learned-range"
FIXED_VARIANCES = ("posterior", "beta")
VARIANCES = (*FIXED_VARIANCES, LEARNED_VARIANCE)
LOSSES = ("simple", "hybrid", "vlb")


# ----------------------------------------------------------------------------- data range

def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> data x0 in [-1, 1] (Ho et al. 2020, Sec. 3.3)."""
    return images * 2.0 - 1.0


def from_model_range(x0: torch.Tensor) -> torch.Tensor:
    """Data x0 in [-1, 1] -> images in [0, 1], clamped."""
    return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)


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


# ----------------------------------------------------------------------------- network input and output

def model_output(model: Callable, x_t: torch.Tensor, t: torch.Tensor, *, self_cond: torch.Tensor | None = None,
                 self_condition: bool = False, model_kwargs: dict | None = None) -> torch.Tensor:
    """The network's raw output at (x_t, t), in float32.

    A self-conditioned network (``self_condition``) takes [x_t, x0_prev] concatenated along the
    channels, where x0_prev is ``self_cond`` (an earlier estimate of x0) or zeros when there is none
    (Chen et al. 2023, "Analog Bits", Sec. 3.3). Any other network takes x_t alone.
    """
    if self_condition:
        x0_prev = torch.zeros_like(x_t) if self_cond is None else self_cond.to(x_t.dtype)
        x_t = torch.cat([x_t, x0_prev], dim=1)
    elif self_cond is not None:
        raise ConfigError("an x0 estimate for self-conditioning was given to a network trained without it")
    return model(x_t, t, **(model_kwargs or {})).float()


def split_output(output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, var_values) from a network output for C = ``channels`` image channels.

    A learned-variance network has 2C output channels: the first C predict the objective (eps, x0
    or v), the last C the variance interpolation v of Eq. 15; a C-channel output gives (output, None).
    """
    if output.shape[1] == channels:
        return output, None
    if output.shape[1] != 2 * channels:
        raise ConfigError(f"the network has {output.shape[1]} output channels; expected {channels} "
                          f"(fixed variance) or {2 * channels} (learned variance)")
    prediction, var_values = output.chunk(2, dim=1)
    return prediction, var_values


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


@torch.no_grad()
def self_condition_estimate(model: Callable, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor,
                            mask: torch.Tensor, *, objective: str = "eps", model_kwargs: dict | None = None) -> torch.Tensor:
    """x0_prev for self-conditioned training (Chen et al. 2023, Sec. 3.3): where ``mask`` [B] is set, the
    network's own x0 estimate from a first pass with x0_prev = 0, without gradient and clamped to the
    data range [-1, 1]; zeros elsewhere."""
    x0_prev = torch.zeros_like(x_t)
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x0_prev
    kwargs = {k: v[idx] if torch.is_tensor(v) and v.shape[:1] == mask.shape else v
              for k, v in (model_kwargs or {}).items()}
    output = model_output(model, x_t[idx], t[idx], self_condition=True, model_kwargs=kwargs)
    prediction, _ = split_output(output, x_t.shape[1])
    _, x0_pred = prediction_to_eps_x0(schedule, x_t[idx], t[idx], prediction, objective)
    x0_prev[idx] = x0_pred.clamp(-1.0, 1.0).to(x0_prev.dtype)
    return x0_prev


def training_losses(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, *, objective: str = "eps", weighting: str = "uniform",
                    min_snr_gamma: float = 5.0, model_kwargs: dict | None = None, variance: str = "posterior",
                    loss: str = "simple", vlb_weight: float = 0.001, self_condition: bool = False,
                    self_cond_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample training loss (shape [B]).

    ``loss="simple"``: the weighted mean squared error of the prediction. With ``objective="eps"`` and
    uniform weighting this is L_simple (Eq. 14, Algorithm 1):
    || eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2, averaged over pixels.

    The L_vlb estimate of a sample is T L_{t-1} at its timestep, in bits/dim
    (:func:`vb_terms_from_mean_variance`; its mean over uniform t is the bound without the prior term).
    ``loss="hybrid"``: L_simple + lambda L_vlb with lambda = ``vlb_weight`` (Nichol & Dhariwal 2021,
    Eq. 16), the mean under a stop-gradient in L_vlb so that only the variance learns from it (Sec. 3.1).
    ``loss="vlb"``: L_vlb alone, which trains mean and variance (their L_vlb).

    Self-conditioning (``self_condition``): samples where ``self_cond_mask`` is set get the network's
    own x0 estimate as x0_prev (:func:`self_condition_estimate`), the others zeros.
    """
    check_objective(objective)
    x_t = q_sample(schedule, x0, t, noise)
    self_cond = None
    if self_condition and self_cond_mask is not None:
        self_cond = self_condition_estimate(model, schedule, x_t, t, self_cond_mask, objective=objective,
                                            model_kwargs=model_kwargs)
    output = model_output(model, x_t, t, self_cond=self_cond, self_condition=self_condition,
                          model_kwargs=model_kwargs)
    prediction, var_values = split_output(output, x0.shape[1])
    target = {"eps": noise, "x0": x0}.get(objective)
    if target is None:
        target = v_target(schedule, x0, t, noise)
    mse = (prediction - target).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    losses = mse * loss_weight(schedule, t, objective, weighting, min_snr_gamma)
    if loss == "simple":
        return losses
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    mean_part = prediction.detach() if loss == "hybrid" else prediction           # the stop-gradient of Sec. 3.1
    frozen = mean_part if var_values is None else torch.cat([mean_part, var_values], dim=1)
    out = p_mean_variance_from_output(schedule, x_t, t, frozen, objective=objective, variance=variance,
                                      clip_denoised=False)
    vlb = schedule.timesteps * vb_terms_from_mean_variance(schedule, x0, x_t, t, out["mean"], out["log_variance"])
    return losses + vlb_weight * vlb if loss == "hybrid" else vlb


# ----------------------------------------------------------------------------- reverse process

def p_mean_variance_from_output(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor, *,
                                objective: str = "eps", variance: str = "posterior",
                                clip_denoised: bool = True) -> dict[str, torch.Tensor]:
    """:func:`p_mean_variance` from the network's raw ``output`` (float32) at (x_t, t)."""
    prediction, var_values = split_output(output, x_t.shape[1])
    eps_pred, x0_pred = prediction_to_eps_x0(schedule, x_t, t, prediction, objective)
    if clip_denoised:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
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
    return {"mean": mean, "variance": var, "log_variance": log_var, "eps_pred": eps_pred, "x0_pred": x0_pred}


def p_mean_variance(model: Callable, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, *,
                    objective: str = "eps", variance: str = "posterior", clip_denoised: bool = True,
                    model_kwargs: dict | None = None, self_condition: bool = False,
                    self_cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Parameters of p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)  (Eq. 1).

    The mean is the posterior mean (Eq. 7) evaluated at the model's x0 estimate, which
    for an eps model equals Eq. 11; with ``clip_denoised`` the x0 estimate is clipped to
    [-1, 1] first (as in the paper's code). sigma_t^2 is beta_tilde_t (``"posterior"``) or
    beta_t (``"beta"``), the two choices of Sec. 3.2; at t = 0 the latter uses beta_tilde_1,
    as the paper's code does (no noise is added at t = 0 either way). ``"learned-range"``
    interpolates between log beta_t and the clipped log beta-tilde_t with the network's second
    half of channels (Nichol & Dhariwal 2021, Eq. 15). A self-conditioned network gets ``self_cond``.
    """
    output = model_output(model, x_t, t, self_cond=self_cond, self_condition=self_condition,
                          model_kwargs=model_kwargs)
    return p_mean_variance_from_output(schedule, x_t, t, output, objective=objective, variance=variance,
                                       clip_denoised=clip_denoised)


def p_sample(model: Callable, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t-1} (Algorithm 2, line 4); returns (x_{t-1}, x0_pred).

    x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise added where t = 0 (the last step).
    """
    out = p_mean_variance(model, schedule, x_t, t, **kwargs)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *((1,) * (x_t.ndim - 1)))
    x_prev = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
    return x_prev, out["x0_pred"]


@dataclass
class SampleTrajectory:
    """The result of a sampling loop with intermediates: x_t and the x0 estimate at each recorded step."""

    x0: torch.Tensor
    timesteps: list[int]
    x_t: list[torch.Tensor]
    x0_pred: list[torch.Tensor]


@torch.inference_mode()
def p_sample_loop(model: Callable, schedule: NoiseSchedule, shape: Sequence[int], *,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None, progress: bool = True,
                  return_intermediates: bool = False, record_every: int = 1, **kwargs):
    """Ancestral sampling over all T steps (Algorithm 2), from x_T = ``noise`` (or drawn) to x_0.

    Randomness comes only from ``generator`` (or the global RNG). With
    ``return_intermediates`` the x_t and x0 estimates of every ``record_every``-th step
    (and the last) are kept on the CPU: progressive generation, the paper's Figure 6.
    Returns x_0, or a :class:`SampleTrajectory`.
    """
    if noise is not None:
        device = noise.device if device is None else device
        x = noise.to(device=device, dtype=torch.float32)
    else:
        x = randn(shape, generator=generator, device=device)
    traj = SampleTrajectory(x0=x, timesteps=[], x_t=[], x0_pred=[])
    steps = range(schedule.timesteps - 1, -1, -1)
    x0_prev = None                       # self-conditioning: the previous step's x0 estimate is fed back
    for i in tqdm(steps, desc="sampling", disable=not progress, leave=False, dynamic_ncols=True):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        z = randn(x.shape, generator=generator, device=x.device) if i > 0 else torch.zeros_like(x)
        x, x0_pred = p_sample(model, schedule, x, t, z, self_cond=x0_prev, **kwargs)
        if kwargs.get("self_condition"):
            x0_prev = x0_pred
        if return_intermediates and (i % record_every == 0 or i == 0):
            traj.timesteps.append(i)
            traj.x_t.append(x.cpu())
            traj.x0_pred.append(x0_pred.cpu())
    if not return_intermediates:
        return x
    traj.x0 = x
    return traj


# ----------------------------------------------------------------------------- facade

class GaussianDiffusion(nn.Module):
    """A model and a noise schedule, with the paper's training loss and sampler.

    A thin facade over the functions above, in the spirit of the paper's reference code::

        model = ddpm.Unet.from_preset("digits")
        diffusion = ddpm.GaussianDiffusion(model, image_size=8, channels=1, timesteps=1000)
        loss = diffusion(images)              # images in [0, 1], shape [B, C, H, W]
        images = diffusion.sample(batch_size=16)   # in [0, 1]
    """

    def __init__(self, model: nn.Module, *, image_size: int | Sequence[int] | None = None,
                 channels: int | None = None, timesteps: int = 1000, schedule: str = "linear",
                 objective: str = "eps", loss_weighting: str = "uniform", min_snr_gamma: float = 5.0,
                 variance: str = "posterior", clip_denoised: bool = True, loss: str = "simple",
                 vlb_weight: float = 0.001, self_condition: bool = False, offset_noise: float = 0.0):
        super().__init__()
        check_objective(objective)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"unknown loss weighting {loss_weighting!r}; choose from {', '.join(LOSS_WEIGHTINGS)}")
        if variance not in VARIANCES:
            raise ConfigError(f"unknown variance {variance!r}; choose from {', '.join(VARIANCES)}")
        if loss not in LOSSES:
            raise ConfigError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        self.model = model
        self.schedule = NoiseSchedule(schedule, timesteps)
        size = image_size if image_size is not None else getattr(model, "image_size", None)
        if size is None:
            raise ConfigError("image_size is required when the model does not define one")
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        channels = channels if channels is not None else getattr(model, "channels", None)
        if channels is None:
            raise ConfigError("channels is required when the model does not define it")
        self.channels = channels
        model_size = getattr(model, "image_size", None)
        if model_size is not None and tuple(model_size) != self.image_size:
            raise ConfigError(f"image_size {self.image_size} differs from the model's {tuple(model_size)}")
        self.objective, self.loss_weighting, self.min_snr_gamma = objective, loss_weighting, min_snr_gamma
        self.variance, self.clip_denoised = variance, clip_denoised
        self.default_sampling = None   # SamplingOptions a checkpoint asks for (RunConfig.sampling); None: the library's
        self.precision = "fp32"         # the network's autocast while sampling (ddpm.precision; load_diffusion sets it)
        self.loss, self.vlb_weight = loss, vlb_weight
        self.self_condition, self.offset_noise = self_condition, offset_noise
        self._schedules: dict[torch.device, NoiseSchedule] = {}

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def schedule_on(self, device: torch.device) -> NoiseSchedule:
        """The schedule with its tables on ``device`` (cached)."""
        if device not in self._schedules:
            self._schedules[device] = self.schedule.to(device)
        return self._schedules[device]

    def forward(self, images: torch.Tensor, *, generator: torch.Generator | None = None,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                model_kwargs: dict | None = None, reduction: str = "mean",
                self_cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss for a batch of images in [0, 1] (Algorithm 1).

        t ~ Uniform({0, ..., T-1}) and eps ~ N(0, I) are drawn from ``generator`` unless given; with
        ``offset_noise`` > 0 a drawn eps gets its per-channel offset (:func:`offset_noise`), and a
        self-conditioned model draws ``self_cond_mask`` (each sample with probability 1/2) unless given.
        """
        if images.ndim != 4 or images.shape[1] != self.channels or tuple(images.shape[2:]) != self.image_size:
            raise ConfigError(f"expected images of shape [B, {self.channels}, {self.image_size[0]}, "
                              f"{self.image_size[1]}], got {list(images.shape)}")
        x0 = to_model_range(images.float())
        b, device = x0.shape[0], x0.device
        if t is None:
            gdev = generator.device if generator is not None else device
            t = torch.randint(0, self.timesteps, (b,), generator=generator, device=gdev).to(device)
        if noise is None:
            noise = randn(x0.shape, generator=generator, device=device)
            if self.offset_noise > 0:
                noise = noise + offset_noise(x0.shape, self.offset_noise, generator=generator, device=device)
        if self.self_condition and self_cond_mask is None:
            gdev = generator.device if generator is not None else device
            self_cond_mask = (torch.rand(b, generator=generator, device=gdev) < 0.5).to(device)
        losses = training_losses(self.model, self.schedule_on(device), x0, t, noise, objective=self.objective,
                                 weighting=self.loss_weighting, min_snr_gamma=self.min_snr_gamma,
                                 model_kwargs=model_kwargs, variance=self.variance, loss=self.loss,
                                 vlb_weight=self.vlb_weight, self_condition=self.self_condition,
                                 self_cond_mask=self_cond_mask)
        return losses.mean() if reduction == "mean" else losses

    @torch.inference_mode()
    def sample(self, batch_size: int = 16, *, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, progress: bool = True, return_intermediates: bool = False,
               record_every: int = 1, clip_denoised: bool | None = None, variance: str | None = None,
               model_kwargs: dict | None = None):
        """Ancestral sampling over all T steps; images in [0, 1], shape [B, C, H, W].

        With ``return_intermediates`` a :class:`SampleTrajectory` is returned whose tensors
        are also mapped to [0, 1].
        """
        device = self.device
        shape = (batch_size, self.channels, *self.image_size)
        out = p_sample_loop(self.model, self.schedule_on(device), shape, noise=noise, generator=generator,
                            device=device, progress=progress, return_intermediates=return_intermediates,
                            record_every=record_every, objective=self.objective,
                            variance=variance or self.variance,
                            clip_denoised=self.clip_denoised if clip_denoised is None else clip_denoised,
                            model_kwargs=model_kwargs, self_condition=self.self_condition)
        if not return_intermediates:
            return from_model_range(out)
        return SampleTrajectory(x0=from_model_range(out.x0), timesteps=out.timesteps,
                                x_t=[from_model_range(x) for x in out.x_t],
                                x0_pred=[from_model_range(x) for x in out.x0_pred])
