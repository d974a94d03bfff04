"""``ddpm train`` and ``ddpm distill``: the options checked, the run directory claimed, the loop run."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from .. import distributed
from ..build import build_model
from ..checkpoint import list_checkpoints
from ..distill import distill, new_plan, resumed_plan
from ..errors import ConfigError
from ..estimates import check_training_memory, duration_lines
from ..precision import check_request
from ..resolve import resolve_train_config, resume_config
from ..run_dir import claimed, prepare_run_dir
from ..signals import StopSignals
from ..tracking import check_tracker
from ..train import train
from ..training_data import check_training_data, load_training_data
from .common import flag, plural


# Each train option and the configuration field it sets.
TRAIN_FLAGS = {
    "data": ("data", "name"), "data_root": ("data", "root"), "split": ("data", "split"),
    "image_size": ("data", "image_size"), "channels": ("data", "channels"), "hflip": ("data", "hflip"),
    "strict": ("data", "strict"), "image_column": ("data", "image_column"), "label_column": ("data", "label_column"),
    "timesteps": ("diffusion", "timesteps"), "schedule": ("diffusion", "schedule"),
    "objective": ("diffusion", "objective"), "loss_weighting": ("diffusion", "loss_weighting"),
    **{name: ("diffusion", name) for name in (
        "variance", "loss", "vlb_weight", "timestep_sampling", "offset_noise", "self_condition")},
    **{name: ("diffusion", name) for name in (
        "formulation", "sigma_data", "p_mean", "p_std", "sigma_min", "sigma_max")},
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
    return resolve_train_config(_flag_layer(args), preset=args.preset, config_file=args.config,
                                conditional=args.conditional, label_dropout_given=args.label_dropout is not None,
                                condition=_image_condition_flags(args))


def _image_condition_flags(args) -> dict:
    """--task, --scale, --condition-noise, --condition-data (ddpm.resolve.image_condition reads them)."""
    return {"task": args.task, "scale": args.scale, "noise": args.condition_noise, "data": args.condition_data}


def _resume_config(args):
    """The saved configuration of the run to resume, and the options checked against it."""
    if any(value is not None for value in _image_condition_flags(args).values()):
        raise ConfigError("--task, --scale, --condition-noise and --condition-data are the run's own; "
                          "drop them with --resume")
    given = {key: getattr(args, key) for key in ("out", "config", "preset", "conditional", "steps", "device",
                                                  "grad_accum", "batch_size", "time_limit")}
    return resume_config(args.resume, _flag_layer(args), world_size=distributed.env_world_size(),
                         flag_names={target: flag(name) for name, target in TRAIN_FLAGS.items()}, **given)


def cmd_train(args) -> int:
    with StopSignals() as stop:            # SIGINT / SIGTERM handled before the run directory exists
        return _train(args, stop)


def _train(args, stop) -> int:
    """Check everything, claim the run directory (rank 0 locks it), train in it."""
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
    main_rank = distributed.is_main()
    world = distributed.world_size()
    if not args.quiet and main_rank:
        verb = "resuming" if args.resume else "training"
        procs = f" with {world} processes (global batch {config.train.global_batch_size(world)})" if world > 1 else ""
        shape = "x".join(map(str, (data.channels, *data.image_size)))       # C x H x W, or C x L for sequences
        print(f"{verb} preset {config.preset!r} ({build_model(config).num_parameters() / 1e6:.2f}M parameters) "
              f"on {data.name} ({plural(data.num_images, 'image')}, {shape}) "
              f"to step {config.train.steps}{procs} -> {run_dir}", file=sys.stderr)
    result = train(config, run_dir, data=data, resume=resume, progress=not args.quiet, stop=stop)
    if not main_rank:
        return 0
    print(f"done in {result.seconds:.0f} s: checkpoint {result.checkpoint}, samples {result.grid}")
    if result.counters.bad_steps:
        print(f"ddpm: warning: {result.counters.bad_steps} step(s) were skipped for a non-finite loss or gradient "
              "(see bad_steps in metrics.jsonl)", file=sys.stderr)
    return 0


# distill options that set the plan, and those that set a TrainConfig field.
DISTILL_PLAN_FLAGS = ("checkpoint", "rounds", "steps_per_round", "teacher_steps", "weighting", "data", "data_root")


DISTILL_TRAIN_FLAGS = ("batch_size", "lr", "ema_decay", "grad_clip", "precision", "seed", "device", "log_every",
                       "checkpoint_every", "keep_last", "sample_every", "num_samples")


def cmd_distill(args) -> int:
    main_rank = distributed.is_main()
    with distributed.agree("checking the configuration"):     # one rank's mistake stops all, one message
        if args.resume:
            given = [flag(n) for n in (*DISTILL_PLAN_FLAGS, *DISTILL_TRAIN_FLAGS)
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
