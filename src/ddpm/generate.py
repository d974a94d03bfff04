"""Sampling from a checkpoint: rebuild the model from its saved configuration and generate.

Image k of a run (k counted from 0 over the whole run, whatever the batches) draws its starting
noise and every later noise from its own generator seeded with ``derive_seed(seed, k)``, so it is
the same for any batch size and can be regenerated alone (``start_index``). The sampler flags of
every command resolve here (:func:`resolve_sampling`); the sampler itself runs through
:func:`ddpm.sampling.run_sampler`. Writing sample folders is :mod:`ddpm.sample_job`'s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np
import torch

from .checkpoint import load_checkpoint, load_weights
from .conditions import check_condition
from .ema import parse_weights, select_weights
from .config import RunConfig
from .build import build_diffusion
from .diffusion import q_sample
from .gaussian_diffusion import GaussianDiffusion
from .errors import CheckpointError, ConfigError
from .pixels import from_model_range, to_model_range, to_uint8
from .precision import channels_last as default_channels_last, resolve_precision
from .samplers import DEFAULT_SAMPLING, KARRAS, SIGMA_SAMPLERS, SamplingOptions, ddim_invert
from .sigmas import Sigmas
from .sampling import (SamplingPlan, check_labels, image_noise, label_conditioning, resolve_plan, run_sampler,
                       sample_images)

__all__ = ["load_diffusion", "DEFAULT_GUIDANCE_SCALE", "SAMPLER_DEFAULT_STEPS", "resolve_sampling",
           "sampling_options", "generate", "progressive_frames", "progressive_timesteps", "interpolation_plan",
           "interpolate", "slerp"]


def load_diffusion(checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
                   weights: str = "ema", *, precision: str = "fp32",
                   channels_last: bool | None = None) -> tuple[GaussianDiffusion, dict]:
    """Rebuild model and diffusion from a checkpoint (file or run directory), ready to sample.

    ``weights`` is ``"ema"`` (the default, as in the paper: the first average), ``"raw"`` or ``"ema:D"``
    (the average of decay D, when the run kept several; :func:`ddpm.ema.select_weights`). ``precision`` is the
    network's autocast while sampling (:mod:`ddpm.precision`; the sampler's maths stays float32;
    ``"auto"`` picks this device's faster one).
    ``channels_last`` (default: :func:`ddpm.precision.channels_last`, on the CPU and CUDA) stores
    the weights in the channels-last memory format, which the convolutions run faster in. Returns
    the diffusion (on ``device``, in eval mode) and the checkpoint's metadata.
    """
    parse_weights(weights)                                          # a bad selection fails before any read
    device = torch.device(device)
    precision = resolve_precision(precision, device).precision      # "auto" becomes this device's choice
    tensors, meta = load_checkpoint(checkpoint)
    try:
        config = RunConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{meta['path']} has an unusable configuration: {exc}") from None
    diffusion = build_diffusion(config, precision=precision)
    load_weights(diffusion.model, tensors, select_weights(tensors, meta, weights), meta["path"])
    meta["run_config"] = config
    if channels_last if channels_last is not None else default_channels_last(device, precision, training=False):
        diffusion.model.to(memory_format=torch.channels_last)
    return diffusion.to(device).eval(), meta


# The step count of a sampler named without --steps (None: all T), each at most T: the paper's ancestral
# sampler over all its steps; DPM-Solver++(2M) at 20, where it has converged in the step-count table of
# benchmarks/RESULTS.md (fast FID 18.8, against 18.2 at 1000 steps); DDIM at 50, as the default
# ancestral sampler (fast FID 20.4 there, against 18.2 at 1000 steps, for a twentieth of the time).
# The sigma samplers (ddpm.samplers, Karras et al. 2022): Euler and ancestral Euler at 50 like DDIM, which
# they generalise; Heun at 18, EDM's count (35 network evaluations: two per step but the last);
# SDE-DPM-Solver++(2M) at 25, a little more than its deterministic sibling, as its noise needs.
SAMPLER_DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpm-solver++": 20, "euler": 50, "heun": 18,
                         "euler-ancestral": 50, "dpm-solver++-sde": 25}

# Where a resolved sampler or step count came from, as record.json says it.
FROM_FLAG, FROM_CHECKPOINT, FROM_DEFAULT = "flag", "checkpoint", "default"


def resolve_sampling(sampler: str | None = None, steps: int | None = None, *, base: SamplingOptions | None = None,
                     base_from: str = FROM_CHECKPOINT, **options) -> tuple[SamplingOptions, dict]:
    """The one rule for the sampler and its step count of every command that samples; returns the
    :class:`SamplingOptions` and where its sampler and steps came from (``{"sampler_from": ...,
    "steps_from": ...}``, each "flag", "checkpoint" or "default"; ``base_from`` names ``base``'s origin).

    ``base`` is the checkpoint's own ``sampling`` section (``GaussianDiffusion.default_sampling``,
    e.g. a distilled student's DDIM steps), or None. The rule:

    - neither ``sampler`` nor ``steps``: ``base``, else :data:`~ddpm.samplers.DEFAULT_SAMPLING`
      (ancestral over at most 50 respaced steps);
    - ``sampler`` alone: ``base`` when it names that sampler with a step count, else that sampler
      over :data:`SAMPLER_DEFAULT_STEPS` (ddpm all T, ddim 50, dpm-solver++ 20, heun 18, ..., at most T);
    - an explicit ``steps`` wins over everything (exactly that many; more than T is an error).

    The other ``options`` (spacing, eta, ...; None = unset) override whichever start was chosen; a sigma
    sampler named over a ``base`` with the karras spacing (an EDM model's) keeps that spacing unless given.
    """
    given = {k: v for k, v in options.items() if v is not None}
    if sampler is None:
        start, sampler_from = (base, base_from) if base is not None else (DEFAULT_SAMPLING, FROM_DEFAULT)
        steps_from = sampler_from
    elif base is not None and base.sampler == sampler and base.steps is not None:
        start, sampler_from, steps_from = base, FROM_FLAG, base_from
    else:
        default = SAMPLER_DEFAULT_STEPS.get(sampler)          # an unknown name: SamplingOptions says so
        start = SamplingOptions(sampler=sampler, steps=default, steps_at_most=default is not None)
        sampler_from, steps_from = FROM_FLAG, FROM_DEFAULT
    if steps is not None:
        given.update(steps=steps, steps_at_most=False)
        steps_from = FROM_FLAG
    if base is not None and base.spacing == KARRAS and start is not base and start.sampler in SIGMA_SAMPLERS:
        given.setdefault("spacing", KARRAS)     # an EDM model's levels: a sigma sampler named alone keeps them
    return dataclasses.replace(start, **given), {"sampler_from": sampler_from, "steps_from": steps_from}


def sampling_options(sampler: str | None = None, steps: int | None = None, *, base: SamplingOptions | None = None,
                     **options) -> SamplingOptions:
    """:class:`SamplingOptions` from keywords (None = unset), by :func:`resolve_sampling`'s rule."""
    return resolve_sampling(sampler, steps, base=base, **options)[0]


# Classifier-free guidance scale w used when none is given (``ddpm sample --class``, training grids).
# Ho & Salimans 2022 write it 1 + w, so this is their w = 1. w = 1 is the conditional model alone,
# w = 0 the unconditional one. benchmarks/conditional_mnist.py: on MNIST, w = 2 already gives 100%
# of the requested digit (96% at w = 1) while the fast FID grows far less than at w = 3 (35 vs 66).
DEFAULT_GUIDANCE_SCALE = 2.0


def generate(diffusion: GaussianDiffusion, n: int, *, batch_size: int = 64, seed: int = 0,
             progress: bool = True, sampler: str | None = None, steps: int | None = None,
             spacing: str | None = None, eta: float | None = None, variance: str | None = None,
             clip: bool | None = None, dynamic_thresholding: bool | None = None,
             sampling: SamplingOptions | SamplingPlan | None = None, start_index: int = 0,
             callback: Callable | None = None, labels=None, guidance_scale: float | None = None,
             latents: torch.Tensor | np.ndarray | None = None, conditions: torch.Tensor | np.ndarray | None = None,
             condition_level: float = 0.0) -> np.ndarray:
    """Images ``start_index`` .. ``start_index + n - 1`` of a run, as uint8 [N, H, W, C], in batches (a
    sequence model's: float32 [N, C, L] in the data's units, :func:`_as_output`).

    A class-conditional model takes ``labels`` (one class per image, length ``n``; None:
    unconditional) and a classifier-free ``guidance_scale`` (see :func:`ddpm.sampling.sample_images`).
    ``latents`` [K, C, H, W] gives image k its starting noise x_T = ``latents[k]`` (k counted over
    the run, like the seeds; e.g. from :func:`ddpm.editing.invert`) instead of drawing it.
    An image-conditioned model takes ``conditions`` [n, C_c, h, w] in [0, 1], one per image (counted
    from ``start_index``), augmented at ``condition_level`` (:func:`ddpm.sampling.sample_images`).

    The sampler is the checkpoint's own default (``diffusion.default_sampling``, set for distilled
    students) or else :data:`~ddpm.samplers.DEFAULT_SAMPLING` (ancestral over 50 respaced steps), unless
    ``sampling`` or the keywords (by :func:`resolve_sampling`'s rule) choose another. Image k depends only
    on (``seed``, k) and the options, never on the batch size or the device's thread count.
    ``callback(indices, info)`` sees every step of every batch.
    """
    if n < 1 or batch_size < 1:
        raise ConfigError("the number of images and the batch size must be positive")
    if start_index < 0:
        raise ConfigError(f"the start index must be >= 0; got {start_index}")
    if sampling is None:
        sampling = sampling_options(sampler, steps, spacing=spacing, eta=eta, variance=variance, clip=clip,
                                    dynamic_thresholding=dynamic_thresholding,
                                    base=getattr(diffusion, "default_sampling", None))
    elif any(v is not None for v in (sampler, steps, spacing, eta, variance, clip, dynamic_thresholding)):
        raise ConfigError("pass either sampling= or the separate sampler keywords, not both")
    if labels is not None and len(labels) != n:
        raise ConfigError(f"{len(labels)} class labels for {n} images; give one per image")
    check_labels(diffusion, labels, guidance_scale)
    if latents is not None:
        latents = torch.as_tensor(latents, dtype=torch.float32)
        if len(latents) < start_index + n:
            raise ConfigError(f"{len(latents)} latents for images {start_index}..{start_index + n - 1}; "
                              "give at most as many images as latents")
    conditions = _checked_conditions(diffusion, conditions, n)
    plan = resolve_plan(diffusion, sampling)                    # once for every batch
    out = []
    for first in range(start_index, start_index + n, batch_size):
        indices = list(range(first, min(first + batch_size, start_index + n)))
        on_step = None if callback is None else (lambda info, idx=indices: callback(idx, info))
        batch_labels = None if labels is None else [labels[k - start_index] for k in indices]
        images = sample_images(diffusion, indices, seed=seed, sampling=plan, callback=on_step,
                               progress=progress, labels=batch_labels, guidance_scale=guidance_scale,
                               given_x_T=None if latents is None else latents[indices[0]:indices[-1] + 1],
                               conditions=None if conditions is None else
                               conditions[indices[0] - start_index:indices[-1] + 1 - start_index],
                               condition_level=condition_level)
        out.append(_as_output(images.cpu()))
    return np.concatenate(out)


def _as_output(images: torch.Tensor) -> np.ndarray:
    """Sampled images in [0, 1] as uint8 [N, H, W, C]; sequences [N, C, L] as float32 data x0 in [-1, 1]
    (:mod:`ddpm.data.sequences`: the data's own units, no quantisation)."""
    if images.ndim == 3:
        return to_model_range(images).numpy().astype(np.float32, copy=False)
    return to_uint8(images)


def _checked_conditions(diffusion: GaussianDiffusion, conditions, n: int) -> torch.Tensor | None:
    """One image condition per image, as a float tensor, for a model that takes them (else one line)."""
    if conditions is not None:
        conditions = torch.as_tensor(conditions, dtype=torch.float32)
        if len(conditions) != n:
            raise ConfigError(f"{len(conditions)} conditions for {n} images; give one per image")
    check_condition(getattr(diffusion, "condition", None), None if conditions is None else conditions[:1],
                    "this checkpoint")
    return conditions


def _progressive_steps(total: int, frames: int) -> list[int]:
    """``frames`` evenly spaced sampler-step indices of ``total``, the first and the last included."""
    if frames < 1:
        raise ConfigError(f"frames must be positive; got {frames}")
    return sorted({round(j * (total - 1) / max(frames - 1, 1)) for j in range(frames)})


def progressive_timesteps(diffusion: GaussianDiffusion, frames: int = 10,
                          sampling: SamplingOptions | SamplingPlan = DEFAULT_SAMPLING) -> list[int] | list[float]:
    """The 0-based timestep t of each frame of :func:`progressive_frames` (frame f shows x_t and the
    x0 estimate made from it); the noise level sigma (a float) where the plan visits Sigmas (karras)."""
    timesteps = resolve_plan(diffusion, sampling).timesteps
    if isinstance(timesteps, Sigmas):
        return [timesteps.values[i] for i in _progressive_steps(len(timesteps), frames)]
    return [int(timesteps[i]) for i in _progressive_steps(len(timesteps), frames)]


def progressive_frames(diffusion: GaussianDiffusion, n: int, *, frames: int = 10,
                       sampling: SamplingOptions | SamplingPlan = DEFAULT_SAMPLING, **kwargs) -> tuple[np.ndarray, ...]:
    """Progressive generation (Ho et al. 2020, Figure 6): images plus x_t and x0_pred at ``frames`` steps.

    Returns (images [N, H, W, C], x_t [F, N, H, W, C], x0_pred [F, N, H, W, C]), uint8 in [0, 255];
    the frames are taken at evenly spaced sampler steps, the first and the last included (F is
    less than ``frames`` when the sampler takes fewer steps). ``kwargs`` go to :func:`generate`.
    :func:`ddpm.viz.progressive_grid` lays them out as the paper's figure.
    """
    plan = resolve_plan(diffusion, sampling)
    keep = _progressive_steps(plan.steps, frames)
    x_t: dict[int, list] = {i: [] for i in keep}
    x0_pred: dict[int, list] = {i: [] for i in keep}

    def record(indices: list[int], info: dict) -> None:
        if info["i"] in x_t:
            x_t[info["i"]].append(to_uint8(from_model_range(info["x_t"]).cpu()))
            x0_pred[info["i"]].append(to_uint8(from_model_range(info["x0_pred"]).cpu()))

    images = generate(diffusion, n, sampling=plan, callback=record, **kwargs)
    return (images, np.stack([np.concatenate(x_t[i]) for i in keep]),
            np.stack([np.concatenate(x0_pred[i]) for i in keep]))


INTERPOLATIONS = ("linear", "slerp")


def slerp(x_a: torch.Tensor, x_b: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation, per sample, along the great circle from x_a to x_b (Shoemake 1985)."""
    a, b = x_a.flatten(1), x_b.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).reshape(-1, *((1,) * (x_a.ndim - 1)))
    if float(theta.abs().max()) < 1e-6:
        return (1.0 - lam) * x_a + lam * x_b
    return (torch.sin((1.0 - lam) * theta) * x_a + torch.sin(lam * theta) * x_b) / torch.sin(theta)


def interpolation_plan(diffusion: GaussianDiffusion, sampling: SamplingOptions | SamplingPlan, *, t: int,
                       n_interp: int, method: str) -> SamplingPlan:
    """:func:`interpolate`'s arguments checked, and its sampler's steps from ``t`` down to 0."""
    if method not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {method!r}; choose from {', '.join(INTERPOLATIONS)}")
    if not 0 <= t < diffusion.timesteps:
        raise ConfigError(f"the interpolation step t must be in 0..{diffusion.timesteps - 1}; got {t}")
    if n_interp < 2:
        raise ConfigError(f"n_interp must be at least 2; got {n_interp}")
    return resolve_plan(diffusion, sampling, start=t)


def interpolate(diffusion: GaussianDiffusion, image_a: torch.Tensor, image_b: torch.Tensor, *, t: int,
                n_interp: int = 8, method: str = "linear", seed: int = 0,
                sampling: SamplingOptions | SamplingPlan = DEFAULT_SAMPLING, invert: bool = False,
                label: int | None = None, guidance_scale: float | None = None) -> np.ndarray:
    """Interpolation between two images through the latent at step ``t`` (Ho et al. 2020, Sec. 4.3, Figure 8).

    Both images ([C, H, W] in [0, 1]) are diffused to x_t with the same noise (Eq. 4), mixed as
    (1 - lambda) x_t + lambda x'_t (``linear``, the paper's) or spherically (``slerp``) for
    ``n_interp`` values of lambda from 0 to 1, and denoised from ``t`` with the chosen sampler over
    the kept steps of t + 1 (all of them unless ``sampling.steps``; spacing ``trailing`` or
    ``linspace``, which start at t). Every interpolant uses the same noise, so only lambda varies.
    With ``invert`` the two x_t are instead the images' DDIM inversions (Song et al. 2021, Sec. 4.3)
    over the same kept steps: deterministic, and DDIM (eta = 0) then returns the two images at the
    ends. A class-conditional model is sampled at class ``label`` (with ``guidance_scale``).
    Returns uint8 [n_interp, H, W, C].
    """
    plan = interpolation_plan(diffusion, sampling, t=t, n_interp=n_interp, method=method)
    device = diffusion.device
    x0 = to_model_range(torch.stack([image_a, image_b]).float().to(device))
    noise = image_noise(seed, [0] * n_interp, x0.shape[1:], device)      # every interpolant image 0's noise
    eps = noise()[:1].expand_as(x0)
    labels = None if label is None else [int(label)] * n_interp
    if invert:
        conditioning = label_conditioning(diffusion, None if label is None else labels[:2], guidance_scale)
        x_t = run_sampler(diffusion, plan.unclipped(), x0, conditioning=conditioning,
                          run=lambda denoiser, x, _: ddim_invert(denoiser, x, diffusion.schedule, plan.timesteps))
    else:
        x_t = q_sample(diffusion.schedule_on(device), x0, torch.full((2,), t, device=device), eps)
    lams = torch.linspace(0.0, 1.0, n_interp).tolist()
    mix = slerp if method == "slerp" else (lambda a, b, lam: (1.0 - lam) * a + lam * b)
    latents = torch.cat([mix(x_t[:1], x_t[1:], lam) for lam in lams])
    out = run_sampler(diffusion, plan, latents, noise=noise,
                      conditioning=label_conditioning(diffusion, labels, guidance_scale))
    return to_uint8(from_model_range(out).cpu())
