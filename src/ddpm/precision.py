"""Numeric precision of the network: the autocast context and the checks that go with it.

The network alone runs in reduced precision; the diffusion maths (schedules, posterior,
samplers) stays in float32, and the network's output is cast back before it meets them.
``fp32`` is the default everywhere. ``bf16`` is mixed precision with bfloat16 (CPUs with
AVX512-BF16 or AMX, and most GPUs); ``fp16`` is for CUDA only (training adds a gradient scaler).
benchmarks/RESULTS.md has the speed each gives.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

__all__ = ["PRECISIONS", "autocast", "check_precision"]

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(device: torch.device, precision: str):
    """The autocast context for the network on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(device: torch.device, precision: str) -> None:
    """One clear error for a precision the device cannot run."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bfloat16; use --precision fp16 or fp32")
