"""A sampling job: plan a sample folder, run it, write it (``ddpm sample``, ``ddpm interpolate``).

:func:`plan_samples` checks everything a run of ``ddpm sample`` needs before anything runs (classes,
latents, processes, the sampler against the checkpoint) and makes its record; :func:`run_samples`
generates the images (:func:`ddpm.generate.generate`) and writes grid.png, samples.npz, record.json
(and images/, progressive.png) into the folder together; :func:`interpolation_folder` does the same
for an interpolation. ``record.json`` holds enough to regenerate any image exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import __version__, distributed, viz
from .data import load_dataset
from .data.image_files import convert_image
from .data.sequences import SEQUENCES_KEY
from .errors import ConfigError, DataError
from .fileio import staged_dir, write_json
from .generate import (DEFAULT_GUIDANCE_SCALE, generate, interpolate, interpolation_plan, progressive_frames,
                       progressive_timesteps)
from .gaussian_diffusion import GaussianDiffusion
from .images import caption_below, label_rows, make_grid, save_npz, save_png
from .pixels import to_tensor, to_uint8
from .samplers import DEFAULT_SAMPLING, KARRAS, SamplingOptions
from .sequence_plots import plot_sequences
from .sigmas import KARRAS_RHO
from .sampling import SamplingPlan, check_labels, num_classes, resolve_plan

__all__ = ["class_indices", "class_names", "resolve_classes", "load_image", "file_sha256", "sampling_record",
           "sample_record", "write_samples", "SamplePlan", "plan_samples", "run_samples", "interpolation_folder"]


def sampling_record(diffusion: GaussianDiffusion, plan: SamplingPlan) -> dict:
    """Every sampling setting as actually used (checkpoint defaults filled in), for the sample record."""
    return {"sampler": plan.sampler, "steps": plan.steps,
            "timesteps": None if getattr(diffusion, "formulation", "ddpm") == "edm" else diffusion.timesteps,
            "spacing": plan.options.spacing, "eta": plan.sampler_kwargs.get("eta"),
            "variance": plan.sampler_kwargs.get("variance"), "clip": plan.clip,
            "dynamic_thresholding": plan.dynamic_thresholding, "precision": diffusion.precision,
            **_sigma_record(plan)}


def _sigma_record(plan: SamplingPlan) -> dict:
    """The sigma samplers' options as used (churn, S_tmin, S_tmax, S_noise; rho of the karras spacing), where they apply."""
    record = {k: v for k, v in plan.sampler_kwargs.items() if k in ("churn", "s_tmin", "s_tmax", "s_noise")}
    if plan.options.spacing == KARRAS:
        record["rho"] = KARRAS_RHO if plan.options.rho is None else plan.options.rho
    return record


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


def load_image(spec: str, image_size: tuple[int, int], channels: int, *,
               data_root: str | os.PathLike | None = None) -> torch.Tensor:
    """An input image as float [C, H, W] in [0, 1], from an image file or ``DATASET:INDEX``.

    ``DATASET:INDEX`` takes image INDEX (0-based) of the training split of a dataset that
    :func:`ddpm.data.load_dataset` reads (``digits:0``, ``mnist:12`` with ``data_root``, or
    ``path/to/images.npz:3``). Anything else is an image file. Either is converted to ``channels``
    and resized so that it covers ``image_size``, then center-cropped.
    """
    if len(image_size) == 1:
        raise ConfigError("this is a sequence model (data [N, C, L]); it takes no input images")
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
            image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {spec}: {exc}") from None
    # as the data loader reads it: 16-bit grey scaled, float grey in 0..255 and finite, else one DataError
    image = convert_image(image, channels, spec)
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


def sample_record(diffusion: GaussianDiffusion, meta: dict, sampling: SamplingOptions | SamplingPlan, *, seed: int,
                  weights: str, **extra) -> dict:
    """What ``record.json`` holds: enough to regenerate any image exactly (with the same checkpoint file).
    ``steps`` counts the steps ``sampling`` takes (a plan from t: the steps from t down to 0)."""
    return {"ddpm_version": __version__, "checkpoint": str(Path(meta["path"]).resolve()),
            "checkpoint_sha256": meta.get("sha256") or file_sha256(meta["path"]),
            "step": meta.get("step"), "weights": weights, "seed": seed, **extra,
            **sampling_record(diffusion, resolve_plan(diffusion, sampling)),
            "seed_of_image_k": "derive_seed(seed, k) (ddpm.seeding)"}


def write_samples(out_dir: str | os.PathLike, images: np.ndarray, nrow: int | None = None,
                  row_labels: list[str] | None = None, caption: str | None = None, **extra: np.ndarray) -> dict[str, Path]:
    """Write ``grid.png`` (``nrow`` images a row; default square-ish; ``row_labels`` written left of
    the rows, ``caption`` under them) and ``samples.npz`` (array ``images``, uint8 [N, H, W, C]) to ``out_dir``.
    Sequences (float32 [N, C, L]) go to ``samples.npz`` as array ``sequences``, in the data's units (the
    layout a sequence model trains on), and ``grid.png`` plots the first few (titled ``caption``)."""
    out_dir = Path(out_dir)
    if images.ndim == 3:                 # a sequence model's: float32 [N, C, L] (ddpm.data.sequences)
        return {"grid": plot_sequences(out_dir / "grid.png", images, caption or ""),
                "samples": save_npz(out_dir / "samples.npz", **{SEQUENCES_KEY: images}, **extra)}
    grid = make_grid(images, nrow=nrow)
    if row_labels:
        grid = label_rows(grid, row_labels)
    if caption:
        grid = caption_below(grid, caption)
    return {"grid": save_png(out_dir / "grid.png", grid),
            "samples": save_npz(out_dir / "samples.npz", images=images, **extra)}


def grid_caption(sampling: SamplingPlan, seed: int, meta: dict | None, weights: str | None = None) -> str:
    """What made a sample grid: the checkpoint and its step, the weights, the sampler and its steps, the seed."""
    which = f" ({weights} weights)" if weights else ""
    return f"{viz.checkpoint_label(meta)}{which}: {sampling.sampler} sampler, {sampling.steps} steps, seed {seed}"


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
    sampling: SamplingPlan                   # the sampler, resolved for this model
    latents: torch.Tensor | None = None      # image k's starting noise, latents[k]; None: drawn
    row_labels: list[str] | None = None      # one per grid row: the class each row shows


# Network evaluations one ddpm sample may ask for: a million images of 1,000 steps (twenty FID-50k sets).
MAX_EVALUATIONS = 10 ** 9


def check_evaluations(images: int, steps: int) -> None:
    """Refuse --num-images x --steps beyond :data:`MAX_EVALUATIONS`, before anything is sampled."""
    if images * steps > MAX_EVALUATIONS:
        raise ConfigError(f"--num-images {images:,} x {steps:,} steps is {images * steps:,} network evaluations; "
                          f"at most {MAX_EVALUATIONS:,} in one run (split it with --start-index)")


def plan_samples(diffusion: GaussianDiffusion, meta: dict, sampling: SamplingOptions | SamplingPlan, *, n: int,
                 classes=None, guidance_scale: float | None = None, seed: int = 0, start_index: int = 0,
                 weights: str = "ema", device: str = "cpu", world: int = 1, latents=None, latents_path=None,
                 sources: dict | None = None) -> SamplePlan:
    """``n`` images (of each class of ``classes``, one grid row per class), validated before anything runs.
    ``sources`` (from :func:`ddpm.generate.resolve_sampling`: where the sampler and steps came from) go into
    the record.

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
    sampling = resolve_plan(diffusion, sampling)                   # validates the steps against T
    check_evaluations(total, sampling.steps)
    record = sample_record(diffusion, meta, sampling, seed=seed, weights=weights, n=total,
                           start_index=start_index, device=device, **extra,
                           **(sources or {}))
    return SamplePlan(total=total, start_index=start_index, labels=labels, guidance_scale=guidance,
                      nrow=n if classes else None, record=record, sampling=sampling, latents=latents,
                      row_labels=_row_labels(classes, names, n))


def _row_labels(classes: list[int] | None, names: list[str] | None, n: int) -> list[str] | None:
    """The grid's row labels when each class fills whole rows of ``n`` images: the class's name (or number)."""
    if classes is None:
        return None
    return [names[c] if names else str(c) for c in classes]


def run_samples(diffusion: GaussianDiffusion, plan: SamplePlan, out: str | os.PathLike, *,
                seed: int = 0, batch_size: int = 64, png: bool = False, progressive: bool = False,
                progress: bool = True, meta: dict | None = None) -> dict[str, Path] | None:
    """Generate ``plan``'s images and write grid.png, samples.npz (with indices and labels), record.json,
    optionally images/NNNNNN.png and progressive.png (labelled, titled after the checkpoint ``meta``), all
    staged and moved into ``out`` together (a failure, e.g. a full disk, leaves none of them). Under torchrun
    each process generates a contiguous range of the indices (image k depends only on (seed, k)) and rank 0
    writes; the others return None."""
    out, sampling = Path(out), plan.sampling
    if len(diffusion.image_size) == 1 and (png or progressive):
        raise ConfigError(f"{'--png' if png else '--progressive'} draws images; a sequence model's samples are "
                          "in samples.npz (array sequences [N, C, L]), plotted in grid.png")
    lo, hi = distributed.shard_range(plan.total)
    common = dict(batch_size=batch_size, seed=seed, progress=progress and distributed.is_main(),
                  start_index=plan.start_index + lo, labels=None if plan.labels is None else plan.labels[lo:hi],
                  guidance_scale=plan.guidance_scale, latents=plan.latents)
    if progressive:
        images, x_t, x0_pred = progressive_frames(diffusion, hi - lo, sampling=sampling, **common)
        gathered = distributed.gather_arrays((images, x_t.swapaxes(0, 1), x0_pred.swapaxes(0, 1)))
        if gathered is None:
            return None
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
                                title=viz.progressive_title(sampling, seed, meta))
        written = write_samples(stage, images, nrow=plan.nrow, row_labels=plan.row_labels,
                                caption=grid_caption(sampling, seed, meta, plan.record.get("weights")), **arrays)
        names = {key: Path(p).name for key, p in written.items()}
        if png:
            for k, image in zip(indices, images):
                save_png(stage / "images" / f"{k:06d}.png", image)
        write_json(stage / "record.json", plan.record)
    return {**{key: out / name for key, name in names.items()}, "record": out / "record.json"}


def interpolation_folder(diffusion: GaussianDiffusion, meta: dict, out: str | os.PathLike, image_a: str, image_b: str,
                         *, t: int | None = None, n_interp: int = 8, method: str = "linear", seed: int = 0,
                         sampling: SamplingOptions | SamplingPlan = DEFAULT_SAMPLING, data_root=None,
                         weights: str = "ema", device: str = "cpu", invert: bool = False, classes=None,
                         guidance_scale: float | None = None, sources: dict | None = None) -> tuple[Path, int]:
    """:func:`interpolate` between two input images (files or DATASET:INDEX), written to ``out`` as
    interpolation.png (the inputs at both ends), interpolation.npz and record.json, staged and moved
    into ``out`` together. Returns (png, t). ``invert`` starts from DDIM inversions; ``classes`` (one
    class, index or name) conditions every interpolant; ``sources`` (:func:`ddpm.generate.resolve_sampling`)
    go into the record."""
    out = Path(out)
    t = diffusion.timesteps // 2 if t is None else t
    a, b = (load_image(spec, diffusion.image_size, diffusion.channels, data_root=data_root)
            for spec in (image_a, image_b))
    classes, guidance = resolve_classes(diffusion, classes, guidance_scale, meta.get("class_names"))
    if classes is not None and len(classes) != 1:
        raise ConfigError(f"--class takes one class for the interpolants; got {len(classes)}")
    sampling = interpolation_plan(diffusion, sampling, t=t, n_interp=n_interp, method=method)
    images = interpolate(diffusion, a, b, t=t, n_interp=n_interp, method=method, seed=seed, sampling=sampling,
                         invert=invert, label=None if classes is None else classes[0], guidance_scale=guidance)
    row = np.concatenate([to_uint8(a[None].cpu()), images, to_uint8(b[None].cpu())])
    record = sample_record(diffusion, meta, sampling, seed=seed, weights=weights, image_a=image_a, image_b=image_b,
                           t=t, n_interp=n_interp, method=method, device=str(device), invert=invert,
                           classes=classes, guidance_scale=guidance, **(sources or {}))
    with staged_dir(out) as stage:
        save_png(stage / "interpolation.png", make_grid(row, nrow=len(row)))
        save_npz(stage / "interpolation.npz", images=images, lambdas=np.linspace(0.0, 1.0, n_interp))
        write_json(stage / "record.json", record)
    return out / "interpolation.png", t
