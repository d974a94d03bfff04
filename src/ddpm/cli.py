"""The ``ddpm`` command line: a thin layer of validated options over the library.

Exit codes: 0 success, 2 usage or configuration error, 3 data error, 4 checkpoint error, 5 training
stopped (non-finite steps), 6 another process of a torchrun group was lost, 128 + N stopped by signal N.
User mistakes print one line, ``ddpm: error: ...``, never a traceback.

Under torchrun (``torchrun --nproc_per_node N -m ddpm train|distill|sample|eval ...``) every process
runs the same command: ``train`` and ``distill`` train data-parallel, ``sample`` and ``eval
--checkpoint`` split the image indices among the processes, and rank 0 writes the files and the
messages.
"""

from __future__ import annotations

import dataclasses
import contextlib
import errno
import json
import sys
from pathlib import Path

from .checkpoint_schema import weight_group
from .cli_ema import cmd_ema
from .cli_parser import build_parser
from .errors import ConfigError, DdpmError, OutputError, TrainingInterrupted


# ----------------------------------------------------------------------------- commands

# Each train option and the configuration field it sets.
TRAIN_FLAGS = {
    "data": ("data", "name"), "data_root": ("data", "root"), "split": ("data", "split"),
    "image_size": ("data", "image_size"), "channels": ("data", "channels"), "hflip": ("data", "hflip"),
    "strict": ("data", "strict"), "image_column": ("data", "image_column"), "label_column": ("data", "label_column"),
    "timesteps": ("diffusion", "timesteps"), "schedule": ("diffusion", "schedule"),
    "objective": ("diffusion", "objective"), "loss_weighting": ("diffusion", "loss_weighting"),
    **{name: ("diffusion", name) for name in (
        "variance", "loss", "vlb_weight", "timestep_sampling", "offset_noise", "self_condition")},
    **{name: ("diffusion", name) for name in ("formulation", "sigma_data", "p_mean", "p_std", "sigma_min", "sigma_max")},
    **{name: ("model", name) for name in (
        "dropout", "dim", "dim_mults", "num_res_blocks", "attention_levels", "attention_resolutions")},
    **{name: ("train", name) for name in (
        "steps", "batch_size", "grad_accum", "optimizer", "lr", "weight_decay", "warmup_steps", "grad_clip",
        "ema_decay", "ema_warmup", "precision", "grad_checkpointing", "max_bad_steps", "seed", "device", "init",
        "log_every", "checkpoint_every", "keep_last", "milestone_every", "sample_every", "num_samples",
        "eval_every", "eval_samples", "eval_metric", "keep_best", "inception_weights", "label_dropout",
        "time_limit", "lr_schedule", "lr_min", "lr_ref_steps", "ema_extra_decays", "ema_snapshot_every",
        "ema_profiles")},
    **{name: ("train", name) for name in ("tracker", "wandb_project", "wandb_name")},
}


def _show_progress(args) -> bool:
    """Progress bars: never with --quiet, as --progress / --no-progress say, else only on a terminal."""
    if args.quiet:
        return False
    return sys.stderr.isatty() if args.progress is None else args.progress


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# Options whose name is not their destination's (the older spellings are hidden aliases).
FLAG_SPELLINGS = {"num_samples": "--num-images", "eval_samples": "--eval-num-images"}


def _flag(name: str) -> str:
    return FLAG_SPELLINGS.get(name) or "--" + name.replace("_", "-")


def _precision(args, device):
    """``--precision`` resolved on ``device`` (auto: :func:`ddpm.precision.resolve_precision`)."""
    from .precision import resolve_precision  # here: beside its command (--help loads it too)

    return resolve_precision(args.precision, device)


def _say_precision(args, choice) -> None:
    """The automatic choice in one line on stderr, once the options have passed every check."""
    from . import distributed  # here: beside its command (--help loads it too)

    if args.precision == "auto" and not getattr(args, "quiet", False) and distributed.is_main():
        print(choice.line(), file=sys.stderr)


def _sampling_from_args(args, diffusion=None, latent_sampling=None):
    """The sampler flags resolved by :func:`ddpm.generate.resolve_sampling` over the defaults of
    ``diffusion``'s checkpoint (or of a ``--latents`` file, which name DDIM steps); returns the
    options and where the sampler and steps came from, for the record."""
    from .generate import FROM_CHECKPOINT, resolve_sampling  # here: beside its command (--help loads it too)

    base = latent_sampling or getattr(diffusion, "default_sampling", None)
    return resolve_sampling(args.sampler, args.steps, base=base, base_from="latents" if latent_sampling else
                            FROM_CHECKPOINT, spacing=args.spacing, eta=args.eta, variance=args.variance,
                            clip=args.clip, dynamic_thresholding=args.dynamic_threshold or None,
                            **_sigma_options(args))


SIGMA_OPTIONS = ("churn", "s_tmin", "s_tmax", "s_noise", "rho")


def _sigma_options(args) -> dict:
    """The sigma samplers' flags (``--churn`` ... ``--rho``), as :class:`~ddpm.samplers.SamplingOptions` fields."""
    return {name: getattr(args, name, None) for name in SIGMA_OPTIONS}


def _flag_layer(args) -> dict:
    """The options given on the command line, as configuration sections."""
    layer: dict = {}
    for name, (section, key) in TRAIN_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name == "image_size":
            if len(value) not in (1, 2):
                raise ConfigError("--image-size takes N or H W")
            value = tuple(value * 2 if len(value) == 1 else value)
        elif isinstance(value, list):
            value = tuple(value)
        layer.setdefault(section, {})[key] = value
    return layer


def _train_config(args):
    """A new run's configuration from the options: preset recipe < --config file < options."""
    from .resolve import resolve_train_config  # here: beside its command (--help loads it too)

    return resolve_train_config(_flag_layer(args), preset=args.preset, config_file=args.config,
                                conditional=args.conditional, label_dropout_given=args.label_dropout is not None,
                                condition=_image_condition_flags(args))


def _image_condition_flags(args) -> dict:
    """--task, --scale, --condition-noise, --condition-data (ddpm.resolve.image_condition reads them)."""
    return {"task": args.task, "scale": args.scale, "noise": args.condition_noise, "data": args.condition_data}


def _resume_config(args):
    """The saved configuration of the run to resume, and the options checked against it."""
    from . import distributed  # here: beside its command (--help loads it too)
    from .resolve import resume_config  # here: beside its command (--help loads it too)

    if any(value is not None for value in _image_condition_flags(args).values()):
        raise ConfigError("--task, --scale, --condition-noise and --condition-data are the run's own; "
                          "drop them with --resume")
    given = {key: getattr(args, key) for key in ("out", "config", "preset", "conditional", "steps", "device",
                                                  "grad_accum", "batch_size", "time_limit")}
    return resume_config(args.resume, _flag_layer(args), world_size=distributed.env_world_size(),
                         flag_names={target: _flag(name) for name, target in TRAIN_FLAGS.items()}, **given)


def cmd_train(args) -> int:
    from .signals import StopSignals  # here: beside its command (--help loads it too)

    with StopSignals() as stop:            # SIGINT / SIGTERM handled before the run directory exists
        return _train(args, stop)


def _train(args, stop) -> int:
    """Check everything, claim the run directory (rank 0 locks it), train in it."""
    from . import distributed  # here: beside its command (--help loads it too)
    from .checkpoint import list_checkpoints  # here: beside its command (--help loads it too)
    from .estimates import check_training_memory  # here: keeps ddpm --help fast
    from .precision import check_request  # here: beside its command (--help loads it too)
    from .run_dir import claimed  # here: beside its command (--help loads it too)
    from .tracking import check_tracker          # the CLI loads the training modules when it trains
    from .train import check_training_data, load_training_data  # here: beside its command (--help loads it too)

    main_rank = distributed.is_main()
    run_dir = None
    with distributed.agree("checking the configuration"):     # one rank's mistake stops all, one message
        if args.resume:
            config, run_dir = _resume_config(args)
            data = load_training_data(config)
        else:
            config, data = _train_config(args)
            check_training_data(config, data)
        device = distributed.training_device(config.train.device)   # an unavailable device: an error before
        check_training_memory(config, device)                # anything runs, and so is a model too big for it
        check_request(config.train.precision, device)        # and a precision it cannot run (fp16 on a CPU)
        check_tracker(config.train.tracker)                  # --tracker wandb without the wandb package
    if main_rank and not args.resume:
        from .estimates import duration_lines    # a run's expected duration, timed on the device when it could be long

        print(*duration_lines(config, device, dry_run=args.dry_run), sep="", end="", file=sys.stderr)
    if args.dry_run:
        if main_rank:
            print(json.dumps(config.to_dict(), indent=2))
        return 0
    if data.skipped and main_rank:
        print(f"ddpm: warning: skipped {len(data.skipped)} unreadable image(s) (--strict makes this an error): "
              + "; ".join(data.skipped[:3]) + (" ..." if len(data.skipped) > 3 else ""), file=sys.stderr)
    with claimed(args.out, run_dir) as run_dir:
        return _train_in(args, config, data, run_dir, stop, resume=bool(list_checkpoints(run_dir)))


def _train_in(args, config, data, run_dir: Path, stop, resume: bool) -> int:
    """Train in the claimed ``run_dir``: from its newest verified checkpoint (``resume``) or from step 0."""
    from . import distributed  # here: beside its command (--help loads it too)
    from .build import build_model  # here: beside its command (--help loads it too)
    from .train import train  # here: beside its command (--help loads it too)

    main_rank = distributed.is_main()
    world = distributed.world_size()
    if not args.quiet and main_rank:
        verb = "resuming" if args.resume else "training"
        procs = f" with {world} processes (global batch {config.train.global_batch_size(world)})" if world > 1 else ""
        print(f"{verb} preset {config.preset!r} ({build_model(config).num_parameters() / 1e6:.2f}M parameters) "
              f"on {data.name} ({_plural(data.num_images, 'image')}, {data.channels}x{data.image_size[0]}x{data.image_size[1]}) "
              f"to step {config.train.steps}{procs} -> {run_dir}", file=sys.stderr)
    result = train(config, run_dir, data=data, resume=resume, progress=not args.quiet, stop=stop)
    if not main_rank:
        return 0
    print(f"done in {result.seconds:.0f} s: checkpoint {result.checkpoint}, samples {result.grid}")
    if result.counters.bad_steps:
        print(f"ddpm: warning: {result.counters.bad_steps} step(s) were skipped for a non-finite loss or gradient "
              "(see bad_steps in metrics.jsonl)", file=sys.stderr)
    return 0


def _output_dir(args, names: tuple[str, ...]) -> Path:
    """``--out DIR`` checked before any work: writable, not below a file, none of ``names`` there
    unless ``--overwrite``. (The outputs are then staged and moved into DIR together.)"""
    from .fileio import check_output_path  # here: beside its command (--help loads it too)
    from .run_dir import new_run_dir  # here: beside its command (--help loads it too)

    out = check_output_path(Path(args.out) if args.out else new_run_dir("samples"), directory=True)
    existing = [name for name in names if (out / name).exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --overwrite")
    return out


def cmd_sample(args) -> int:
    from . import distributed  # here: beside its command (--help loads it too)
    from .generate import load_diffusion  # here: beside its command (--help loads it too)
    from .sample_job import plan_samples, run_samples  # here: keeps ddpm --help fast

    with distributed.agree("checking the options"):
        out = _output_dir(args, ("grid.png", "samples.npz", "record.json", "progressive.png", "images"))
        device = distributed.training_device(args.device)
        choice = _precision(args, device)
        diffusion, meta = load_diffusion(args.checkpoint, device=device, weights=args.weights,
                                         precision=choice.precision)
        if args.condition is not None or args.then or getattr(diffusion, "condition", None) is not None:
            return _sample_image_conditioned(args, out, device, choice, diffusion, meta)
        latents, latent_sampling = _latents_from_args(args, diffusion)
        sampling, sources = _sampling_from_args(args, diffusion, latent_sampling)   # e.g. a student's steps
        plan = plan_samples(diffusion, meta, sampling, n=args.n, classes=args.classes,
                            guidance_scale=args.guidance_scale, seed=args.seed, start_index=args.start_index,
                            weights=args.weights, device=str(device), world=distributed.world_size(),
                            latents=latents, latents_path=args.latents, sources=sources)
    _say_precision(args, choice)
    paths = run_samples(diffusion, plan, out, seed=args.seed, batch_size=args.batch_size, png=args.png,
                        progressive=args.progressive, progress=_show_progress(args), meta=meta)
    if paths is not None:
        print(f"wrote {_plural(plan.total, 'image')} ({plan.record['sampler']}, "
              f"{_plural(plan.record['steps'], 'step')}) from "
              f"{meta['path']} (step {meta.get('step')}) to {paths['grid']}, {paths['samples']} and {paths['record']}")
    return 0


def _sample_image_conditioned(args, out, device, choice, diffusion, meta) -> int:
    """``ddpm sample --condition SRC`` on an image-conditioned checkpoint, or a cascade (``--then RUN``)."""
    from .condition_job import sample_command        # the command's own module, loaded when it runs

    print(sample_command(args, out, device, choice.precision, diffusion, meta,
                         sampling_for=lambda d: _sampling_from_args(args, d)[0],
                         classes=_classes_from_args(args, diffusion, meta), progress=_show_progress(args)))
    return 0


def _latents_from_args(args, diffusion):
    """``--latents NPZ``: the latents and the DDIM options the file names (None, None without it)."""
    if getattr(args, "latents", None) is None:
        return None, None
    from .editing import load_latents  # here: keeps ddpm --help fast

    latents, sampling = load_latents(args.latents, diffusion)
    if args.start_index >= len(latents) or (args.n is not None and args.start_index + args.n > len(latents)):
        raise ConfigError(f"{args.latents} holds {len(latents)} latents; --start-index {args.start_index} "
                          f"--num-images {args.n or 1} asks for more")
    return latents, sampling


def _classes_from_args(args, diffusion, meta=None) -> tuple[list[int] | None, float | None]:
    """``--class K ... | all`` (indices, or names the checkpoint holds) and ``--guidance-scale W``."""
    from .sample_job import resolve_classes  # here: keeps ddpm --help fast

    return resolve_classes(diffusion, args.classes, args.guidance_scale, (meta or {}).get("class_names"))


def cmd_interpolate(args) -> int:
    from .device import select_device  # here: beside its command (--help loads it too)
    from .generate import load_diffusion  # here: beside its command (--help loads it too)
    from .sample_job import interpolation_folder  # here: keeps ddpm --help fast

    out = _output_dir(args, ("interpolation.png", "interpolation.npz", "record.json"))
    device = select_device(args.device)
    choice = _precision(args, device)
    diffusion, meta = load_diffusion(args.checkpoint, device=device, weights=args.weights, precision=choice.precision)
    sampling, sources = _sampling_from_args(args, diffusion)
    png, t = interpolation_folder(diffusion, meta, out, args.image_a, args.image_b, t=args.t, n_interp=args.n_interp,
                                  method=args.method, seed=args.seed, sampling=sampling, data_root=args.data_root,
                                  weights=args.weights, device=str(device), invert=args.invert, classes=args.classes,
                                  guidance_scale=args.guidance_scale, sources=sources)
    _say_precision(args, choice)
    print(f"wrote {args.n_interp} interpolants at t = {t} to {png}")
    return 0


def _checkpoint_arg(positional: str | None, option: str | None, what: str) -> str:
    """The checkpoint a command reads, given as its positional argument or as ``--checkpoint``: exactly once."""
    if positional is not None and option is not None:
        raise ConfigError(f"give {what} once: as an argument or as --checkpoint, not both")
    if positional is None and option is None:
        raise ConfigError(f"give {what}, as an argument or as --checkpoint")
    return positional if positional is not None else option


def cmd_inspect(args) -> int:
    from .checkpoint import load_checkpoint  # here: beside its command (--help loads it too)

    tensors, meta = load_checkpoint(_checkpoint_arg(args.path, args.checkpoint, "the checkpoint to inspect"))
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(f"checkpoint: {meta['path']}")
    print(f"step:       {meta.get('step')}")
    print(f"format:     version {meta.get('format_version')}")
    sampling = meta.get("config", {}).get("sampling")
    if sampling:
        steps = sampling.get("steps") or "all T"
        print(f"sampling:   {sampling.get('sampler')}, {steps} steps ({sampling.get('spacing')} spacing), "
              "used by the commands that sample when neither --sampler nor --steps is given, or --sampler "
              "names it")
    groups: dict[str, list] = {}
    for name, t in tensors.items():          # ema@0.999.* and phema.0.* are groups of their own
        groups.setdefault((weight_group(name) or (name.split(".", 1)[0],))[0], []).append(t)
    print("tensors:")
    for prefix, ts in sorted(groups.items()):
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in ts})
        print(f"  {prefix + '.*':<10} {len(ts):5d} tensors  {sum(t.numel() for t in ts):>13,d} values  {', '.join(dtypes)}")
    print("configuration:")
    print(json.dumps(meta.get("config", {}), indent=2))
    return 0


def cmd_eval(args) -> int:
    from .fileio import check_output_path, write_json  # here: beside its command (--help loads it too)

    for option, path in (("--out", args.out), ("--nn-grid", args.nn_grid)):
        if path:                        # before any work: an existing file needs --overwrite
            check_output_path(path, overwrite=args.overwrite, option=option)
    if args.checkpoint and _is_image_conditioned(args.checkpoint):
        from .evaluation.conditioned import evaluate_checkpoint    # held-out pairs: their own figures

        results = evaluate_checkpoint(args, progress=_show_progress(args))
    else:
        results = _evaluate(args)
    if results is None:               # a process other than rank 0 under torchrun
        return 0
    for key, value in results.items():
        if key != "bpd_terms":
            print(f"{key:>18}: {value:.6g}" if isinstance(value, float) else f"{key:>18}: {value}")
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


def _evaluate(args):
    """The metrics of ``ddpm eval`` (ddpm.evaluation.pipeline)."""
    from .evaluation.pipeline import EvalConfig, evaluate  # here: keeps ddpm --help fast

    names = ("metric", "checkpoint", "samples", "data", "data_root", "split", "image_column", "n", "ref_n", "features",
             "inception", "inception_weights", "inception_resize", "ref_stats", "save_stats", "cache_dir", "nn_grid",
             "sampler", "steps", "spacing", "eta", *SIGMA_OPTIONS, "class_label", "guidance_scale", "batch_size", "seed",
             "device", "weights", "precision", "probes", "ode_solver", "ode_steps")
    options = {name: getattr(args, name) for name in names}
    return evaluate(EvalConfig(metrics=tuple(options.pop("metric")), progress=_show_progress(args), **options))


def _is_image_conditioned(checkpoint) -> bool:
    from .checkpoint import read_metadata             # the checkpoint's header alone, before the eval pipeline

    try:
        return read_metadata(checkpoint)["config"].get("condition") is not None
    except DdpmError:                                 # the eval pipeline reports an unreadable checkpoint
        return False


def cmd_viz(args) -> int:
    from . import viz  # here: keeps ddpm --help fast

    from .fileio import check_output_path  # here: beside its command (--help loads it too)

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must end in .png")
    check_output_path(out, overwrite=args.overwrite)       # a directory, below a file, an existing file
    if args.viz_command == "schedule":
        viz.schedule_figure(out, timesteps=args.timesteps, schedules=args.schedules)
    elif args.viz_command == "forward":
        from .data import load_dataset  # here: beside its command (--help loads it too)

        size = None
        if args.image_size:
            if len(args.image_size) not in (1, 2):
                raise ConfigError("--image-size takes N or H W")
            size = tuple(args.image_size * 2 if len(args.image_size) == 1 else args.image_size)
        data = load_dataset(args.data, data_root=args.data_root, image_size=size)
        viz.forward_figure(out, data.images[:args.n], args.steps, schedules=args.schedules,
                           timesteps=args.timesteps, seed=args.seed)
    elif args.viz_command == "reverse":
        from .device import select_device  # here: beside its command (--help loads it too)
        from .generate import load_diffusion  # here: beside its command (--help loads it too)
        from .sampling import resolve_plan  # here: beside its command (--help loads it too)

        device = select_device(args.device)
        choice = _precision(args, device)
        diffusion, meta = load_diffusion(args.checkpoint, device=device, weights=args.weights,
                                         precision=choice.precision)
        sampling, _ = _sampling_from_args(args, diffusion)
        sampling = resolve_plan(diffusion, sampling)    # validates --steps against the checkpoint's T
        classes, guidance = _classes_from_args(args, diffusion, meta)
        labels = None if classes is None else [c for c in classes for _ in range(args.n)]
        viz.reverse_figure(out, diffusion, n=args.n * len(classes or [0]), frames=args.frames, seed=args.seed,
                           sampling=sampling, meta=meta, labels=labels, guidance_scale=guidance)
        _say_precision(args, choice)
    else:
        run_dir = _checkpoint_arg(args.run_dir, args.checkpoint, "the run directory")
        viz.training_figure(out, run_dir, grids=args.grids)
        if viz.training_to_tensorboard(run_dir, out, grids=args.grids):
            print(f"also in TensorBoard: {Path(run_dir) / 'tensorboard'}")
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from .interop.diffusers import export_diffusers  # here: keeps ddpm --help fast

    if args.private and not args.push_to_hub:
        raise ConfigError("--private applies to --push-to-hub OWNER/NAME; give that too")
    out = export_diffusers(args.checkpoint, args.out, weights=args.weights)
    print(f"wrote a diffusers DDPMPipeline folder to {out} ({args.weights} weights of {args.checkpoint})")
    if args.push_to_hub:
        from .interop.hub import push_to_hub  # here: keeps ddpm --help fast

        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"uploaded it to {url}")
    return 0


def cmd_import(args) -> int:
    from .interop.diffusers import import_diffusers  # here: keeps ddpm --help fast

    if args.format == "openai":
        from .interop.openai import import_openai  # here: keeps ddpm --help fast

        source = _checkpoint_arg(args.folder, args.checkpoint, "the state dict to import")
        if not args.flags:
            raise ConfigError("--format openai needs --flags \"...\": the flags the model was built with")
        if source.startswith("hf://"):
            from .interop.hub import openai_state_dict_source       # huggingface_hub: an optional extra

            source = openai_state_dict_source(source)
        print(f"wrote checkpoint {import_openai(source, args.out, args.flags)} from {source}")
        return 0
    if args.flags:
        raise ConfigError("--flags applies to --format openai only")
    folder = _checkpoint_arg(args.folder, args.checkpoint, "the diffusers folder to import")
    if folder.startswith("hf://"):
        from .interop.hub import diffusers_snapshot  # here: keeps ddpm --help fast

        folder = str(diffusers_snapshot(folder))
    out = import_diffusers(folder, args.out)
    print(f"wrote checkpoint {out} from the diffusers folder {folder}")
    return 0


# distill options that set the plan, and those that set a TrainConfig field.
DISTILL_PLAN_FLAGS = ("checkpoint", "rounds", "steps_per_round", "teacher_steps", "weighting", "data", "data_root")
DISTILL_TRAIN_FLAGS = ("batch_size", "lr", "ema_decay", "grad_clip", "precision", "seed", "device", "log_every",
                       "checkpoint_every", "keep_last", "sample_every", "num_samples")


def cmd_distill(args) -> int:
    from . import distributed  # here: beside its command (--help loads it too)
    from .distill import distill, new_plan, resumed_plan  # here: beside its command (--help loads it too)
    from .run_dir import prepare_run_dir  # here: beside its command (--help loads it too)

    main_rank = distributed.is_main()
    with distributed.agree("checking the configuration"):     # one rank's mistake stops all, one message
        if args.resume:
            given = [_flag(n) for n in (*DISTILL_PLAN_FLAGS, *DISTILL_TRAIN_FLAGS)
                     if n != "device" and getattr(args, n) is not None]
            config, train_cfg, data_cfg = resumed_plan(args.resume, given=given, out=args.out, device=args.device)
        else:
            config, train_cfg, data_cfg = new_plan(
                args.checkpoint, args.rounds, steps_per_round=args.steps_per_round, teacher_steps=args.teacher_steps,
                weighting=args.weighting, data=args.data, data_root=args.data_root,
                train_options={n: getattr(args, n) for n in DISTILL_TRAIN_FLAGS if getattr(args, n) is not None})
        distributed.training_device(train_cfg.device)     # an unavailable device is an error before anything runs
    if args.dry_run:
        if main_rank:
            print(json.dumps({"distill": dataclasses.asdict(config), "train": dataclasses.asdict(train_cfg),
                              "data": dataclasses.asdict(data_cfg)}, indent=2))
        return 0
    run_dir = Path(args.resume) if args.resume else None
    if not args.resume:
        with distributed.agree("creating the run directory"):
            if main_rank:
                run_dir = prepare_run_dir(args.out)
        run_dir = Path(distributed.broadcast_object(None if run_dir is None else str(run_dir)))

    def on_round(r: int, teacher_steps: int, student_steps: int) -> None:
        if not args.quiet and main_rank:
            print(f"round {r}/{config.rounds}: {teacher_steps} -> {student_steps} DDIM steps, "
                  f"{train_cfg.steps} optimizer steps -> {run_dir / f'round-{r:02d}'}", file=sys.stderr)

    result = distill(config, train_cfg, run_dir, data=data_cfg, resume=bool(args.resume), progress=not args.quiet,
                     on_round=on_round)
    if main_rank:
        print(f"done in {result.seconds:.0f} s: a {result.student_steps}-step student, checkpoint {result.student} "
              f"({run_dir / 'student'}); sample it with: ddpm sample --checkpoint {run_dir / 'student'}")
    return 0


# ----------------------------------------------------------------------------- editing: inpaint, edit, invert

def _editing_setup(args, outputs: tuple[str, ...], sampling=None):
    """Output folder, model, images, class labels and sampler of an editing command, all checked before any
    work. ``sampling`` (fixed options, e.g. invert's DDIM) replaces the sampler flags, which resolve over
    the checkpoint's own defaults; returns their origins too (:func:`ddpm.generate.resolve_sampling`)."""
    from .device import select_device  # here: beside its command (--help loads it too)
    from .editing import load_images  # here: keeps ddpm --help fast
    from .generate import load_diffusion  # here: beside its command (--help loads it too)
    from .sampling import resolve_plan  # here: beside its command (--help loads it too)

    out = _output_dir(args, outputs)
    diffusion, meta = load_diffusion(args.checkpoint, device=select_device(args.device), weights=args.weights,
                                     precision=args.precision)
    sampling, sources = (sampling, {}) if sampling is not None else _sampling_from_args(args, diffusion)
    sampling = resolve_plan(diffusion, sampling)                # validates --steps against the checkpoint's T
    images, sizes = load_images(args.image, diffusion, data_root=args.data_root)
    labels, guidance = _labels_per_image(args, diffusion, meta, len(images))
    return out, diffusion, meta, images, sizes, labels, guidance, sampling, sources


def _labels_per_image(args, diffusion, meta, count: int):
    """``--class``: one class for every image or one per image, by index or (when the checkpoint has them) name."""
    from .generate import DEFAULT_GUIDANCE_SCALE  # here: beside its command (--help loads it too)
    from .sample_job import class_indices, class_names  # here: keeps ddpm --help fast
    from .sampling import check_labels, num_classes  # here: beside its command (--help loads it too)

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
    from .editing import result_grid  # here: keeps ddpm --help fast
    from .fileio import staged_dir, write_json  # here: beside its command (--help loads it too)
    from .images import save_npz, save_png  # here: beside its command (--help loads it too)

    with staged_dir(out) as stage:
        if extra is not None:
            extra(stage)
        save_png(stage / "grid.png", result_grid(rows))
        save_npz(stage / "results.npz", **arrays)
        write_json(stage / "record.json", record)


def cmd_inpaint(args) -> int:
    import numpy as np  # here: beside its command (--help loads it too)

    from .editing import RESAMPLING_DEFAULTS, inpaint, load_mask, masked_preview  # here: keeps ddpm --help fast
    from .sample_job import sample_record  # here: keeps ddpm --help fast

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
    import numpy as np  # here: beside its command (--help loads it too)

    from .editing import edit, sdedit_start  # here: keeps ddpm --help fast
    from .sample_job import sample_record  # here: keeps ddpm --help fast
    from .sampling import resolve_plan  # here: beside its command (--help loads it too)

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
    import numpy as np  # here: beside its command (--help loads it too)

    from .editing import invert, save_latents  # here: keeps ddpm --help fast
    from .sample_job import sample_record  # here: keeps ddpm --help fast
    from .samplers import SamplingOptions  # here: beside its command (--help loads it too)

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
    from .pixels import to_uint8  # here: beside its command (--help loads it too)

    return to_uint8(images.cpu())


def cmd_prepare(args) -> int:
    from .data.prepare import prepare_dataset  # here: keeps ddpm --help fast

    if args.image_size is not None and len(args.image_size) not in (1, 2):
        raise ConfigError("--image-size takes N or H W")
    size = None if args.image_size is None else tuple(args.image_size * 2 if len(args.image_size) == 1
                                                      else args.image_size)
    result = prepare_dataset(args.data, args.out, data_root=args.data_root, split=args.split, image_size=size,
                             channels=args.channels, strict=args.strict, workers=args.workers,
                             progress=not args.quiet, image_column=args.image_column, label_column=args.label_column)
    n, height, width, channels = result.shape
    resumed = f", {result.resumed_rows} of them by an interrupted run" if result.resumed_rows else ""
    skipped = f"; {len(result.skipped)} unreadable file(s) skipped (first: {result.skipped[0]})" if result.skipped else ""
    print(f"prepared {n} images of {height}x{width}x{channels} in {result.path}{resumed}{skipped}")
    return 0


# The commands that share their work among the processes torchrun starts.
DISTRIBUTED_COMMANDS = ("train", "sample", "eval", "distill")
COMMANDS = {"train": cmd_train, "sample": cmd_sample, "interpolate": cmd_interpolate, "inspect": cmd_inspect, "eval": cmd_eval, "viz": cmd_viz,
            "export": cmd_export, "import": cmd_import, "distill": cmd_distill, "inpaint": cmd_inpaint,
            "edit": cmd_edit, "invert": cmd_invert, "prepare": cmd_prepare, "ema": cmd_ema}


# Commands whose long phases are samplers (ddpm.signals.check_stop); train installs its own handlers.
STOPPABLE_COMMANDS = ("sample", "eval", "interpolate", "inpaint", "edit", "invert")


def _stop_signals(command: str):
    """SIGINT / SIGTERM as a request to stop at the sampler's next step, for the commands that check it."""
    from .signals import StopSignals   # reason: the CLI loads a command's modules when it runs

    return StopSignals() if command in STOPPABLE_COMMANDS else contextlib.nullcontext()


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe cannot fail."""
    import os  # here: beside its command (--help loads it too)

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):      # stdout is not a real file (e.g. under a test's capture)
        pass


# OSError numbers that mean the environment (disk, permissions, limits), never a bug: one line, no traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG,
                                errno.EIO, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EMFILE,
                                errno.ENFILE, errno.ENOMEM})


def _one_line(exc: BaseException) -> str:
    """An error message on one line, whatever a library put in it."""
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    """The ``ddpm`` command; Ctrl-C at any moment, the heavy imports of the start included, is one line."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from . import distributed  # here: beside its command (--help loads it too)

    code = None
    try:
        distributed.init()          # under torchrun: join the process group (a no-op otherwise)
        if distributed.world_size() > 1 and args.command not in DISTRIBUTED_COMMANDS:
            raise ConfigError(f"ddpm {args.command} runs in one process; start it without torchrun")
        from .interop.hub import resolve_hub_args       # --checkpoint hf://OWNER/NAME: the downloaded file
        resolve_hub_args(args)
        with _stop_signals(args.command):   # SIGINT / SIGTERM stop a sampling command between its steps
            code = COMMANDS[args.command](args)
        sys.stdout.flush()                  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        # The reader went away (ddpm inspect --json | head): stop quietly, as a process killed by SIGPIPE.
        _discard_stdout()
        return 128 + 13
    except TrainingInterrupted as exc:
        if distributed.is_main():
            print(f"ddpm: {exc}", file=sys.stderr)
        return exc.exit_code
    except DdpmError as exc:
        # Under torchrun, rank 0 speaks for errors every rank shares (decided together, or gathered
        # by distributed.agree); a lost peer is news only the rank that saw it can give.
        if distributed.is_main() or isinstance(exc, distributed.PeerLost):
            print(f"ddpm: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise                   # not the disk, permissions or limits: a bug, which keeps its traceback
        print(f"ddpm: error: cannot write {exc.filename or 'a file'}: {exc.strerror or exc}", file=sys.stderr)
        return OutputError.exit_code
    except MemoryError:
        print("ddpm: error: out of memory; choose a smaller model, image size or batch size", file=sys.stderr)
        return ConfigError.exit_code
    finally:
        distributed.shutdown(completed=code == 0)
