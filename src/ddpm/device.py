"""Which device a command runs on: ``auto`` or an explicit choice, checked before anything runs, and
whether a model's memory fits it (:func:`check_fits`).

Precision (the network's autocast) is chosen per device in :mod:`ddpm.precision`; under torchrun
each process's device is :func:`ddpm.distributed.training_device`.
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

__all__ = ["select_device", "device_bytes", "check_fits"]


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


def device_bytes(device) -> int | None:
    """Total memory of ``device`` (physical memory for the CPU); None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


def check_fits(need: int, device, what: str) -> None:
    """Refuse ``need`` bytes that exceed ``device``'s memory; ``what`` begins the message ("... takes")."""
    have = device_bytes(device)
    if have is not None and need > have:
        raise ConfigError(f"{what} at least {_gib(need)}, more than the {_gib(have)} of the {device} device; "
                          "choose a smaller model (dim, dim_mults, num_res_blocks), image size or batch size")
