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

The network's output is read in one place, ``ddpm.denoiser``; the losses are in ``ddpm.losses`` and
the samplers in ``ddpm.samplers``. :class:`GaussianDiffusion` is a thin facade over them holding a
model and a schedule. Images in [0, 1] are mapped to the model's [-1, 1] and back by
:func:`to_model_range` and :func:`from_model_range`, the one place those mappings are written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

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
    "prediction_to_eps_x0", "check_objective", "loss_weight",
    "LOSSES", "LEARNED_VARIANCE", "FIXED_VARIANCES", "learned_range_log_variance", "offset_noise",
    "normal_kl", "discretized_gaussian_log_likelihood", "mean_over_dims", "vb_terms_from_mean_variance",
    "p_mean_variance_from_prediction", "SampleTrajectory", "GaussianDiffusion",
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
    # In the far tail the difference underflows: fall back to the log-density times the bin width.
    tail = mass < 1e-12
    if bool(tail.any()):
        centre = inv_std * (x0 - mean)
        log_density = -0.5 * centre ** 2 - 0.5 * math.log(2 * math.pi) - log_scale + math.log(2 * BIN_HALF_WIDTH)
        log_mid = torch.where(tail, torch.minimum(log_density, torch.zeros_like(log_density)), log_mid)
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


# ----------------------------------------------------------------------------- facade

class GaussianDiffusion(nn.Module):
    """A model and a noise schedule, with the paper's training loss and sampler.

    A thin facade in the spirit of the paper's reference code; the work is done by the losses
    (``ddpm.losses``) and the samplers (``ddpm.samplers``), which it calls::

        model = ddpm.Unet.from_preset("digits")
        diffusion = ddpm.GaussianDiffusion(model, image_size=8, channels=1, timesteps=1000)
        loss = diffusion(images)              # images in [0, 1], shape [B, C, H, W]
        images = diffusion.sample(batch_size=16)   # in [0, 1]

    The diffusion options (``timesteps``, ``schedule``, ``objective``, ``variance``, ``loss``, ...) are
    the fields of :class:`~ddpm.config.DiffusionConfig`, given as keywords or as ``config=``, and are
    validated as the command line validates them. ``sampling`` (the sampler a checkpoint asks for,
    :class:`~ddpm.samplers.SamplingOptions`; None: the library's) and ``precision`` (the network's
    autocast while sampling, :mod:`ddpm.precision`) are fixed when it is built; nothing is set
    from outside afterwards.
    """

    def __init__(self, model: nn.Module, *, config=None, image_size: int | Sequence[int] | None = None,
                 channels: int | None = None, sampling=None, precision: str = "fp32", **options):
        super().__init__()
        from .config import DiffusionConfig       # config.py reads this module's names; built lazily

        if config is not None and options:
            raise ConfigError("pass config= or the diffusion options as keywords, not both")
        try:
            config = config if config is not None else DiffusionConfig(**options)
        except TypeError as exc:
            raise ConfigError(f"unknown diffusion option: {exc}") from None
        self.model, self.config = model, config
        self.schedule = NoiseSchedule(config.schedule, config.timesteps)
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
        self._sampling, self._precision = sampling, precision
        self._schedules: dict[torch.device, NoiseSchedule] = {}

    # What the samplers, the bound and the sample record read; all from the configuration.
    timesteps = property(lambda self: self.config.timesteps)
    objective = property(lambda self: self.config.objective)
    variance = property(lambda self: self.config.variance)
    clip_denoised = property(lambda self: self.config.clip_denoised)
    self_condition = property(lambda self: self.config.self_condition)
    default_sampling = property(lambda self: self._sampling, doc="the checkpoint's sampler (None: the library's)")
    precision = property(lambda self: self._precision, doc="the network's autocast while sampling")

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
        """Training loss for a batch of images in [0, 1] (Algorithm 1), from the configuration's loss.

        t and eps ~ N(0, I) are drawn from ``generator`` (default: one seeded from the global RNG)
        unless given, as the training loop draws
        them (``ddpm.losses``: the loss's timestep draw, then the noise, then its extras: offset
        noise, the self-conditioning coins); a given ``noise`` is used as it is.
        """
        from .losses import make_loss

        if images.ndim != 4 or images.shape[1] != self.channels or tuple(images.shape[2:]) != self.image_size:
            raise ConfigError(f"expected images of shape [B, {self.channels}, {self.image_size[0]}, "
                              f"{self.image_size[1]}], got {list(images.shape)}")
        x0 = to_model_range(images.float())
        loss = make_loss(self.config, self.schedule_on(x0.device))
        if generator is None:           # the global RNG seeds one, so torch.manual_seed reproduces the draws
            generator = torch.Generator(x0.device).manual_seed(int(torch.randint(2 ** 62, (1,))))
        weights = None
        if t is None:
            t, weights = loss.draw_timesteps(x0.shape[0], generator, x0.device)
        extras = {}
        if noise is None:
            noise, extras = loss.draw_extras(randn(x0.shape, generator=generator, device=x0.device), generator)
        if self_cond_mask is not None:
            extras["self_cond_mask"] = self_cond_mask
        losses = loss.losses(self.model, x0, t, noise, model_kwargs=model_kwargs, **extras)
        losses = losses if weights is None else losses * weights
        return losses.mean() if reduction == "mean" else losses

    @torch.inference_mode()
    def sample(self, batch_size: int = 16, *, sampler: str = "ddpm", steps: int | None = None,
               spacing: str = "trailing", generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               progress: bool = True, return_intermediates: bool = False, record_every: int = 1,
               clip_denoised: bool | None = None, model_kwargs: dict | None = None, **options):
        """Images in [0, 1], shape [B, C, H, W], from the sampler registry (``ddpm.samplers.SAMPLERS``).

        The default is the paper's ancestral sampler over all T steps (Algorithm 2); ``sampler`` and
        ``steps`` (with ``spacing``) choose another, ``options`` are the sampler's own (``eta``,
        ``variance``) and the denoiser's (``dynamic_thresholding``, ``guidance_scale``,
        ``uncond_kwargs``). x_T is ``noise`` or drawn from ``generator``, as is every later noise.
        With ``return_intermediates`` a :class:`SampleTrajectory` is returned, its tensors (x_t after
        every ``record_every``-th step, and the last) mapped to [0, 1] too.
        """
        from .samplers import SAMPLERS, make_denoiser, spaced_timesteps
        from .precision import autocast

        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        device = self.device
        schedule = self.schedule_on(device)
        timesteps = spaced_timesteps(self.timesteps, steps, spacing)
        denoiser_options = {k: options.pop(k) for k in ("dynamic_thresholding", "guidance_scale", "uncond_kwargs")
                            if k in options}
        if sampler == "ddpm":
            options.setdefault("variance", self.variance)
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        denoiser = make_denoiser(self.model, schedule, objective=self.objective,
                                 clip=clip and not denoiser_options.get("dynamic_thresholding"),
                                 model_kwargs=model_kwargs, self_condition=self.self_condition, **denoiser_options)
        shape = (batch_size, self.channels, *self.image_size)
        x_T = randn(shape, generator=generator, device=device) if noise is None else noise.to(device, torch.float32)
        traj = SampleTrajectory(x0=x_T, timesteps=[], x_t=[], x0_pred=[])
        bar = tqdm(total=len(timesteps), desc="sampling", disable=not progress, leave=False, dynamic_ncols=True)

        def on_step(info: dict) -> None:
            bar.update(1)
            if return_intermediates and (info["t"] % record_every == 0 or info["i"] + 1 == len(timesteps)):
                traj.timesteps.append(info["t"])
                traj.x_t.append(from_model_range(info["x"]).cpu())
                traj.x0_pred.append(from_model_range(info["x0_pred"]).cpu())

        with autocast(device, self.precision):
            x0 = SAMPLERS[sampler](denoiser, x_T, schedule, timesteps, callback=on_step,
                                   noise=lambda: randn(shape, generator=generator, device=device), **options)
        bar.close()
        traj.x0 = from_model_range(x0)
        return traj if return_intermediates else traj.x0
