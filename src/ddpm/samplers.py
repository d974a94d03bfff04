"""Samplers: the paper's ancestral sampler, respaced ancestral, DDIM and DPM-Solver++(2M).

Every sampler is one function with the same signature::

    sampler(denoiser, x_T, schedule, timesteps, *, noise=None, callback=None, **options) -> x_0

* ``denoiser(x_t, t)`` returns ``(eps_pred, x0_pred)`` for the 0-based timestep ``t`` (an int shared
  by the batch), as a :class:`~ddpm.denoiser.Prediction` that also carries a learned-variance
  network's interpolation channels (``var_values``, used by the ancestral sampler only).
  :func:`~ddpm.denoiser.make_denoiser` (re-exported here) builds one from any network, whatever its
  training objective (eps, x0 or v), with optional guidance, x0 clipping or dynamic thresholding:
  samplers never branch on it.
* ``x_T`` is the starting noise; ``schedule`` a :class:`~ddpm.schedules.NoiseSchedule`;
  ``timesteps`` the kept 0-based timesteps in the order they are visited (descending, e.g. from
  :func:`spaced_timesteps`). Each step goes from ``timesteps[i]`` to ``timesteps[i + 1]``, and the
  last one to the data (alpha_bar = 1): one network evaluation per kept timestep.
* ``noise()`` returns fresh standard normal noise shaped like ``x_T`` (stochastic samplers only;
  :func:`batch_noise` and ``ddpm.generate`` build it from generators): randomness is passed in.
* ``callback(info)`` is called after every step with ``i``, ``t``, ``x_t``, ``x0_pred`` and ``x``
  (the new state).

Adding a sampler means writing one function and adding it to :data:`SAMPLERS`. The coefficients
are computed in float64 from ``schedule.alphas_cumprod``; the states stay float32. Symbols are in
``docs/notation.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Sequence

import numpy as np
import torch

from .denoiser import DYNAMIC_THRESHOLD_PERCENTILE, Denoiser, Prediction, dynamic_threshold, make_denoiser
from .diffusion import LEARNED_VARIANCE, VARIANCES, learned_range_log_variance, randn
from .errors import ConfigError
from .schedules import NoiseSchedule

__all__ = [
    "Denoiser", "Prediction", "make_denoiser", "dynamic_threshold", "DYNAMIC_THRESHOLD_PERCENTILE",   # ddpm.denoiser
    "leading_timesteps", "trailing_timesteps", "linspace_timesteps", "SPACINGS", "spaced_timesteps",
    "transitions", "ancestral_step", "ddim_sigma", "ddim_step", "half_log_snr",
    "sample_ancestral", "sample_ddim", "sample_dpm_solver_pp_2m", "SAMPLERS",
    "ddim_invert", "ddim_reconstruct", "batch_noise",
    "SamplingOptions", "DEFAULT_SAMPLING",
]

NoiseSource = Callable[[], torch.Tensor]


# ----------------------------------------------------------------------------- timestep spacing

def leading_timesteps(timesteps: int, steps: int) -> list[int]:
    """'leading' (Lin et al. 2024, Table 2): 0, T//K, 2 T//K, ..., visited from the largest down."""
    stride = timesteps // steps
    return [k * stride for k in range(steps)][::-1]


def trailing_timesteps(timesteps: int, steps: int) -> list[int]:
    """'trailing' (Lin et al. 2024, Table 2): round(T - k T / K) - 1 for k = 0..K-1; starts at T - 1."""
    return [int(np.round(timesteps - k * timesteps / steps)) - 1 for k in range(steps)]


def linspace_timesteps(timesteps: int, steps: int) -> list[int]:
    """'linspace' (Lin et al. 2024, Table 2): round(linspace(0, T - 1, K)); includes 0 and T - 1."""
    return [int(t) for t in np.round(np.linspace(0, timesteps - 1, steps))][::-1]


SPACINGS: dict[str, Callable[[int, int], list[int]]] = {
    "leading": leading_timesteps,
    "trailing": trailing_timesteps,
    "linspace": linspace_timesteps,
}


def spaced_timesteps(timesteps: int, steps: int | None = None, spacing: str = "trailing") -> list[int]:
    """The K = ``steps`` kept 0-based timesteps of a T-step schedule, descending (all T if ``steps`` is None)."""
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    steps = timesteps if steps is None else steps
    if not isinstance(steps, int) or not 1 <= steps <= timesteps:
        raise ConfigError(f"the number of sampling steps must be between 1 and T = {timesteps}; got {steps!r}")
    kept = SPACINGS[spacing](timesteps, steps)
    assert len(set(kept)) == steps and kept == sorted(kept, reverse=True), kept
    return kept


def transitions(schedule: NoiseSchedule, timesteps: Sequence[int]) -> list[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar_prev) for each step t -> next kept timestep; alpha_bar_prev = 1 after the last."""
    abar = schedule.alphas_cumprod.detach().cpu().double().tolist()
    ts = [int(t) for t in timesteps]
    if not ts or any(not 0 <= t < len(abar) for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ConfigError(f"timesteps must be distinct, descending and in 0..{len(abar) - 1}; got {ts}")
    return [(t, abar[t], abar[ts[i + 1]] if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]


def _draw(noise: NoiseSource | None, x: torch.Tensor) -> torch.Tensor:
    if noise is None:
        raise ConfigError("this sampler is stochastic: pass noise=, a function returning standard normal noise")
    z = noise()
    if z.shape != x.shape:
        raise ConfigError(f"noise() returned shape {tuple(z.shape)}, expected {tuple(x.shape)}")
    return z.to(device=x.device, dtype=x.dtype)


def _report(callback, i, t, x_t, x0_pred, x) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x_t": x_t, "x0_pred": x0_pred, "x": x})


# ----------------------------------------------------------------------------- ancestral (Ho et al. 2020)

def ancestral_step(x_t: torch.Tensor, x0_pred: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float,
                   noise: torch.Tensor, variance: str = "posterior",
                   var_values: torch.Tensor | None = None) -> torch.Tensor:
    """One step of Algorithm 2 between two kept timesteps, with the respaced beta = 1 - alpha_bar_t / alpha_bar_prev.

    (improved-diffusion's respacing: the kept steps form a diffusion of their own.) The mean is the
    posterior mean at x0_pred (Eq. 7), the variance beta-tilde (``"posterior"``), beta (``"beta"``) or,
    with ``"learned-range"``, the network's interpolation ``var_values`` between the log of the
    respaced beta and beta-tilde (Nichol & Dhariwal 2021, Eq. 15). At the last step (alpha_bar_prev
    = 1) beta-tilde is 0 and a learned variance adds no noise.
    """
    beta = 1.0 - alpha_bar_t / alpha_bar_prev
    coef1 = math.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar_t)                  # Eq. 7, coefficient of x0
    coef2 = math.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)    # Eq. 7, coefficient of x_t
    if variance == LEARNED_VARIANCE:
        if var_values is None:
            raise ConfigError("variance 'learned-range' needs a network trained with learned variances "
                              "(2C output channels); this one has C")
        beta_tilde = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
        if beta_tilde <= 0.0:
            return coef1 * x0_pred + coef2 * x_t
        sigma = torch.exp(0.5 * learned_range_log_variance(var_values, math.log(beta), math.log(beta_tilde)))
        return coef1 * x0_pred + coef2 * x_t + sigma * noise
    sigma2 = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) if variance == "posterior" else beta
    return coef1 * x0_pred + coef2 * x_t + math.sqrt(sigma2) * noise


@torch.no_grad()
def sample_ancestral(denoiser: Denoiser, x_T: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
                     noise: NoiseSource | None = None, callback=None, variance: str = "posterior") -> torch.Tensor:
    """Ancestral sampling (Algorithm 2) over the kept timesteps; over all T it is the paper's sampler.

    No noise is added at the last step. ``variance="learned-range"`` uses the denoiser's
    ``Prediction.var_values`` (a learned-variance network).
    """
    if variance not in VARIANCES:
        raise ConfigError(f"unknown variance {variance!r}; choose from {', '.join(VARIANCES)}")
    x = x_T.float()
    steps = transitions(schedule, timesteps)
    for i, (t, abar_t, abar_prev) in enumerate(steps):
        pred = denoiser(x, t)
        _, x0_pred = pred
        z = _draw(noise, x) if i + 1 < len(steps) else torch.zeros_like(x)
        x_prev = ancestral_step(x, x0_pred, abar_t, abar_prev, z, variance, getattr(pred, "var_values", None))
        _report(callback, i, t, x, x0_pred, x_prev)
        x = x_prev
    return x


# ----------------------------------------------------------------------------- DDIM (Song et al. 2021)

def _per_sample(value, like: torch.Tensor):
    """A level shared by the batch (a float) as it is; per-sample levels [B] shaped to broadcast against ``like``."""
    return value.reshape(-1, *((1,) * (like.ndim - 1))) if torch.is_tensor(value) else value


def _sqrt(value):
    """sqrt(max(value, 0)) of a float (in float64) or of a tensor."""
    return value.clamp(min=0.0).sqrt() if torch.is_tensor(value) else math.sqrt(max(value, 0.0))


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta: float):
    """sigma_t(eta) = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)  (Eq. 16)."""
    if eta == 0.0:
        return 0.0
    return eta * _sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev))


def ddim_step(x_t: torch.Tensor, eps_pred: torch.Tensor, x0_pred: torch.Tensor, alpha_bar_t, alpha_bar_prev,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev = sqrt(alpha_bar_prev) x0_pred + sqrt(1 - alpha_bar_prev - sigma^2) eps_pred + sigma z  (Eq. 12).

    The one DDIM update: of the sampler, of the inversion (run forwards, to a larger alpha-bar
    level) and of the distillation teacher. The alpha-bars are floats shared by the batch
    (computed in float64) or per-sample tensors [B]; alpha_bar_prev = 1 lands on x0_pred.
    """
    alpha_bar_t, alpha_bar_prev = _per_sample(alpha_bar_t, x_t), _per_sample(alpha_bar_prev, x_t)
    sigma = ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)
    direction = _sqrt(1.0 - alpha_bar_prev - sigma ** 2) * eps_pred                  # "direction pointing to x_t"
    x_prev = _sqrt(alpha_bar_prev) * x0_pred + direction
    no_noise = not torch.is_tensor(sigma) and sigma == 0.0
    return x_prev if no_noise else x_prev + sigma * noise


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x_T: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
                noise: NoiseSource | None = None, callback=None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) over the kept timesteps; eta = 0 is deterministic, eta = 1 is ancestral."""
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta must be between 0 and 1; got {eta}")
    x = x_T.float()
    for i, (t, abar_t, abar_prev) in enumerate(transitions(schedule, timesteps)):
        eps_pred, x0_pred = denoiser(x, t)
        stochastic = ddim_sigma(abar_t, abar_prev, eta) > 0.0
        x_prev = ddim_step(x, eps_pred, x0_pred, abar_t, abar_prev, eta, _draw(noise, x) if stochastic else None)
        _report(callback, i, t, x, x0_pred, x_prev)
        x = x_prev
    return x


# ----------------------------------------------------------------------------- DPM-Solver++ (Lu et al. 2022)

def half_log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma) with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)  (Lu et al. 2022)."""
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


@torch.no_grad()
def sample_dpm_solver_pp_2m(denoiser: Denoiser, x_T: torch.Tensor, schedule: NoiseSchedule,
                            timesteps: Sequence[int], *, noise: NoiseSource | None = None,
                            callback=None) -> torch.Tensor:
    """DPM-Solver++(2M): multistep second-order solver of the probability-flow ODE in data prediction.

    Lu et al. 2022, Algorithm 2. The first step is first order (DPM-Solver++1, which is DDIM with
    eta = 0). Lower order at the end (``lower_order_final`` of Lu et al.'s code and diffusers): the
    step to the data (sigma = 0, lambda = infinity) is first order, which gives x0_pred; so is a step
    into timestep 0 (paper t = 1, the paper's end time), after which only that final denoising is
    left -- its jump in lambda is so large that the second-order extrapolation would be unstable.
    Deterministic: ``noise`` is not used.
    """
    x = x_T.float()
    steps = transitions(schedule, timesteps)
    x0_before, h_before = None, None
    for i, (t, abar_t, abar_next) in enumerate(steps):
        _, x0_pred = denoiser(x, t)
        if i + 1 == len(steps):
            x_next = x0_pred                                              # to the data: sigma_next = 0
        else:
            h = half_log_snr(abar_next) - half_log_snr(abar_t)            # h_i = lambda_{t_i} - lambda_{t_{i-1}}
            if x0_before is None or steps[i + 1][0] == 0:
                d = x0_pred                                               # first step, or into t = 0: first order
            else:
                r = h_before / h                                          # r_i = h_{i-1} / h_i
                d = (1.0 + 1.0 / (2.0 * r)) * x0_pred - (1.0 / (2.0 * r)) * x0_before   # D_i
            sigma_ratio = math.sqrt((1.0 - abar_next) / (1.0 - abar_t))
            # x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
            x_next = sigma_ratio * x - math.sqrt(abar_next) * math.expm1(-h) * d
            h_before = h
        _report(callback, i, t, x, x0_pred, x_next)
        x0_before, x = x0_pred, x_next
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ancestral,
    "ddim": sample_ddim,
    "dpm-solver++": sample_dpm_solver_pp_2m,
}


# ----------------------------------------------------------------------------- DDIM inversion

@torch.no_grad()
def ddim_invert(denoiser: Denoiser, x0: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
                callback=None) -> torch.Tensor:
    """Encode data x0 to noise x_T by running the deterministic DDIM step (Eq. 12, eta = 0) forwards.

    ``timesteps`` are the same kept steps given to :func:`sample_ddim` (any order). Going up from
    level s to the next kept t, the step uses the prediction at s (at the data, the first kept
    timestep's): x_t = sqrt(alpha_bar_t) x0_pred(x_s) + sqrt(1 - alpha_bar_t) eps_pred(x_s), the usual
    approximation eps(x_t) ~ eps(x_s) (Song et al. 2021, Sec. 4.3). ``sample_ddim`` from the result
    over the same timesteps reconstructs x0 up to that approximation.
    """
    ascending = sorted(int(t) for t in timesteps)
    transitions(schedule, ascending[::-1])                                # validates the timesteps
    abar = schedule.alphas_cumprod.detach().cpu().double().tolist()
    x, abar_s = x0.float(), 1.0
    for i, t in enumerate(ascending):
        s = ascending[max(i - 1, 0)]
        eps_pred, _ = denoiser(x, s)
        x0_pred = (x - math.sqrt(1.0 - abar_s) * eps_pred) / math.sqrt(abar_s)   # consistent with eps_pred at x_s
        x_next = ddim_step(x, eps_pred, x0_pred, abar_s, abar[t])                # Eq. 12 with eta = 0, upwards
        _report(callback, i, t, x, x0_pred, x_next)
        x, abar_s = x_next, abar[t]
    return x


def ddim_reconstruct(denoiser: Denoiser, x0: torch.Tensor, schedule: NoiseSchedule,
                     timesteps: Sequence[int]) -> torch.Tensor:
    """Invert x0 to x_T with :func:`ddim_invert`, then sample back with DDIM (eta = 0) over the same steps."""
    x_T = ddim_invert(denoiser, x0, schedule, timesteps)
    return sample_ddim(denoiser, x_T, schedule, sorted(timesteps, reverse=True), eta=0.0)


# ----------------------------------------------------------------------------- noise sources

def batch_noise(generators: Sequence[torch.Generator], shape: Sequence[int],
                device: torch.device | str | None = None) -> NoiseSource:
    """A noise source drawing sample k's noise [*shape] from ``generators[k]``: per-sample reproducible."""
    def draw() -> torch.Tensor:
        return torch.stack([randn(shape, generator=g) for g in generators]).to(device)
    return draw


# ----------------------------------------------------------------------------- options, as the CLI and record see them

@dataclass(frozen=True)
class SamplingOptions:
    """Which sampler to run and how, validated when built: the options of every command that samples,
    and a checkpoint's own sampler (``RunConfig.sampling``, its ``sampling`` section: e.g. a
    distilled student's DDIM over the steps it was trained for; ``to_dict`` writes it).

    ``steps`` None means all T steps; ``eta`` only applies to ``ddim`` (default 0), ``variance``
    only to ``ddpm`` (default: the checkpoint's); ``clip`` None means the checkpoint's setting;
    ``dynamic_thresholding`` replaces clipping. :func:`ddpm.sampling.resolve_plan` resolves them
    for one model (its timesteps, sampler keywords and x0 rule).
    """

    sampler: str = "ddpm"
    steps: int | None = None
    spacing: str = "trailing"
    eta: float | None = None
    variance: str | None = None
    clip: bool | None = None
    dynamic_thresholding: bool = False
    steps_at_most: bool = False        # steps is an upper bound: a schedule with fewer steps uses all of them

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.spacing not in SPACINGS:
            raise ConfigError(f"unknown spacing {self.spacing!r}; choose from {', '.join(SPACINGS)}")
        if self.steps is not None and not (_is_int(self.steps) and 1 <= self.steps <= MAX_STEPS):
            raise ConfigError(f"steps must be a positive integer (at most {MAX_STEPS:,}); got {self.steps!r}")
        if self.eta is not None and self.sampler != "ddim":
            raise ConfigError(f"eta only applies to the ddim sampler, not {self.sampler}")
        if self.eta is not None and not (_is_number(self.eta) and 0.0 <= self.eta <= 1.0):
            raise ConfigError(f"eta must be between 0 and 1; got {self.eta}")
        if self.variance is not None and self.sampler != "ddpm":
            raise ConfigError(f"the variance choice only applies to the ddpm sampler, not {self.sampler}")
        if self.variance is not None and self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}; choose from {', '.join(VARIANCES)}")
        for name in ("clip", "dynamic_thresholding", "steps_at_most"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "clip" and value is None):
                raise ConfigError(f"sampling {name} must be true or false; got {value!r}")
        if self.dynamic_thresholding and self.clip:
            raise ConfigError("x0 clipping and dynamic thresholding exclude each other; choose one")

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The kept timesteps for a T-step schedule, descending."""
        steps = min(self.steps, num_timesteps) if self.steps_at_most and self.steps else self.steps
        return spaced_timesteps(num_timesteps, steps, self.spacing)

    def sampler_options(self, default_variance: str = "posterior") -> dict:
        """The sampler's own keyword options (eta for ddim, variance for ddpm)."""
        if self.sampler == "ddim":
            return {"eta": 0.0 if self.eta is None else float(self.eta)}
        if self.sampler == "ddpm":
            return {"variance": self.variance or default_variance}
        return {}

    def to_dict(self) -> dict:
        """A checkpoint's ``sampling`` section: sampler, steps, spacing, eta and clip, and the other
        fields where they differ from their defaults (so that older readers still read the section)."""
        section = asdict(self)
        return {k: v for k, v in section.items() if k in _SECTION_KEYS or v != _DEFAULTS[k]}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MAX_STEPS = 100_000          # no schedule has more steps (ddpm.config.MAX_TIMESTEPS)
_SECTION_KEYS = ("sampler", "steps", "spacing", "eta", "clip")       # always in a checkpoint's sampling section
_DEFAULTS = {f.name: f.default for f in fields(SamplingOptions)}


# The default of `ddpm sample` and `ddpm.generate.generate`: ancestral sampling over 50 respaced
# steps (trailing spacing), the best of all samplers at 25 to 50 steps in the step-count benchmark
# (benchmarks/RESULTS.md, benchmarks/sampler_steps.py). `--sampler ddpm --steps 1000` (or no
# --steps with --sampler ddpm) is the paper's 1000-step sampler.
DEFAULT_SAMPLING = SamplingOptions(sampler="ddpm", steps=50, steps_at_most=True)
