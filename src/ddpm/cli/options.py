"""The pieces of the ``ddpm`` parser that several commands share: the one-line usage error, renamed
options, ``--num-images``, the sampler, precision and class options. Nothing here imports torch."""

from __future__ import annotations

import argparse
import os
import sys

from .arg_types import finite_nonneg, finite_positive, nonneg_float, number, positive_int
from .choices import DEFAULT_GUIDANCE_SCALE, SAMPLERS, SPACING_CHOICES, VARIANCES

# ddpm.precision.CHOICES, repeated so that building the parser does not import torch.
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _DeprecatedAlias(argparse.Action):
    """An older spelling of an option, hidden from --help: it sets the same destination through the same
    type, and says once on stderr (rank 0 only under torchrun) which spelling replaces it."""

    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        if os.environ.get("RANK", "0") == "0":          # read before torchrun's process group exists
            print(f"ddpm: note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(group, name: str, *old: str, dest: str, type, **kwargs) -> None:
    """Option ``name``, and each of its ``old`` spellings as a hidden, deprecated alias of it."""
    group.add_argument(name, dest=dest, type=type, **kwargs)
    for alias in old:
        group.add_argument(alias, dest=dest, type=type, action=_DeprecatedAlias, new=name)


def add_num_images(group, *old: str, dest: str = "n", help: str, limit: int = 65_536, **kwargs) -> None:
    """``--num-images N``, every command's image count (``old``: the spellings it replaced), 1 .. ``limit``:
    the work a command does grows with it, so each command bounds it by what a user could want."""
    count = number(int, lambda v: 1 <= v <= limit, f"a positive integer up to {limit:,}")
    add_renamed(group, "--num-images", *old, dest=dest, type=count, metavar="N",
                help=f"{help}; at most {limit:,}", **kwargs)


def add_hub_columns(g, labels: bool = True) -> None:
    g.add_argument("--image-column", metavar="NAME",
                   help="a Hugging Face dataset's (hf:NAME or a save_to_disk folder) image column "
                        "(default: its first Image column; docs/data.md)")
    if labels:
        g.add_argument("--label-column", metavar="NAME",
                       help="its label column: a ClassLabel, integers or strings (default: label or labels, if any)")


def add_progress(group) -> None:
    group.add_argument("--progress", action=argparse.BooleanOptionalAction,
                       help="progress bars on stderr (default: only when stderr is a terminal, so logs stay clean)")


# The defaults of --sampler and --steps, as ddpm.generate.resolve_sampling implements them.
SAMPLER_HELP = ("ddpm (ancestral, the paper's), ddim or dpm-solver++ (2M); or a sigma sampler (Karras et al. 2022): "
                "euler, heun, euler-ancestral, dpm-solver++-sde (default: the checkpoint's own sampler "
                "if it names one, e.g. a distilled student's, else ddpm over 50 respaced steps, the best at 25 to "
                "50 steps in benchmarks/RESULTS.md)")

STEPS_HELP = ("sampler steps, 1..T, one network evaluation each, heun two but the last (default: the checkpoint's "
              "own count for its sampler, else 50 without "
              "--sampler; with --sampler alone: all T for ddpm, 50 for ddim, euler and euler-ancestral, 20 for "
              "dpm-solver++, 25 for dpm-solver++-sde, 18 for heun (35 evaluations), at most T)")


def add_sampler_options(p) -> None:
    """The sampler flags of every command that samples (their defaults: :func:`ddpm.generate.resolve_sampling`)."""
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=tuple(SAMPLERS), help=SAMPLER_HELP)
    g.add_argument("--steps", type=positive_int, metavar="K", help=STEPS_HELP)
    add_spacing(g)
    g.add_argument("--eta", type=float, help="DDIM only: 0 deterministic (default), 1 the ancestral variance")
    add_sigma_sampler_options(g)
    g.add_argument("--variance", choices=VARIANCES, help="ddpm only: sigma^2 = beta-tilde, beta, or learned-range for "
                                                         "models trained with it (default: the checkpoint's)")
    g.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the x0 estimate to [-1, 1] (default: the checkpoint's setting)")
    g.add_argument("--dynamic-threshold", action="store_true",
                   help="dynamic thresholding of the x0 estimate (Saharia et al. 2022, p = 0.995) instead of clipping")
    add_precision(g)


def add_spacing(g) -> None:
    g.add_argument("--spacing", choices=SPACING_CHOICES,
                   help="which K of the T timesteps are kept, or karras: EDM's sigma spacing (Karras et al. 2022, "
                        "Eq. 5; default trailing; see docs/samplers.md)")


def add_sigma_sampler_options(g, *, spacing: bool = False) -> None:
    """EDM's options of the sigma samplers (Karras et al. 2022, Algorithm 2) and of the karras spacing
    (with ``spacing``, --spacing itself first)."""
    if spacing:
        add_spacing(g)
    g.add_argument("--churn", type=finite_nonneg, metavar="S",
                   help="euler/heun: S_churn, the noise added back per step (default 0: the deterministic ODE)")
    g.add_argument("--s-tmin", type=finite_nonneg, metavar="SIGMA",
                   help="euler/heun: churn only where sigma >= S_tmin (default 0)")
    g.add_argument("--s-tmax", type=nonneg_float, metavar="SIGMA",
                   help="euler/heun: churn only where sigma <= S_tmax (default inf)")
    g.add_argument("--s-noise", type=finite_nonneg, metavar="S",
                   help="sigma samplers: S_noise, the scale of the fresh noise (default 1)")
    g.add_argument("--rho", type=finite_positive, metavar="RHO",
                   help="--spacing karras: rho of Eq. 5 (default 7)")


def add_precision(group) -> None:
    group.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                       help="autocast for the network while sampling (default auto: bf16 where it is faster on "
                            "this device, else fp32; fp32 for bit-for-bit reproducible images; fp16 on CUDA only; "
                            "see docs/speed.md)")


def add_class_option(p, text: str, nargs="+") -> None:
    """``--class`` and ``--guidance-scale`` for a class-conditional checkpoint."""
    g = p.add_argument_group("class-conditional models (trained with --conditional)")
    g.add_argument("--class", dest="classes", nargs=nargs, metavar="K", help=text)
    g.add_argument("--guidance-scale", type=float, metavar="W",
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE_SCALE:g} with --class)")
