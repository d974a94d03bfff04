"""Editing images with a trained model: inpainting, SDEdit and DDIM inversion. Nothing is trained.

All three run on the shared denoiser (``denoiser(x_t, t) -> Prediction``, :mod:`ddpm.denoiser`)
and take their randomness from a ``noise()`` source, like the samplers:

* **Inpainting.** ``keep`` is a bool mask [H, W], True where the input's pixel is known. RePaint
  (Lugmayr et al. 2022, Algorithm 1) runs the ancestral sampler and, after every step, takes the
  known region from q(x_{t-1} | x_0) and the unknown one from the model; its resampling schedule
  walks each block of ``jump_length`` steps ``resample`` times, jumping back up through the forward
  process in between (their Sec. 4.2). Every other sampler inpaints by *replacement*: before each
  network evaluation the known region of x_t is replaced by a draw of q(x_t | x_0).
* **SDEdit** (Meng et al. 2022): diffuse the input to t0 = round(S (T - 1)) with q(x_t0 | x_0)
  (Eq. 4) and denoise from t0 with any sampler.
* **DDIM inversion** (Song et al. 2021, Sec. 4.3): :func:`ddpm.samplers.ddim_invert` to a latent
  x_T, and DDIM (eta = 0) from it back to the image.

:func:`repaint`, :func:`inpaint_by_replacement` and :func:`sdedit` work in the model's range on
tensors; :func:`inpaint`, :func:`edit` and :func:`invert` take a loaded checkpoint and images in
[0, 1] and give image k of a run the seed ``derive_seed(seed, k)``, as ``ddpm sample`` does.
Named masks, mask files and the result grids are here too. Symbols are in ``docs/notation.md``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import MAX_IMAGE_SIDE, MAX_TIMESTEPS
from .denoiser import Denoiser
from .errors import ConfigError, DataError
from .images import make_grid, save_npz
from .pixels import from_model_range, to_model_range, to_uint8
from .sample_job import load_image
from .samplers import _draw  # the samplers' own noise check
from .samplers import DEFAULT_SAMPLING, SAMPLERS, SamplingOptions, ancestral_step, ddim_invert, sample_ddim, transitions
from .sampling import SamplingPlan, image_noise, label_conditioning, resolve_plan, run_sampler
from .schedules import NoiseSchedule
from .seeding import derive_seed

__all__ = [
    "MASK_NAMES", "named_mask", "load_mask", "repaint_schedule", "repaint", "inpaint_by_replacement",
    "sdedit_start", "sdedit", "RESAMPLING_DEFAULTS", "inpaint", "edit", "invert", "load_images",
    "masked_preview", "result_grid", "save_latents", "load_latents",
]

NoiseSource = Callable[[], torch.Tensor]

# RePaint's defaults, the paper's (Lugmayr et al. 2022, Sec. 5): jump length j = 10, r = 10 resamplings.
RESAMPLING_DEFAULTS = {"jump_length": 10, "resample": 10}
# Each resampling walks every block again: the network runs about K x resample times (the paper: 10).
RESAMPLING_MAX = {"jump_length": MAX_TIMESTEPS, "resample": 1_000}


# ----------------------------------------------------------------------------- masks

MASK_NAMES = ("left-half", "lower-half", "center", "random:P")


def named_mask(name: str, image_size: Sequence[int], *, seed: int = 0) -> torch.Tensor:
    """A named mask, bool [H, W], True = keep; the name says the region to FILL.

    ``left-half`` fills the left W // 2 columns, ``lower-half`` the lower H // 2 rows, ``center``
    the central H // 2 x W // 2 block, ``random:P`` round(P H W) pixels drawn from ``seed``.
    """
    height, width = (int(v) for v in image_size)
    keep = torch.ones(height, width, dtype=torch.bool)
    if name == "left-half":
        keep[:, :width // 2] = False
    elif name == "lower-half":
        keep[height - height // 2:, :] = False
    elif name == "center":
        top, left = (height - height // 2) // 2, (width - width // 2) // 2
        keep[top:top + height // 2, left:left + width // 2] = False
    elif name.startswith("random:"):
        try:
            fraction = float(name.split(":", 1)[1])
        except ValueError:
            fraction = float("nan")
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"mask {name}: P, the fraction of pixels to fill, must be a number in [0, 1]")
        order = np.random.default_rng(derive_seed(seed)).permutation(height * width)
        keep.view(-1)[torch.from_numpy(order[:round(fraction * height * width)])] = False
    else:
        raise ConfigError(f"unknown mask {name!r}: give a PNG file or one of {', '.join(MASK_NAMES)}")
    return keep


def load_mask(spec: str, image_size: Sequence[int], *, source_sizes: Sequence[tuple[int, int]] = (),
              seed: int = 0) -> torch.Tensor:
    """A mask, bool [H, W] at the model's ``image_size``, True = keep: a name or a greyscale PNG.

    In a PNG a value >= 128 keeps the input's pixel, below fills it. Any size is fine that has the
    aspect ratio of each input image (``source_sizes``, (H, W) as read; the model's size when
    empty); it is fitted to ``image_size`` as the images are (cover, center-crop), with nearest.
    """
    if not spec.lower().endswith(".png") and not Path(spec).is_file():
        return named_mask(spec, image_size, seed=seed)
    height, width = (int(v) for v in image_size)
    try:
        with Image.open(spec) as image:
            if max(image.size) > MAX_IMAGE_SIDE:      # decoding a claimed 40,000 x 40,000 would take gigabytes
                raise DataError(f"mask {spec} is {image.width}x{image.height} (WxH); a mask has at most "
                                f"{MAX_IMAGE_SIDE:,} pixels a side")
            image.load()
    except FileNotFoundError:
        raise DataError(f"no such mask file: {spec}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read mask {spec}: {exc}") from None
    if image.mode not in ("1", "L"):
        raise DataError(f"mask {spec} is a {image.mode} image; a mask is greyscale (mode L or 1): "
                        "white (>= 128) keeps a pixel, black fills it")
    mask_h, mask_w = image.height, image.width
    for source_h, source_w in (source_sizes or [(height, width)]):
        if round(mask_w * source_h / source_w) != mask_h:
            raise DataError(f"mask {spec} is {mask_w}x{mask_h} (WxH), not the aspect ratio of the "
                            f"{source_w}x{source_h} image")
    fitted = ImageOps.fit(image.convert("L"), (width, height), method=Image.NEAREST)
    return torch.from_numpy(np.asarray(fitted, dtype=np.uint8) >= 128)


def _as_keep(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mask on x's device, checked: bool [H, W], True where the pixel is known."""
    if keep.dtype != torch.bool or keep.shape != x.shape[-2:]:
        raise ConfigError(f"the mask must be bool [H, W] = {tuple(x.shape[-2:])}; got {keep.dtype} {tuple(keep.shape)}")
    return keep.to(x.device)


def _noised(x0: torch.Tensor, alpha_bar: float, z: torch.Tensor) -> torch.Tensor:
    """A draw of q(x_t | x_0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)  (Eq. 4)."""
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1.0 - alpha_bar) * z


# ----------------------------------------------------------------------------- RePaint (Lugmayr et al. 2022)

def repaint_schedule(num_steps: int, jump_length: int = 10, resample: int = 10) -> list[int]:
    """The levels RePaint visits over K = ``num_steps`` kept timesteps; level i is the i-th kept
    timestep (0 the noisiest), level K the data.

    Lugmayr et al. 2022, Sec. 4.2: the steps among the noisy levels are cut into blocks of
    ``jump_length`` counted from the data end; each block is walked down ``resample`` times, with a
    jump back up to its start in between; the last step, to the data, is taken once. With
    ``jump_length`` 1 this is their Algorithm 1 with U = ``resample``; with ``resample`` 1, plain
    ancestral sampling. The list starts at 0 and ends at K; a step to a larger level is a reverse
    step, to a smaller one a jump through the forward process.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"the number of steps must be a positive integer; got {num_steps!r}")
    if not isinstance(jump_length, int) or jump_length < 1 or not isinstance(resample, int) or resample < 1:
        raise ConfigError(f"the jump length and the resamplings must be positive integers; got {jump_length}, {resample}")
    levels, start = [0], 0
    for end in list(range(num_steps - 1, 0, -jump_length))[::-1]:       # block ends, counted from the data
        for r in range(resample):
            levels += range(start + 1, end + 1)
            if r + 1 < resample:
                levels.append(start)                                    # jump back to the block's start
        start = end
    return levels + [num_steps]


@torch.no_grad()
def repaint(denoiser: Denoiser, x0: torch.Tensor, keep: torch.Tensor, schedule: NoiseSchedule,
            timesteps: Sequence[int], *, noise: NoiseSource, jump_length: int = 10, resample: int = 10,
            variance: str = "posterior", callback=None) -> torch.Tensor:
    """RePaint inpainting (Lugmayr et al. 2022, Algorithm 1 with the resampling schedule of Sec. 4.2).

    ``x0`` [B, C, H, W] is the input in the model's range (only its ``keep`` pixels matter);
    ``timesteps`` the kept timesteps, descending, whose respaced betas the ancestral steps use
    (:func:`ddpm.samplers.ancestral_step`, with ``variance``). Returns x_0 with the known pixels
    equal to ``x0``. ``callback(info)`` sees every move with ``level``, ``t``, ``x`` and ``reverse``.
    """
    steps = transitions(schedule, timesteps)
    alpha_bar = [abar_t for _, abar_t, _ in steps] + [1.0]              # per level; the data's is 1
    m = _as_keep(keep, x0)
    x = _draw(noise, x0.float())                                        # line 1: x_T ~ N(0, I)
    levels = repaint_schedule(len(steps), jump_length, resample)
    for a, b in zip(levels, levels[1:]):
        if b > a:                                                       # a reverse step, lines 4-8
            t, abar_t, abar_prev = steps[a]
            last = b == len(steps)
            pred = denoiser(x, t)
            z_known = torch.zeros_like(x) if last else _draw(noise, x)
            x_known = _noised(x0, abar_prev, z_known)                     # line 5: q(x_{t-1} | x_0)
            z = torch.zeros_like(x) if last else _draw(noise, x)
            x_unknown = ancestral_step(x, pred[1], abar_t, abar_prev, z, variance,
                                       getattr(pred, "var_values", None))  # line 7: p(x_{t-1} | x_t)
            x = torch.where(m, x_known, x_unknown)                       # line 8
        else:                                                           # line 10, over a - b levels at once:
            ratio = alpha_bar[b] / alpha_bar[a]                          # q(x_t | x_s) = N(sqrt(ab_t/ab_s) x_s, ...)
            x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * _draw(noise, x)
        if callback is not None:
            callback({"level": b, "t": steps[b][0] if b < len(steps) else -1, "x": x, "reverse": b > a})
    return x


@torch.no_grad()
def inpaint_by_replacement(sampler: Callable, denoiser: Denoiser, x0: torch.Tensor, keep: torch.Tensor,
                           schedule: NoiseSchedule, timesteps: Sequence[int], *, noise: NoiseSource,
                           callback=None, **options) -> torch.Tensor:
    """Inpainting with any sampler by replacement (Song et al. 2021, score SDE, App. I.2).

    Before each network evaluation at timestep t the known region of x_t is replaced by a draw of
    q(x_t | x_0) (Eq. 4), so the network always sees the input there at the right noise level. The
    samplers' updates act pixel by pixel, so in the unknown region this is the same as replacing the
    state after each step. The known pixels of the result are ``x0``'s.
    """
    m = _as_keep(keep, x0)
    alphas_cumprod = schedule.alphas_cumprod.detach().cpu().double().tolist()

    def replaced(x_t: torch.Tensor, t: int):
        x_known = _noised(x0, alphas_cumprod[int(t)], _draw(noise, x_t))
        return denoiser(torch.where(m, x_known, x_t), t)

    x_T = _draw(noise, x0.float())
    out = sampler(replaced, x_T, schedule, timesteps, noise=noise, callback=callback, **options)
    return torch.where(m, x0, out)


# ----------------------------------------------------------------------------- SDEdit (Meng et al. 2022)

def sdedit_start(strength: float, timesteps: int) -> int | None:
    """t0 = round(S (T - 1)), the 0-based timestep SDEdit diffuses to; None for S = 0 (no edit)."""
    if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ConfigError(f"the strength S must be in [0, 1] (0: the input, 1: a new sample); got {strength!r}")
    return None if strength == 0 else int(round(strength * (timesteps - 1)))


@torch.no_grad()
def sdedit(sampler: Callable, denoiser: Denoiser, x0: torch.Tensor, schedule: NoiseSchedule,
           timesteps: Sequence[int], *, noise: NoiseSource, callback=None, **options) -> torch.Tensor:
    """SDEdit (Meng et al. 2022, Algorithm 1 with any sampler): x_t0 ~ q(x_t0 | x_0) at t0 =
    ``timesteps[0]`` (Eq. 4), then ``sampler`` over ``timesteps`` from there to the data."""
    t0 = int(timesteps[0])
    alpha_bar_t0 = float(schedule.alphas_cumprod[t0])
    x_t0 = _noised(x0.float(), alpha_bar_t0, _draw(noise, x0.float()))
    return sampler(denoiser, x_t0, schedule, timesteps, noise=noise, callback=callback, **options)


# ----------------------------------------------------------------------------- on a checkpoint

def _batches(diffusion, images: torch.Tensor, run: Callable, *, seed: int, start_index: int, batch_size: int,
             labels, guidance_scale, plan: SamplingPlan) -> list[torch.Tensor]:
    """``run(denoiser, x0, noise)`` over batches of ``images`` ([N, C, H, W] in [0, 1]) through
    :func:`ddpm.sampling.run_sampler` with ``plan``'s x0 rule: image k of the run (from ``start_index``)
    draws its noise from ``derive_seed(seed, k)``. Model-range outputs."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (diffusion.channels, *diffusion.image_size):
        raise ConfigError(f"images of shape {tuple(images.shape[1:])} for a model of shape "
                          f"{(diffusion.channels, *diffusion.image_size)}")
    if labels is not None and len(labels) != len(images):
        raise ConfigError(f"{len(labels)} class labels for {len(images)} images; give one per image")
    device, out = diffusion.device, []
    for first in range(0, len(images), batch_size):
        rows = list(range(first, min(first + batch_size, len(images))))
        noise = image_noise(seed, [start_index + k for k in rows], images.shape[1:], device)
        conditioning = label_conditioning(diffusion, None if labels is None else [labels[k] for k in rows],
                                          guidance_scale)
        x0 = to_model_range(images[first:rows[-1] + 1].float().to(device))
        out.append(run_sampler(diffusion, plan, x0, noise=noise, conditioning=conditioning, run=run).float())
    return out


def _resampling(sampling: SamplingOptions, jump_length: int | None, resample: int | None) -> dict | None:
    """RePaint's schedule for the ancestral sampler (paper defaults); None: replacement, for the others."""
    if sampling.sampler == "ddpm":
        chosen = {"jump_length": jump_length, "resample": resample}
        for name, value in chosen.items():
            if value is not None and not (isinstance(value, int) and 1 <= value <= RESAMPLING_MAX[name]):
                raise ConfigError(f"the {name.replace('_', ' ')} must be an integer from 1 to "
                                  f"{RESAMPLING_MAX[name]:,}; got {value!r}")
        return {k: RESAMPLING_DEFAULTS[k] if v is None else v for k, v in chosen.items()}
    if jump_length is not None or resample is not None:
        raise ConfigError(f"RePaint's resampling (jump length, resamplings) runs on the ancestral sampler "
                          f"(ddpm); {sampling.sampler} inpaints by replacement")
    return None


def inpaint(diffusion, images: torch.Tensor, keep: torch.Tensor, *,
            sampling: SamplingOptions | SamplingPlan = DEFAULT_SAMPLING,
            seed: int = 0, start_index: int = 0, jump_length: int | None = None, resample: int | None = None,
            labels=None, guidance_scale: float | None = None, batch_size: int = 64) -> np.ndarray:
    """Fill the pixels where ``keep`` [H, W] is False in ``images`` [N, C, H, W] (in [0, 1]).

    The ancestral sampler (``ddpm``) runs RePaint with ``jump_length`` and ``resample`` (default
    the paper's, 10 and 10), every other sampler the replacement method. Returns uint8
    [N, H, W, C] whose known pixels equal ``to_uint8(images)`` exactly.
    """
    plan = resolve_plan(diffusion, sampling)
    resampling = _resampling(plan.options, jump_length, resample)
    timesteps, options = list(plan.timesteps), plan.sampler_kwargs

    def run(denoiser, x0, noise):
        if resampling is not None:
            return repaint(denoiser, x0, keep, diffusion.schedule, timesteps, noise=noise,
                           variance=options["variance"], **resampling)
        return inpaint_by_replacement(SAMPLERS[plan.sampler], denoiser, x0, keep, diffusion.schedule,
                                      timesteps, noise=noise, **options)

    outs = _batches(diffusion, images, run, seed=seed, start_index=start_index, batch_size=batch_size,
                    labels=labels, guidance_scale=guidance_scale, plan=plan)
    filled = to_uint8(from_model_range(torch.cat(outs)).cpu())
    known = keep.numpy()[None, :, :, None]
    return np.where(known, to_uint8(images.float().cpu()), filled)       # the known pixels, exactly


def edit(diffusion, images: torch.Tensor, strength: float, *,
         sampling: SamplingOptions | SamplingPlan = DEFAULT_SAMPLING,
         seed: int = 0, start_index: int = 0, labels=None, guidance_scale: float | None = None,
         batch_size: int = 64) -> np.ndarray:
    """SDEdit ``images`` [N, C, H, W] (in [0, 1]) at strength S; returns uint8 [N, H, W, C].

    The sampler's kept steps are spread over [t0, 0] (at most t0 + 1 of them; the spacing must
    start at t0: trailing or linspace). S = 0 returns the input; at S = 1 image k starts from
    sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps_k at the last timestep, where ``ddpm sample``
    starts from eps_k, and the later noise is the same.
    """
    t0 = sdedit_start(strength, diffusion.timesteps)
    if t0 is None:
        return to_uint8(images.float().cpu())
    plan = resolve_plan(diffusion, sampling, start=t0, start_name="t0")       # the steps over [t0, 0]

    def run(denoiser, x0, noise):
        return sdedit(SAMPLERS[plan.sampler], denoiser, x0, diffusion.schedule, list(plan.timesteps), noise=noise,
                      **plan.sampler_kwargs)

    outs = _batches(diffusion, images, run, seed=seed, start_index=start_index, batch_size=batch_size,
                    labels=labels, guidance_scale=guidance_scale, plan=plan)
    return to_uint8(from_model_range(torch.cat(outs)).cpu())


def invert(diffusion, images: torch.Tensor, *, steps: int = 50, spacing: str = "trailing", labels=None,
           guidance_scale: float | None = None, batch_size: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """DDIM inversion of ``images`` [N, C, H, W] (in [0, 1]) over ``steps`` kept timesteps.

    Returns the latents x_T [N, C, H, W] (float32, model range) and the reconstructions, uint8
    [N, H, W, C], from DDIM (eta = 0) over the same steps. Both run without x0 clipping, which
    would break the correspondence of the two directions.
    """
    plan = resolve_plan(diffusion, SamplingOptions(sampler="ddim", steps=steps, spacing=spacing, clip=False))
    timesteps = list(plan.timesteps)
    latents = []

    def run(denoiser, x0, noise):
        x_T = ddim_invert(denoiser, x0, diffusion.schedule, timesteps)
        latents.append(x_T.float().cpu())
        return sample_ddim(denoiser, x_T, diffusion.schedule, timesteps, eta=0.0)

    recon = _batches(diffusion, images, run, seed=0, start_index=0, batch_size=batch_size, labels=labels,
                     guidance_scale=guidance_scale, plan=plan.unclipped())
    return torch.cat(latents), to_uint8(from_model_range(torch.cat(recon)).cpu())


# ----------------------------------------------------------------------------- files

def load_images(specs: Sequence[str], diffusion, *, data_root: str | os.PathLike | None = None
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The input images at the model's size and channels, [N, C, H, W] in [0, 1], and the (H, W)
    of each as read (an image file's own size; the model's for ``DATASET:INDEX``)."""
    images, sizes = [], []
    for spec in specs:
        images.append(load_image(spec, diffusion.image_size, diffusion.channels, data_root=data_root))
        if Path(spec).is_file():
            with Image.open(spec) as image:
                sizes.append((image.height, image.width))
        else:
            sizes.append(tuple(diffusion.image_size))
    return torch.stack(images), sizes


def masked_preview(images: np.ndarray, keep: torch.Tensor) -> np.ndarray:
    """uint8 images [N, H, W, C] with the pixels to fill shown mid-grey (128)."""
    return np.where(keep.numpy()[None, :, :, None], images, np.uint8(128))


def result_grid(rows: Sequence[np.ndarray]) -> np.ndarray:
    """One grid, a row per array of uint8 [N, H, W, C] (e.g. inputs, masked inputs, results)."""
    return make_grid(np.concatenate(list(rows)), nrow=len(rows[0]))


def save_latents(path: str | os.PathLike, latents: torch.Tensor, *, timesteps: Sequence[int], num_timesteps: int,
                 steps: int, spacing: str) -> Path:
    """``latents.npz``: ``latents`` float32 [N, C, H, W] and the DDIM steps that decode them."""
    return save_npz(path, latents=latents.numpy().astype(np.float32), timesteps=np.asarray(timesteps),
                    num_timesteps=np.int64(num_timesteps), steps=np.int64(steps), spacing=np.str_(spacing))


def load_latents(path: str | os.PathLike, diffusion) -> tuple[torch.Tensor, SamplingOptions | None]:
    """Latents [N, C, H, W] from an ``.npz`` (array ``latents``) for ``diffusion``'s shape, and the
    DDIM options that decode them when the file says (as :func:`save_latents` writes it)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"no such latents file: {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read latents {path}: {exc}") from None
    latents = arrays.get("latents")
    shape = (diffusion.channels, *diffusion.image_size)
    if latents is None or latents.ndim != 4 or tuple(latents.shape[1:]) != shape or len(latents) == 0:
        found = "no array 'latents'" if latents is None else f"latents of shape {tuple(latents.shape)}"
        raise DataError(f"{path} holds {found}; this model needs [N, {', '.join(map(str, shape))}]")
    if not np.isfinite(latents).all():
        raise DataError(f"{path} holds non-finite latents")
    sampling = None
    if {"steps", "spacing", "num_timesteps"} <= set(arrays):
        if int(arrays["num_timesteps"]) != diffusion.timesteps:
            raise DataError(f"{path} was inverted with T = {int(arrays['num_timesteps'])}; this model has "
                            f"T = {diffusion.timesteps}")
        sampling = SamplingOptions(sampler="ddim", steps=int(arrays["steps"]), spacing=str(arrays["spacing"]),
                                   clip=False)
    return torch.from_numpy(latents.astype(np.float32)), sampling
