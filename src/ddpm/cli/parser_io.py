"""The options of ``ddpm export``, ``ddpm import`` and ``ddpm prepare``."""

from __future__ import annotations

import argparse

from .arg_types import positive_int
from .ema import WEIGHTS_HELP, weights_type
from .options import add_hub_columns


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


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a diffusers DDPMPipeline folder",
                       description="Write a checkpoint as a folder that diffusers' DDPMPipeline.from_pretrained "
                                   "loads: unet/ (UNet2DModel config and safetensors weights), scheduler/ "
                                   "(DDPMScheduler config: the same schedule, variance, prediction type and "
                                   "clipping), model_index.json, and a model card README.md for the Hugging Face "
                                   "Hub with a copy of the run's samples.png. Needs diffusers (pip install "
                                   "'ddpm[diffusers]'). Class-conditional, image-conditioned and other models "
                                   "DDPMPipeline cannot run are refused.",
                       epilog=EXAMPLES_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint file or a run directory")
    p.add_argument("--format", choices=("diffusers",), default="diffusers", help="the target format (diffusers)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="a directory for the pipeline's files: new or empty (nothing is overwritten)")
    p.add_argument("--weights", type=weights_type, default="ema", metavar="WEIGHTS", help=WEIGHTS_HELP)
    p.add_argument("--push-to-hub", metavar="OWNER/NAME",
                   help="also upload the folder to this Hugging Face Hub model repository (created if absent; "
                        "token from hf auth login)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")


def add_import(sub) -> None:
    p = sub.add_parser("import", help="convert a diffusers DDPMPipeline folder into a checkpoint",
                       description="Convert a diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler, "
                                   "safetensors weights) into a ddpm checkpoint that sample, eval, interpolate "
                                   "and inspect read. Needs diffusers (pip install 'ddpm[diffusers]'). Pickled "
                                   ".bin weights are refused, never loaded; so are architectures and schedules "
                                   "ddpm cannot express.",
                       epilog=EXAMPLES_IMPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", metavar="SOURCE",
                   help="diffusers: the pipeline folder (model_index.json, unet/, scheduler/) or "
                        "hf://OWNER/NAME[@REV]; "
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


def add_prepare(sub) -> None:
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
    p.add_argument("--image-size", type=positive_int, nargs="+", metavar="N",
                   help="resize and center-crop to N x N (or give H W)")
    p.add_argument("--channels", type=int, choices=(1, 3, 4), help="1 grey, 3 RGB, 4 RGBA")
    p.add_argument("--strict", action="store_true", help="an unreadable image is an error (default: skipped, counted)")
    add_hub_columns(p)
    p.add_argument("--workers", type=positive_int, help="decoding threads (default: the CPU count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
