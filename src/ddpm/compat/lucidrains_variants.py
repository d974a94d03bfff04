"""lucidrains' other diffusion classes: those this project has an equivalent for, on its machinery,
and the others as classes that refuse in one line naming the nearest ddpm call.

* ``LearnedGaussianDiffusion(model, vb_loss_weight)``: a ``Unet(learned_variance=True)`` trained with
  the hybrid loss L_simple + lambda L_vlb and sampled with the learned variance (Nichol & Dhariwal 2021).
* ``XMWrapper(diffusion, candidates=K)``: each image's loss is the smallest of K draws of the noise
  at one timestep; sampling is the diffusion's.
* ``WeightedObjectiveGaussianDiffusion``, ``ElucidatedDiffusion``, ``ContinuousTimeGaussianDiffusion``,
  ``VParamContinuousTimeGaussianDiffusion``, ``KarrasUnet`` (and its 1D and 3D forms): no equivalent.
Import these names from :mod:`ddpm.compat.lucidrains`.
"""

from __future__ import annotations

import torch
from torch import nn

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


# lucidrains' classes without an equivalent here, and the nearest ddpm call for each.
UNSUPPORTED = {
    "WeightedObjectiveGaussianDiffusion": "a network predicting eps and x0 with learned mixing weights is not "
                                          "built here; nearest: GaussianDiffusion(model, objective='pred_v'), "
                                          "whose target mixes eps and x0 by the step's signal-to-noise ratio",
    "ElucidatedDiffusion": "continuous-noise-level (EDM) training and sampling are not here yet; nearest: "
                           "GaussianDiffusion(model, ...) with sampling_timesteps (DDIM) or ddpm sample "
                           "--sampler dpm-solver++",
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
ElucidatedDiffusion = _unsupported("ElucidatedDiffusion")
ContinuousTimeGaussianDiffusion = _unsupported("ContinuousTimeGaussianDiffusion")
VParamContinuousTimeGaussianDiffusion = _unsupported("VParamContinuousTimeGaussianDiffusion")
KarrasUnet = _unsupported("KarrasUnet")
KarrasUnet1D = _unsupported("KarrasUnet1D")
KarrasUnet3D = _unsupported("KarrasUnet3D")
InvSqrtDecayLRSched = _unsupported("InvSqrtDecayLRSched")
