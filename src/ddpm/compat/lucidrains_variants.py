"""lucidrains' other diffusion classes: those this project has an equivalent for, on its machinery,
and the others as classes that refuse in one line naming the nearest ddpm call.

* ``LearnedGaussianDiffusion(model, vb_loss_weight)``: a ``Unet(learned_variance=True)`` trained with
  the hybrid loss L_simple + lambda L_vlb and sampled with the learned variance (Nichol & Dhariwal 2021).
* ``XMWrapper(diffusion, candidates=K)``: each image's loss is the smallest of K draws of the noise
  at one timestep; sampling is the diffusion's.
* ``ElucidatedDiffusion(net, image_size=, channels=, num_sample_steps=, sigma_min=, ..., S_noise=)``:
  EDM (Karras et al. 2022) on ``ddpm.edm`` (preconditioning, log-normal sigmas, the loss weight) and
  the Heun sampler of ``ddpm.samplers`` with churn over the karras levels.
* ``WeightedObjectiveGaussianDiffusion``, ``ContinuousTimeGaussianDiffusion``,
  ``VParamContinuousTimeGaussianDiffusion``, ``KarrasUnet`` (and its 1D and 3D forms): no equivalent.
Import these names from :mod:`ddpm.compat.lucidrains`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..edm import EDMDenoiser, EDMLoss
from ..samplers import sample_heun
from ..sigmas import karras_sigmas
from .lucidrains_core import ArgumentError, GaussianDiffusion

__all__ = ["LearnedGaussianDiffusion", "XMWrapper", "UNSUPPORTED", "WeightedObjectiveGaussianDiffusion",
           "ElucidatedDiffusion", "ContinuousTimeGaussianDiffusion", "VParamContinuousTimeGaussianDiffusion",
           "KarrasUnet", "KarrasUnet1D", "KarrasUnet3D", "InvSqrtDecayLRSched"]


class LearnedGaussianDiffusion(GaussianDiffusion):
    """:class:`~ddpm.compat.lucidrains.GaussianDiffusion` of a ``Unet(learned_variance=True)``: the hybrid
    loss with lambda = ``vb_loss_weight`` (0.001, the paper's) and the learned-range variance."""

    def __init__(self, model, vb_loss_weight: float = 0.001, **options):
        if not getattr(model, "learned_variance", False):
            raise ArgumentError("LearnedGaussianDiffusion needs a model with twice the channels out; "
                                "nearest: Unet(..., learned_variance=True)")
        super().__init__(model, vlb_weight=float(vb_loss_weight), **options)
        self.vb_loss_weight = float(vb_loss_weight)


class XMWrapper(nn.Module):
    """Explorative modelling (forward XM): each image's loss is the smallest over ``candidates`` draws
    of the noise, all at the image's one timestep; the batch loss is their mean. ``sample`` is the
    wrapped diffusion's."""

    def __init__(self, flow_model: GaussianDiffusion, candidates: int = 1, max_batch_size: int | None = None,
                 **options):
        super().__init__()
        if options:
            raise ArgumentError(f"XMWrapper({next(iter(options))}=...) has no equivalent in ddpm; it takes "
                                f"candidates and max_batch_size")
        if not isinstance(candidates, int) or candidates < 1:
            raise ArgumentError(f"XMWrapper(candidates={candidates!r}) must be a positive integer")
        self.flow_model, self.candidates, self.max_batch_size = flow_model, candidates, max_batch_size

    def sample(self, *args, **kwargs):
        return self.flow_model.sample(*args, **kwargs)

    def forward(self, images: torch.Tensor, *, candidates: int | None = None) -> torch.Tensor:
        k = self.candidates if candidates is None else candidates
        if k == 1:
            return self.flow_model(images)
        b = images.shape[0]
        t = torch.randint(0, self.flow_model.timesteps, (b,), device=images.device)
        repeated, t = images.repeat_interleave(k, dim=0), t.repeat_interleave(k)      # rows (image, candidate)
        chunk = self.max_batch_size or b * k
        losses = torch.cat([self.flow_model(repeated[i:i + chunk], t=t[i:i + chunk], reduction="none")
                            for i in range(0, b * k, chunk)])
        return losses.reshape(b, k).amin(dim=1).mean()


class ElucidatedDiffusion(nn.Module):
    """EDM (Karras et al. 2022) with lucidrains' arguments: ``diffusion(images)`` is EDM's loss (``ddpm.edm``:
    Eq. 2 with Table 1's preconditioning, sigma log-normal with ``P_mean``, ``P_std``) for images in [0, 1];
    ``sample(batch_size)`` runs Heun's method with churn (Algorithm 2, ``S_churn``, ``S_tmin``, ``S_tmax``,
    ``S_noise``) over ``num_sample_steps`` karras levels (Eq. 5, ``rho``) between ``sigma_min`` and
    ``sigma_max``, images in [0, 1]. The network is called as ``net(c_in x, c_noise)``."""

    def __init__(self, net, *, image_size, channels: int = 3, num_sample_steps: int = 32, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0, P_mean: float = -1.2,
                 P_std: float = 1.2, S_churn: float = 80.0, S_tmin: float = 0.05, S_tmax: float = 50.0,
                 S_noise: float = 1.003, **options):
        super().__init__()
        if options:
            raise ArgumentError(f"ElucidatedDiffusion({next(iter(options))}=...) has no equivalent in ddpm; it takes "
                                "image_size, channels, num_sample_steps, sigma_min, sigma_max, sigma_data, rho, "
                                "P_mean, P_std, S_churn, S_tmin, S_tmax and S_noise")
        if not isinstance(num_sample_steps, int) or num_sample_steps < 1:
            raise ArgumentError(f"ElucidatedDiffusion(num_sample_steps={num_sample_steps!r}) must be a positive integer")
        self.net, self.channels, self.num_sample_steps = net, channels, num_sample_steps
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho
        self.S_churn, self.S_tmin, self.S_tmax, self.S_noise = S_churn, S_tmin, S_tmax, S_noise
        self.loss = EDMLoss(sigma_data=sigma_data, p_mean=P_mean, p_std=P_std)
        self.denoiser = EDMDenoiser(net, sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """EDM's loss, the mean over the batch, for images in [0, 1] drawn with the global RNG."""
        if tuple(images.shape[1:]) != (self.channels, *self.image_size):
            raise ArgumentError(f"ElucidatedDiffusion expects images [B, {self.channels}, "
                                f"{', '.join(map(str, self.image_size))}]; got {list(images.shape)}")
        generator = torch.Generator(images.device).manual_seed(int(torch.randint(2 ** 62, (1,))))
        sigma, _ = self.loss.draw_timesteps(images.shape[0], generator, images.device)
        x0 = images.float() * 2.0 - 1.0
        noise = torch.randn(x0.shape, generator=generator, device=images.device)
        return self.loss.losses(self.net, x0, sigma, noise).mean()

    @torch.no_grad()
    def sample(self, batch_size: int = 16, num_sample_steps: int | None = None, clamp: bool = True) -> torch.Tensor:
        """``batch_size`` images in [0, 1] by EDM's stochastic Heun sampler (Algorithm 2) from the global RNG."""
        steps = num_sample_steps or self.num_sample_steps
        shape = (batch_size, self.channels, *self.image_size)
        sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)
        x = sample_heun(self.denoiser, torch.randn(shape, device=self.device), None, sigmas,
                        noise=lambda: torch.randn(shape, device=self.device), churn=self.S_churn,
                        s_tmin=self.S_tmin, s_tmax=self.S_tmax, s_noise=self.S_noise)
        return ((x.clamp(-1.0, 1.0) if clamp else x) + 1.0) / 2.0


# lucidrains' classes without an equivalent here, and the nearest ddpm call for each.
UNSUPPORTED = {
    "WeightedObjectiveGaussianDiffusion": "a network predicting eps and x0 with learned mixing weights is not "
                                          "built here; nearest: GaussianDiffusion(model, objective='pred_v'), "
                                          "whose target mixes eps and x0 by the step's signal-to-noise ratio",
    "ContinuousTimeGaussianDiffusion": "time is discrete here (T steps); nearest: GaussianDiffusion(model, "
                                       "timesteps=1000, beta_schedule='cosine')",
    "VParamContinuousTimeGaussianDiffusion": "time is discrete here (T steps); nearest: GaussianDiffusion("
                                             "model, objective='pred_v', beta_schedule='cosine')",
    "KarrasUnet": "the magnitude-preserving EDM2 U-Net is not built here; nearest: Unet(dim=..., dim_mults=...)",
    "KarrasUnet1D": "the magnitude-preserving EDM2 U-Net is not built here; nearest: Unet1D(dim=..., "
                    "dim_mults=...)",
    "KarrasUnet3D": "there are no 3D (video) networks here; nearest: Unet for images, Unet1D for sequences",
    "InvSqrtDecayLRSched": "the learning rate here is a linear warm-up then constant; nearest: "
                           "ddpm train --warmup-steps",
}


def _unsupported(name: str) -> type:
    def refuse(self, *args, **kwargs):
        raise ArgumentError(f"{name} has no equivalent in ddpm: {UNSUPPORTED[name]} (docs/coming-from.md)")

    return type(name, (), {"__init__": refuse, "__doc__": f"Not available in ddpm: {UNSUPPORTED[name]}.",
                           "__module__": __name__})


WeightedObjectiveGaussianDiffusion = _unsupported("WeightedObjectiveGaussianDiffusion")
ContinuousTimeGaussianDiffusion = _unsupported("ContinuousTimeGaussianDiffusion")
VParamContinuousTimeGaussianDiffusion = _unsupported("VParamContinuousTimeGaussianDiffusion")
KarrasUnet = _unsupported("KarrasUnet")
KarrasUnet1D = _unsupported("KarrasUnet1D")
KarrasUnet3D = _unsupported("KarrasUnet3D")
InvSqrtDecayLRSched = _unsupported("InvSqrtDecayLRSched")
