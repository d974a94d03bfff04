"""Evaluating an image-conditioned model on held-out pairs (``ddpm eval --checkpoint`` of such a model).

For each held-out target and its condition the model makes one output; reported beside the same
figures for the trivial baseline (bicubic upscaling of the low-resolution input for
super-resolution, the condition itself for colorize and paired data):

* ``psnr`` and ``ssim`` of the outputs against the targets (:mod:`ddpm.evaluation.image_metrics`);
* ``consistency_psnr``: how well each output agrees with its own condition: PSNR of the
  area-downsampled output against the low-resolution input (super-resolution) or of the output's
  luminance against the given luminance (colorize); none for paired data;
* ``fast_fid``: the Frechet distance of the LeNet features (the fast metric) of the outputs
  against those of the targets.
"""

from __future__ import annotations

import numpy as np
import torch

from ..conditions import ImageCondition, area_downsample, given_condition, luminance, shown_condition
from ..data import load_dataset
from ..data.pairs import load_pairs
from ..device import select_device
from ..errors import ConfigError
from ..generate import generate, load_diffusion, sampling_options
from ..precision import resolve_precision
from ..pixels import to_tensor, to_uint8
from .features import LenetFeatures
from .image_metrics import psnr, ssim
from .metrics import fid_from_features

__all__ = ["baseline_outputs", "condition_scores", "evaluate_conditioned", "evaluate_checkpoint"]


def baseline_outputs(condition: ImageCondition, given: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
    """The trivial answer in [0, 1]: the bicubic upscaling (super-resolution) or the condition itself,
    its channel repeated to the targets' channels (colorize: a grey image)."""
    out = shown_condition(condition, given, size)
    if out.shape[1] != channels:
        out = out.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
    return out


def _consistency(condition: ImageCondition, outputs: torch.Tensor, given: torch.Tensor) -> float | None:
    """PSNR of what the output implies (downsampled, or its luminance) against the given condition."""
    if condition.task == "super-resolution":
        implied = area_downsample(outputs, condition.scale)
    elif condition.task == "colorize":
        implied = luminance(outputs) if outputs.shape[1] == 3 else outputs
    else:
        return None
    return float(psnr(implied * 2 - 1, given * 2 - 1).clamp(max=100.0).mean())


def condition_scores(condition: ImageCondition, outputs: np.ndarray, targets: np.ndarray, given: torch.Tensor,
                     features=None) -> dict[str, float]:
    """PSNR, SSIM, consistency and the fast metric of uint8 ``outputs`` [N, H, W, C] against ``targets``."""
    out_t, tgt_t = torch.from_numpy(outputs), torch.from_numpy(targets)
    scores = {"psnr": float(psnr(out_t, tgt_t).clamp(max=100.0).mean()), "ssim": float(ssim(out_t, tgt_t).mean())}
    consistency = _consistency(condition, to_tensor(outputs), given)
    if consistency is not None:
        scores["consistency_psnr"] = consistency
    if len(outputs) >= 2:
        features = features or LenetFeatures()
        scores["fast_fid"] = fid_from_features(features(outputs), features(targets))
    return scores


def evaluate_conditioned(diffusion, targets: np.ndarray, conditions: np.ndarray | None = None, *, seed: int = 0,
                         batch_size: int = 64, sampling=None, level: float = 0.0,
                         progress: bool = False) -> dict[str, float]:
    """The model's scores and the baseline's (``baseline_*``) on held-out ``targets`` (uint8 [N, H, W, C]),
    with the paired ``conditions`` (uint8) or, for super-resolution and colorize, those the targets imply."""
    condition = getattr(diffusion, "condition", None)
    if condition is None:
        raise ConfigError("this checkpoint is not image-conditioned")
    if conditions is None:
        if condition.task == "paired":
            raise ConfigError("a paired model is evaluated on held-out pairs: give --condition-data")
        given = given_condition(condition, to_tensor(targets))
    else:
        given = to_tensor(conditions)
    outputs = generate(diffusion, len(targets), batch_size=batch_size, seed=seed, sampling=sampling,
                       progress=progress, conditions=given, condition_level=level)
    baseline = to_uint8(baseline_outputs(condition, given, tuple(diffusion.image_size), diffusion.channels))
    features = LenetFeatures()
    scores = condition_scores(condition, outputs, targets, given, features)
    base = condition_scores(condition, baseline, targets, given, features)
    return {"task": condition.task, "n": len(targets), **scores, **{f"baseline_{k}": v for k, v in base.items()}}


def evaluate_checkpoint(args, progress: bool = False) -> dict:
    """``ddpm eval --checkpoint`` of an image-conditioned model: :func:`evaluate_conditioned` on the first
    ``--num-images`` held-out pairs (the ``--split`` of ``--data``, with ``--condition-data`` for a paired model)."""
    if args.data is None:
        raise ConfigError("an image-conditioned checkpoint is evaluated on held-out pairs: give --data (its --split, "
                          "default test, holds the targets)")
    device = select_device(args.device)
    diffusion, _ = load_diffusion(args.checkpoint, device=device, weights=args.weights,
                                  precision=resolve_precision(args.precision, device).precision)
    size, channels = tuple(diffusion.image_size), diffusion.channels
    conditions = None
    if args.condition_data is not None:
        targets, paired = load_pairs(args.data, args.condition_data, data_root=args.data_root, split=args.split,
                                     image_size=size, channels=channels)
        conditions = np.asarray(paired.images[:args.n])
    else:
        targets = load_dataset(args.data, data_root=args.data_root, split=args.split, image_size=size,
                               channels=channels)
    sampling = sampling_options(args.sampler, args.steps, eta=args.eta, base=diffusion.default_sampling)
    return evaluate_conditioned(diffusion, np.asarray(targets.images[:args.n]), conditions, seed=args.seed,
                                batch_size=args.batch_size, sampling=sampling, level=args.condition_noise or 0.0,
                                progress=progress)
