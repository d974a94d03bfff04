"""Gaussian diffusion maths (Ho et al. 2020) as free functions.

Every function takes the schedule (and, where a prediction is needed, the model) as
an argument: the maths never owns the network. Symbols follow ``docs/notation.md``:
``x0``, ``x_t``, ``eps``, ``t`` is the 0-based timestep index (paper t = index + 1).
Model outputs are interpreted according to the training ``objective``: ``"eps"``
(the paper's noise prediction), ``"x0"`` or ``"v"`` (Salimans & Ho 2022,
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0).

:class:`GaussianDiffusion` is a thin facade holding a model and a schedule; it is
the one place where images in [0, 1] are mapped to the model's [-1, 1] and back.
"""

from __future__ import annotations

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
    "p_mean_variance", "p_sample", "p_sample_loop", "SampleTrajectory", "GaussianDiffusion",
]

OBJECTIVES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min-snr")
VARIANCES = ("posterior", "beta")


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


def training_losses(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, *, objective: str = "eps", weighting: str = "uniform",
                    min_snr_gamma: float = 5.0, model_kwargs: dict | None = None) -> torch.Tensor:
    """Per-sample training loss (shape [B]): the weighted mean squared error of the prediction.

    With ``objective="eps"`` and uniform weighting this is L_simple (Eq. 14, Algorithm 1):
    || eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2, averaged over pixels.
    """
    check_objective(objective)
    x_t = q_sample(schedule, x0, t, noise)
    output = model(x_t, t, **(model_kwargs or {}))
    target = {"eps": noise, "x0": x0}.get(objective)
    if target is None:
        target = v_target(schedule, x0, t, noise)
    mse = (output.float() - target).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    return mse * loss_weight(schedule, t, objective, weighting, min_snr_gamma)


# ----------------------------------------------------------------------------- reverse process

def p_mean_variance(model: Callable, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, *,
                    objective: str = "eps", variance: str = "posterior", clip_denoised: bool = True,
                    model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """Parameters of p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)  (Eq. 1).

    The mean is the posterior mean (Eq. 7) evaluated at the model's x0 estimate, which
    for an eps model equals Eq. 11; with ``clip_denoised`` the x0 estimate is clipped to
    [-1, 1] first (as in the paper's code). sigma_t^2 is beta_tilde_t (``"posterior"``) or
    beta_t (``"beta"``), the two choices of Sec. 3.2; at t = 0 the latter uses beta_tilde_1,
    as the paper's code does (no noise is added at t = 0 either way).
    """
    output = model(x_t, t, **(model_kwargs or {})).float()
    eps_pred, x0_pred = prediction_to_eps_x0(schedule, x_t, t, output, objective)
    if clip_denoised:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
    mean, post_var, post_log_var = q_posterior_mean_variance(schedule, x0_pred, x_t, t)
    if variance == "posterior":
        var, log_var = post_var, post_log_var
    elif variance == "beta":
        betas = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]])
        var = extract(betas, t, x_t)
        log_var = torch.log(var)
    else:
        raise ConfigError(f"unknown variance {variance!r}; choose from {', '.join(VARIANCES)}")
    return {"mean": mean, "variance": var, "log_variance": log_var, "eps_pred": eps_pred, "x0_pred": x0_pred}


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
    for i in tqdm(steps, desc="sampling", disable=not progress, leave=False, dynamic_ncols=True):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        z = randn(x.shape, generator=generator, device=x.device) if i > 0 else torch.zeros_like(x)
        x, x0_pred = p_sample(model, schedule, x, t, z, **kwargs)
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
                 variance: str = "posterior", clip_denoised: bool = True):
        super().__init__()
        check_objective(objective)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"unknown loss weighting {loss_weighting!r}; choose from {', '.join(LOSS_WEIGHTINGS)}")
        if variance not in VARIANCES:
            raise ConfigError(f"unknown variance {variance!r}; choose from {', '.join(VARIANCES)}")
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
                model_kwargs: dict | None = None, reduction: str = "mean") -> torch.Tensor:
        """Training loss for a batch of images in [0, 1] (Algorithm 1).

        t ~ Uniform({0, ..., T-1}) and eps ~ N(0, I) are drawn from ``generator`` unless given.
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
        losses = training_losses(self.model, self.schedule_on(device), x0, t, noise, objective=self.objective,
                                 weighting=self.loss_weighting, min_snr_gamma=self.min_snr_gamma,
                                 model_kwargs=model_kwargs)
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
                            model_kwargs=model_kwargs)
        if not return_intermediates:
            return from_model_range(out)
        return SampleTrajectory(x0=from_model_range(out.x0), timesteps=out.timesteps,
                                x_t=[from_model_range(x) for x in out.x_t],
                                x0_pred=[from_model_range(x) for x in out.x0_pred])
