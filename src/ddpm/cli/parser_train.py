"""The options of ``ddpm train`` and ``ddpm distill``."""

from __future__ import annotations

import argparse

from .arg_types import (finite_positive, nonneg_float, nonneg_int, positive_float, positive_int, seed_type,
                        timesteps_type)
from .choices import DISTILL_WEIGHTINGS, PRESETS, SCHEDULES
from .ema import add_ema_options
from .options import PRECISION_CHOICES, add_hub_columns, add_num_images, add_renamed


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


EXAMPLES_DISTILL = """\
examples:
  ddpm distill --checkpoint runs/001 --rounds 6 --steps-per-round 2000 --out runs/distilled   # 256 -> 4 steps
  ddpm sample --checkpoint runs/distilled/student --num-images 64   # DDIM over the student's 4 steps, no flags
  ddpm distill --checkpoint runs/001 --rounds 2 --teacher-steps 16 --lr 2e-4 --out runs/d16
  ddpm distill --resume runs/distilled                          # continue where it stopped, mid-round
"""


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model", description="Train a noise-prediction U-Net (Algorithm 1). "
                       "Options override a --config TOML file, which overrides the preset's recipe.",
                       epilog=EXAMPLES_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    bool_flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--data", help="digits (built in, the default), mnist, fashion-mnist, cifar10, a folder of "
                                  "images, an .npz file, hf:NAME[:CONFIG][@SPLIT] or a save_to_disk folder")
    g.add_argument("--data-root", help="folder holding the files of mnist / fashion-mnist (IDX) or cifar10 (binary)")
    g.add_argument("--split", choices=("train", "test"))
    g.add_argument("--image-size", type=positive_int, nargs="+", metavar="N",
                   help="resize and center-crop to N x N (or give H W)")
    g.add_argument("--channels", type=int, choices=(1, 3, 4), help="1 grey, 3 RGB, 4 RGBA")
    g.add_argument("--hflip", action=bool_flag, help="random horizontal flips")
    g.add_argument("--strict", action=bool_flag,
                   help="an unreadable image is an error (default: skipped with a warning)")
    add_hub_columns(g)
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
    g.add_argument("--steps", type=positive_int, help="optimizer steps (with --resume: may extend the run)")
    g.add_argument("--time-limit", type=nonneg_float, metavar="MINUTES",
                   help="stop after this many minutes of this command, as if --steps were reached (checkpoint "
                        "and final grid); --resume continues (0: no limit)")
    g.add_argument("--batch-size", type=positive_int,
                   help="images per forward pass of each process; an optimizer step sees batch size x "
                        "processes (torchrun) x grad-accum images")
    g.add_argument("--grad-accum", type=positive_int, help="micro-batches per step (gradient accumulation)")
    g.add_argument("--optimizer", choices=("adam", "adamw"))
    g.add_argument("--lr", type=positive_float, help="peak learning rate")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-steps", type=nonneg_int, help="linear learning-rate warm-up")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 disables)")
    add_ema_options(g)
    g.add_argument("--ema-warmup", action=bool_flag, help="EMA decay min(decay, (1+n)/(10+n)) (default on)")
    g.add_argument("--precision", choices=PRECISION_CHOICES,
                   help="autocast for the network (default auto: bf16 where it is faster on this device, else fp32; "
                        "fp32 is bit-for-bit reproducible; see docs/speed.md)")
    g.add_argument("--grad-checkpointing", action=bool_flag, help="trade compute for memory")
    g.add_argument("--max-bad-steps", type=positive_int, help="non-finite steps in a row before stopping")
    g.add_argument("--seed", type=seed_type)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--init", metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's EMA weights, with its architecture (and, unless "
                        "given, its diffusion settings and image size); e.g. a model made by ddpm import")
    _add_image_condition_train(p.add_argument_group("image-conditioned models (docs/conditioning.md)"))
    _add_train_output(p.add_argument_group("output"))


def _add_model_size(g) -> None:
    """The U-Net's width and depth, over the preset's: --dim, --dim-mults, --num-res-blocks, attention."""
    g.add_argument("--dim", type=positive_int, help="the U-Net's base channel count (the preset's by default)")
    g.add_argument("--dim-mults", type=positive_int, nargs="+", metavar="M",
                   help="channel multiplier of each resolution level, e.g. 1 2 2 (one level each)")
    g.add_argument("--num-res-blocks", type=positive_int, help="residual blocks per level")
    g.add_argument("--attention-levels", type=int, nargs="*", metavar="L",
                   help="levels with self-attention, counted from the top (0 = the full image size); "
                        "none given: no attention but the middle's")
    g.add_argument("--attention-resolutions", type=positive_int, nargs="*", metavar="R",
                   help="the same places by feature-map size (shorter side), as older configurations name them")


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
    g.add_argument("--scale", type=positive_int, metavar="S",
                   help="super-resolution factor: the condition is the target at 1/S of its size (S divides it)")
    g.add_argument("--condition-noise", type=nonneg_float, metavar="L",
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
    g.add_argument("--sigma-data", type=finite_positive, metavar="S", help="edm: the data's std (default 0.5)")
    g.add_argument("--p-mean", type=float, metavar="M", help="edm: ln sigma ~ N(P_mean, P_std^2) (default -1.2)")
    g.add_argument("--p-std", type=finite_positive, metavar="S", help="edm: P_std (default 1.2)")
    g.add_argument("--sigma-min", type=finite_positive, metavar="SIGMA",
                   help="edm: the lowest noise level sampled (default 0.002)")
    g.add_argument("--sigma-max", type=finite_positive, metavar="SIGMA",
                   help="edm: the highest noise level sampled (default 80)")


def _add_diffusion_options(g) -> None:
    """The diffusion process, the loss and the conditioning of ``ddpm train``."""
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument("--timesteps", type=timesteps_type, help="T (default 1000)")
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
    g.add_argument("--vlb-weight", type=positive_float, metavar="LAMBDA",
                   help="lambda of the hybrid loss (default 0.001)")
    g.add_argument("--timestep-sampling", choices=("uniform", "importance"),
                   help="importance: t drawn in proportion to its loss RMS, losses reweighted (needs an L_vlb term) "
                        "(default uniform)")
    g.add_argument("--offset-noise", type=nonneg_float, metavar="STRENGTH",
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
    g.add_argument("--log-every", type=positive_int)
    g.add_argument("--checkpoint-every", type=nonneg_int)
    g.add_argument("--keep-last", type=nonneg_int, help="checkpoints kept besides milestones (0: all)")
    g.add_argument("--milestone-every", type=nonneg_int, help="checkpoints at multiples of this are kept")
    g.add_argument("--sample-every", type=nonneg_int)
    add_num_images(g, "--num-samples", dest="num_samples", help="images in each sample grid (default 64)")
    g.add_argument("--eval-every", type=nonneg_int, help="steps between evaluations of the EMA model (0: never)")
    add_renamed(g, "--eval-num-images", "--eval-samples", dest="eval_samples", type=positive_int, metavar="N",
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


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="progressive distillation: the same model in a few sampling steps",
                       description="Progressive distillation (Salimans & Ho 2022): each round trains a student, "
                                   "initialised from its teacher, to do two of the teacher's DDIM steps in one, "
                                   "then makes it the next teacher. Every round is an ordinary run directory "
                                   "RUN_DIR/round-NN whose checkpoints sample with DDIM over their step count by "
                                   "default; RUN_DIR/student links to the newest finished round.",
                       epilog=EXAMPLES_DISTILL, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="TEACHER", help="the teacher: a checkpoint file or a run directory")
    p.add_argument("--rounds", type=positive_int, help="rounds; each halves the sampling steps")
    p.add_argument("--steps-per-round", type=positive_int, metavar="N", help="optimizer steps per round (default 1000)")
    p.add_argument("--teacher-steps", type=positive_int, metavar="K",
                   help="the teacher's DDIM steps in round 1, divisible by 2^rounds (default: a distilled "
                        "teacher's own count, else 256, or the largest power of two below T)")
    p.add_argument("--weighting", choices=DISTILL_WEIGHTINGS,
                   help="x-space loss weight: 1 + SNR (default; the MSE of v) or max(SNR, 1)")
    p.add_argument("--data", help="train on this dataset instead of the teacher's")
    p.add_argument("--data-root", help="folder holding the files of mnist / fashion-mnist / cifar10")
    g = p.add_argument_group("training (default: the teacher's settings)")
    g.add_argument("--batch-size", type=positive_int)
    g.add_argument("--lr", type=positive_float, help="learning rate (default: the teacher's)")
    g.add_argument("--ema-decay", type=float, help="the students' EMA decay (with the teacher's warm-up setting)")
    g.add_argument("--grad-clip", type=float, help="max gradient norm (0 disables)")
    g.add_argument("--precision", choices=PRECISION_CHOICES, help="(default auto, as ddpm train)")
    g.add_argument("--seed", type=seed_type)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="RUN_DIR", help="a directory: the run directory, one round-NN per round "
                                                    "(default: runs/NNN, the next free number)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a distillation run (only --device may be given)")
    g.add_argument("--log-every", type=positive_int)
    g.add_argument("--checkpoint-every", type=nonneg_int)
    g.add_argument("--keep-last", type=nonneg_int, help="checkpoints kept per round (0: all)")
    g.add_argument("--sample-every", type=nonneg_int)
    add_num_images(g, "--num-samples", dest="num_samples", help="images in each sample grid")
    g.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    g.add_argument("--quiet", action="store_true", help="no progress output")
