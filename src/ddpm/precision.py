"""How the network runs: its numeric precision (the autocast context, its checks and the automatic
choice) and its memory format.

The network alone runs in reduced precision; the diffusion maths (schedules, posterior,
samplers) stays in float32, and the network's output is cast back before it meets them.

``auto`` is the default everywhere (``ddpm train``, ``sample``, ``eval``, ``distill``,
``interpolate``, ``viz reverse`` and :func:`ddpm.train.train`), and :func:`resolve_precision`
turns it into one of :data:`PRECISIONS` before anything runs:

* ``DDPM_PRECISION=fp32|bf16|fp16`` in the environment, when set, is the choice (tests and
  reproducible benchmarks);
* on CUDA, ``bf16`` where the GPU supports bfloat16 natively, else ``fp32``;
* on a CPU, ``bf16`` where a short probe (:func:`probe_cpu`: bf16 autocast against fp32 on
  convolution and matrix-multiply work shaped like the U-Net's) finds bf16 measurably faster,
  else ``fp32``. The verdict is cached as JSON in the user's cache folder (``$DDPM_CACHE``, else
  ``~/.cache/ddpm``), keyed by the processor model, its flags and the torch version, so each
  machine probes once;
* ``fp32`` anywhere else (Apple MPS).

``fp32`` is the bit-for-bit reproducible choice: the same command gives the same bits on any
machine whose fp32 kernels agree, whereas ``auto`` may pick bf16 on one machine and fp32 on the
next. ``bf16`` is mixed precision with bfloat16 (most GPUs, and CPUs whose bf16 matrix multiply
beats fp32: AMD Zen 4, or Intel with AMX; an Intel Xeon with only AVX512-BF16 runs it at half the
fp32 rate); ``fp16`` is for CUDA only (training adds a gradient scaler). benchmarks/RESULTS.md has
the speed each gives; docs/speed.md explains the choice.

The convolutions run faster with the weights and activations in the channels-last (NHWC) memory
format on the CPU (oneDNN's native layout) and on CUDA; :func:`channels_last` says where the
project uses it. The layout changes no result beyond float rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import distributed
from .errors import ConfigError
from .fileio import write_json

__all__ = ["PRECISIONS", "CHOICES", "ENV_VAR", "BF16_MIN_SPEEDUP", "Resolved", "autocast", "channels_last",
           "check_precision", "check_request", "resolve_precision", "cpu_verdict", "probe_cpu", "machine_key", "cache_path"]

PRECISIONS = ("fp32", "bf16", "fp16")
CHOICES = ("auto", *PRECISIONS)
ENV_VAR = "DDPM_PRECISION"
CACHE_FILE = "precision.json"
# bf16 must beat fp32 by this factor in the probe: the probe's work is mostly convolutions and
# matrix multiplies, while a real step also spends time on memory-bound work bf16 barely speeds up.
BF16_MIN_SPEEDUP = 1.15


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


# ----------------------------------------------------------------------------- the automatic choice

@dataclass(frozen=True)
class Resolved:
    """A concrete precision and how it was chosen (``why``, for the one line a command prints)."""

    precision: str
    why: str

    def line(self) -> str:
        return f"precision: {self.precision} ({self.why})"


def _forced(device: torch.device) -> str | None:
    """The precision :data:`ENV_VAR` forces on ``auto``, checked against ``device``; None when unset."""
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in PRECISIONS:
            raise ConfigError(f"{ENV_VAR}={forced!r} is not a precision; set it to one of {', '.join(PRECISIONS)}")
        if forced == "fp16" and device.type != "cuda":
            raise ConfigError(f"{ENV_VAR}=fp16 needs a CUDA device; set it to bf16 or fp32")
        check_precision(device, forced)
    return forced or None


def check_request(requested: str, device: torch.device) -> None:
    """The errors :func:`resolve_precision` would raise, without probing the CPU: an explicit
    precision ``device`` cannot run, or the one :data:`ENV_VAR` forces on ``auto``. A command calls
    this before it creates anything, and resolves ``auto`` later."""
    if requested not in CHOICES:
        raise ConfigError(f"unknown precision {requested!r}; choose from {', '.join(CHOICES)}")
    if requested == "auto":
        _forced(torch.device(device))
    else:
        check_precision(torch.device(device), requested)


def resolve_precision(requested: str, device: torch.device) -> Resolved:
    """``requested`` (one of :data:`CHOICES`) as a precision ``device`` runs; see the module docstring.

    The result has passed :func:`check_precision`. Under torchrun every rank takes rank 0's CPU
    verdict, so that all ranks run alike.
    """
    device = torch.device(device)
    if requested not in CHOICES:
        raise ConfigError(f"unknown precision {requested!r}; choose from {', '.join(CHOICES)}")
    if requested != "auto":
        check_precision(device, requested)
        return Resolved(requested, "as requested")
    forced = _forced(device)
    if forced:
        return Resolved(forced, f"auto, forced by {ENV_VAR}")
    if device.type == "cuda":
        if _cuda_bf16(device):
            return Resolved("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bfloat16")
        return Resolved("fp32", f"auto: {torch.cuda.get_device_name(device)} lacks native bfloat16")
    if device.type != "cpu":
        return Resolved("fp32", f"auto: the default on {device.type}")
    found = distributed.broadcast_object(cpu_verdict() if distributed.is_main() else None,
                                         "sharing the precision verdict")
    return Resolved(found["precision"], f"auto: {found['why']}")


def _cuda_bf16(device: torch.device) -> bool:
    """Native bfloat16 on this GPU (compute capability 8.0 or newer), not emulation: what auto asks."""
    return torch.cuda.get_device_capability(device) >= (8, 0) and torch.cuda.is_bf16_supported()


def cpu_verdict(*, cache_dir: str | os.PathLike | None = None, probe: Callable[[], dict] | None = None) -> dict:
    """This CPU's choice, ``{"precision", "why", ...}``: read from the cache, else probed and cached.

    ``probe`` replaces :func:`probe_cpu` (its ``{"fp32_s", "bf16_s"}``); an unreadable cache is
    probed again, and one that cannot be written leaves the verdict unsaved. Tests never time
    anything: they replace the probe's result.
    """
    path = cache_path(cache_dir)
    key = machine_key()
    cached = _read_cache(path)
    if key in cached and cached[key].get("precision") in ("fp32", "bf16"):
        return cached[key]
    if not _cpu_has_bf16():
        found = {"precision": "fp32", "why": "this CPU has no bfloat16 kernels in oneDNN"}
    else:
        timing = (probe or probe_cpu)()
        speedup = timing["fp32_s"] / timing["bf16_s"]
        better = speedup >= BF16_MIN_SPEEDUP
        found = {"precision": "bf16" if better else "fp32",
                 "why": f"bf16 ran {speedup:.2f}x the fp32 speed in this CPU's probe "
                        f"({'at least' if better else 'below'} {BF16_MIN_SPEEDUP}x)",
                 "speedup": round(speedup, 3), **{k: round(v, 6) for k, v in timing.items()}}
    found = {**found, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    cached[key] = found
    try:
        write_json(path, cached)
    except OSError:
        pass
    return found


def _cpu_has_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (without them bf16 is emulated, and slow)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The probe's cache file: ``cache_dir``, else ``$DDPM_CACHE``, else ``~/.cache/ddpm``."""
    root = cache_dir or os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm"
    return Path(root) / CACHE_FILE


def _read_cache(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


# The processor flags that decide the bf16 and fp32 kernels oneDNN picks (x86 and Arm names).
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_fp16",
          "asimd", "bf16", "sve", "sve2", "sme")


def machine_key(cpuinfo: str = "/proc/cpuinfo") -> str:
    """What the verdict depends on: the processor model, its relevant flags and the torch version."""
    model, flags = _cpu_model_and_flags(cpuinfo)
    present = [flag for flag in _FLAGS if flag in flags]
    return f"{model} | {' '.join(present) or 'no listed flags'} | torch {torch.__version__}"


def _cpu_model_and_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The first processor's model name (with its x86 family and model numbers: a virtual machine
    may name two generations alike, "AMD EPYC") and flags in ``cpuinfo`` (Linux), else the
    platform's name."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip() and fields:
                    break
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    model = (fields.get("model name") or fields.get("Hardware") or fields.get("CPU part")
             or platform.processor() or platform.machine())
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return model, set((fields.get("flags") or fields.get("Features") or "").split())


def probe_cpu(seconds: float = 0.5) -> dict:
    """Seconds of one forward and backward pass of U-Net-like work in fp32 and in bf16 autocast.

    The work is a 3x3 convolution of 128 channels at 16x16 (batch 8) followed by GroupNorm and
    SiLU, as in a residual block, and a 1024 x 256 by 256 x 256 matrix multiply, as in attention
    and the embeddings; the weights are channels-last as :func:`channels_last` puts them. The
    two precisions alternate after a warm-up and each keeps its fastest pass, so a burst of
    other load on the machine does not decide the verdict; it takes about ``seconds``.
    """
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(32, 128)
    linear = torch.nn.Linear(256, 256)
    x = torch.randn(8, 128, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    h = torch.randn(1024, 256, generator=generator)

    def one_pass(precision: str) -> float:
        start = time.perf_counter()
        with autocast(cpu, precision):
            y = torch.nn.functional.silu(norm(conv(x)))
            loss = y.float().square().mean() + linear(h).float().square().mean()
        loss.backward()
        return time.perf_counter() - start

    best = {"fp32": float("inf"), "bf16": float("inf")}
    for precision in best:                     # warm-up: oneDNN builds its kernels on first use
        one_pass(precision)
    start, passes = time.perf_counter(), 0
    while passes < 3 or (time.perf_counter() - start < seconds and passes < 50):
        for precision in best:
            best[precision] = min(best[precision], one_pass(precision))
        passes += 1
    return {"fp32_s": best["fp32"], "bf16_s": best["bf16"]}
