"""``ddpm inpaint``, ``ddpm edit`` and ``ddpm invert``: a trained model applied to given images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..device import select_device
from ..editing import (RESAMPLING_DEFAULTS, edit, inpaint, invert, load_images, load_mask, masked_preview, result_grid,
                       save_latents, sdedit_start)
from ..errors import ConfigError
from ..fileio import staged_dir, write_json
from ..generate import DEFAULT_GUIDANCE_SCALE, load_diffusion
from ..images import save_npz, save_png
from ..pixels import to_uint8
from ..sample_job import class_indices, class_names, sample_record
from ..samplers import SamplingOptions
from ..sampling import check_labels, num_classes, resolve_plan
from .common import output_dir, sampling_from_args


def _editing_setup(args, outputs: tuple[str, ...], sampling=None):
    """Output folder, model, images, class labels and sampler of an editing command, all checked before any
    work. ``sampling`` (fixed options, e.g. invert's DDIM) replaces the sampler flags, which resolve over
    the checkpoint's own defaults; returns their origins too (:func:`ddpm.generate.resolve_sampling`)."""
    out = output_dir(args, outputs)
    diffusion, meta = load_diffusion(args.checkpoint, device=select_device(args.device), weights=args.weights,
                                     precision=args.precision)
    sampling, sources = (sampling, {}) if sampling is not None else sampling_from_args(args, diffusion)
    sampling = resolve_plan(diffusion, sampling)                # validates --steps against the checkpoint's T
    images, sizes = load_images(args.image, diffusion, data_root=args.data_root)
    labels, guidance = _labels_per_image(args, diffusion, meta, len(images))
    return out, diffusion, meta, images, sizes, labels, guidance, sampling, sources


def _labels_per_image(args, diffusion, meta, count: int):
    """``--class``: one class for every image or one per image, by index or (when the checkpoint has them) name."""
    if args.classes is None:
        if args.guidance_scale is not None:
            raise ConfigError("--guidance-scale needs --class")
        return None, None
    classes = class_indices(args.classes, num_classes(diffusion), meta.get("class_names") or class_names(diffusion))
    if len(classes) not in (1, count):
        raise ConfigError(f"--class takes one class, or one per --image ({count}); got {len(classes)}")
    guidance = DEFAULT_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale
    labels = classes * count if len(classes) == 1 else classes
    check_labels(diffusion, labels, guidance)
    return labels, guidance


def _write_results(out: Path, rows: list, record: dict, extra=None, **arrays) -> None:
    """grid.png, results.npz, record.json and the files ``extra(folder)`` writes, staged and moved into
    ``out`` together: a failure (a full disk) leaves none of them there."""
    with staged_dir(out) as stage:
        if extra is not None:
            extra(stage)
        save_png(stage / "grid.png", result_grid(rows))
        save_npz(stage / "results.npz", **arrays)
        write_json(stage / "record.json", record)


def cmd_inpaint(args) -> int:
    out, diffusion, meta, images, sizes, labels, guidance, sampling, sources = _editing_setup(
        args, ("grid.png", "results.npz", "record.json"))
    keep = load_mask(args.mask, diffusion.image_size, source_sizes=sizes, seed=args.seed)
    repeat = [k for k in range(len(images)) for _ in range(args.n)]          # result k fills image k // n
    results = inpaint(diffusion, images[repeat], keep, sampling=sampling, seed=args.seed,
                      jump_length=args.jump_length, resample=args.resample, batch_size=args.batch_size,
                      labels=None if labels is None else [labels[k] for k in repeat], guidance_scale=guidance)
    inputs = _to_uint8_batch(images)
    method = "repaint" if sampling.sampler == "ddpm" else "replacement"
    resampling = {} if method != "repaint" else {k: getattr(args, k) or v for k, v in RESAMPLING_DEFAULTS.items()}
    record = sample_record(diffusion, meta, sampling, seed=args.seed, weights=args.weights, images=args.image,
                           n=args.n, mask=args.mask, method=method, **resampling, classes=labels,
                           guidance_scale=guidance, unknown_pixels=int((~keep).sum()), **sources)
    per_result = results.reshape(len(images), args.n, *results.shape[1:]).swapaxes(0, 1)
    _write_results(out, [inputs, masked_preview(inputs, keep), *per_result], record, images=results,
                   inputs=inputs, mask=keep.numpy(), image_index=np.asarray(repeat))
    print(f"inpainted {int((~keep).sum())} pixels of {len(images)} image(s), {args.n} result(s) each "
          f"({method}, {record['steps']} steps) -> {out / 'grid.png'}, {out / 'results.npz'}")
    return 0


def cmd_edit(args) -> int:
    out, diffusion, meta, images, _, labels, guidance, sampling, sources = _editing_setup(
        args, ("grid.png", "results.npz", "record.json"))
    t0 = sdedit_start(args.strength, diffusion.timesteps)
    if t0 is not None:
        sampling = resolve_plan(diffusion, sampling, start=t0, start_name="t0")      # the steps over [t0, 0]
    repeat = [k for k in range(len(images)) for _ in range(args.n)]
    results = edit(diffusion, images[repeat], args.strength, sampling=sampling, seed=args.seed,
                   batch_size=args.batch_size, labels=None if labels is None else [labels[k] for k in repeat],
                   guidance_scale=guidance)
    inputs = _to_uint8_batch(images)
    record = sample_record(diffusion, meta, sampling, seed=args.seed, weights=args.weights, images=args.image,
                           n=args.n, strength=args.strength, t0=t0, classes=labels, guidance_scale=guidance,
                           **sources)
    if t0 is None:
        record["steps"] = 0                                         # the input, as it is
    per_result = results.reshape(len(images), args.n, *results.shape[1:]).swapaxes(0, 1)
    _write_results(out, [inputs, *per_result], record, images=results, inputs=inputs, image_index=np.asarray(repeat))
    print(f"edited {len(images)} image(s) at strength {args.strength:g} (t0 = {t0}), {args.n} result(s) each "
          f"-> {out / 'grid.png'}, {out / 'results.npz'}")
    return 0


def cmd_invert(args) -> int:
    sampling = SamplingOptions(sampler="ddim", steps=args.steps, spacing=args.spacing, clip=False)
    out, diffusion, meta, images, _, labels, guidance, sampling, _ = _editing_setup(
        args, ("latents.npz", "grid.png", "results.npz", "record.json"), sampling)
    latents, recon = invert(diffusion, images, steps=args.steps, spacing=args.spacing, labels=labels,
                            guidance_scale=guidance, batch_size=args.batch_size)
    inputs = _to_uint8_batch(images)
    error = np.abs(recon.astype(np.int16) - inputs.astype(np.int16)) / 255.0
    record = sample_record(diffusion, meta, sampling, seed=0, weights=args.weights, images=args.image,
                           classes=labels, guidance_scale=guidance, mean_abs_error=float(error.mean()),
                           max_abs_error=float(error.max()), error_range="[0, 1] images")
    _write_results(out, [inputs, recon], record, images=recon, inputs=inputs, extra=lambda folder: save_latents(
        folder / "latents.npz", latents, timesteps=list(sampling.timesteps), num_timesteps=diffusion.timesteps,
        steps=record["steps"], spacing=args.spacing))
    print(f"inverted {len(images)} image(s) over {record['steps']} DDIM steps -> {out / 'latents.npz'}; "
          f"reconstruction error {error.mean():.4f} mean, {error.max():.4f} max (images in [0, 1])")
    return 0


def _to_uint8_batch(images):
    """[N, C, H, W] float in [0, 1] -> uint8 [N, H, W, C]."""
    return to_uint8(images.cpu())
