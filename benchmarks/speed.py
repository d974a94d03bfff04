"""Throughput, FLOP utilisation and peak memory of the U-Net, for training and for sampling.

For each preset asked for, on the current device, and for each configuration ("row"):

* FLOPs per image of one forward pass and of one training step (forward + backward), counted
  with ``torch.utils.flop_counter`` (matrix multiplies, convolutions, attention);
* the dense rate of this machine, measured in the same process and in the row's precision: the
  best of square matrix multiplies, the im2col multiplies of the preset's 3x3 convolutions and
  those convolutions themselves (on a CPU, ``torch.mm`` and ``conv2d`` run in different libraries,
  MKL and oneDNN, whose rates differ by up to 2.7x on an AMD EPYC). "MFU" = achieved FLOP/s / that
  rate (the "matmul" column);
* training images/s: forward, MSE loss on the noise, backward, optimizer step (Adam), at a fixed
  batch size; sampling images/s: forward passes under ``torch.inference_mode``;
* peak memory: ``ru_maxrss`` of the process on the CPU (every measurement runs in a subprocess of
  its own, so the figure is that row's alone), ``torch.cuda.max_memory_allocated`` on CUDA.

Rows: ``SYSTEM[-PRECISION][-cl|-nchw][-compile]``.

* ``SYSTEM``: ``ours`` (the project's U-Net as ``ddpm train`` and ``ddpm sample`` run it: the fused
  Adam step, and the memory format of ``ddpm.precision.channels_last``) or ``diffusers``
  (diffusers' ``UNet2DModel`` configured as the paper's CIFAR-10 model, the same 35,746,307
  parameters as the ``cifar10`` preset, as a user gets it: eager mode, its default memory format,
  ``torch.optim.Adam`` with its defaults).
* ``PRECISION``: ``fp32`` (the default of a row name), ``bf16`` or ``fp16`` (autocast of the network,
  ``ddpm.precision.autocast``), or ``auto``: what ``--precision auto``, ddpm's default, resolves to
  on this device (``ddpm.precision.resolve_precision``: ``DDPM_PRECISION``, else the cached probe
  on a CPU, bf16 on a GPU that has it). fp32 on CUDA runs with PyTorch's defaults (TF32
  convolutions, full fp32 matrix multiplies) for both systems.
* ``-cl`` / ``-nchw`` force the channels-last or the default memory format; ``-compile`` wraps the
  network in ``torch.compile`` (its compile time is reported apart, not in images/s; ``--compile-backend``
  chooses the backend, inductor by default).

The baseline of every ratio is ``diffusers`` (fp32, as a user gets it). The default rows are the
comparisons that matter on a CPU: ``diffusers``, ``ours-auto`` (the default), and like for like
``ours`` / ``ours-bf16`` / ``diffusers-bf16``.

Two ways to measure:

* every row in a subprocess of its own (the default), so the peak memory is that row's alone;
  ``--repeat N`` measures every row N times, interleaved, and keeps each row's best median;
* ``--interleave``: every row built in one process, then one step of each in turn, so that load
  from other work on a shared machine falls on all rows alike (no per-row peak memory then).

    .venv/bin/python benchmarks/speed.py                          # cifar10, batch 16, 2 threads
    .venv/bin/python benchmarks/speed.py --interleave --steps 6   # the like-for-like check on a busy machine
    .venv/bin/python benchmarks/speed.py --presets digits mnist cifar10 --json speed.json
    .venv/bin/python benchmarks/speed.py --rows ours --mode train --steps 5   # a quick look
    .venv/bin/python benchmarks/speed.py --device cuda --batch-size 128 \
        --rows ours-fp32 ours-bf16 ours-bf16-compile diffusers-bf16-cl            # see benchmarks/gpu.sh

Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

SYSTEMS = ("ours", "diffusers")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_ROWS = ["diffusers", "ours-auto", "ours", "ours-bf16", "diffusers-bf16"]
BASELINE = "diffusers"


@dataclass(frozen=True)
class Row:
    """One configuration to measure, parsed from its name (see the module docstring)."""

    name: str
    system: str
    precision: str
    memory: str            # "ddpm" (ours: ddpm.precision.channels_last; diffusers: its default), "cl" or "nchw"
    compile: bool


def parse_row(name: str) -> Row:
    system, *rest = name.split("-")
    if system not in SYSTEMS:
        raise argparse.ArgumentTypeError(f"row {name!r}: the system is ours or diffusers")
    precision = rest.pop(0) if rest and rest[0] in PRECISIONS else "fp32"
    memory = rest.pop(0) if rest and rest[0] in ("cl", "nchw") else "ddpm"
    compiled = bool(rest) and rest[0] == "compile"
    if compiled:
        rest.pop(0)
    if rest:
        raise argparse.ArgumentTypeError(f"row {name!r}: unknown part(s) {'-'.join(rest)}")
    return Row(name, system, precision, memory, compiled)


# --- worker: one system, one preset, one mode, in a process of its own ----------------------------

def build(system: str, preset: str, *, channels_last: bool):
    """(config, model, forward(x, t) -> prediction) of ``system`` ("ours" or "diffusers") for ``preset``."""
    import torch

    from ddpm.models import Unet
    from ddpm.models import preset_config

    cfg = preset_config(preset)
    if system == "ours":
        model = Unet(cfg)
        forward = model
    elif system == "diffusers":
        model = diffusers_unet(cfg)
        def forward(x, t):
            return model(x, t).sample
    else:
        raise SystemExit(f"unknown system {system!r}")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return cfg, model, forward


def diffusers_unet(cfg):
    """diffusers' UNet2DModel with the architecture of our preset ``cfg`` (the paper's layout)."""
    from diffusers import UNet2DModel

    res, down, up = min(cfg.image_size), [], []
    for level in range(len(cfg.dim_mults)):
        down.append("AttnDownBlock2D" if res in cfg.attention_resolutions else "DownBlock2D")
        if level != len(cfg.dim_mults) - 1:
            res //= 2
    up = [name.replace("Down", "Up") for name in reversed(down)]
    return UNet2DModel(sample_size=cfg.image_size, in_channels=cfg.channels, out_channels=cfg.channels,
                       block_out_channels=tuple(cfg.dim * m for m in cfg.dim_mults),
                       layers_per_block=cfg.num_res_blocks, down_block_types=tuple(down),
                       up_block_types=tuple(up), attention_head_dim=cfg.dim * max(cfg.dim_mults) // cfg.attention_heads
                       if cfg.attention_heads > 1 else None,
                       norm_num_groups=cfg.norm_groups, norm_eps=1e-5, flip_sin_to_cos=False, freq_shift=1,
                       downsample_padding=1, dropout=cfg.dropout)


def dense_kernels(cfg, batch_size: int) -> list[tuple]:
    """The yardstick's kernels: square ``torch.mm`` multiplies, the im2col multiplies of the preset's
    3x3 convolutions, and those convolutions themselves in both memory formats.

    The convolutions are there because on a CPU ``torch.mm`` and ``conv2d`` are served by different
    libraries (MKL's GEMM and oneDNN): on an AMD EPYC MKL's fp32 GEMM reached 96-172 GFLOP/s where
    oneDNN's 3x3 convolution reached 404-471, so a multiply-only yardstick put the U-Net above 100%."""
    kernels: list[tuple] = [("mm", n, n, n) for n in (1024, 2048, 4096)]
    h, w = cfg.image_size
    for level, mult in enumerate(cfg.dim_mults):
        ch, hl, wl = cfg.dim * mult, h >> level, w >> level
        kernels.append(("mm", batch_size * hl * wl, 9 * ch, ch))
        kernels += [("conv3x3", batch_size, ch, hl, wl, layout) for layout in ("nchw", "channels-last")]
    return kernels


def kernel_flops(kernel: tuple) -> int:
    """Multiply-add FLOPs of one call: 2 M K N, with a 3x3 convolution counted as its im2col multiply."""
    if kernel[0] == "mm":
        _, m, k, n = kernel
        return 2 * m * k * n
    _, b, ch, h, w, _ = kernel
    return 2 * (b * h * w) * (9 * ch) * ch


def kernel_name(kernel: tuple) -> str:
    if kernel[0] == "mm":
        return "mm {}x{}x{}".format(*kernel[1:])
    return "conv3x3 {}x{}x{}x{} {}".format(*kernel[1:])


def matmul_rate(device, dtype, kernels, seconds: float = 1.0) -> tuple[float, str]:
    """The best FLOP/s over ``kernels`` (each timed for about ``seconds``) and that kernel's name: the
    dense rate this machine's libraries reach in ``dtype``, against which MFU is reported."""
    import torch
    import torch.nn.functional as F

    best_rate, best_kernel = 0.0, None
    for kernel in kernels:
        if kernel[0] == "mm":
            a = torch.randn(kernel[1], kernel[2], device=device, dtype=dtype)
            b = torch.randn(kernel[2], kernel[3], device=device, dtype=dtype)

            def call():
                return a @ b
        else:
            _, n, ch, h, w, layout = kernel
            fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
            x = torch.randn(n, ch, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
            weight = torch.randn(ch, ch, 3, 3, device=device, dtype=dtype).contiguous(memory_format=fmt)

            def call():
                return F.conv2d(x, weight, padding=1)
        with torch.no_grad():
            for _ in range(2):
                call()
            sync(device)
            best, start = float("inf"), time.perf_counter()
            while time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                call()
                sync(device)
                best = min(best, time.perf_counter() - t0)
        rate = kernel_flops(kernel) / best
        if rate > best_rate:
            best_rate, best_kernel = rate, kernel_name(kernel)
    return best_rate, best_kernel


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(forward, model, x, t, *, train: bool) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            out = forward(x, t)
            out.float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                forward(x, t)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_memory_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # kilobytes on Linux


def prepare(row: Row, preset: str, mode: str, device, batch_size: int, compile_backend: str = "inductor") -> dict:
    """Everything one row needs: its ``step()`` (one training step or one forward pass) and what
    the table reports besides the timing."""
    import torch

    from ddpm.precision import autocast, resolve_precision
    from ddpm.precision import channels_last as ddpm_channels_last

    precision = resolve_precision(row.precision, device).precision      # auto: ddpm's choice on this device
    training = mode == "train"
    ours = row.system == "ours"
    channels_last = {"cl": True, "nchw": False}.get(row.memory, ours and ddpm_channels_last(device, precision,
                                                                                            training=training))
    torch.manual_seed(0)
    cfg, model, forward = build(row.system, preset, channels_last=channels_last)
    model.to(device)
    b, c, (h, w) = batch_size, cfg.channels, cfg.image_size
    model.train(training)
    x1, t1 = torch.randn(1, c, h, w, device=device), torch.zeros(1, dtype=torch.long, device=device)
    flops_per_image = count_flops(forward, model, x1, t1, train=training)
    if row.compile:
        compiled = torch.compile(model, backend=compile_backend)
        forward = compiled if ours else (lambda x, t: compiled(x, t).sample)

    def batch():
        return torch.randn(b, c, h, w, device=device), torch.randint(0, 1000, (b,), device=device)

    if training:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, **({"fused": True} if ours else {}))
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None   # as ddpm train runs fp16

        def step():
            x, t = batch()
            noise = torch.randn_like(x)
            with autocast(device, precision):
                loss = torch.nn.functional.mse_loss(forward(x, t).float(), noise)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
    else:
        model.eval()

        def step():
            x, t = batch()
            with torch.inference_mode(), autocast(device, precision):
                forward(x, t)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return {"step": step, "cfg": cfg, "precision": precision, "dtype": dtype, "channels_last": channels_last,
            "fused_adam": ours and training, "flops_per_image": flops_per_image,
            "parameters": sum(p.numel() for p in model.parameters())}


def timed(prep: dict, device) -> float:
    start = time.perf_counter()
    prep["step"]()
    sync(device)
    return time.perf_counter() - start


def report(row: Row, prep: dict, times: list[float], args, *, rate: float, kernel: str, peak: float | None,
           compile_s: float | None) -> dict:
    times = sorted(times)
    median = times[len(times) // 2]
    images_per_s = args.batch_size / median
    flops = prep["flops_per_image"]
    return {"row": row.name, "system": row.system, "preset": args.preset, "mode": args.mode,
            "batch_size": args.batch_size, "threads": args.threads, "device": str(args.device),
            "precision": prep["precision"], "channels_last": prep["channels_last"], "compiled": row.compile,
            "compile_s": compile_s, "fused_adam": prep["fused_adam"], "parameters": prep["parameters"],
            "gflop_per_image": flops / 1e9, "matmul_gflops": rate / 1e9, "matmul_kernel": kernel,
            "seconds_per_step": median, "images_per_s": images_per_s,
            "achieved_gflops": flops * images_per_s / 1e9, "mfu": flops * images_per_s / rate,
            "peak_memory_mib": None if peak is None else peak / 2 ** 20}


def worker(args) -> dict:
    """One row, one preset, one mode, in this process (a subprocess of the driver)."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    row = parse_row(args.row)
    prep = prepare(row, args.preset, args.mode, device, args.batch_size, args.compile_backend)
    first = timed(prep, device)                   # includes torch.compile's compilation for -compile rows
    for _ in range(args.warmup - 1):
        timed(prep, device)
    times = [timed(prep, device) for _ in range(args.steps)]
    peak = peak_memory_bytes(device)               # before the yardstick's matrices add to the high-water mark
    rate, kernel = matmul_rate(device, prep["dtype"], dense_kernels(prep["cfg"], args.batch_size), args.matmul_seconds)
    return report(row, prep, times, args, rate=rate, kernel=kernel, peak=peak,
                  compile_s=first if row.compile else None)


def interleaved(args, rows: list[Row]) -> list[dict]:
    """Every row in this process, one step of each in turn: load on a shared machine hits all alike."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preps = [prepare(row, args.preset, args.mode, device, args.batch_size, args.compile_backend) for row in rows]
    compile_s = [timed(prep, device) for prep in preps]
    for _ in range(args.warmup - 1):
        for prep in preps:
            timed(prep, device)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(args.steps):
        for i, prep in enumerate(preps):
            times[i].append(timed(prep, device))
    rates = {}
    for prep in preps:
        if prep["dtype"] not in rates:
            rates[prep["dtype"]] = matmul_rate(device, prep["dtype"], dense_kernels(prep["cfg"], args.batch_size),
                                               args.matmul_seconds)
    return [report(row, prep, t, args, rate=rates[prep["dtype"]][0], kernel=rates[prep["dtype"]][1], peak=None,
                   compile_s=c if row.compile else None)
            for row, prep, t, c in zip(rows, preps, times, compile_s)]


# --- driver: one subprocess per measurement (or one process for all), then the table ----------------

def run_worker(args, row: str, preset: str, mode: str) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--row", row, "--preset", preset, "--mode", mode,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--matmul-seconds", str(args.matmul_seconds),
           "--compile-backend", args.compile_backend]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {row} {preset} {mode}: failed\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_line(args) -> str:
    import torch

    from ddpm.precision import machine_key

    if args.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(torch.device(args.device))}, CUDA {torch.version.cuda}"
    else:
        where = f"{os.cpu_count()} cores, {args.threads} threads"
    return f"# {machine_key()}; {where}; device {args.device}; batch {args.batch_size}; {time.strftime('%Y-%m-%d')}"


def print_row(preset: str, mode: str, r: dict, base: dict | None) -> None:
    speed = f"{r['images_per_s'] / base['images_per_s']:12.2f}x" if base else f"{'':>13}"
    peak = r["peak_memory_mib"]
    memory = (f"{peak / base['peak_memory_mib']:12.2f}x" if base and base["peak_memory_mib"] and peak else "")
    compiled = f"  (compiled in {r['compile_s']:.0f} s)" if r.get("compile_s") else ""
    print(f"{preset:<10} {mode:<7} {r['row']:<26} {r['precision']:<5} {r['images_per_s']:9.2f} {speed} "
          f"{r['gflop_per_image']:10.2f} {r['achieved_gflops']:8.1f} {r['matmul_gflops']:8.1f} {r['mfu']:6.1%} "
          f"{'' if peak is None else f'{peak:9.0f}':>9} {memory}{compiled}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["cifar10"])
    parser.add_argument("--mode", choices=("train", "sample", "both"), default="both")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="SYSTEM[-PRECISION][-cl|-nchw][-compile]")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="measure every row this many times, interleaved; "
                                                               "keep each row's best median")
    parser.add_argument("--interleave", action="store_true", help="all rows in one process, a step of each in turn")
    parser.add_argument("--matmul-seconds", type=float, default=1.0, help="time per shape of the matmul yardstick")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for -compile rows (aot_eager: a quick check of the path)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    try:
        rows = [parse_row(name) for name in args.rows]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: measuring ours only", file=sys.stderr)
        rows = [r for r in rows if r.system != "diffusers"]
    modes = ["train", "sample"] if args.mode == "both" else [args.mode]
    how = "interleaved in one process" if args.interleave else f"a subprocess per row, best of {args.repeat}"
    print(machine_line(args) + f"; {how}")
    print(f"{'preset':<10} {'mode':<7} {'row':<26} {'prec':<5} {'img/s':>9} {'vs ' + BASELINE:>13} {'GFLOP/img':>10} "
          f"{'GFLOP/s':>8} {'matmul':>8} {'MFU':>6} {'peak MiB':>9} {'vs ' + BASELINE:>13}")
    results = []
    for preset in args.presets:
        for mode in modes:
            best: dict[str, dict] = {}
            if args.interleave:
                args.preset, args.mode = preset, mode
                best = {r["row"]: r for r in interleaved(args, rows)}
            else:
                for i in range(args.repeat):
                    for row in rows:
                        r = run_worker(args, row.name, preset, mode)
                        if r is not None and (row.name not in best or r["images_per_s"] > best[row.name]["images_per_s"]):
                            best[row.name] = r
                        if r is not None and args.repeat == 1:      # as it comes, for a run that may be cut short
                            print_row(preset, mode, r, best.get(BASELINE))
                            save(args.json, [*results, *best.values()])
            for row in rows:
                if row.name in best:
                    results.append(best[row.name])
                    if args.interleave or args.repeat > 1:
                        print_row(preset, mode, best[row.name], best.get(BASELINE))
            save(args.json, results)


def save(path: str | None, results: list[dict]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
