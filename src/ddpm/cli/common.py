"""What the ``ddpm`` commands share: progress, option spellings, precision, the sampler flags, the output
folder, the checkpoint argument and the class options. Loaded with the first command that runs."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import distributed
from ..errors import ConfigError
from ..fileio import check_output_path
from ..generate import FROM_CHECKPOINT, resolve_sampling
from ..precision import resolve_precision
from ..run_dir import new_run_dir
from ..sample_job import resolve_classes


def show_progress(args) -> bool:
    """Progress bars: never with --quiet, as --progress / --no-progress say, else only on a terminal."""
    if args.quiet:
        return False
    return sys.stderr.isatty() if args.progress is None else args.progress


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# Options whose name is not their destination's (the older spellings are hidden aliases).
FLAG_SPELLINGS = {"num_samples": "--num-images", "eval_samples": "--eval-num-images"}


def flag(name: str) -> str:
    return FLAG_SPELLINGS.get(name) or "--" + name.replace("_", "-")


def precision_choice(args, device):
    """``--precision`` resolved on ``device`` (auto: :func:`ddpm.precision.resolve_precision`)."""
    return resolve_precision(args.precision, device)


def say_precision(args, choice) -> None:
    """The automatic choice in one line on stderr, once the options have passed every check."""
    if args.precision == "auto" and not getattr(args, "quiet", False) and distributed.is_main():
        print(choice.line(), file=sys.stderr)


def sampling_from_args(args, diffusion=None, latent_sampling=None):
    """The sampler flags resolved by :func:`ddpm.generate.resolve_sampling` over the defaults of
    ``diffusion``'s checkpoint (or of a ``--latents`` file, which name DDIM steps); returns the
    options and where the sampler and steps came from, for the record."""
    base = latent_sampling or getattr(diffusion, "default_sampling", None)
    return resolve_sampling(args.sampler, args.steps, base=base, base_from="latents" if latent_sampling else
                            FROM_CHECKPOINT, spacing=args.spacing, eta=args.eta, variance=args.variance,
                            clip=args.clip, dynamic_thresholding=args.dynamic_threshold or None,
                            **sigma_options(args))


SIGMA_OPTIONS = ("churn", "s_tmin", "s_tmax", "s_noise", "rho")


def sigma_options(args) -> dict:
    """The sigma samplers' flags (``--churn`` ... ``--rho``), as :class:`~ddpm.samplers.SamplingOptions` fields."""
    return {name: getattr(args, name, None) for name in SIGMA_OPTIONS}


def output_dir(args, names: tuple[str, ...]) -> Path:
    """``--out DIR`` checked before any work: writable, not below a file, none of ``names`` there
    unless ``--overwrite``. (The outputs are then staged and moved into DIR together.)"""
    out = check_output_path(Path(args.out) if args.out else new_run_dir("samples"), directory=True)
    existing = [name for name in names if (out / name).exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --overwrite")
    return out


def checkpoint_arg(positional: str | None, option: str | None, what: str) -> str:
    """The checkpoint a command reads, given as its positional argument or as ``--checkpoint``: exactly once."""
    if positional is not None and option is not None:
        raise ConfigError(f"give {what} once: as an argument or as --checkpoint, not both")
    if positional is None and option is None:
        raise ConfigError(f"give {what}, as an argument or as --checkpoint")
    return positional if positional is not None else option


def classes_from_args(args, diffusion, meta=None) -> tuple[list[int] | None, float | None]:
    """``--class K ... | all`` (indices, or names the checkpoint holds) and ``--guidance-scale W``."""
    return resolve_classes(diffusion, args.classes, args.guidance_scale, (meta or {}).get("class_names"))
