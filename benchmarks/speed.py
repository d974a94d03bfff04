"""Throughput, FLOP utilisation and peak memory of the U-Net, for training and for sampling.

For each preset asked for, on the current device, and for each configuration ("row"):

* FLOPs per image of one forward pass and of one training step (forward + backward), counted
  with ``torch.utils.flop_counter`` (matrix multiplies, convolutions, attention);
* the matrix-multiply rate of this machine, measured in the same process: the best of several
  matrix shapes (squares and the im2col shapes of the preset's 3x3 convolutions), in the row's
  precision. "MFU" = achieved FLOP/s / that rate;
* training images/s: forward, MSE loss on the noise, backward, optimizer step (Adam), at a fixed
  batch size; sampling images/s: forward passes under ``torch.inference_mode``;
* peak memory: ``ru_maxrss`` of the process on the CPU (every measurement runs in a subprocess of
  its own, so the figure is that row's alone), ``torch.cuda.max_memory_allocated`` on CUDA.

Rows:

* ``diffusers``: diffusers' ``UNet2DModel`` configured as the paper's CIFAR-10 model (the same
  35,746,307 parameters as the ``cifar10`` preset), as a user gets it: eager mode, its default
  memory format, fp32, ``torch.optim.Adam`` with its defaults. The baseline of every ratio.
* ``ours``: the project's U-Net as ``ddpm train`` and ``ddpm sample`` run it by default: fp32, the
  fused Adam step, and the memory format of ``ddpm.precision.channels_last`` (channels-last on the
  CPU and CUDA, except bf16 training on the CPU).
* ``ours-bf16``: the same with ``--precision bf16`` (bfloat16 autocast of the network).
* ``diffusers-bf16``: diffusers' model under the same bfloat16 autocast, the like-for-like check.

``--repeat N`` measures every row N times, interleaved, and keeps each row's best median, so a
passing burst of load on a shared machine does not decide a ratio.

    .venv/bin/python benchmarks/speed.py                          # cifar10, batch 16, 2 threads
    .venv/bin/python benchmarks/speed.py --presets digits mnist cifar10 --json speed.json
    .venv/bin/python benchmarks/speed.py --rows ours --mode train --steps 5   # a quick look

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

ROWS = {   # name: (model, precision); ours also takes the fused Adam step and ddpm's memory format
    "diffusers": ("diffusers", "fp32"),
    "ours": ("ours", "fp32"),
    "ours-bf16": ("ours", "bf16"),
    "diffusers-bf16": ("diffusers", "bf16"),
}
BASELINE = "diffusers"


# --- worker: one system, one preset, one mode, in a process of its own ----------------------------

def build(system: str, preset: str, *, channels_last: bool):
    """(config, model, forward(x, t) -> prediction) of ``system`` ("ours" or "diffusers") for ``preset``."""
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


def gemm_shapes(cfg, batch_size: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of square multiplies and of the im2col form of the preset's 3x3 convolutions."""
    shapes = [(n, n, n) for n in (1024, 2048, 4096)]
    h, w = cfg.image_size
    for level, mult in enumerate(cfg.dim_mults):
        ch = cfg.dim * mult
        shapes.append((batch_size * (h >> level) * (w >> level), 9 * ch, ch))
    return shapes


def matmul_rate(device, dtype, shapes, seconds: float = 1.0) -> tuple[float, tuple[int, int, int]]:
    """The best FLOP/s of ``torch.mm`` over ``shapes`` (each timed for about ``seconds``), and its shape."""
    import torch

    best_rate, best_shape = 0.0, None
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        sync(device)
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
        rate = 2 * m * k * n / best
        if rate > best_rate:
            best_rate, best_shape = rate, (m, k, n)
    return best_rate, best_shape


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
    from ddpm.precision import autocast
    from ddpm.precision import channels_last as ddpm_channels_last

    system, precision = ROWS[args.row]
    fused = system == "ours"
    channels_last = fused and ddpm_channels_last(device, precision, training=args.mode == "train")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    torch.manual_seed(0)
    cfg, model, forward = build(system, args.preset, channels_last=channels_last)
    model.to(device)
    b, c = args.batch_size, cfg.channels
    h, w = cfg.image_size

    def batch():
        x = torch.randn(b, c, h, w, device=device)
        t = torch.randint(0, 1000, (b,), device=device)
        return x, t

    x1, t1 = torch.randn(1, c, h, w, device=device), torch.zeros(1, dtype=torch.long, device=device)
    model.train(args.mode == "train")
    flops_per_image = count_flops(forward, model, x1, t1, train=args.mode == "train")

    if args.mode == "train":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, **({"fused": True} if fused else {}))

        def step():
            x, t = batch()
            noise = torch.randn_like(x)
            with autocast(device, precision):
                loss = torch.nn.functional.mse_loss(forward(x, t).float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        model.eval()

        def step():
            x, t = batch()
            with torch.inference_mode(), autocast(device, precision):
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
    peak = peak_memory_bytes(device)               # before the yardstick's matrices add to the high-water mark
    rate, shape = matmul_rate(device, dtype, gemm_shapes(cfg, b))
    images_per_s = b / median
    return {"row": args.row, "system": system, "preset": args.preset, "mode": args.mode, "batch_size": b,
            "threads": args.threads, "device": str(device), "precision": precision,
            "channels_last": channels_last, "fused_adam": fused and args.mode == "train",
            "parameters": sum(p.numel() for p in model.parameters()),
            "gflop_per_image": flops_per_image / 1e9, "matmul_gflops": rate / 1e9, "matmul_shape": shape,
            "seconds_per_step": median, "images_per_s": images_per_s,
            "achieved_gflops": flops_per_image * images_per_s / 1e9,
            "mfu": flops_per_image * images_per_s / rate, "peak_memory_mib": peak / 2 ** 20}


# --- driver: one subprocess per measurement, then the table -----------------------------------------

def run_worker(args, row: str, preset: str, mode: str) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--row", row, "--preset", preset, "--mode", mode,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {row} {preset} {mode}: failed\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["cifar10"])
    parser.add_argument("--mode", choices=("train", "sample", "both"), default="both")
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="measure every row this many times, interleaved; "
                                                               "keep each row's best median")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", choices=tuple(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    rows = list(args.rows)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: measuring ours only", file=sys.stderr)
        rows = [r for r in rows if ROWS[r][0] != "diffusers"]
    modes = ["train", "sample"] if args.mode == "both" else [args.mode]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}, {args.threads} threads, batch {args.batch_size}, best of {args.repeat}")
    print(f"{'preset':<10} {'mode':<7} {'row':<15} {'img/s':>8} {'vs ' + BASELINE:>13} {'GFLOP/img':>10} "
          f"{'GFLOP/s':>8} {'matmul':>8} {'MFU':>6} {'peak MiB':>9} {'vs ' + BASELINE:>13}")
    results = []
    for preset in args.presets:
        for mode in modes:
            best: dict[str, dict] = {}
            for _ in range(args.repeat):
                for row in rows:
                    r = run_worker(args, row, preset, mode)
                    if r is not None and (row not in best or r["images_per_s"] > best[row]["images_per_s"]):
                        best[row] = r
            base = best.get(BASELINE)
            for row in rows:
                if row not in best:
                    continue
                r = best[row]
                results.append(r)
                speed = f"{r['images_per_s'] / base['images_per_s']:12.2f}x" if base else f"{'':>13}"
                memory = f"{r['peak_memory_mib'] / base['peak_memory_mib']:12.2f}x" if base else ""
                print(f"{preset:<10} {mode:<7} {row:<15} {r['images_per_s']:8.2f} {speed} {r['gflop_per_image']:10.2f} "
                      f"{r['achieved_gflops']:8.1f} {r['matmul_gflops']:8.1f} {r['mfu']:6.1%} "
                      f"{r['peak_memory_mib']:9.0f} {memory}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
