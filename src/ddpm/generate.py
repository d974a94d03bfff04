"""Sampling from a checkpoint: rebuild the model from its saved configuration, generate, write files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, split_prefix
from .config import RunConfig, build_diffusion
from .data import to_uint8
from .diffusion import GaussianDiffusion
from .errors import CheckpointError, ConfigError
from .images import make_grid, save_npz, save_png

__all__ = ["select_device", "load_diffusion", "generate", "write_samples"]


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an unavailable explicit choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but Apple MPS is not available")
    return device


def load_diffusion(checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
                   weights: str = "ema") -> tuple[GaussianDiffusion, dict]:
    """Rebuild model and diffusion from a checkpoint (file or run directory).

    ``weights`` is ``"ema"`` (the default, as in the paper) or ``"raw"``. Returns the
    diffusion (on ``device``, in eval mode) and the checkpoint's metadata.
    """
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw'; got {weights!r}")
    tensors, meta = load_checkpoint(checkpoint)
    try:
        config = RunConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{meta['path']} has an unusable configuration: {exc}") from None
    diffusion = build_diffusion(config)
    state = split_prefix(tensors, "ema" if weights == "ema" else "model")
    try:
        diffusion.model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{meta['path']}: weights do not match the saved architecture ({first})") from None
    meta["run_config"] = config
    return diffusion.to(device).eval(), meta


def generate(diffusion: GaussianDiffusion, n: int, *, batch_size: int = 64, seed: int = 0,
             progress: bool = True) -> np.ndarray:
    """``n`` images as uint8 [N, H, W, C], drawn with the paper's ancestral sampler in batches.

    The noise comes from one generator seeded with ``seed`` on the CPU, so a seed gives the
    same images on every device and thread count.
    """
    if n < 1 or batch_size < 1:
        raise ConfigError("the number of images and the batch size must be positive")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        images = diffusion.sample(b, generator=generator, progress=progress)
        out.append(to_uint8(images.cpu()))
    return np.concatenate(out)


def write_samples(out_dir: str | os.PathLike, images: np.ndarray, **extra: np.ndarray) -> dict[str, Path]:
    """Write ``grid.png`` and ``samples.npz`` (array ``images``, uint8 [N, H, W, C]) to ``out_dir``."""
    out_dir = Path(out_dir)
    return {"grid": save_png(out_dir / "grid.png", make_grid(images)),
            "samples": save_npz(out_dir / "samples.npz", images=images, **extra)}
