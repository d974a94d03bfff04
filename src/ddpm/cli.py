"""The ``ddpm`` command line: a thin layer of validated options over the library.

Exit codes: 0 success, 2 usage or configuration error, 3 data error, 4 checkpoint error.
User mistakes print one line, ``ddpm: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, DdpmError

EXAMPLES_MAIN = """\
examples:
  ddpm train                                   # 8x8 digits, about 5 minutes on a laptop CPU
  ddpm train --data mnist --data-root ../shared/data/mnist --steps 20000
  ddpm sample --checkpoint runs/001 --n 64 --out samples/digits
  ddpm inspect runs/001
"""

EXAMPLES_TRAIN = """\
examples:
  ddpm train                                   # built-in digits with the 'digits' preset
  ddpm train --data fashion-mnist --data-root DIR --batch-size 64 --steps 20000
  ddpm train --data photos/ --preset cifar10 --image-size 32 --channels 3 --out runs/photos
  ddpm train --data images.npz --preset mnist --dry-run
"""

EXAMPLES_SAMPLE = """\
examples:
  ddpm sample --checkpoint runs/001 --n 64 --out samples/digits
  ddpm sample --checkpoint runs/001/checkpoints/step-0003000.safetensors --seed 7 --weights raw
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_train(sub) -> None:
    from .models import PRESETS
    from .schedules import SCHEDULES

    p = sub.add_parser("train", help="train a model", description="Train a noise-prediction U-Net (Algorithm 1).",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="digits (built in), mnist, fashion-mnist, a folder of images or an .npz file (default: digits)")
    g.add_argument("--data-root", help="folder holding the IDX files of mnist / fashion-mnist")
    g.add_argument("--split", choices=("train", "test"), default="train")
    g.add_argument("--image-size", type=_positive_int, nargs="+", metavar="N",
                   help="resize and center-crop to N x N (or give H W)")
    g.add_argument("--channels", type=int, choices=(1, 3, 4), help="1 grey, 3 RGB, 4 RGBA")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips")
    g = p.add_argument_group("model and diffusion")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="U-Net preset (default: digits for digits, mnist for mnist / fashion-mnist)")
    g.add_argument("--timesteps", type=_positive_int, help="T (default 1000)")
    g.add_argument("--schedule", choices=sorted(SCHEDULES), help="noise schedule (default linear)")
    g.add_argument("--objective", choices=("eps", "x0", "v"), help="what the network predicts (default eps)")
    g.add_argument("--dropout", type=float, help="dropout rate in the residual blocks")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, help="optimizer steps")
    g.add_argument("--batch-size", type=_positive_int)
    g.add_argument("--lr", type=_positive_float, help="Adam learning rate")
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 disables)")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--log-every", type=_positive_int)
    g.add_argument("--checkpoint-every", type=_nonneg_int)
    g.add_argument("--sample-every", type=_nonneg_int)
    g.add_argument("--num-samples", type=_positive_int, help="images in each sample grid")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/NNN, the next free number)")
    g.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a checkpoint",
                       description="Generate images with the paper's ancestral sampler (Algorithm 2).",
                       epilog=EXAMPLES_SAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint file or a run directory")
    p.add_argument("--n", type=_positive_int, default=64, help="number of images (default 64)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: samples/NNN, the next free number)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--overwrite", action="store_true", help="replace grid.png / samples.npz already in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a checkpoint's configuration, step and tensors",
                       description="Print a checkpoint's configuration, step and a summary of its tensors.")
    p.add_argument("path", help="a checkpoint file or a run directory (its newest checkpoint)")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models: train, sample, inspect.",
                     epilog=EXAMPLES_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_sample(sub)
    _add_inspect(sub)
    return parser


# ----------------------------------------------------------------------------- commands

def _train_config(args):
    """Resolve the run configuration from the options and the dataset; returns (config, data)."""
    from .config import DEFAULT_PRESET_FOR_DATA, DataConfig, DiffusionConfig, RunConfig, TrainConfig
    from .data import load_dataset
    from .models import preset_config

    preset = args.preset or DEFAULT_PRESET_FOR_DATA.get(args.data)
    if preset is None:
        raise ConfigError("--preset is required for your own data (e.g. --preset mnist for 28x28 grey, "
                          "--preset cifar10 for 32x32 colour)")
    image_size = args.image_size
    if image_size is not None and len(image_size) not in (1, 2):
        raise ConfigError("--image-size takes N or H W")
    data_cfg = DataConfig(name=args.data, root=args.data_root, split=args.split,
                          image_size=tuple(image_size * 2 if len(image_size) == 1 else image_size) if image_size else None,
                          channels=args.channels, hflip=args.hflip)
    data = load_dataset(data_cfg.name, data_root=data_cfg.root, split=data_cfg.split,
                        image_size=data_cfg.image_size, channels=data_cfg.channels)
    model_over = {"image_size": data.image_size, "channels": data.channels}
    if args.dropout is not None:
        model_over["dropout"] = args.dropout
    diff_over = {k: v for k, v in (("timesteps", args.timesteps), ("schedule", args.schedule),
                                   ("objective", args.objective)) if v is not None}
    train_over = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "ema_decay", "grad_clip", "seed",
                                                "device", "log_every", "checkpoint_every", "sample_every",
                                                "num_samples") if getattr(args, k) is not None}
    config = RunConfig(preset=preset, model=preset_config(preset, **model_over),
                       diffusion=DiffusionConfig(**diff_over), data=data_cfg, train=TrainConfig(**train_over))
    return config, data


def cmd_train(args) -> int:
    from .config import build_model
    from .generate import select_device
    from .train import check_training_data, prepare_run_dir, train

    config, data = _train_config(args)
    check_training_data(config, data)
    select_device(config.train.device)          # an unavailable device is an error before anything runs
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    run_dir = prepare_run_dir(args.out)
    if not args.quiet:
        n_params = build_model(config).num_parameters()
        print(f"training preset {config.preset!r} ({n_params / 1e6:.2f}M parameters) on {data.name} "
              f"({data.num_images} images, {data.channels}x{data.image_size[0]}x{data.image_size[1]}) "
              f"for {config.train.steps} steps -> {run_dir}", file=sys.stderr)
    result = train(config, run_dir, data=data, progress=not args.quiet)
    print(f"done in {result.seconds:.0f} s: checkpoint {result.checkpoint}, samples {result.grid}")
    return 0


def cmd_sample(args) -> int:
    from .generate import generate, load_diffusion, select_device, write_samples
    from .train import new_run_dir

    out = Path(args.out) if args.out else new_run_dir("samples")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    existing = [name for name in ("grid.png", "samples.npz") if (out / name).exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --overwrite")
    device = select_device(args.device)
    diffusion, meta = load_diffusion(args.checkpoint, device=device, weights=args.weights)
    images = generate(diffusion, args.n, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    paths = write_samples(out, images)
    print(f"wrote {args.n} images from {meta['path']} (step {meta.get('step')}) to {paths['grid']} and {paths['samples']}")
    return 0


def cmd_inspect(args) -> int:
    from .checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(args.path)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(f"checkpoint: {meta['path']}")
    print(f"step:       {meta.get('step')}")
    print(f"format:     version {meta.get('format_version')}")
    groups: dict[str, list] = {}
    for name, t in tensors.items():
        groups.setdefault(name.split(".", 1)[0], []).append(t)
    print("tensors:")
    for prefix, ts in sorted(groups.items()):
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in ts})
        print(f"  {prefix + '.*':<10} {len(ts):5d} tensors  {sum(t.numel() for t in ts):>13,d} values  {', '.join(dtypes)}")
    print("configuration:")
    print(json.dumps(meta.get("config", {}), indent=2))
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except DdpmError as exc:
        print(f"ddpm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130
