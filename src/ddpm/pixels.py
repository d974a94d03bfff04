"""The pixel mappings, in one place.

Datasets and sample files hold uint8 pixels [N, H, W, C]; the user API takes and returns images
in [0, 1] as float [N, C, H, W]; the diffusion maths works on data x0 in [-1, 1] (Ho et al. 2020,
Sec. 3.3). Every conversion between them is here.

Sequences (:mod:`ddpm.data.sequences`) are no pixels: their data hold x0 itself, float32 [N, L, C]
in [-1, 1]; :func:`uint8_to_unit` gives them the same [0, 1] view, (x0 + 1) / 2, so that
:func:`to_model_range` returns x0 (to float32 rounding) wherever images take that road.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_model_range", "from_model_range", "to_tensor", "uint8_to_unit", "to_uint8"]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> data x0 in [-1, 1] (Ho et al. 2020, Sec. 3.3)."""
    return images * 2.0 - 1.0


def from_model_range(x0: torch.Tensor) -> torch.Tensor:
    """Data x0 in [-1, 1] -> images in [0, 1], clamped."""
    return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)


def uint8_to_unit(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, C] (a tensor, on any device) -> float32 [B, C, H, W] in [0, 1], on that device, laid out
    as [B, C, H, W] (not a view of [B, H, W, C]: with several channels that view has channels-last strides, which
    the network carries through and which makes a bf16 training step on the CPU about a fifth slower);
    sequences, float32 x0 [B, L, C] in [-1, 1] -> float32 (x0 + 1) / 2 [B, C, L]."""
    if batch.is_floating_point() and batch.ndim == 3:
        return batch.permute(0, 2, 1).add(1.0).div_(2.0)
    return batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [0, 1]. Meant for one batch at a time."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"to_tensor expects a uint8 numpy array [N, H, W, C], got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    # copy: the result must not share memory with (possibly read-only) dataset storage.
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(torch.float32).div_(255)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [0, 1] -> uint8 [N, H, W, C], rounded and clamped to 0..255."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError(f"to_uint8 expects a float tensor [N, C, H, W], got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    if torch.isnan(images).any():
        raise ValueError("to_uint8 got images containing NaN")
    pixels = (images.detach().to(torch.float32) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
