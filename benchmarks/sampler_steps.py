"""Sample quality against the number of steps, for every sampler, on one trained checkpoint.

    .venv/bin/python benchmarks/sampler_steps.py --checkpoint runs/NNN --data-root ../shared/data/mnist
    .venv/bin/python benchmarks/sampler_steps.py --checkpoint RUN --data-root DIR --n 1000 --grids OUT_DIR

For each sampler (ddpm = ancestral over a respaced subset, ddim with eta = 0, dpm-solver++) and
each step count, generates the same ``--n`` images (per-image seeds) and scores them with the
project's fast metric (FID on the LeNet features of ``ddpm.evaluation``, against the test split of
the checkpoint's dataset). Prints a markdown table; results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from ddpm.evaluation import fast_metric, fast_reference
from ddpm.device import select_device
from ddpm.generate import generate, load_diffusion
from ddpm.images import make_grid, save_png

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", help="folder of the checkpoint's dataset files (mnist, fashion-mnist)")
    parser.add_argument("--n", type=int, default=1000, help="images per configuration (default 1000)")
    parser.add_argument("--steps", default="10,20,50,100,1000", help="comma-separated step counts")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--grids", help="write a 64-image grid per configuration into this folder")
    args = parser.parse_args()

    device = select_device(args.device)
    diffusion, meta = load_diffusion(args.checkpoint, device=device)
    data = meta["run_config"].data
    reference = fast_reference(data.name, data_root=args.data_root or data.root, image_size=data.image_size,
                               channels=data.channels)
    steps_list = [int(s) for s in args.steps.split(",")]
    print(f"checkpoint {meta['path']} (step {meta['step']}), dataset {data.name}, {args.n} images per row, "
          f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()})")
    print("| sampler | steps | fast FID | fast KID | seconds |")
    print("|---|---|---|---|---|")
    for sampler in args.samplers.split(","):
        for steps in steps_list:
            if steps > diffusion.timesteps:
                continue
            start = time.perf_counter()
            images = generate(diffusion, args.n, batch_size=args.batch_size, seed=0, progress=False,
                              sampler=sampler, steps=steps)
            seconds = time.perf_counter() - start
            scores = fast_metric(images, reference)
            print(f"| {sampler} | {steps} | {scores['fast_fid']:.2f} | {scores['fast_kid']:.3f} | "
                  f"{seconds:.1f} |", flush=True)
            if args.grids:
                save_png(Path(args.grids) / f"{sampler}-{steps}.png", make_grid(images[:64]))


if __name__ == "__main__":
    main()
