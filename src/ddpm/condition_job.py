"""Sampling an image-conditioned model (``ddpm sample --condition``) and a cascade (``--then``).

A conditioned sample folder holds ``samples.npz`` with ``images`` (the samples), ``conditions`` (the
given conditions, uint8, at their own size), ``targets`` when the conditions came from a dataset
(``digits:3``) and ``indices``; ``grid.png`` shows one column per condition: the condition (brought
to the samples' size as the network sees it), its samples, and the target, each row labelled.
Image k uses condition k // per_condition and the noise of ``derive_seed(seed, k)``.

A cascade (Ho et al. 2021, Cascaded Diffusion Models) samples the base checkpoint, then gives image k
of each stage to the next stage's super-resolution model as image k's condition (quantised to uint8,
as the folder stores it). Stage s > 0 samples with the seed ``derive_seed(seed, s)``, so image k of a
cascade depends only on (seed, k): ``--start-index k --num-images 1`` regenerates it alone.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .conditions import ImageCondition, condition_from_input, given_condition, shown_condition
from .data import load_dataset
from .data.image_files import find_image_files
from .errors import ConfigError, DataError
from .fileio import staged_dir, write_json
from .gaussian_diffusion import GaussianDiffusion
from .generate import generate, load_diffusion
from .images import label_rows, make_grid, save_npz, save_png
from .pixels import to_tensor, to_uint8
from .sample_job import sample_record
from .seeding import derive_seed

__all__ = ["Conditions", "load_conditions", "plan_cascade", "check_cascade", "condition_grid", "run_conditioned",
           "run_cascade", "sample_command"]

MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclasses.dataclass
class Conditions:
    """Given conditions in [0, 1] [K, C_c, h, w], with their targets [K, C, H, W] when known."""

    images: torch.Tensor
    targets: torch.Tensor | None
    source: str


def _image_condition(diffusion: GaussianDiffusion) -> ImageCondition:
    condition = getattr(diffusion, "condition", None)
    if condition is None:
        raise ConfigError("this checkpoint is not image-conditioned: it takes no --condition (train with --task)")
    return condition


def _read_file(path: Path, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(MODES[channels]), dtype=np.uint8).reshape(image.height, image.width,
                                                                                     channels)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _read_source(spec: str, channels: int) -> np.ndarray:
    """uint8 [K, h, w, C_c] from an image file, a folder of images of one size, or an .npz."""
    path = Path(spec)
    if path.is_dir():
        files = find_image_files(path)
        if not files:
            raise DataError(f"{spec} holds no images")
        arrays = [_read_file(f, channels) for f in files]
        if len({a.shape for a in arrays}) > 1:
            raise DataError(f"the conditions in {spec} differ in size; give images of one size")
        return np.stack(arrays)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as npz:
            key = "conditions" if "conditions" in npz.files else "images" if "images" in npz.files else None
            if key is None:
                raise DataError(f"{spec} holds no 'images' or 'conditions' array")
            array = npz[key]
        if array.dtype != np.uint8 or array.ndim != 4:
            raise DataError(f"{spec}: '{key}' must be uint8 [N, H, W, C]; got {array.dtype} {list(array.shape)}")
        if array.shape[3] != channels:
            raise ConfigError(f"this model takes {channels}-channel conditions; {spec} holds {array.shape[3]}")
        return array
    if path.is_file():
        return _read_file(path, channels)[None]
    raise DataError(f"no such condition: {spec} (an image file, a folder, an .npz, or DATASET:INDEX, e.g. digits:3)")


def load_conditions(diffusion: GaussianDiffusion, spec: str, *, data_root=None) -> Conditions:
    """``--condition SRC`` for ``diffusion``: checked against its condition's size and channels.

    ``DATASET:INDEX`` takes test image INDEX of a dataset in the model's size and channels as the
    target, and its condition the way training makes it (super-resolution, colorize)."""
    condition = _image_condition(diffusion)
    size = tuple(diffusion.image_size)
    source, _, index = spec.rpartition(":")
    if source and index.isdigit() and not Path(spec).exists():
        if condition.task == "paired":
            raise ConfigError("a paired model's conditions are images of the paired kind: give a file, folder or .npz")
        data = load_dataset(source, data_root=data_root, split="test", image_size=size, channels=diffusion.channels)
        if int(index) >= data.num_images:
            raise ConfigError(f"{spec}: {source} has {data.num_images} test images (0..{data.num_images - 1})")
        targets = to_tensor(data.images[int(index):int(index) + 1])
        return Conditions(given_condition(condition, targets), targets, spec)
    images = to_tensor(_read_source(spec, condition.channels))
    condition_from_input(condition, images[:1] * 2 - 1, size)          # the size, checked before any work
    return Conditions(images, None, spec)


def check_cascade(stages: list[tuple[str, GaussianDiffusion]]) -> None:
    """One line, before any work, when a stage does not take the previous stage's output as its condition."""
    (_, first), rest = stages[0], stages[1:]
    if getattr(first, "condition", None) is not None:
        raise ConfigError("a cascade starts from an unconditional or class-conditional model; "
                          f"{stages[0][0]} is image-conditioned")
    previous = (first.channels, *first.image_size)
    for path, stage in rest:
        condition = getattr(stage, "condition", None)
        if condition is None or condition.task != "super-resolution":
            raise ConfigError(f"--then {path}: a cascade stage must be a super-resolution model")
        low = (condition.channels, stage.image_size[0] // condition.scale, stage.image_size[1] // condition.scale)
        if previous != low:
            raise ConfigError(f"--then {path} takes {low[0]}x{low[1]}x{low[2]} conditions (channels x H x W), "
                              f"but the stage before makes {previous[0]}x{previous[1]}x{previous[2]} images")
        previous = (stage.channels, *stage.image_size)


def condition_grid(images: np.ndarray, shown: np.ndarray, targets: np.ndarray | None, per: int) -> np.ndarray:
    """One column per condition: the condition, its ``per`` samples, the target; rows labelled."""
    k = len(shown)
    channels = images.shape[3]
    widen = (lambda a: np.repeat(a, channels, axis=3) if a.shape[3] != channels else a)
    rows = [widen(shown)] + [images[j::per] for j in range(per)] + ([] if targets is None else [widen(targets)])
    labels = ["condition"] + ["sample"] * per + ([] if targets is None else ["target"])
    return label_rows(make_grid(np.concatenate(rows), nrow=k), labels)


def run_conditioned(diffusion: GaussianDiffusion, meta: dict, conditions: Conditions, out: str | os.PathLike, *,
                    sampling, per_condition: int, seed: int, level: float, batch_size: int, progress: bool,
                    weights: str, device: str, sources: dict) -> dict[str, Path]:
    """``per_condition`` samples of each condition; grid.png, samples.npz and record.json written together."""
    condition = _image_condition(diffusion)
    k = len(conditions.images)
    given = conditions.images.repeat_interleave(per_condition, dim=0)
    images = generate(diffusion, len(given), batch_size=batch_size, seed=seed, sampling=sampling, progress=progress,
                      conditions=given, condition_level=level)
    shown = to_uint8(shown_condition(condition, conditions.images, diffusion.image_size))
    targets = None if conditions.targets is None else to_uint8(conditions.targets)
    arrays = {"images": images, "conditions": to_uint8(conditions.images),
              "indices": np.arange(len(images)), **({} if targets is None else {"targets": targets})}
    record = sample_record(diffusion, meta, sampling, seed=seed, weights=weights, n=len(images), start_index=0,
                           device=device, **sources,
                           condition={"source": conditions.source, "task": condition.task, "count": k,
                                      "per_condition": per_condition, "level": level,
                                      "condition_of_image_k": "conditions[k // per_condition]"})
    out = Path(out)
    with staged_dir(out) as stage:
        save_png(stage / "grid.png", condition_grid(images, shown, targets, per_condition))
        save_npz(stage / "samples.npz", **arrays)
        write_json(stage / "record.json", record)
    return {"grid": out / "grid.png", "samples": out / "samples.npz", "record": out / "record.json"}


def plan_cascade(stages: list[tuple[str, GaussianDiffusion, dict, object]], seed: int, weights: str = "ema") -> list[dict]:
    """Each stage's record entry: its checkpoint, sampler and seed (stage 0: ``seed``; stage s: derive_seed(seed, s))."""
    check_cascade([(path, diffusion) for path, diffusion, _, _ in stages])
    return [sample_record(diffusion, meta, sampling, seed=seed if s == 0 else derive_seed(seed, s), weights=weights)
            for s, (_, diffusion, meta, sampling) in enumerate(stages)]


def run_cascade(stages, records: list[dict], out: str | os.PathLike, *, n: int, start_index: int, batch_size: int,
                progress: bool, labels=None, guidance_scale=None) -> dict[str, Path]:
    """Images ``start_index`` .. ``start_index + n - 1`` of the cascade; each stage's output kept in samples.npz."""
    outputs = []
    previous = None
    for s, ((_, diffusion, _, sampling), record) in enumerate(zip(stages, records)):
        kwargs = {"labels": labels, "guidance_scale": guidance_scale} if s == 0 else {
            "conditions": to_tensor(previous)}
        previous = generate(diffusion, n, batch_size=batch_size, seed=record["seed"], sampling=sampling,
                            progress=progress, start_index=start_index, **kwargs)
        outputs.append(previous)
    arrays = {"images": outputs[-1], "indices": np.arange(start_index, start_index + n),
              **{f"stage_{s}": images for s, images in enumerate(outputs[:-1])}}
    record = {"cascade": [{k: v for k, v in r.items() if k not in ("seed_of_image_k",)} for r in records],
              "n": n, "start_index": start_index,
              "seed_of_image_k": "stage s: derive_seed(stage seed, k); stage s > 0 is conditioned on stage s - 1's "
                                 "image k as stored in samples.npz (uint8)"}
    out = Path(out)
    with staged_dir(out) as stage:
        save_png(stage / "grid.png", make_grid(outputs[-1]))
        save_npz(stage / "samples.npz", **arrays)
        write_json(stage / "record.json", record)
    return {"grid": out / "grid.png", "samples": out / "samples.npz", "record": out / "record.json"}


def _check_flags(args) -> None:
    for flag, given in (("--latents", args.latents), ("--progressive", args.progressive), ("--png", args.png)):
        if given:
            raise ConfigError(f"{flag} is not available with --condition or --then")
    if args.then and (args.condition is not None or args.condition_noise):
        raise ConfigError("a cascade conditions each stage on the previous stage's images: drop --condition "
                          "and --condition-noise")


def sample_command(args, out, device, precision: str, diffusion: GaussianDiffusion, meta: dict, *, sampling_for,
                   classes: tuple, progress: bool) -> str:
    """``ddpm sample`` of an image-conditioned checkpoint (``--condition``) or of a cascade (``--then``):
    checked, run, written; returns the line to print. ``sampling_for(diffusion)`` resolves the sampler
    flags against a checkpoint, ``classes`` are the (labels, guidance scale) of ``--class``."""
    _check_flags(args)
    n = args.n or 1
    if args.then:
        stages = [(args.checkpoint, diffusion, meta, sampling_for(diffusion))]
        for path in args.then:
            stage, stage_meta = load_diffusion(path, device=device, weights=args.weights, precision=precision)
            stages.append((path, stage, stage_meta, sampling_for(stage)))
        records = plan_cascade(stages, args.seed, args.weights)
        labels = None if classes[0] is None else [c for c in classes[0] for _ in range(n)]
        paths = run_cascade(stages, records, out, n=len(labels) if labels else n, start_index=args.start_index,
                            batch_size=args.batch_size, progress=progress, labels=labels, guidance_scale=classes[1])
        return f"wrote a {len(stages)}-stage cascade to {paths['grid']}, {paths['samples']} and {paths['record']}"
    if args.condition is None:
        raise ConfigError(f"{meta['path']} is image-conditioned ({diffusion.condition.task}): give --condition SRC")
    if classes[0] is not None or args.start_index:
        raise ConfigError("--class and --start-index are not available with --condition")
    conditions = load_conditions(diffusion, args.condition, data_root=args.data_root)
    paths = run_conditioned(diffusion, meta, conditions, out, sampling=sampling_for(diffusion), per_condition=n,
                            seed=args.seed, level=args.condition_noise or 0.0, batch_size=args.batch_size,
                            progress=progress, weights=args.weights, device=str(device), sources={})
    count = len(conditions.images)
    return (f"wrote {count * n} image(s) for {count} condition(s) to {paths['grid']}, {paths['samples']} and "
            f"{paths['record']}")
