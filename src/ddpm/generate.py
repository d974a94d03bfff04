"""Sampling from a checkpoint: rebuild the model from its saved configuration, generate, write files.

Image k of a run (k counted from 0 over the whole run, whatever the batches) draws its starting
noise and every later noise from its own generator seeded with ``derive_seed(seed, k)``, so it is
the same for any batch size and can be regenerated alone (``start_index``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, load_weights
from .config import RunConfig
from .device import select_device          # re-exported: its earlier home
from .diffusion import from_model_range
from .build import build_diffusion
from .gaussian_diffusion import GaussianDiffusion
from .errors import CheckpointError, ConfigError
from .data import class_index
from .images import label_rows, make_grid, save_npz, save_png
from .pixels import to_uint8
from .precision import autocast, channels_last as default_channels_last, check_precision, resolve_precision
from .samplers import DEFAULT_SAMPLING, SAMPLERS, SamplingOptions, batch_noise, ddim_invert, make_denoiser
from .seeding import derive_seed

__all__ = ["select_device", "load_diffusion", "num_classes", "check_labels", "DEFAULT_GUIDANCE_SCALE",
           "SAMPLER_DEFAULT_STEPS", "resolve_sampling", "sampling_options", "resolved_sampling", "sampling_denoiser",
           "class_indices", "sample_images",
           "generate", "progressive_frames", "progressive_timesteps", "progressive_grid", "interpolate", "slerp",
           "load_image", "sample_record", "write_samples", "file_sha256", "resolve_classes", "SamplePlan",
           "plan_samples", "run_samples", "interpolation_folder"]


def load_diffusion(checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
                   weights: str = "ema", *, precision: str = "fp32",
                   channels_last: bool | None = None) -> tuple[GaussianDiffusion, dict]:
    """Rebuild model and diffusion from a checkpoint (file or run directory), ready to sample.

    ``weights`` is ``"ema"`` (the default, as in the paper) or ``"raw"``. ``precision`` is the
    network's autocast while sampling (:mod:`ddpm.precision`; the sampler's maths stays float32;
    ``"auto"`` picks this device's faster one).
    ``channels_last`` (default: :func:`ddpm.precision.channels_last`, on the CPU and CUDA) stores
    the weights in the channels-last memory format, which the convolutions run faster in. Returns
    the diffusion (on ``device``, in eval mode) and the checkpoint's metadata.
    """
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw'; got {weights!r}")
    device = torch.device(device)
    precision = resolve_precision(precision, device).precision      # "auto" becomes this device's choice
    tensors, meta = load_checkpoint(checkpoint)
    try:
        config = RunConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{meta['path']} has an unusable configuration: {exc}") from None
    diffusion = build_diffusion(config, precision=precision)
    load_weights(diffusion.model, tensors, "ema" if weights == "ema" else "model", meta["path"])
    meta["run_config"] = config
    if channels_last if channels_last is not None else default_channels_last(device, precision, training=False):
        diffusion.model.to(memory_format=torch.channels_last)
    return diffusion.to(device).eval(), meta


# The step count of a sampler named without --steps (None: all T), each at most T: the paper's ancestral
# sampler over all its steps; DPM-Solver++(2M) at 20, where it has converged in the step-count table of
# benchmarks/RESULTS.md (fast FID 18.8, against 18.2 at 1000 steps); DDIM at 50, as the default
# ancestral sampler (fast FID 20.4 there, against 18.2 at 1000 steps, for a twentieth of the time).
SAMPLER_DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpm-solver++": 20}

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
      over :data:`SAMPLER_DEFAULT_STEPS` (ddpm all T, ddim 50, dpm-solver++ 20, at most T);
    - an explicit ``steps`` wins over everything (exactly that many; more than T is an error).

    The other ``options`` (spacing, eta, ...; None = unset) override whichever start was chosen.
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
    return dataclasses.replace(start, **given), {"sampler_from": sampler_from, "steps_from": steps_from}


def sampling_options(sampler: str | None = None, steps: int | None = None, *, base: SamplingOptions | None = None,
                     **options) -> SamplingOptions:
    """:class:`SamplingOptions` from keywords (None = unset), by :func:`resolve_sampling`'s rule."""
    return resolve_sampling(sampler, steps, base=base, **options)[0]


def resolved_sampling(diffusion: GaussianDiffusion, sampling: SamplingOptions) -> dict:
    """Every sampling setting as actually used (checkpoint defaults filled in), for the sample record."""
    timesteps = sampling.timesteps(diffusion.timesteps)
    options = sampling.sampler_options(diffusion.variance)
    return {"sampler": sampling.sampler, "steps": len(timesteps), "timesteps": diffusion.timesteps,
            "spacing": sampling.spacing, "eta": options.get("eta"), "variance": options.get("variance"),
            "clip": _clip(diffusion, sampling), "dynamic_thresholding": sampling.dynamic_thresholding,
            "precision": diffusion.precision}


def _clip(diffusion: GaussianDiffusion, sampling: SamplingOptions) -> bool:
    if sampling.dynamic_thresholding:
        return False
    return diffusion.clip_denoised if sampling.clip is None else bool(sampling.clip)


# Classifier-free guidance scale w used when none is given (``ddpm sample --class``, training grids).
# Ho & Salimans 2022 write it 1 + w, so this is their w = 1. w = 1 is the conditional model alone,
# w = 0 the unconditional one. benchmarks/conditional_mnist.py: on MNIST, w = 2 already gives 100%
# of the requested digit (96% at w = 1) while the fast FID grows far less than at w = 3 (35 vs 66).
DEFAULT_GUIDANCE_SCALE = 2.0


def num_classes(diffusion: GaussianDiffusion) -> int | None:
    """The class count of a class-conditional model, None for an unconditional one."""
    config = getattr(diffusion.model, "config", None)
    return getattr(config, "num_classes", None)


def check_labels(diffusion: GaussianDiffusion, labels, guidance_scale: float | None) -> None:
    """Fail early on class labels an unconditional model cannot take, or outside 0..num_classes-1."""
    classes = num_classes(diffusion)
    if labels is None:
        if guidance_scale is not None:
            raise ConfigError("a guidance scale needs class labels (--class)")
        return
    if classes is None:
        raise ConfigError("this checkpoint is an unconditional model: it takes no class labels "
                          "(train with --conditional)")
    bad = sorted({int(c) for c in labels if not 0 <= int(c) < classes})
    if bad:
        raise ConfigError(f"class {bad[0]} is out of range: this model has classes 0..{classes - 1}")
    if guidance_scale is not None and not guidance_scale >= 0:
        raise ConfigError(f"the guidance scale must be >= 0; got {guidance_scale}")


def sampling_denoiser(diffusion: GaussianDiffusion, sampling: SamplingOptions = DEFAULT_SAMPLING, *,
                      labels=None, guidance_scale: float | None = None, clip: bool | None = None):
    """The shared denoiser (:func:`~ddpm.samplers.make_denoiser`) of a loaded model for ``sampling``.

    ``labels`` (one class per image) condition a class-conditional model, with classifier-free
    guidance at ``guidance_scale`` w (None or 1: the conditional model alone). ``clip`` overrides
    the x0 clipping that ``sampling`` and the checkpoint choose (DDIM inversion runs without it).
    """
    check_labels(diffusion, labels, guidance_scale)
    device = diffusion.device
    cond: dict = {}
    if labels is not None:
        y = torch.as_tensor(list(labels), dtype=torch.long, device=device)
        cond = {"model_kwargs": {"y": y}}
        if guidance_scale is not None and guidance_scale != 1:
            cond.update(guidance_scale=float(guidance_scale),
                        uncond_kwargs={"y": torch.full_like(y, num_classes(diffusion))})
    return make_denoiser(diffusion.model, diffusion.schedule_on(device), objective=diffusion.objective,
                         clip=_clip(diffusion, sampling) if clip is None else clip,
                         dynamic_thresholding=sampling.dynamic_thresholding and clip is None,
                         self_condition=diffusion.self_condition, **cond)


def class_indices(specs, count: int | None, class_names=None) -> list[int]:
    """Class labels from command-line words: indices, names (when the checkpoint holds ``class_names``), or 'all'."""
    if count is None:
        raise ConfigError("--class needs a class-conditional checkpoint (trained with --conditional); "
                          "this one is unconditional")
    specs = [str(s) for s in specs]
    if specs == ["all"]:
        return list(range(count))
    names = list(class_names or [])
    labels = []
    for spec in specs:
        if spec.lstrip("-").isdigit():
            labels.append(int(spec))
        elif spec in names:
            labels.append(names.index(spec))
        else:
            known = f"its classes are {', '.join(names)}" if names else "it holds no class names; give indices"
            raise ConfigError(f"--class {spec}: not a class index or name of this checkpoint ({known})")
    bad = [c for c in labels if not 0 <= c < count]
    if bad:
        raise ConfigError(f"class {bad[0]} is out of range: this model has classes 0..{count - 1}")
    return labels


def sample_images(diffusion: GaussianDiffusion, indices: list[int], *, seed: int = 0,
                  sampling: SamplingOptions = DEFAULT_SAMPLING, callback: Callable | None = None,
                  progress: bool = False, labels=None, guidance_scale: float | None = None,
                  given_x_T: torch.Tensor | None = None) -> torch.Tensor:
    """One batch: the images with run indices ``indices``, in [0, 1], shape [B, C, H, W].

    Image k's noise comes from a CPU generator seeded with ``derive_seed(seed, k)``: first x_T,
    then each step's noise. ``callback`` receives the sampler's per-step dict (model range).
    A class-conditional model takes one class label per image (``labels``; None: unconditional)
    and classifier-free guidance with ``guidance_scale`` w (None or 1: the conditional model alone).
    ``given_x_T`` [B, C, H, W] replaces the drawn starting noise (e.g. DDIM-inverted latents).
    """
    device = diffusion.device
    shape = (diffusion.channels, *diffusion.image_size)
    generators = [torch.Generator().manual_seed(derive_seed(seed, k)) for k in indices]
    noise = batch_noise(generators, shape, device)
    x_T = noise()                     # drawn even when x_T is given, so each step's noise stays the same
    if given_x_T is not None:
        if tuple(given_x_T.shape) != tuple(x_T.shape):
            raise ConfigError(f"starting noise of shape {tuple(given_x_T.shape)[1:]} for a model of shape {shape}")
        x_T = given_x_T.to(device=device, dtype=x_T.dtype)
    denoiser = sampling_denoiser(diffusion, sampling, labels=labels, guidance_scale=guidance_scale)
    timesteps = sampling.timesteps(diffusion.timesteps)
    bar = tqdm(total=len(timesteps), desc="sampling", disable=not progress, leave=False, dynamic_ncols=True)

    def on_step(info: dict) -> None:
        bar.update(1)
        if callback is not None:
            callback(info)

    with torch.inference_mode(), autocast(device, diffusion.precision):
        x0 = SAMPLERS[sampling.sampler](denoiser, x_T, diffusion.schedule, timesteps, noise=noise,
                                        callback=on_step, **sampling.sampler_options(diffusion.variance))
    bar.close()
    return from_model_range(x0)


def generate(diffusion: GaussianDiffusion, n: int, *, batch_size: int = 64, seed: int = 0,
             progress: bool = True, sampler: str | None = None, steps: int | None = None,
             spacing: str | None = None, eta: float | None = None, variance: str | None = None,
             clip: bool | None = None, dynamic_thresholding: bool | None = None,
             sampling: SamplingOptions | None = None, start_index: int = 0,
             callback: Callable | None = None, labels=None, guidance_scale: float | None = None,
             latents: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Images ``start_index`` .. ``start_index + n - 1`` of a run, as uint8 [N, H, W, C], in batches.

    A class-conditional model takes ``labels`` (one class per image, length ``n``; None:
    unconditional) and a classifier-free ``guidance_scale`` (see :func:`sample_images`).
    ``latents`` [K, C, H, W] gives image k its starting noise x_T = ``latents[k]`` (k counted over
    the run, like the seeds; e.g. from :func:`ddpm.editing.invert`) instead of drawing it.

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
    out = []
    for first in range(start_index, start_index + n, batch_size):
        indices = list(range(first, min(first + batch_size, start_index + n)))
        on_step = None if callback is None else (lambda info, idx=indices: callback(idx, info))
        batch_labels = None if labels is None else [labels[k - start_index] for k in indices]
        images = sample_images(diffusion, indices, seed=seed, sampling=sampling, callback=on_step,
                               progress=progress, labels=batch_labels, guidance_scale=guidance_scale,
                               given_x_T=None if latents is None else latents[indices[0]:indices[-1] + 1])
        out.append(to_uint8(images.cpu()))
    return np.concatenate(out)


def _progressive_steps(total: int, frames: int) -> list[int]:
    """``frames`` evenly spaced sampler-step indices of ``total``, the first and the last included."""
    if frames < 1:
        raise ConfigError(f"frames must be positive; got {frames}")
    return sorted({round(j * (total - 1) / max(frames - 1, 1)) for j in range(frames)})


def progressive_timesteps(diffusion: GaussianDiffusion, frames: int = 10,
                          sampling: SamplingOptions = DEFAULT_SAMPLING) -> list[int]:
    """The 0-based timestep t of each frame of :func:`progressive_frames` (frame f shows x_t and the
    x0 estimate made from it)."""
    timesteps = sampling.timesteps(diffusion.timesteps)
    return [int(timesteps[i]) for i in _progressive_steps(len(timesteps), frames)]


def progressive_frames(diffusion: GaussianDiffusion, n: int, *, frames: int = 10,
                       sampling: SamplingOptions = DEFAULT_SAMPLING, **kwargs) -> tuple[np.ndarray, ...]:
    """Progressive generation (Ho et al. 2020, Figure 6): images plus x_t and x0_pred at ``frames`` steps.

    Returns (images [N, H, W, C], x_t [F, N, H, W, C], x0_pred [F, N, H, W, C]), uint8 in [0, 255];
    the frames are taken at evenly spaced sampler steps, the first and the last included (F is
    less than ``frames`` when the sampler takes fewer steps). ``kwargs`` go to :func:`generate`.
    """
    keep = _progressive_steps(len(sampling.timesteps(diffusion.timesteps)), frames)
    x_t: dict[int, list] = {i: [] for i in keep}
    x0_pred: dict[int, list] = {i: [] for i in keep}

    def record(indices: list[int], info: dict) -> None:
        if info["i"] in x_t:
            x_t[info["i"]].append(to_uint8(from_model_range(info["x_t"]).cpu()))
            x0_pred[info["i"]].append(to_uint8(from_model_range(info["x0_pred"]).cpu()))

    images = generate(diffusion, n, sampling=sampling, callback=record, **kwargs)
    return (images, np.stack([np.concatenate(x_t[i]) for i in keep]),
            np.stack([np.concatenate(x0_pred[i]) for i in keep]))


def progressive_grid(x_t: np.ndarray, x0_pred: np.ndarray) -> np.ndarray:
    """One grid: for each image a row of x_t over time, then a row of x0_pred over time (Figure 6)."""
    f, n = x_t.shape[:2]
    rows = np.stack([x_t.transpose(1, 0, 2, 3, 4), x0_pred.transpose(1, 0, 2, 3, 4)], axis=1)   # [N, 2, F, ...]
    return make_grid(rows.reshape(n * 2 * f, *x_t.shape[2:]), nrow=f)


INTERPOLATIONS = ("linear", "slerp")


def slerp(x_a: torch.Tensor, x_b: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation, per sample, along the great circle from x_a to x_b (Shoemake 1985)."""
    a, b = x_a.flatten(1), x_b.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).reshape(-1, *((1,) * (x_a.ndim - 1)))
    if float(theta.abs().max()) < 1e-6:
        return (1.0 - lam) * x_a + lam * x_b
    return (torch.sin((1.0 - lam) * theta) * x_a + torch.sin(lam * theta) * x_b) / torch.sin(theta)


def interpolate(diffusion: GaussianDiffusion, image_a: torch.Tensor, image_b: torch.Tensor, *, t: int,
                n_interp: int = 8, method: str = "linear", seed: int = 0,
                sampling: SamplingOptions = DEFAULT_SAMPLING, invert: bool = False, label: int | None = None,
                guidance_scale: float | None = None) -> np.ndarray:
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
    from .diffusion import q_sample, to_model_range

    if method not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {method!r}; choose from {', '.join(INTERPOLATIONS)}")
    if not 0 <= t < diffusion.timesteps:
        raise ConfigError(f"the interpolation step t must be in 0..{diffusion.timesteps - 1}; got {t}")
    if n_interp < 2:
        raise ConfigError(f"n_interp must be at least 2; got {n_interp}")
    if sampling.steps is not None and sampling.steps > t + 1 and not sampling.steps_at_most:
        raise ConfigError(f"--steps {sampling.steps} is more than the t + 1 = {t + 1} steps left from t = {t}")
    timesteps = sampling.timesteps(t + 1)             # the steps from t down to 0
    if timesteps[0] != t:
        raise ConfigError(f"spacing {sampling.spacing!r} does not start at t = {t}; use trailing or linspace")
    device = diffusion.device
    x0 = to_model_range(torch.stack([image_a, image_b]).float().to(device))
    generators = [torch.Generator().manual_seed(derive_seed(seed, 0)) for _ in range(n_interp)]
    noise = batch_noise(generators, x0.shape[1:], device)
    eps = noise()[:1].expand_as(x0)
    labels = None if label is None else [int(label)] * n_interp
    if invert:
        inverter = sampling_denoiser(diffusion, sampling, labels=None if label is None else labels[:2],
                                     guidance_scale=guidance_scale, clip=False)
        with torch.inference_mode(), autocast(device, diffusion.precision):
            x_t = ddim_invert(inverter, x0, diffusion.schedule, timesteps)
    else:
        x_t = q_sample(diffusion.schedule_on(device), x0, torch.full((2,), t, device=device), eps)
    lams = torch.linspace(0.0, 1.0, n_interp).tolist()
    mix = slerp if method == "slerp" else (lambda a, b, lam: (1.0 - lam) * a + lam * b)
    latents = torch.cat([mix(x_t[:1], x_t[1:], lam) for lam in lams])
    denoiser = sampling_denoiser(diffusion, sampling, labels=labels, guidance_scale=guidance_scale)
    with torch.inference_mode(), autocast(device, diffusion.precision):
        out = SAMPLERS[sampling.sampler](denoiser, latents, diffusion.schedule, timesteps, noise=noise,
                                         **sampling.sampler_options(diffusion.variance))
    return to_uint8(from_model_range(out).cpu())


def load_image(spec: str, image_size: tuple[int, int], channels: int, *,
               data_root: str | os.PathLike | None = None) -> torch.Tensor:
    """An input image as float [C, H, W] in [0, 1], from an image file or ``DATASET:INDEX``.

    ``DATASET:INDEX`` takes image INDEX (0-based) of the training split of a dataset that
    :func:`ddpm.data.load_dataset` reads (``digits:0``, ``mnist:12`` with ``data_root``, or
    ``path/to/images.npz:3``). Anything else is an image file. Either is converted to ``channels``
    and resized so that it covers ``image_size``, then center-cropped.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from .data import load_dataset
    from .pixels import to_tensor
    from .errors import DataError

    source, _, index = spec.rpartition(":")
    if source and index.isdigit():
        data = load_dataset(source, data_root=data_root, image_size=tuple(image_size), channels=channels)
        if int(index) >= data.num_images:
            raise ConfigError(f"{spec}: {source} has {data.num_images} images (indices 0..{data.num_images - 1})")
        return to_tensor(data.images[int(index):int(index) + 1])[0]
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"no such image file: {spec} (or give DATASET:INDEX, e.g. digits:0)")
    try:
        with Image.open(path) as image:
            image = image.convert({1: "L", 3: "RGB", 4: "RGBA"}[channels])
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {spec}: {exc}") from None
    height, width = image_size
    image = ImageOps.fit(image, (width, height), method=Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
    return to_tensor(pixels[None])[0]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_record(diffusion: GaussianDiffusion, meta: dict, sampling: SamplingOptions, *, seed: int,
                  weights: str, **extra) -> dict:
    """What ``record.json`` holds: enough to regenerate any image exactly (with the same checkpoint file)."""
    from . import __version__

    return {"ddpm_version": __version__, "checkpoint": str(Path(meta["path"]).resolve()),
            "checkpoint_sha256": meta.get("sha256") or file_sha256(meta["path"]),
            "step": meta.get("step"), "weights": weights, "seed": seed, **extra,
            **resolved_sampling(diffusion, sampling), "seed_of_image_k": "derive_seed(seed, k) (ddpm.seeding)"}


def write_samples(out_dir: str | os.PathLike, images: np.ndarray, nrow: int | None = None,
                  row_labels: list[str] | None = None, **extra: np.ndarray) -> dict[str, Path]:
    """Write ``grid.png`` (``nrow`` images a row; default square-ish; ``row_labels`` written left of
    the rows) and ``samples.npz`` (array ``images``, uint8 [N, H, W, C]) to ``out_dir``."""
    out_dir = Path(out_dir)
    grid = make_grid(images, nrow=nrow)
    if row_labels:
        grid = label_rows(grid, row_labels)
    return {"grid": save_png(out_dir / "grid.png", grid),
            "samples": save_npz(out_dir / "samples.npz", images=images, **extra)}


def class_names(diffusion: GaussianDiffusion) -> list[str] | None:
    """The names of a class-conditional model's classes, if its checkpoint has them."""
    names = getattr(getattr(diffusion.model, "config", None), "class_names", None)
    return list(names) if names else None


# ----------------------------------------------------------------------------- a sampling run, as ddpm sample makes it

def resolve_classes(diffusion: GaussianDiffusion, classes: list[str] | None, guidance_scale: float | None,
                    names: list[str] | None = None) -> tuple[list[int] | None, float | None]:
    """Class numbers, names or ``["all"]``, and a guidance scale, checked against the model; the default
    scale with classes. ``names`` default to those the checkpoint's model holds (:func:`class_names`)."""
    if classes is None:
        if guidance_scale is not None:
            raise ConfigError("--guidance-scale needs --class")
        return None, None
    chosen = class_indices(classes, num_classes(diffusion), names or class_names(diffusion))
    guidance = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    check_labels(diffusion, chosen, guidance)
    return chosen, guidance


@dataclasses.dataclass
class SamplePlan:
    """What a sampling run makes: ``total`` images from ``start_index``, their labels, and its record."""

    total: int
    start_index: int
    labels: list[int] | None
    guidance_scale: float | None
    nrow: int | None
    record: dict
    latents: torch.Tensor | None = None          # image k's starting noise, latents[k]; None: drawn
    row_labels: list[str] | None = None      # one per grid row: the class each row shows


def plan_samples(diffusion: GaussianDiffusion, meta: dict, sampling: SamplingOptions, *, n: int, classes=None,
                 guidance_scale: float | None = None, seed: int = 0, start_index: int = 0, weights: str = "ema",
                 device: str = "cpu", world: int = 1, latents=None, latents_path=None,
                 sources: dict | None = None) -> SamplePlan:
    """``n`` images (of each class of ``classes``, one grid row per class), validated before anything runs.
    ``sources`` (from :func:`resolve_sampling`: where the sampler and steps came from) go into the record.

    With ``latents`` (e.g. :func:`ddpm.editing.load_latents`) image k starts from ``latents[k]``;
    ``n`` None means one image per latent from ``start_index`` (64 without latents)."""
    classes, guidance = resolve_classes(diffusion, classes, guidance_scale, meta.get("class_names"))
    n = n or (64 if latents is None else len(latents) - start_index)
    total = n * len(classes) if classes else n
    labels = None if classes is None else [c for c in classes for _ in range(n)]
    names = class_names(diffusion)
    extra = {} if classes is None else {"classes": classes, "guidance_scale": guidance, "n_per_class": n}
    if latents is not None:
        if n < 1 or start_index + total > len(latents):
            raise ConfigError(f"{total} images from {len(latents)} latents (from index {start_index}); "
                              "give at most as many images as latents")
        extra["latents"] = str(Path(latents_path).resolve()) if latents_path else "given"
    if classes is not None and names:
        extra["class_names"] = [names[c] for c in classes]
    if world > 1:
        extra["processes"] = world
        if total < world:
            raise ConfigError(f"{total} image(s) for {world} processes; each process needs at least one")
    record = sample_record(diffusion, meta, sampling, seed=seed, weights=weights, n=total,
                           start_index=start_index, device=device, **extra,
                           **(sources or {}))                       # validates the steps against T
    return SamplePlan(total=total, start_index=start_index, labels=labels, guidance_scale=guidance,
                      nrow=n if classes else None, record=record, latents=latents,
                      row_labels=_row_labels(classes, names, n))


def _row_labels(classes: list[int] | None, names: list[str] | None, n: int) -> list[str] | None:
    """The grid's row labels when each class fills whole rows of ``n`` images: the class's name (or number)."""
    if classes is None:
        return None
    return [names[c] if names else str(c) for c in classes]


def run_samples(diffusion: GaussianDiffusion, plan: SamplePlan, out: str | os.PathLike, sampling: SamplingOptions, *,
                seed: int = 0, batch_size: int = 64, png: bool = False, progressive: bool = False,
                progress: bool = True, meta: dict | None = None) -> dict[str, Path] | None:
    """Generate ``plan``'s images and write grid.png, samples.npz (with indices and labels), record.json,
    optionally images/NNNNNN.png and progressive.png (labelled, titled after the checkpoint ``meta``), all
    staged and moved into ``out`` together (a failure, e.g. a full disk, leaves none of them). Under torchrun
    each process generates a contiguous range of the indices (image k depends only on (seed, k)) and rank 0
    writes; the others return None."""
    from . import distributed
    from .fileio import staged_dir, write_json

    out = Path(out)
    lo, hi = distributed.shard_range(plan.total)
    common = dict(batch_size=batch_size, seed=seed, progress=progress and distributed.is_main(),
                  start_index=plan.start_index + lo, labels=None if plan.labels is None else plan.labels[lo:hi],
                  guidance_scale=plan.guidance_scale, latents=plan.latents)
    if progressive:
        images, x_t, x0_pred = progressive_frames(diffusion, hi - lo, sampling=sampling, **common)
        gathered = distributed.gather_arrays((images, x_t.swapaxes(0, 1), x0_pred.swapaxes(0, 1)))
        if gathered is None:
            return None
        from . import viz

        images = gathered[0]
        frames = (gathered[1].swapaxes(0, 1), gathered[2].swapaxes(0, 1))      # x_t, x0_pred [F, N, ...]
    else:
        gathered = distributed.gather_arrays((generate(diffusion, hi - lo, sampling=sampling, **common),))
        if gathered is None:             # not rank 0: its images went to rank 0, which writes them
            return None
        images = gathered[0]
    indices = np.arange(plan.start_index, plan.start_index + plan.total)
    arrays = {"indices": indices} if plan.labels is None else {"indices": indices, "labels": np.asarray(plan.labels)}
    with staged_dir(out) as stage:
        if progressive:
            viz.progressive_png(stage / "progressive.png", *frames, progressive_timesteps(diffusion, sampling=sampling),
                                title=viz.progressive_title(diffusion, sampling, seed, meta))
        names = {key: Path(p).name for key, p in write_samples(stage, images, nrow=plan.nrow, row_labels=plan.row_labels,
                                                                            **arrays).items()}
        if png:
            for k, image in zip(indices, images):
                save_png(stage / "images" / f"{k:06d}.png", image)
        write_json(stage / "record.json", plan.record)
    return {**{key: out / name for key, name in names.items()}, "record": out / "record.json"}


def interpolation_folder(diffusion: GaussianDiffusion, meta: dict, out: str | os.PathLike, image_a: str, image_b: str,
                         *, t: int | None = None, n_interp: int = 8, method: str = "linear", seed: int = 0,
                         sampling: SamplingOptions = DEFAULT_SAMPLING, data_root=None, weights: str = "ema",
                         device: str = "cpu", invert: bool = False, classes=None,
                         guidance_scale: float | None = None, sources: dict | None = None) -> tuple[Path, int]:
    """:func:`interpolate` between two input images (files or DATASET:INDEX), written to ``out`` as
    interpolation.png (the inputs at both ends), interpolation.npz and record.json, staged and moved
    into ``out`` together. Returns (png, t). ``invert`` starts from DDIM inversions; ``classes`` (one
    class, index or name) conditions every interpolant; ``sources`` (:func:`resolve_sampling`) go into the record."""
    from .fileio import staged_dir, write_json

    out = Path(out)
    t = diffusion.timesteps // 2 if t is None else t
    a, b = (load_image(spec, diffusion.image_size, diffusion.channels, data_root=data_root)
            for spec in (image_a, image_b))
    classes, guidance = resolve_classes(diffusion, classes, guidance_scale, meta.get("class_names"))
    if classes is not None and len(classes) != 1:
        raise ConfigError(f"--class takes one class for the interpolants; got {len(classes)}")
    images = interpolate(diffusion, a, b, t=t, n_interp=n_interp, method=method, seed=seed, sampling=sampling,
                         invert=invert, label=None if classes is None else classes[0], guidance_scale=guidance)
    row = np.concatenate([to_uint8(a[None].cpu()), images, to_uint8(b[None].cpu())])
    record = sample_record(diffusion, meta, sampling, seed=seed, weights=weights, image_a=image_a, image_b=image_b,
                           t=t, n_interp=n_interp, method=method, device=str(device), invert=invert,
                           classes=classes, guidance_scale=guidance, **(sources or {}))
    record["steps"] = len(sampling.timesteps(t + 1))       # the steps from t down to 0
    with staged_dir(out) as stage:
        save_png(stage / "interpolation.png", make_grid(row, nrow=len(row)))
        save_npz(stage / "interpolation.npz", images=images, lambdas=np.linspace(0.0, 1.0, n_interp))
        write_json(stage / "record.json", record)
    return out / "interpolation.png", t
