"""The continuous-time view (Karras et al. 2022, "EDM"): every model as a denoiser D(x; sigma).

A variance-preserving state x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, divided by
sqrt(alpha_bar_t), is x = x0 + sigma_t eps with

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)                                 (EDM, Table 1, VP column)

so a DDPM trained on any schedule is a denoiser D(x; sigma) ~ E[x0 | x] of data plus Gaussian noise
of standard deviation sigma, and the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma
(EDM Eq. 3 with sigma(t) = t, s(t) = 1). The sigma samplers of ``ddpm.samplers`` and the exact
likelihood of ``ddpm.evaluation.ode_likelihood`` read every model through this one interface,
:class:`SigmaDenoiser`: ``D(x, sigma) -> x0_pred``, with ``sigma_min`` and ``sigma_max``, the
range it was trained on. :class:`DiscreteSigmaDenoiser` is the view of a ddpm model (it wraps the
callable :func:`ddpm.denoiser.make_denoiser` returns, so guided, conditional, self-conditioned and
learned-variance models work unchanged); ``ddpm.edm.EDMDenoiser`` is a network trained in sigma
space directly.

Sigmas to visit are a :class:`Sigmas` (descending, normally ending at 0);
:func:`karras_sigmas` is EDM's spacing (Eq. 5). Timesteps are 0-based (``docs/notation.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .denoiser import Denoiser
from .errors import ConfigError
from .schedules import NoiseSchedule

__all__ = ["Sigmas", "schedule_sigmas", "timestep_to_sigma", "sigma_to_timestep", "nearest_timestep",
           "karras_sigmas", "karras_timesteps", "sigma_steps", "SigmaDenoiser", "DiscreteSigmaDenoiser",
           "as_sigma_denoiser", "KARRAS_RHO"]

KARRAS_RHO = 7.0      # EDM Eq. 5: rho = 7 (their Sec. 3, Fig. 13)


@dataclass(frozen=True)
class Sigmas:
    """The noise levels a sigma sampler visits: sigma_0 > sigma_1 > ... >= 0, one step between neighbours.

    ``len()`` is the number of steps (one fewer than the levels), as ``len(timesteps)`` is for the
    discrete samplers. The last level is normally 0 (the data); a sampler stops at whatever it is.
    """

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        values = tuple(float(s) for s in self.values)
        object.__setattr__(self, "values", values)
        if len(values) < 2 or any(not math.isfinite(s) or s < 0.0 for s in values):
            raise ConfigError(f"sigmas must be at least two finite levels >= 0; got {list(values)}")
        if any(a <= b for a, b in zip(values, values[1:])):
            raise ConfigError(f"sigmas must be strictly decreasing; got {list(values)}")

    def __len__(self) -> int:
        return len(self.values) - 1


# ----------------------------------------------------------------------------- sigma <-> timestep

def schedule_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1, float64, increasing."""
    return schedule.alphas_cumprod.detach().cpu().double().pow(-1).sub(1.0).sqrt()


def timestep_to_sigma(schedule: NoiseSchedule, t) -> torch.Tensor:
    """sigma at a (possibly fractional) timestep t in [0, T-1]: log sigma interpolated linearly between neighbours."""
    log_sigmas = schedule_sigmas(schedule).log()
    t = torch.as_tensor(t, dtype=torch.float64)
    if bool(((t < 0) | (t > len(log_sigmas) - 1)).any()):
        raise ConfigError(f"timesteps must lie in [0, {len(log_sigmas) - 1}]")
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return ((1.0 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def sigma_to_timestep(schedule: NoiseSchedule, sigma) -> torch.Tensor:
    """The fractional timestep of ``sigma`` (float64): the inverse of :func:`timestep_to_sigma`, clamped to [0, T-1]."""
    log_sigmas = schedule_sigmas(schedule).log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
    return low.double() + w


def nearest_timestep(schedule: NoiseSchedule, sigma) -> torch.Tensor:
    """The trained timestep nearest to ``sigma`` in log sigma (a LongTensor shaped like ``sigma``)."""
    return sigma_to_timestep(schedule, sigma).round().long()


# ----------------------------------------------------------------------------- spacings

def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> Sigmas:
    """EDM Eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"the number of sampling steps must be a positive integer; got {steps!r}")
    if not 0.0 < sigma_min < sigma_max or rho <= 0:
        raise ConfigError(f"karras spacing needs 0 < sigma_min < sigma_max and rho > 0; got "
                          f"{sigma_min}, {sigma_max}, {rho}")
    if steps == 1:
        return Sigmas((sigma_max, 0.0))
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return Sigmas(tuple((a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)) + (0.0,))


def karras_timesteps(schedule: NoiseSchedule, steps: int, rho: float = KARRAS_RHO) -> list[int]:
    """Karras sigmas between sigma_0 and sigma_{T-1} of ``schedule``, each mapped to its nearest timestep.

    For the discrete samplers (ddpm, ddim, dpm-solver++). Where two sigmas land on the same timestep
    (rho = 7 crowds the small sigmas), the later one moves to the next free timestep below, and at
    the bottom the steps are pushed back up; so K distinct descending timesteps are kept for every
    K <= T (K network evaluations), each as near its Karras sigma as that allows.
    """
    T = schedule.timesteps
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ConfigError(f"the number of sampling steps must be between 1 and T = {T}; got {steps!r}")
    sigmas = schedule_sigmas(schedule)
    wanted = nearest_timestep(schedule, torch.tensor(karras_sigmas(steps, float(sigmas[0]), float(sigmas[-1]),
                                                                     rho).values[:-1])).tolist()
    kept = []
    for t in wanted:                                       # descending: each strictly below the one before
        kept.append(min(t, kept[-1] - 1) if kept else t)
    for i in range(len(kept) - 1, -1, -1):                 # ascending from the bottom: none below 0
        kept[i] = max(kept[i], 0 if i == len(kept) - 1 else kept[i + 1] + 1)
    return kept


def sigma_steps(schedule: NoiseSchedule | None, timesteps: "Sigmas | Sequence[int]") -> Sigmas:
    """The levels a sigma sampler visits: ``timesteps`` as they are when :class:`Sigmas`, else the sigmas
    of the kept (distinct, descending) timesteps of ``schedule`` followed by 0, the data."""
    if isinstance(timesteps, Sigmas):
        return timesteps
    if schedule is None:
        raise ConfigError("integer timesteps need the model's noise schedule; pass Sigmas for a continuous model")
    ts = [int(t) for t in timesteps]
    if not ts or any(not 0 <= t < schedule.timesteps for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ConfigError(f"timesteps must be distinct, descending and in 0..{schedule.timesteps - 1}; got {ts}")
    sigmas = schedule_sigmas(schedule)
    return Sigmas(tuple(float(sigmas[t]) for t in ts) + (0.0,))


# ----------------------------------------------------------------------------- the denoiser in sigma space

def _column(value, like: torch.Tensor):
    """A float as it is; a per-sample tensor [B] shaped to broadcast against ``like``."""
    if torch.is_tensor(value) and value.ndim > 0:
        return value.to(device=like.device, dtype=like.dtype).reshape(-1, *((1,) * (like.ndim - 1)))
    return float(value)


class SigmaDenoiser:
    """D(x; sigma) -> x0_pred for x = x0 + sigma n (``sigma`` a float shared by the batch, or a tensor [B]).

    ``sigma_min`` and ``sigma_max`` are the range of noise levels the model was trained on (the
    default ends of the karras spacing and of the likelihood's ODE).
    """

    sigma_min: float
    sigma_max: float

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        raise NotImplementedError


class DiscreteSigmaDenoiser(SigmaDenoiser):
    """A ddpm model in sigma space: D(x; sigma) = x - sigma eps_pred(x / sqrt(1 + sigma^2), t(sigma)).

    ``denoiser`` is the callable of :func:`ddpm.denoiser.make_denoiser` (any objective, guidance,
    clipping, self-conditioning); x / sqrt(1 + sigma^2) is the VP state x_t at that noise level.

    t(sigma) is the trained timestep NEAREST to sigma in log sigma (k-diffusion's
    ``DiscreteEpsDDPMDenoiser`` with ``quantize=True``), not an interpolation between the two
    nearest: the network has only ever seen integer timesteps, and the denoiser's conversions
    (Eq. 4 solved for x0 or eps, clipping, guidance, learned variances) are tables indexed by them;
    interpolating would cost two network evaluations per call or feed the network timesteps it never
    learned. At the schedule's own sigmas (integer timesteps, ``karras_timesteps``) the rounding is
    exact and D is the denoiser's x0_pred; between them it is off by at most half a step in log sigma.
    """

    def __init__(self, denoiser: Denoiser, schedule: NoiseSchedule):
        self.denoiser, self.schedule = denoiser, schedule
        sigmas = schedule_sigmas(schedule)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    def timestep(self, sigma):
        """The timestep evaluated at ``sigma``: an int for a float, a LongTensor [B] for a tensor [B]."""
        t = nearest_timestep(self.schedule, sigma.detach().cpu() if torch.is_tensor(sigma) else sigma)
        return int(t) if t.ndim == 0 else t

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        t = self.timestep(sigma)
        if torch.is_tensor(t):
            t = t.to(x.device)
        s = _column(sigma, x)
        c_in = 1.0 / (1.0 + s * s) ** 0.5                                   # x_t = x sqrt(alpha_bar) (EDM Table 1, VP)
        eps_pred, _ = self.denoiser(x * c_in, t)
        return x - s * eps_pred.to(x.dtype)                 # D = x - sigma eps (Table 1: c_skip = 1, c_out = -sigma)


def as_sigma_denoiser(denoiser, schedule: NoiseSchedule | None) -> SigmaDenoiser:
    """``denoiser`` itself when it is a :class:`SigmaDenoiser`, else the sigma view of a ddpm denoiser."""
    if isinstance(denoiser, SigmaDenoiser):
        return denoiser
    if schedule is None:
        raise ConfigError("a ddpm denoiser needs its noise schedule to be read in sigma space")
    return DiscreteSigmaDenoiser(denoiser, schedule)
