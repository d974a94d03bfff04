"""Fixed versus learned variances (Nichol & Dhariwal 2021) on MNIST at a fixed CPU budget.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/improved_ddpm.py --data-root ../shared/data/mnist \\
        --out-dir /tmp/improved --json /tmp/improved/results.json

Trains the same small U-Net twice for the same number of optimizer steps: the paper's L_simple
with the fixed variance beta-tilde, and Improved DDPM's learned-range variance with the hybrid
loss (lambda = 0.001). For each EMA model it reports the variational bound in bits/dim on a seeded
random subset of the MNIST test set (all T terms, ``ddpm.evaluation.evaluate_bpd``) and the fast
metric (LeNet FID and KID against the whole test split) of samples from the ancestral sampler at
25, 50 and 100 respaced steps; real training images give the metric's floor at the same count.
Runs single-threaded (torch.set_num_threads(1)). Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ddpm.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from ddpm.data import load_dataset
from ddpm.evaluation import evaluate_bpd, fast_metric, fast_reference
from ddpm.generate import generate, load_diffusion
from ddpm.models import preset_config
from ddpm.train import train

VARIANTS = {
    "fixed (L_simple, beta-tilde)": dict(),
    "learned (hybrid, learned-range)": dict(variance="learned-range", loss="hybrid"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder with the MNIST IDX files")
    parser.add_argument("--out-dir", required=True, help="run directories are written here")
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per model (the budget)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=16, help="U-Net base width (the mnist preset has 32)")
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--bpd-n", type=int, default=32, help="test images for bits/dim (seeded random subset)")
    parser.add_argument("--n", type=int, default=200, help="samples per quality measurement")
    parser.add_argument("--sampling-steps", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--variants", nargs="+", choices=[name.split()[0] for name in VARIANTS],
                        default=[name.split()[0] for name in VARIANTS],
                        help="which models (run them as separate processes to use two cores)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    train_data = load_dataset("mnist", data_root=args.data_root, split="train")
    test = load_dataset("mnist", data_root=args.data_root, split="test").images
    rng = np.random.default_rng(0)
    bpd_images = test[np.sort(rng.choice(len(test), args.bpd_n, replace=False))]
    real = train_data.images[np.sort(rng.choice(train_data.num_images, args.n, replace=False))]
    reference = fast_reference("mnist", data_root=args.data_root)
    results = {"steps": args.steps, "batch_size": args.batch_size, "dim": args.dim, "timesteps": args.timesteps,
               "bpd_n": args.bpd_n, "n": args.n, "real_floor": fast_metric(real, reference), "variants": {}}
    print(f"real training images ({args.n}): fast FID {results['real_floor']['fast_fid']:.2f}", flush=True)

    for name, diffusion_options in VARIANTS.items():
        if name.split()[0] not in args.variants:
            continue
        config = RunConfig(preset="mnist", model=preset_config("mnist", dim=args.dim),
                           diffusion=DiffusionConfig(timesteps=args.timesteps, **diffusion_options),
                           data=DataConfig(name="mnist", root=args.data_root),
                           train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=5e-4, warmup_steps=200,
                                             checkpoint_every=args.steps, log_every=100, num_samples=16, seed=0,
                                             device="cpu"))
        run_dir = Path(args.out_dir) / name.split()[0]
        start = time.perf_counter()
        train(config, run_dir, data=train_data, progress=False)
        train_seconds = time.perf_counter() - start
        diffusion, _ = load_diffusion(run_dir)
        start = time.perf_counter()
        bpd = evaluate_bpd(diffusion, bpd_images, batch_size=args.bpd_n, seed=0, progress=False)
        row = {"train_seconds": train_seconds, "bpd": bpd.bpd, "bpd_stderr": bpd.stderr, "bpd_prior": bpd.prior,
               "bpd_decoder": bpd.decoder, "bpd_seconds": time.perf_counter() - start, "quality": {}}
        print(f"{name}: trained {args.steps} steps in {train_seconds:.0f} s; {bpd.bpd:.3f} +- {bpd.stderr:.3f} bits/dim",
              flush=True)
        for steps in args.sampling_steps:
            start = time.perf_counter()
            images = generate(diffusion, args.n, batch_size=args.n, seed=0, progress=False, sampler="ddpm", steps=steps)
            scores = fast_metric(images, reference)
            row["quality"][steps] = {**scores, "seconds": time.perf_counter() - start}
            print(f"  ancestral, {steps} steps: fast FID {scores['fast_fid']:.2f}, KID {scores['fast_kid']:.4f}",
                  flush=True)
        results["variants"][name] = row
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    print("\n| model | train s | bits/dim (n = %d) | " % args.bpd_n
          + " | ".join(f"fast FID @ {k}" for k in args.sampling_steps) + " |")
    print("|---|---|---|" + "---|" * len(args.sampling_steps))
    for name, row in results["variants"].items():
        print(f"| {name} | {row['train_seconds']:.0f} | {row['bpd']:.3f} +- {row['bpd_stderr']:.3f} | "
              + " | ".join(f"{row['quality'][k]['fast_fid']:.2f}" for k in args.sampling_steps) + " |")


if __name__ == "__main__":
    main()
