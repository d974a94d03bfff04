"""The options of ``ddpm sample``, ``ddpm interpolate`` and ``ddpm viz``."""

from __future__ import annotations

import argparse

from .arg_types import nonneg_float, nonneg_int, number, positive_int, seed_type, timesteps_type
from .choices import DEFAULT_GUIDANCE_SCALE, SCHEDULES
from .ema import WEIGHTS_HELP, weights_type
from .options import Parser, add_class_option, add_num_images, add_progress, add_sampler_options


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


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a checkpoint",
                       description="Generate images from a checkpoint with a chosen sampler (default: the "
                                   "checkpoint's own sampler if it names one, else ancestral sampling, Algorithm 2, "
                                   "over 50 respaced steps; --sampler ddpm alone gives the paper's sampler over all "
                                   "T steps, ddim alone 50, dpm-solver++ alone 20). Writes grid.png, samples.npz "
                                   "and record.json (with the sampler and steps used and where they came from), "
                                   "from which any single image can be regenerated.",
                       epilog=EXAMPLES_SAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint file or a run directory")
    add_num_images(p, "--n", limit=1_000_000,
                   help="number of images, of each class with --class (default 64, or one per --latents; "
                         "under torchrun the total over all processes; --num-images x --steps at most 10^9)")
    p.add_argument("--out", metavar="DIR", help="a directory for grid.png, samples.npz and record.json (default: "
                                                "samples/NNN, the next free number)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (does not change them)")
    p.add_argument("--seed", type=seed_type, default=0, help="image k uses a seed derived from (seed, k)")
    p.add_argument("--start-index", type=nonneg_int, default=0, metavar="K",
                   help="first image index: --start-index K --num-images M regenerates images K..K+M-1 of a run")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", type=weights_type, default="ema", metavar="WEIGHTS", help=WEIGHTS_HELP)
    add_sampler_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--png", action="store_true", help="also write one PNG per image, DIR/images/NNNNNN.png (index k)")
    g.add_argument("--progressive", action="store_true",
                   help="also write DIR/progressive.png: x_t and the x0 estimate of each image over time (Figure 6)")
    g.add_argument("--overwrite", action="store_true", help="replace outputs already in DIR")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_progress(g)
    g = p.add_argument_group("starting noise")
    g.add_argument("--latents", metavar="NPZ",
                   help="start image k from latents[k] of this .npz (e.g. from ddpm invert) instead of drawn noise; "
                        "without --sampler, the DDIM steps the file names")
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
    g.add_argument("--condition-noise", type=nonneg_float, metavar="L",
                   help="the conditioning-augmentation level at sampling (a model trained with --condition-noise)")
    g.add_argument("--then", action="append", metavar="RUN",
                   help="a cascade: each image the checkpoint makes conditions this super-resolution run "
                        "(repeat for more stages)")


EXAMPLES_INTERPOLATE = """\
examples:
  ddpm interpolate --checkpoint runs/001 --image-a digits:0 --image-b digits:1 --num-images 10 --out interp/01
  ddpm interpolate --checkpoint runs/002 --image-a mnist:3 --image-b mnist:7 --data-root ../shared/data/mnist --t 250
  ddpm interpolate --checkpoint runs/003 --image-a a.png --image-b b.png --method slerp --sampler ddim --steps 50
"""


def add_interpolate(sub) -> None:
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
    p.add_argument("--t", type=nonneg_int, help="0-based timestep to diffuse to (default T // 2, the paper's 500)")
    add_num_images(p, "--n-interp", dest="n_interp", default=8, limit=1_000,
                   help="interpolants, lambda from 0 to 1 (at least 2; default 8)")
    p.add_argument("--method", choices=("linear", "slerp"), default="linear",
                   help="linear (the paper's) or spherical interpolation of the two x_t")
    p.add_argument("--out", metavar="DIR", help="a directory for interpolation.png, interpolation.npz and "
                                                "record.json (default: samples/NNN, the next free number)")
    p.add_argument("--seed", type=seed_type, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", type=weights_type, default="ema", metavar="WEIGHTS", help=WEIGHTS_HELP)
    p.add_argument("--invert", action="store_true",
                   help="start from the images' DDIM inversions to t (deterministic) instead of q(x_t | x_0)")
    add_class_option(p, "the class of every interpolant (index or name)", nargs=1)
    add_sampler_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in DIR")


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


MAX_FRAMES = 1_000              # viz reverse --frames: one column per sampler step shown


PNG_OUT_HELP = "a file: the PNG to write (an existing file needs --overwrite)"


def add_viz(sub) -> None:
    p = sub.add_parser("viz", help="pictures of the schedule, forward and reverse process, and training",
                       description="Draw each stage of a diffusion model as one PNG: the noise schedules, real "
                                   "images diffused by q(x_t | x_0), progressive generation from a checkpoint, "
                                   "and a training run. Charts need matplotlib (pip install 'ddpm[viz]').",
                       epilog=EXAMPLES_VIZ, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_subparsers(dest="viz_command", metavar="WHAT", parser_class=Parser, required=True)
    schedules = dict(nargs="+", choices=sorted(SCHEDULES), default=["linear", "cosine", "sigmoid"],
                     metavar="NAME", help="linear, cosine and/or sigmoid (default: all three)")

    s = what.add_parser("schedule", help="alpha-bar, beta and log SNR against t, for each schedule",
                        description="Plot alpha-bar_t, beta_t and log SNR(t) of the schedules side by side.")
    s.add_argument("--timesteps", type=timesteps_type, default=1000, help="T (default 1000)")
    s.add_argument("--schedules", **schedules)
    s.add_argument("--out", required=True, metavar="PNG_FILE", help=PNG_OUT_HELP)
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    f = what.add_parser("forward", help="real images diffused to chosen steps, one block per schedule",
                        description="Diffuse real images with q(x_t | x_0) (Eq. 4) to the chosen 0-based steps, "
                                    "with the same noise for every step and schedule (fixed --seed).")
    f.add_argument("--data", required=True, help="digits, mnist, fashion-mnist, cifar10, a folder or an .npz file")
    f.add_argument("--data-root", help="folder holding the files of mnist / fashion-mnist / cifar10")
    f.add_argument("--steps", type=nonneg_int, nargs="+", default=[0, 100, 250, 500, 750, 999], metavar="T",
                   help="0-based steps to show (default 0 100 250 500 750 999)")
    f.add_argument("--timesteps", type=timesteps_type, default=1000, help="T (default 1000)")
    f.add_argument("--schedules", **schedules)
    add_num_images(f, "--n", default=4, limit=256, help="images, the first N of the train split (default 4)")
    f.add_argument("--image-size", type=positive_int, nargs="+", metavar="N", help="resize and center-crop")
    f.add_argument("--seed", type=seed_type, default=0)
    f.add_argument("--out", required=True, metavar="PNG_FILE", help=PNG_OUT_HELP)
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    r = what.add_parser("reverse", help="x_t and the x0 estimate over the reverse process (Figure 6)",
                        description="Progressive generation from a checkpoint with any sampler: for each image, "
                                    "a row of x_t and a row of the x0 estimate at evenly spaced sampler steps.")
    r.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint file or a run directory")
    add_num_images(r, "--n", default=4, limit=256, help="images, of each class with --class (default 4)")
    r.add_argument("--frames", type=number(int, lambda v: 1 <= v <= MAX_FRAMES, f"1..{MAX_FRAMES}"), default=10,
                   help=f"columns: sampler steps shown, at most {MAX_FRAMES} (default 10)")
    r.add_argument("--seed", type=seed_type, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--weights", type=weights_type, default="ema", metavar="WEIGHTS", help=WEIGHTS_HELP)
    add_class_option(r, "class labels (indices or names) or 'all': --num-images images of each")
    add_sampler_options(r)
    r.add_argument("--out", required=True, metavar="PNG_FILE", help=PNG_OUT_HELP)
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    t = what.add_parser("training", help="loss curves and sample grids of a run, as one PNG",
                        description="Loss curve, loss per timestep quartile and the sample grids over a run "
                                    "(from RUN_DIR/metrics.jsonl and RUN_DIR/samples/).")
    t.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="the training run's directory")
    t.add_argument("--checkpoint", metavar="RUN_DIR", help="the same as RUN_DIR (give one of them)")
    t.add_argument("--grids", type=positive_int, default=4, help="sample grids shown, evenly spread (default 4)")
    t.add_argument("--out", required=True, metavar="PNG_FILE", help=PNG_OUT_HELP)
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
