"""Samplers: the paper's ancestral sampler, respaced ancestral, DDIM and DPM-Solver++(2M).

Every sampler is one function with the same signature::

    sampler(denoiser, x_T, schedule, timesteps, *, noise=None, callback=None, **options) -> x_0

* ``denoiser(x_t, t)`` returns ``(eps_pred, x0_pred)`` for the 0-based timestep ``t`` (an int shared
  by the batch), as a :class:`~ddpm.denoiser.Prediction` that also carries a learned-variance
  network's interpolation channels (``var_values``, used by the ancestral sampler only).
  :func:`~ddpm.denoiser.make_denoiser` builds one from any network, whatever its
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

from .denoiser import Denoiser
from .diffusion import LEARNED_VARIANCE, VARIANCES, learned_range_log_variance, randn
from .errors import ConfigError
from .schedules import NoiseSchedule
from .sigmas import KARRAS_RHO, Sigmas, as_sigma_denoiser, karras_sigmas, karras_timesteps, schedule_sigmas, sigma_steps

__all__ = [
    "leading_timesteps", "trailing_timesteps", "linspace_timesteps", "SPACINGS", "spaced_timesteps",
    "transitions", "ancestral_step", "ddim_sigma", "ddim_step", "half_log_snr",
    "sample_ancestral", "sample_ddim", "sample_dpm_solver_pp_2m", "SAMPLERS",
    "ddim_invert", "ddim_reconstruct", "batch_noise",
    "SamplingOptions", "DEFAULT_SAMPLING",
    "KARRAS", "SPACING_CHOICES", "to_d", "churn_gamma", "ancestral_sigmas",
    "sample_euler", "sample_heun", "sample_euler_ancestral", "sample_dpm_solver_pp_2m_sde", "SIGMA_SAMPLERS",
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
KARRAS = "karras"                     # sigma spacing (EDM Eq. 5): needs the schedule, see spaced_timesteps
SPACING_CHOICES = (*SPACINGS, KARRAS)


def spaced_timesteps(timesteps: int, steps: int | None = None, spacing: str = "trailing", *,
                     schedule: NoiseSchedule | None = None, rho: float = KARRAS_RHO) -> list[int]:
    """The K = ``steps`` kept 0-based timesteps of a T-step schedule, descending (all T if ``steps`` is None).

    ``"karras"`` needs the ``schedule`` itself: :func:`ddpm.sigmas.karras_timesteps` with ``rho``.
    """
    if spacing not in SPACING_CHOICES:
        raise ConfigError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACING_CHOICES)}")
    steps = timesteps if steps is None else steps
    if spacing == KARRAS:
        if schedule is None or schedule.timesteps != timesteps:
            raise ConfigError(f"the karras spacing needs the model's {timesteps}-step noise schedule")
        return karras_timesteps(schedule, steps, rho)
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
    # EDM's stochasticity (Karras et al. 2022, Algorithm 2): churn, s_tmin, s_tmax for euler and heun,
    # s_noise for every sigma sampler but euler/heun without churn; rho for the karras spacing. None: defaults.
    churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    rho: float | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.spacing not in SPACING_CHOICES:
            raise ConfigError(f"unknown spacing {self.spacing!r}; choose from {', '.join(SPACING_CHOICES)}")
        self._check_sigma_options()
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

    def _check_sigma_options(self) -> None:
        churn_options = {"churn": self.churn, "s_tmin": self.s_tmin, "s_tmax": self.s_tmax}
        for name, value in {**churn_options, "s_noise": self.s_noise, "rho": self.rho}.items():
            if value is not None and (not isinstance(value, (int, float)) or math.isnan(value) or value < 0):
                raise ConfigError(f"{name} must be a number >= 0; got {value!r}")
        for name, value in churn_options.items():
            if value is not None and self.sampler not in ("euler", "heun"):
                raise ConfigError(f"{name} only applies to the euler and heun samplers, not {self.sampler}")
        if self.s_noise is not None and self.sampler not in SIGMA_SAMPLERS:
            raise ConfigError(f"s_noise only applies to the sigma samplers ({', '.join(SIGMA_SAMPLERS)}), "
                              f"not {self.sampler}")
        if self.s_tmin is not None and self.s_tmax is not None and self.s_tmin > self.s_tmax:
            raise ConfigError(f"s_tmin ({self.s_tmin}) must not exceed s_tmax ({self.s_tmax})")
        if self.rho is not None and (self.spacing != KARRAS or self.rho == 0):
            raise ConfigError("rho only applies to the karras spacing, and must be > 0")

    def timesteps(self, num_timesteps: int, schedule: NoiseSchedule | None = None) -> list[int] | Sigmas:
        """The kept timesteps for a T-step schedule, descending.

        The karras spacing needs ``schedule``: a sigma sampler then gets the Karras sigmas between the
        schedule's sigma_0 and sigma_{T-1} themselves (:class:`~ddpm.sigmas.Sigmas`), a discrete sampler
        their nearest timesteps (:func:`~ddpm.sigmas.karras_timesteps`).
        """
        steps = min(self.steps, num_timesteps) if self.steps_at_most and self.steps else self.steps
        if self.spacing == KARRAS and self.sampler in SIGMA_SAMPLERS:
            if schedule is None:
                raise ConfigError("the karras spacing needs the model's noise schedule")
            sigmas = schedule_sigmas(schedule)
            return karras_sigmas(num_timesteps if steps is None else steps, float(sigmas[0]), float(sigmas[-1]),
                                 KARRAS_RHO if self.rho is None else self.rho)
        rho = KARRAS_RHO if self.rho is None else self.rho
        return spaced_timesteps(num_timesteps, steps, self.spacing, schedule=schedule, rho=rho)

    def sigmas(self, sigma_min: float, sigma_max: float) -> Sigmas:
        """The levels for a model trained in sigma space (EDM): ``steps`` (default 18) Karras sigmas (Eq. 5)."""
        if self.sampler not in SIGMA_SAMPLERS:
            raise ConfigError(f"a model trained in sigma space needs a sigma sampler ({', '.join(SIGMA_SAMPLERS)})")
        if self.spacing != KARRAS:
            raise ConfigError(f"a model trained in sigma space is sampled with the karras spacing, not {self.spacing}")
        return karras_sigmas(self.steps or 18, sigma_min, sigma_max, KARRAS_RHO if self.rho is None else self.rho)

    def sampler_options(self, default_variance: str = "posterior") -> dict:
        """The sampler's own keyword options (eta for ddim, variance for ddpm, EDM's churn and noise)."""
        if self.sampler == "ddim":
            return {"eta": 0.0 if self.eta is None else float(self.eta)}
        if self.sampler == "ddpm":
            return {"variance": self.variance or default_variance}
        names = ("churn", "s_tmin", "s_tmax", "s_noise") if self.sampler in ("euler", "heun") else ("s_noise",)
        return {name: float(getattr(self, name)) for name in names if getattr(self, name) is not None}

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


# ----------------------------------------------------------------------------- sigma samplers (Karras et al. 2022)
#
# The same signature as above. ``denoiser`` is a ddpm denoiser (read in sigma space on ``schedule``,
# ddpm.sigmas.DiscreteSigmaDenoiser) or a ddpm.sigmas.SigmaDenoiser (an EDM network; ``schedule``
# may then be None); ``timesteps`` are kept timesteps (their sigmas, then 0) or a ddpm.sigmas.Sigmas.
# The state is x = x_t / sqrt(alpha_bar_t) = x0 + sigma n: x_T, read as the VP state at the first
# level, starts as sqrt(1 + sigma_0^2) x_T. ``callback`` sees ``sigma`` too; its ``t`` is the kept
# timestep (sigma when given Sigmas) and ``x_t``/``x`` are in the VP scale (x / sqrt(1 + sigma^2)), as
# the other samplers report them.

def to_d(x: torch.Tensor, sigma: float, x0_pred: torch.Tensor) -> torch.Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE (EDM Eq. 3, sigma(t) = t, s(t) = 1)."""
    return (x - x0_pred) / sigma


def churn_gamma(sigma: float, steps: int, churn: float, s_tmin: float, s_tmax: float) -> float:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0  (EDM Algorithm 2, line 4)."""
    return min(churn / steps, math.sqrt(2.0) - 1.0) if churn > 0 and s_tmin <= sigma <= s_tmax else 0.0


def ancestral_sigmas(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic step to sigma_down, then noise sigma_up, reaching sigma_next.

    sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2, the DDIM eta = 1 variance (Song et al.
    2021, Eq. 16) in sigma space; sigma_down^2 = sigma_next^2 - sigma_up^2.
    """
    sigma_up = min(sigma_next, math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def _sigma_start(denoiser, x_T: torch.Tensor, schedule, timesteps, callback):
    """(D, levels, x, report): the sigma-space denoiser, the levels to visit, the starting state, the callback."""
    D = as_sigma_denoiser(denoiser, schedule)
    sigmas = list(sigma_steps(schedule, timesteps).values)
    labels = sigmas if isinstance(timesteps, Sigmas) else [int(t) for t in timesteps]

    def report(i, x, x0_pred, x_next) -> None:
        if callback is not None:
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            callback({"i": i, "t": labels[i], "sigma": sigma, "x_t": x / math.sqrt(1.0 + sigma ** 2),
                      "x0_pred": x0_pred, "x": x_next / math.sqrt(1.0 + sigma_next ** 2)})
    return D, sigmas, x_T.float() * math.sqrt(1.0 + sigmas[0] ** 2), report


def _churned(x, sigma, gamma, s_noise, noise):
    """EDM Algorithm 2, lines 5-6: sigma_hat = (1 + gamma) sigma, x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps"""
    if gamma <= 0.0:
        return x, sigma
    sigma_hat = sigma * (1.0 + gamma)
    return x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * s_noise * _draw(noise, x), sigma_hat


def _edm_steps(denoiser, x_T, schedule, timesteps, noise, callback, churn, s_tmin, s_tmax, s_noise, second_order):
    """EDM Algorithm 2 (Algorithm 1 when churn = 0); Euler's method without lines 9-11."""
    D, sigmas, x, report = _sigma_start(denoiser, x_T, schedule, timesteps, callback)
    N = len(sigmas) - 1
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        gamma = churn_gamma(sigma, N, churn, s_tmin, s_tmax)                       # line 4
        x_hat, sigma_hat = _churned(x, sigma, gamma, s_noise, noise)               # lines 5-6
        x0_pred = D(x_hat, sigma_hat)
        d = to_d(x_hat, sigma_hat, x0_pred)                                        # line 7
        x_next = x_hat + (sigma_next - sigma_hat) * d                              # line 8: Euler step
        if second_order and sigma_next != 0.0:                                     # line 9
            d_prime = to_d(x_next, sigma_next, D(x_next, sigma_next))              # line 10
            x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_prime)  # line 11: trapezoidal rule
        report(i, x, x0_pred, x_next)
        x = x_next
    return x


@torch.no_grad()
def sample_euler(denoiser, x_T: torch.Tensor, schedule: NoiseSchedule | None, timesteps, *,
                 noise: NoiseSource | None = None, callback=None, churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """Euler's method on the probability-flow ODE, with EDM's churn (Karras et al. 2022, Algorithm 2
    without the correction of lines 9-11). churn = 0 is deterministic; over a ddpm model's own
    timesteps it is DDIM with eta = 0 (their Sec. 4; Song et al. 2021, Sec. 4.3)."""
    return _edm_steps(denoiser, x_T, schedule, timesteps, noise, callback, churn, s_tmin, s_tmax, s_noise, False)


@torch.no_grad()
def sample_heun(denoiser, x_T: torch.Tensor, schedule: NoiseSchedule | None, timesteps, *,
                noise: NoiseSource | None = None, callback=None, churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2; Algorithm 1 when churn = 0).

    Two network evaluations per step except the last, to sigma = 0, which is an Euler step (line 9).
    With churn > 0 each step with S_tmin <= sigma_i <= S_tmax first adds noise raising sigma_i by
    gamma_i (lines 4-6).
    """
    return _edm_steps(denoiser, x_T, schedule, timesteps, noise, callback, churn, s_tmin, s_tmax, s_noise, True)


@torch.no_grad()
def sample_euler_ancestral(denoiser, x_T: torch.Tensor, schedule: NoiseSchedule | None, timesteps, *,
                           noise: NoiseSource | None = None, callback=None, s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``): an Euler step to sigma_down, then fresh
    noise sigma_up (:func:`ancestral_sigmas`); over a ddpm model's own timesteps it is DDIM with eta = 1."""
    D, sigmas, x, report = _sigma_start(denoiser, x_T, schedule, timesteps, callback)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        x0_pred = D(x, sigma)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
        x_next = x + (sigma_down - sigma) * to_d(x, sigma, x0_pred)                # Euler step to sigma_down
        if sigma_up > 0.0:
            x_next = x_next + sigma_up * s_noise * _draw(noise, x)                 # back up to sigma_next
        report(i, x, x0_pred, x_next)
        x = x_next
    return x


@torch.no_grad()
def sample_dpm_solver_pp_2m_sde(denoiser, x_T: torch.Tensor, schedule: NoiseSchedule | None, timesteps, *,
                                noise: NoiseSource | None = None, callback=None, s_noise: float = 1.0) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, DPM-Solver++, Sec. 5 / App. B), midpoint form, in data prediction.

    With lambda = -log sigma and h = lambda_next - lambda, each step solves the reverse SDE's linear
    part exactly: x_next = (sigma_next / sigma) e^{-h} x + (1 - e^{-2h}) D_i + sigma_next sqrt(1 - e^{-2h}) z,
    where D_i is x0_pred plus, after the first step, the second-order correction
    (1 / (2 r)) (x0_pred - x0_pred_before), r = h_before / h. The step to sigma = 0 returns x0_pred.
    """
    D, sigmas, x, report = _sigma_start(denoiser, x_T, schedule, timesteps, callback)
    x0_before, h_before = None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        x0_pred = D(x, sigma)
        if sigma_next == 0.0:
            x_next = x0_pred                                                        # to the data
        else:
            h = math.log(sigma / sigma_next)                                        # lambda_next - lambda
            one_minus = -math.expm1(-2.0 * h)                                       # 1 - e^{-2h}
            x_next = (sigma_next / sigma) * math.exp(-h) * x + one_minus * x0_pred
            if x0_before is not None:
                x_next = x_next + one_minus * (0.5 * h / h_before) * (x0_pred - x0_before)   # 1 / (2 r) (D_i - D_{i-1})
            x_next = x_next + sigma_next * math.sqrt(one_minus) * s_noise * _draw(noise, x)
            h_before = h
        report(i, x, x0_pred, x_next)
        x0_before, x = x0_pred, x_next
    return x


SIGMA_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "euler-ancestral": sample_euler_ancestral,
    "dpm-solver++-sde": sample_dpm_solver_pp_2m_sde,
}
SAMPLERS.update(SIGMA_SAMPLERS)
