"""lucidrains' denoising-diffusion-pytorch API, on this project's U-Net and diffusion maths.

Code written against that library runs with its import changed::

    from ddpm.compat.lucidrains import GaussianDiffusion, Unet

    model = Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)   # no image size: any multiple of 8
    diffusion = GaussianDiffusion(model, image_size=128, timesteps=1000, sampling_timesteps=250)
    loss = diffusion(images)                  # images in [0, 1]
    samples = diffusion.sample(batch_size=4)  # DDIM over 250 steps, as there

    trainer = Trainer(diffusion, "path/to/your/images", train_batch_size=32, train_num_steps=700_000)
    trainer.train()                           # the project's training loop, into ./results

Its argument names are accepted where they mean the same thing here, and this project's own
:class:`~ddpm.models.UnetConfig` names are accepted too. An argument with no equivalent is an
error that names the nearest one (:class:`ArgumentError`, a ``TypeError``). What each name
becomes is listed in ``docs/coming-from.md``.
"""
from __future__ import annotations

from .lucidrains_1d import Dataset1D, GaussianDiffusion1D, Trainer1D, Unet1D
from .lucidrains_core import OBJECTIVES, ArgumentError, GaussianDiffusion, Trainer, Unet
from .lucidrains_variants import (ContinuousTimeGaussianDiffusion, ElucidatedDiffusion, InvSqrtDecayLRSched,
                                  KarrasUnet, KarrasUnet1D, KarrasUnet3D, LearnedGaussianDiffusion,
                                  VParamContinuousTimeGaussianDiffusion, WeightedObjectiveGaussianDiffusion,
                                  XMWrapper)

__all__ = ["ArgumentError", "Unet", "GaussianDiffusion", "Trainer", "OBJECTIVES",
           "Unet1D", "GaussianDiffusion1D", "Trainer1D", "Dataset1D", "LearnedGaussianDiffusion", "XMWrapper",
           "WeightedObjectiveGaussianDiffusion", "ElucidatedDiffusion", "ContinuousTimeGaussianDiffusion",
           "VParamContinuousTimeGaussianDiffusion", "KarrasUnet", "KarrasUnet1D", "KarrasUnet3D", "InvSqrtDecayLRSched"]
