"""Throughput, FLOP utilisation and peak memory of the U-Net, for training and for sampling.

For each preset asked for, on the current device:

* FLOPs per image of one forward pass and of one training step (forward + backward), counted
  with ``torch.utils.flop_counter`` (matrix multiplies, convolutions, attention);
* the matrix-multiply rate of this machine, measured in the same process (square fp32 or bf16
  ``torch.mm``), the yardstick of "MFU" = achieved FLOP/s / matrix-multiply FLOP/s;
* training images/s: forward, MSE loss on the noise, backward, optimizer step (Adam), at a fixed
  batch size; sampling images/s: forward passes under ``torch.inference_mode``;
* peak memory: ``ru_maxrss`` of the process on the CPU (every measurement runs in a subprocess of
  its own, so the figure is that system's alone), ``torch.cuda.max_memory_allocated`` on CUDA.

When diffusers is importable, its ``UNet2DModel`` configured as the paper's CIFAR-10 model
(the same 35,746,307 parameters as the ``cifar10`` preset) is measured the same way and the
ratios ours / diffusers are printed.

    .venv/bin/python benchmarks/speed.py                          # cifar10, batch 16, 2 threads
    .venv/bin/python benchmarks/speed.py --presets digits mnist cifar10 --json speed.json
    .venv/bin/python benchmarks/speed.py --only ours --mode train --steps 5   # a quick look

Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SYSTEMS = ("ours", "diffusers")


# --- worker: one system, one preset, one mode, in a process of its own ----------------------------

def build(system: str, preset: str, *, channels_last: bool):
    import torch

    from ddpm.models import Unet
    from ddpm.models.presets import preset_config

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


def matmul_rate(device, dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a square matrix multiply, the best of several timed repetitions."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, start = float("inf"), time.perf_counter()
    for _ in range(3):
        a @ b
    while time.perf_counter() - start < seconds:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


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


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    torch.manual_seed(0)
    cfg, model, forward = build(args.system, args.preset, channels_last=args.channels_last)
    model.to(device)
    b, c = args.batch_size, cfg.channels
    h, w = cfg.image_size
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def batch():
        x = torch.randn(b, c, h, w, device=device).contiguous(memory_format=memory_format)
        t = torch.randint(0, 1000, (b,), device=device)
        return x, t

    x1, t1 = torch.randn(1, c, h, w, device=device), torch.zeros(1, dtype=torch.long, device=device)
    model.train(args.mode == "train")
    flops_per_image = count_flops(forward, model, x1, t1, train=args.mode == "train")
    rate = matmul_rate(device, dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    if args.mode == "train":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            x, t = batch()
            noise = torch.randn_like(x)
            with autocast:
                loss = torch.nn.functional.mse_loss(forward(x, t).float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        model.eval()

        def step():
            x, t = batch()
            with torch.inference_mode(), autocast:
                forward(x, t)

    for _ in range(args.warmup):
        step()
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    images_per_s = b / median
    return {"system": args.system, "preset": args.preset, "mode": args.mode, "batch_size": b,
            "threads": args.threads, "device": str(device), "precision": args.precision,
            "channels_last": args.channels_last, "parameters": sum(p.numel() for p in model.parameters()),
            "gflop_per_image": flops_per_image / 1e9, "matmul_gflops": rate / 1e9,
            "seconds_per_step": median, "images_per_s": images_per_s,
            "achieved_gflops": flops_per_image * images_per_s / 1e9,
            "mfu": flops_per_image * images_per_s / rate, "peak_memory_mib": peak_memory_bytes(device) / 2 ** 20}


# --- driver: one subprocess per measurement, then the table -----------------------------------------

def run_worker(args, system: str, preset: str, mode: str) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--system", system, "--preset", preset, "--mode", mode,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", args.device,
           "--precision", args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.channels_last:
        cmd.append("--channels-last")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {system} {preset} {mode}: failed\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["cifar10"])
    parser.add_argument("--mode", choices=("train", "sample", "both"), default="both")
    parser.add_argument("--only", choices=SYSTEMS, help="measure one system only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    systems = [args.only] if args.only else list(SYSTEMS)
    if "diffusers" in systems:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed: measuring ours only", file=sys.stderr)
            systems.remove("diffusers")
    modes = ["train", "sample"] if args.mode == "both" else [args.mode]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}, {args.threads} threads, batch {args.batch_size}, {args.precision}"
          f"{', channels-last' if args.channels_last else ''}")
    results = []
    header = (f"{'preset':<12} {'mode':<7} {'system':<10} {'img/s':>8} {'GFLOP/img':>10} {'GFLOP/s':>8} "
              f"{'matmul':>8} {'MFU':>6} {'peak MiB':>9}")
    print(header)
    for preset in args.presets:
        for mode in modes:
            row = {}
            for system in systems:
                r = run_worker(args, system, preset, mode)
                if r is None:
                    continue
                results.append(r)
                row[system] = r
                print(f"{preset:<12} {mode:<7} {system:<10} {r['images_per_s']:8.2f} {r['gflop_per_image']:10.2f} "
                      f"{r['achieved_gflops']:8.1f} {r['matmul_gflops']:8.1f} {r['mfu']:6.1%} "
                      f"{r['peak_memory_mib']:9.0f}", flush=True)
            if "ours" in row and "diffusers" in row:
                a, b = row["ours"], row["diffusers"]
                print(f"{'':<12} {'':<7} {'ratio':<10} {a['images_per_s'] / b['images_per_s']:7.2f}x "
                      f"{'':>10} {'':>8} {'':>8} {'':>6} {a['peak_memory_mib'] / b['peak_memory_mib']:8.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
