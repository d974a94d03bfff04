"""Class-conditional MNIST: does the model draw the digit it is asked for?

    .venv/bin/python benchmarks/conditional_mnist.py --checkpoint RUN --n 100

For a checkpoint trained with ``ddpm train --data mnist --conditional``, generates ``--n`` images
of every class at several guidance scales (default sampler), and classifies them with the
project's MNIST LeNet (``ddpm.evaluation.classify``, 99.28% on the MNIST test set). Prints the
accuracy against the requested class and the fast FID per scale; results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ddpm.evaluation import classify, fast_metric, fast_reference
from ddpm.device import select_device
from ddpm.generate import generate, load_diffusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", help="MNIST IDX folder (default: the one the run was trained on)")
    parser.add_argument("--n", type=int, default=100, help="images per class")
    parser.add_argument("--scales", default="1,2,3,5", help="comma-separated guidance scales")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    diffusion, meta = load_diffusion(args.checkpoint, device=select_device(args.device))
    data = meta["run_config"].data
    reference = fast_reference(data.name, data_root=args.data_root or data.root)
    labels = np.repeat(np.arange(10), args.n)
    print(f"checkpoint {meta['path']} (step {meta['step']}), {args.n} images per class, default sampler")
    print("| guidance scale | accuracy (LeNet) | fast FID | seconds |")
    print("|---|---|---|---|")
    for w in (float(s) for s in args.scales.split(",")):
        start = time.perf_counter()
        images = generate(diffusion, len(labels), batch_size=500, seed=0, progress=False, labels=labels,
                          guidance_scale=w)
        seconds = time.perf_counter() - start
        accuracy = float((classify(images).argmax(axis=1) == labels).mean())
        print(f"| {w:g} | {accuracy:.3f} | {fast_metric(images, reference)['fast_fid']:.2f} | {seconds:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
