"""Exact negative log-likelihood through the probability-flow ODE, in bits per dimension.

Song et al. 2021 ("Score-Based Generative Modeling through SDEs"), Sec. 4.3 and Appendix D.2, in
sigma space (``ddpm.sigmas``): with s = ln sigma the ODE dx/dsigma = (x - D(x; sigma)) / sigma reads

    dx/ds = f(x, s) = x - D(x; e^s)
    log p_{sigma_min}(x) = log p_prior(x(s_max)) + int_{s_min}^{s_max} div_x f(x(s), s) ds,
    div_x f = dim - tr(dD/dx),   p_prior = N(0, (1 + sigma_max^2) I)

(the instantaneous change of variables, Chen et al. 2018; the prior is the VP prior N(0, I) of x_T
read in sigma space). x(s_min) is the data: p_{sigma_min} is the model's density of data plus
N(0, sigma_min^2) noise, as Song et al. start at t = epsilon. The trace is Hutchinson's estimate
(Hutchinson 1989) with ``probes`` Rademacher vectors v, v^T (dD/dx) v by one vector-Jacobian product
each, drawn once per image and kept through the integration (so an adaptive solver integrates one
smooth function). The estimate is unbiased in the trace; its spread over images is in the standard
error. Solvers: fixed steps in s (``"heun"``, ``"rk4"``) or adaptive (``"rk45"``, SciPy's
Dormand-Prince ``solve_ivp``, rtol = atol = 1e-5 as Song et al.; SciPy comes with scikit-learn).

Bits/dim of 8-bit images (Song et al., App. D.2, uniform dequantisation): with k in 0..255 and
u ~ U[0, 1)^D, x = 2 (k + u) / 256 - 1; a density on [-1, 1]^D gives each 8-bit bin (width 2/256)
the bound -log P(k) <= E_u[-log p(x)] - D log(2/256), so bits/dim = -log p(x) / (D ln 2) + 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..denoiser import make_denoiser
from ..edm import EDMDenoiser
from ..errors import ConfigError, DataError
from ..sigmas import DiscreteSigmaDenoiser, SigmaDenoiser
from ..signals import check_stop

__all__ = ["ODE_SOLVERS", "hutchinson_divergence", "log_likelihood_ode", "dequantize", "OdeBpdResult", "bpd_ode",
           "sigma_denoiser", "evaluate_bpd_ode", "MAX_PROBES"]

ODE_SOLVERS = ("heun", "rk4", "rk45")
MAX_PROBES = 64                       # ddpm eval --probes: 1..64 Hutchinson vectors per image
LOG2 = math.log(2.0)


def hutchinson_divergence(D: SigmaDenoiser, x: torch.Tensor, sigma: float,
                          probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, div_x f) at x for f = x - D(x; sigma): div f = dim - tr(dD/dx), the trace as mean_k v_k^T (dD/dx) v_k."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        denoised = D(x, sigma)
        traces = []
        for k, v in enumerate(probes):
            (vjp,) = torch.autograd.grad(denoised, x, v, retain_graph=k + 1 < len(probes))   # v^T dD/dx
            traces.append((vjp * v).flatten(1).sum(1))
    dim = x[0].numel()
    return (x - denoised).detach(), dim - torch.stack(traces).mean(0).detach()


def _prior_log_density(x: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """log N(x; 0, (1 + sigma_max^2) I) per sample, in nats."""
    var = 1.0 + sigma_max ** 2
    flat = x.flatten(1).double()
    return -0.5 * (flat.pow(2).sum(1) / var + flat.shape[1] * math.log(2.0 * math.pi * var))


def _fixed_steps(rhs, y: torch.Tensor, s0: float, s1: float, steps: int, solver: str) -> torch.Tensor:
    """``steps`` equal steps of Heun's method or the classical Runge-Kutta method (RK4) from s0 to s1."""
    h = (s1 - s0) / steps
    for i in range(steps):
        check_stop("computing bits/dim along the probability-flow ODE")
        s = s0 + i * h
        k1 = rhs(s, y)
        if solver == "heun":
            k2 = rhs(s + h, y + h * k1)
            y = y + 0.5 * h * (k1 + k2)
        else:
            k2 = rhs(s + 0.5 * h, y + 0.5 * h * k1)
            k3 = rhs(s + 0.5 * h, y + 0.5 * h * k2)
            k4 = rhs(s + h, y + h * k3)
            y = y + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return y


def _adaptive(rhs, y: torch.Tensor, s0: float, s1: float, rtol: float, atol: float) -> torch.Tensor:
    from scipy.integrate import solve_ivp          # scikit-learn's dependency

    def f(s, flat):
        return rhs(s, torch.from_numpy(flat).to(y)).double().cpu().numpy()

    out = solve_ivp(f, (s0, s1), y.double().cpu().numpy(), method="RK45", rtol=rtol, atol=atol)
    if not out.success:
        raise ConfigError(f"the adaptive ODE solver failed: {out.message}")
    return torch.from_numpy(out.y[:, -1]).to(y)


def log_likelihood_ode(D: SigmaDenoiser, x0: torch.Tensor, *, generator: torch.Generator | None = None,
                       probes: int = 1, solver: str = "rk45", steps: int = 32, rtol: float = 1e-5, atol: float = 1e-5,
                       sigma_min: float | None = None, sigma_max: float | None = None) -> tuple[torch.Tensor, int]:
    """(log p_{sigma_min}(x0) in nats per sample [B] (float64), network evaluations) by the probability-flow ODE.

    ``sigma_min``/``sigma_max`` default to the denoiser's trained range; ``steps`` is for the fixed-step
    solvers. The probes are drawn from ``generator``.
    """
    if solver not in ODE_SOLVERS:
        raise ConfigError(f"unknown ODE solver {solver!r}; choose from {', '.join(ODE_SOLVERS)}")
    if not isinstance(probes, int) or probes < 1 or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"probes and steps must be positive integers; got {probes!r}, {steps!r}")
    sigma_min = D.sigma_min if sigma_min is None else sigma_min
    sigma_max = D.sigma_max if sigma_max is None else sigma_max
    if not 0.0 < sigma_min < sigma_max:
        raise ConfigError(f"the ODE needs 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    x0 = x0.float()
    B, shape = x0.shape[0], x0.shape
    dev = generator.device if generator is not None else "cpu"
    v = torch.randint(0, 2, (probes, *shape), generator=generator, device=dev).to(x0) * 2.0 - 1.0   # Rademacher
    calls = [0]

    def rhs(s: float, y: torch.Tensor) -> torch.Tensor:
        """d/ds of the state [x (B D values), integral of div f (B values)]."""
        calls[0] += 1
        f, div = hutchinson_divergence(D, y[:-B].reshape(shape).float(), math.exp(s), v)
        return torch.cat([f.flatten(), div]).to(y)

    y = torch.cat([x0.flatten(), x0.new_zeros(B)]).double()
    s0, s1 = math.log(sigma_min), math.log(sigma_max)
    y = _adaptive(rhs, y, s0, s1, rtol, atol) if solver == "rk45" else _fixed_steps(rhs, y, s0, s1, steps, solver)
    return _prior_log_density(y[:-B].reshape(shape), sigma_max) + y[-B:], calls[0]


def dequantize(x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x = 2 (k + u) / 256 - 1 for 8-bit data x0 = 2 k / 255 - 1, u ~ U[0, 1) (Song et al., App. D.2)."""
    k = (x0.double() + 1.0) * 127.5
    if bool(((k - k.round()).abs() > 1e-3).any()) or bool(((k < -1e-3) | (k > 255.001)).any()):
        raise DataError("bpd-ode needs 8-bit data: x0 = 2 k / 255 - 1 with k in 0..255")
    u = torch.rand(x0.shape, generator=generator, device=generator.device if generator is not None else "cpu",
                   dtype=torch.float64).to(x0.device)
    return (2.0 * (k.round() + u) / 256.0 - 1.0).to(x0.dtype)


@dataclass(frozen=True)
class OdeBpdResult:
    """The mean bits/dim over images, its standard error, every image's value and the network evaluations."""

    bpd: float
    stderr: float
    per_image: np.ndarray
    nfe: int


def bpd_ode(D: SigmaDenoiser, x0: torch.Tensor, *, generator: torch.Generator | None = None, batch_size: int = 64,
            progress: Callable[[int], None] | None = None, **options) -> OdeBpdResult:
    """Negative log-likelihood of 8-bit data x0 ([N, C, H, W] in [-1, 1]) in bits/dim, by the probability-flow ODE.

    Each image is dequantised (:func:`dequantize`) and its log-density computed by
    :func:`log_likelihood_ode` (``options``: probes, solver, steps, rtol, atol, sigma_min, sigma_max);
    bits/dim = -log p(x) / (D ln 2) + 7. The standard error is that of the mean over images. Draws
    come from ``generator`` batch by batch (dequantisation, then probes). The trace needs gradients
    with respect to x: call it outside ``torch.inference_mode()``, with a denoiser built without x0
    clipping or thresholding (they make D non-differentiable).
    """
    dims = x0[0].numel()
    values, nfe = [], 0
    for first in range(0, x0.shape[0], batch_size):
        check_stop("computing bits/dim along the probability-flow ODE")
        x = dequantize(x0[first:first + batch_size], generator)
        log_p, calls = log_likelihood_ode(D, x, generator=generator, **options)
        values.append((-log_p / (dims * LOG2) + 7.0).cpu().numpy())
        nfe += calls
        if progress is not None:
            progress(x.shape[0])
    per_image = np.concatenate(values)
    stderr = float(per_image.std(ddof=1) / math.sqrt(len(per_image))) if len(per_image) > 1 else float("nan")
    return OdeBpdResult(float(per_image.mean()), stderr, per_image, nfe)


def sigma_denoiser(diffusion) -> SigmaDenoiser:
    """D(x; sigma) of a :class:`~ddpm.gaussian_diffusion.GaussianDiffusion`, unclipped (the trace needs its
    gradient): EDM's denoiser for an EDM model, else the ddpm model's sigma view (``ddpm.sigmas``)."""
    config = diffusion.config
    if getattr(diffusion, "formulation", "ddpm") == "edm":
        return EDMDenoiser(diffusion.model, sigma_data=config.sigma_data, sigma_min=config.sigma_min,
                           sigma_max=config.sigma_max)
    schedule = diffusion.schedule_on(diffusion.device)
    denoiser = make_denoiser(diffusion.model, schedule, objective=diffusion.objective, clip=False,
                             self_condition=diffusion.self_condition)
    return DiscreteSigmaDenoiser(denoiser, schedule)


def evaluate_bpd_ode(diffusion, images: np.ndarray, *, probes: int = 1, solver: str = "rk45", steps: int | None = None,
                     batch_size: int = 64, seed: int = 0) -> dict:
    """:func:`bpd_ode` of uint8 ``images`` [N, H, W, C] under ``diffusion``'s network, in float32, with
    gradients on (outside inference mode); the draws from a CPU generator seeded with ``seed``.
    Returns the ``bpd_ode*`` entries of ``ddpm eval``'s results."""
    if solver == "rk45" and steps is not None:
        raise ConfigError("--ode-steps sets the fixed-step solvers (heun, rk4); rk45 chooses its own steps")
    x0 = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float() * (2.0 / 255.0) - 1.0   # 2 k / 255 - 1
    options = {"probes": probes, "solver": solver, **({"steps": steps} if steps is not None else {})}
    with torch.inference_mode(False), torch.enable_grad():
        result = bpd_ode(sigma_denoiser(diffusion), x0.to(diffusion.device), generator=torch.Generator().manual_seed(seed),
                         batch_size=batch_size, **options)
    return {"bpd_ode": result.bpd, "bpd_ode_stderr": result.stderr, "bpd_ode_n": len(result.per_image),
            "bpd_ode_nfe": result.nfe, "bpd_ode_probes": probes, "bpd_ode_solver": solver,
            **({"bpd_ode_steps": steps if steps is not None else 32} if solver != "rk45" else {})}
