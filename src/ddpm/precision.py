"""How the network runs: its numeric precision (the autocast context and its checks) and its
memory format.

The network alone runs in reduced precision; the diffusion maths (schedules, posterior,
samplers) stays in float32, and the network's output is cast back before it meets them.
``fp32`` is the default everywhere. ``bf16`` is mixed precision with bfloat16 (most GPUs, and
CPUs whose bf16 matrix multiply beats fp32: AMD Zen 4 or Intel with AMX; an Intel Xeon with only
AVX512-BF16 runs it at half the fp32 rate); ``fp16`` is for CUDA only (training adds a gradient
scaler). benchmarks/RESULTS.md has the speed each gives.

The convolutions run faster with the weights and activations in the channels-last (NHWC) memory
format on the CPU (oneDNN's native layout) and on CUDA; :func:`channels_last` says where the
project uses it. The layout changes no result beyond float rounding.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

__all__ = ["PRECISIONS", "autocast", "channels_last", "check_precision"]

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


def channels_last(device: torch.device, precision: str, *, training: bool) -> bool:
    """Whether the network's weights (and so its activations) go channels-last on ``device``.

    Yes on the CPU and CUDA, except bf16 training on the CPU, which measured 5% slower that
    way; other devices keep PyTorch's default (benchmarks/RESULTS.md, "Speed").
    """
    if device.type not in ("cpu", "cuda"):
        return False
    return not (training and device.type == "cpu" and precision == "bf16")
