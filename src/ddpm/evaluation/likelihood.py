"""The variational bound on the negative log-likelihood, in bits per dimension.

Ho et al. 2020, Eq. 5 (Table 2 reports it for CIFAR-10), computed term by term as
improved-diffusion does (Nichol & Dhariwal 2021):

    L = L_T + sum_{t>=2} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                                  the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))          every t >= 2, x_t ~ q(x_t | x_0)
    L_0     = -log p_theta(x_0 | x_1), p_theta a Gaussian discretised over the 256 bins of the
              8-bit grid, edge bins extended to -inf / +inf                 (Sec. 3.3, Eq. 13)

In code timesteps are 0-based (paper t = index + 1): code ``t = 0`` is the decoder L_0 and
code ``t >= 1`` the KL terms. Each term is in nats per image, summed over dimensions, then
divided by (D log 2) to give bits per dimension. Data must lie on the 8-bit grid: x0 = 2 k / 255 - 1
for k in 0..255 (``images_to_x0``). Every one of the T terms is computed for every image, with one
x_t drawn per term and image, so the estimate is unbiased and its standard error over images is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

# The bound's maths lives in ddpm.diffusion (training's L_vlb uses it too).
from ..denoiser import Denoiser
from ..diffusion import (BIN_HALF_WIDTH, LOG2, discretized_gaussian_log_likelihood, mean_over_dims, normal_kl,
                         q_mean_variance, q_sample, randn, vb_terms_from_mean_variance)
from ..errors import ConfigError, DataError
from ..schedules import NoiseSchedule
from ..signals import check_stop

__all__ = ["prior_bpd", "vb_terms_bpd", "bpd_terms",
           "images_to_x0", "BpdResult", "evaluate_bpd"]


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape [B]; no parameters, near 0 for a good schedule."""
    t = torch.full((x0.shape[0],), schedule.timesteps - 1, device=x0.device, dtype=torch.long)
    mean, _, log_var = q_mean_variance(schedule, x0.double(), t)
    return mean_over_dims(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / LOG2


def vb_terms_bpd(denoiser: Denoiser, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                 variance: str = "posterior") -> torch.Tensor:
    """One term of the bound per image, in bits/dim, shape [B]: L_{t-1} (a KL) where t >= 1, L_0 where t = 0.

    ``denoiser`` is the network bound to its schedule, objective and self-conditioning, clipping its x0
    estimate or not. A learned variance (``variance="learned-range"``) enters the KL and the decoder as
    it enters sampling. A self-conditioned network is evaluated as a reverse step of its own: a first
    pass with x0_prev = 0 gives the x0 estimate that the second pass is conditioned on.
    """
    self_cond = denoiser.p_mean_variance(x_t, t, variance=variance)["x0_pred"] if denoiser.self_condition else None
    out = denoiser.p_mean_variance(x_t, t, variance=variance, x0_prev=self_cond)
    return vb_terms_from_mean_variance(denoiser.schedule, x0, x_t, t, out["mean"].double(),
                                       out["log_variance"].double())


@torch.inference_mode()
def bpd_terms(denoiser: Denoiser, x0: torch.Tensor, *, variance: str = "posterior",
              generator: torch.Generator | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every term of the bound for a batch x0 [B, ...] on the 8-bit grid in [-1, 1], by ``denoiser``
    (:func:`vb_terms_bpd`) on its schedule.

    Returns, in bits/dim, ``terms`` [B, T] (column t is L_0 for t = 0, else L_t in the paper's
    numbering), ``prior`` [B] (L_T) and ``total`` [B] = prior + sum of the terms.
    """
    schedule = denoiser.schedule
    b, T = x0.shape[0], schedule.timesteps
    terms = torch.zeros(b, T, dtype=torch.float64)
    steps = range(T - 1, -1, -1)
    for i in tqdm(steps, desc="bits/dim", disable=not progress, leave=False, dynamic_ncols=True):
        check_stop("computing bits/dim")        # T network evaluations per batch: SIGINT / SIGTERM end it between two
        t = torch.full((b,), i, device=x0.device, dtype=torch.long)
        x_t = q_sample(schedule, x0, t, randn(x0.shape, generator=generator, device=x0.device))
        terms[:, i] = vb_terms_bpd(denoiser, x0, x_t, t, variance=variance).cpu()
    prior = prior_bpd(schedule, x0).cpu()
    return {"terms": terms, "prior": prior, "total": prior + terms.sum(dim=1)}


def images_to_x0(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> x0 float32 [N, C, H, W] on the 8-bit grid: 2 k / 255 - 1."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise DataError("bits/dim needs uint8 images [N, H, W, C] (data on the 8-bit grid)")
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float() * (2.0 / 255.0) - 1.0


@dataclass
class BpdResult:
    """The bound in bits/dim over ``n`` images: the mean, its standard error, and the mean of every term."""

    bpd: float
    stderr: float
    n: int
    prior: float
    decoder: float                       # L_0
    terms: list[float] = field(repr=False)   # mean over images of column t (0-based), length T
    per_image: list[float] = field(repr=False)

    def to_dict(self) -> dict:
        return {"bpd": self.bpd, "bpd_stderr": self.stderr, "bpd_n": self.n, "bpd_prior": self.prior,
                "bpd_decoder": self.decoder, "bpd_kl": float(sum(self.terms[1:])), "bpd_terms": self.terms}


def evaluate_bpd(diffusion, images: np.ndarray, *, batch_size: int = 100, seed: int = 0,
                 progress: bool = True, clip_denoised: bool | None = None) -> BpdResult:
    """The bound for uint8 ``images`` [N, H, W, C] under a :class:`~ddpm.diffusion.GaussianDiffusion`.

    Uses the diffusion's objective, variance (fixed or learned), self-conditioning and x0 clipping (as sampling does, and as
    improved-diffusion's evaluation does); the x_t noise comes from a CPU generator seeded with ``seed``.
    """
    if getattr(diffusion, "formulation", "ddpm") == "edm":
        raise ConfigError("the variational bound is a ddpm model's (its T steps); for an EDM model use "
                          "--metric bpd-ode, the exact likelihood")
    x0_all = images_to_x0(images)
    expected = (diffusion.channels, *diffusion.image_size)
    if tuple(x0_all.shape[1:]) != expected:
        raise DataError(f"images have shape {tuple(images.shape[1:])} (H, W, C) but the model expects "
                        f"{expected[1]}x{expected[2]} with {expected[0]} channel(s)")
    device = diffusion.device
    schedule = diffusion.schedule_on(device)
    generator = torch.Generator().manual_seed(seed)
    clip = diffusion.clip_denoised if clip_denoised is None else clip_denoised
    denoiser = Denoiser(diffusion.model, schedule, objective=diffusion.objective, clip=clip,
                        self_condition=getattr(diffusion, "self_condition", False))
    results = []
    batches = range(0, len(x0_all), batch_size)
    for start in tqdm(batches, desc="bits/dim batches", disable=not progress or len(batches) == 1, dynamic_ncols=True):
        check_stop("computing bits/dim")
        x0 = x0_all[start:start + batch_size].to(device)
        results.append(bpd_terms(denoiser, x0, variance=diffusion.variance, generator=generator, progress=progress))
    total = torch.cat([r["total"] for r in results])
    terms = torch.cat([r["terms"] for r in results])
    prior = torch.cat([r["prior"] for r in results])
    n = len(total)
    stderr = float(total.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return BpdResult(bpd=float(total.mean()), stderr=stderr, n=n, prior=float(prior.mean()),
                     decoder=float(terms[:, 0].mean()), terms=terms.mean(dim=0).tolist(), per_image=total.tolist())
