"""``ddpm sample``, ``ddpm interpolate`` and ``ddpm viz``: images from a checkpoint, and pictures."""

from __future__ import annotations

from pathlib import Path

from .. import distributed, viz
from ..condition_job import sample_command
from ..data import load_dataset
from ..device import select_device
from ..editing import load_latents
from ..errors import ConfigError
from ..fileio import check_output_path
from ..generate import load_diffusion
from ..sample_job import interpolation_folder, plan_samples, run_samples
from ..sampling import resolve_plan
from .common import (checkpoint_arg, classes_from_args, output_dir, plural, precision_choice, sampling_from_args,
                     say_precision, show_progress)


def cmd_sample(args) -> int:
    with distributed.agree("checking the options"):
        out = output_dir(args, ("grid.png", "samples.npz", "record.json", "progressive.png", "images"))
        device = distributed.training_device(args.device)
        choice = precision_choice(args, device)
        diffusion, meta = load_diffusion(args.checkpoint, device=device, weights=args.weights,
                                         precision=choice.precision)
        if args.condition is not None or args.then or getattr(diffusion, "condition", None) is not None:
            return _sample_image_conditioned(args, out, device, choice, diffusion, meta)
        latents, latent_sampling = _latents_from_args(args, diffusion)
        sampling, sources = sampling_from_args(args, diffusion, latent_sampling)   # e.g. a student's steps
        plan = plan_samples(diffusion, meta, sampling, n=args.n, classes=args.classes,
                            guidance_scale=args.guidance_scale, seed=args.seed, start_index=args.start_index,
                            weights=args.weights, device=str(device), world=distributed.world_size(),
                            latents=latents, latents_path=args.latents, sources=sources)
    say_precision(args, choice)
    paths = run_samples(diffusion, plan, out, seed=args.seed, batch_size=args.batch_size, png=args.png,
                        progressive=args.progressive, progress=show_progress(args), meta=meta)
    if paths is not None:
        print(f"wrote {plural(plan.total, 'image')} ({plan.record['sampler']}, "
              f"{plural(plan.record['steps'], 'step')}) from "
              f"{meta['path']} (step {meta.get('step')}) to {paths['grid']}, {paths['samples']} and {paths['record']}")
    return 0


def _sample_image_conditioned(args, out, device, choice, diffusion, meta) -> int:
    """``ddpm sample --condition SRC`` on an image-conditioned checkpoint, or a cascade (``--then RUN``)."""
    print(sample_command(args, out, device, choice.precision, diffusion, meta,
                         sampling_for=lambda d: sampling_from_args(args, d)[0],
                         classes=classes_from_args(args, diffusion, meta), progress=show_progress(args)))
    return 0


def _latents_from_args(args, diffusion):
    """``--latents NPZ``: the latents and the DDIM options the file names (None, None without it)."""
    if getattr(args, "latents", None) is None:
        return None, None

    latents, sampling = load_latents(args.latents, diffusion)
    if args.start_index >= len(latents) or (args.n is not None and args.start_index + args.n > len(latents)):
        raise ConfigError(f"{args.latents} holds {len(latents)} latents; --start-index {args.start_index} "
                          f"--num-images {args.n or 1} asks for more")
    return latents, sampling


def cmd_interpolate(args) -> int:
    out = output_dir(args, ("interpolation.png", "interpolation.npz", "record.json"))
    device = select_device(args.device)
    choice = precision_choice(args, device)
    diffusion, meta = load_diffusion(args.checkpoint, device=device, weights=args.weights, precision=choice.precision)
    sampling, sources = sampling_from_args(args, diffusion)
    png, t = interpolation_folder(diffusion, meta, out, args.image_a, args.image_b, t=args.t, n_interp=args.n_interp,
                                  method=args.method, seed=args.seed, sampling=sampling, data_root=args.data_root,
                                  weights=args.weights, device=str(device), invert=args.invert, classes=args.classes,
                                  guidance_scale=args.guidance_scale, sources=sources)
    say_precision(args, choice)
    print(f"wrote {args.n_interp} interpolants at t = {t} to {png}")
    return 0


def cmd_viz(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must end in .png")
    check_output_path(out, overwrite=args.overwrite)       # a directory, below a file, an existing file
    if args.viz_command == "schedule":
        viz.schedule_figure(out, timesteps=args.timesteps, schedules=args.schedules)
    elif args.viz_command == "forward":
        size = None
        if args.image_size:
            if len(args.image_size) not in (1, 2):
                raise ConfigError("--image-size takes N or H W")
            size = tuple(args.image_size * 2 if len(args.image_size) == 1 else args.image_size)
        data = load_dataset(args.data, data_root=args.data_root, image_size=size)
        viz.forward_figure(out, data.images[:args.n], args.steps, schedules=args.schedules,
                           timesteps=args.timesteps, seed=args.seed)
    elif args.viz_command == "reverse":
        device = select_device(args.device)
        choice = precision_choice(args, device)
        diffusion, meta = load_diffusion(args.checkpoint, device=device, weights=args.weights,
                                         precision=choice.precision)
        sampling, _ = sampling_from_args(args, diffusion)
        sampling = resolve_plan(diffusion, sampling)    # validates --steps against the checkpoint's T
        classes, guidance = classes_from_args(args, diffusion, meta)
        labels = None if classes is None else [c for c in classes for _ in range(args.n)]
        viz.reverse_figure(out, diffusion, n=args.n * len(classes or [0]), frames=args.frames, seed=args.seed,
                           sampling=sampling, meta=meta, labels=labels, guidance_scale=guidance)
        say_precision(args, choice)
    else:
        run_dir = checkpoint_arg(args.run_dir, args.checkpoint, "the run directory")
        viz.training_figure(out, run_dir, grids=args.grids)
        if viz.training_to_tensorboard(run_dir, out, grids=args.grids):
            print(f"also in TensorBoard: {Path(run_dir) / 'tensorboard'}")
    print(f"wrote {out}")
    return 0
