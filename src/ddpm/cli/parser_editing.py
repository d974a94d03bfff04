"""The options of ``ddpm inpaint``, ``ddpm edit`` and ``ddpm invert``."""

from __future__ import annotations

import argparse

from .arg_types import positive_int
from .choices import SPACINGS
from .ema import WEIGHTS_HELP, weights_type
from .options import add_class_option, add_num_images, add_precision, add_sampler_options


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
        add_num_images(p, "--n", default=1, limit=1_000, help="results per input image (default 1)")
        p.add_argument("--seed", type=int, default=0, help="result k uses a seed derived from (seed, k)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (does not change them)")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", type=weights_type, default="ema", metavar="WEIGHTS", help=WEIGHTS_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in DIR")
    add_class_option(p, "class index or name: one for every image, or one per --image")


def add_inpaint(sub) -> None:
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
    p.add_argument("--jump-length", type=positive_int, metavar="J", help="RePaint: steps per jump back (default 10)")
    p.add_argument("--resample", type=positive_int, metavar="R",
                   help="RePaint: times each block of steps is walked (default 10; 1 = plain replacement)")
    add_sampler_options(p)


def add_edit(sub) -> None:
    p = sub.add_parser("edit", help="image-to-image: noise images partly and denoise them (SDEdit)",
                       description="SDEdit (Meng et al. 2022): diffuse each image to t0 = round(S (T - 1)) and "
                                   "denoise from t0 with the chosen sampler, its --steps spread over [t0, 0]. "
                                   "S = 0 returns the input, S = 1 is a new sample. Writes DIR/grid.png (rows: "
                                   "inputs, results), results.npz and record.json.",
                       epilog=EXAMPLES_EDIT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_editing_inputs(p)
    p.add_argument("--strength", required=True, type=float, metavar="S", help="0..1: how far to diffuse")
    add_sampler_options(p)


def add_invert(sub) -> None:
    p = sub.add_parser("invert", help="DDIM-invert images to their latent noise and reconstruct them",
                       description="Run the deterministic DDIM step forwards (Song et al. 2021, Sec. 4.3) from each "
                                   "image to its latent x_T, then DDIM back. Writes DIR/latents.npz (for ddpm sample "
                                   "--latents), grid.png (rows: inputs, reconstructions), results.npz and "
                                   "record.json with the reconstruction error.",
                       epilog=EXAMPLES_INVERT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_editing_inputs(p, results=False)
    p.add_argument("--steps", type=positive_int, default=50, metavar="K", help="DDIM steps, 1..T (default 50)")
    p.add_argument("--spacing", choices=tuple(SPACINGS), default="trailing", help="kept timesteps (default trailing)")
    add_precision(p)
