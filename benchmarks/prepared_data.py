"""Prepared datasets: how fast ``ddpm prepare`` decodes, and how fast training can read the result.

Three measurements, each printed as a table:

* ``prepare``: images/s of :func:`ddpm.prepared.prepare_dataset` on a folder of JPEGs (synthetic
  photos of 512x384, made from scikit-learn's two sample photos, shifted and noised so no two
  files are alike), at each ``--prepare-sizes`` (cover resize + center crop), with
  ``--workers`` decoding threads.
* ``read``: images/s delivered to the training loop from a prepared dataset's memory map, as
  training takes them: a random permutation cut into batches, each batch's rows read by fancy
  indexing (sorted, so the disk is read forward) and turned into float32 NCHW by ``to_tensor``.
  The dataset is written just before, so its pages are in the page cache: this is the rate of
  the reading code, not of a cold disk.
* ``train``: images/s of one training step (forward, MSE, backward, Adam) of the ``mnist``
  preset's U-Net at the same size with 3 channels, on this CPU, as the figure reading must beat
  by far (the ratio column: read / train).

    .venv/bin/python benchmarks/prepared_data.py                  # all three, a few minutes
    .venv/bin/python benchmarks/prepared_data.py --only read --read-sizes 32 64

Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` distinct 512x384 JPEGs cut from the two sample photos, shifted and noised."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images                     # two 427x640 RGB photos
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        photo = photos[i % 2]
        top, left = rng.integers(0, photo.shape[0] - 384), rng.integers(0, photo.shape[1] - 512)
        crop = photo[top:top + 384, left:left + 512].astype(np.int16)
        crop = np.clip(crop + rng.integers(-8, 9, crop.shape), 0, 255).astype(np.uint8)
        Image.fromarray(crop).save(folder / f"{i:05d}.jpg", quality=90)


def bench_prepare(work: Path, count: int, sizes: list[int], workers: int) -> list[tuple]:
    from ddpm.prepared import prepare_dataset

    source = work / "jpegs"
    make_jpegs(source, count)
    rows = []
    for size in sizes:
        start = time.perf_counter()
        prepare_dataset(source, work / f"prepared-{size}", image_size=size, channels=3, workers=workers)
        seconds = time.perf_counter() - start
        rows.append((size, count, seconds, count / seconds))
    return rows


def bench_read(work: Path, size: int, megabytes: int, batch_size: int, seconds: float) -> float:
    """Images/s of random-order batches read from a memory map and converted for the network."""
    from numpy.lib.format import open_memmap

    from ddpm.data import to_tensor

    n = max(batch_size * 4, megabytes * 1_000_000 // (size * size * 3))
    path = work / f"read-{size}.npy"
    images = open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    rng = np.random.default_rng(0)
    for start in range(0, n, 1024):
        images[start:start + 1024] = rng.integers(0, 256, images[start:start + 1024].shape, dtype=np.uint8)
    images.flush()
    del images
    images = np.load(path, mmap_mode="r")
    delivered, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            to_tensor(images[np.sort(order[i:i + batch_size])])
            delivered += batch_size
            if time.perf_counter() - start >= seconds:
                break
    rate = delivered / (time.perf_counter() - start)
    del images
    path.unlink()
    return rate


def bench_train(size: int, batch_size: int, steps: int) -> float:
    """Images/s of training steps of the mnist preset's U-Net at ``size`` x ``size`` x 3."""
    import torch

    from ddpm.models import Unet, preset_config

    torch.manual_seed(0)
    # The mnist preset's shape; its attention (at 7x7, a quarter of 28) moves to a quarter of ``size``.
    model = Unet(preset_config("mnist", image_size=(size, size), channels=3, attention_resolutions=(size // 4,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, size, size)
    t = torch.randint(0, 1000, (batch_size,))

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x, t), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()                                                    # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("prepare", "read"), help="one part (read includes train)")
    parser.add_argument("--jpegs", type=int, default=400, help="JPEGs to prepare")
    parser.add_argument("--prepare-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--read-sizes", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--read-megabytes", type=int, default=400, help="size of each synthetic read dataset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--read-seconds", type=float, default=5.0)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--train-batch-size", type=int, default=8)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "prepare"):
            print(f"\nprepare: {args.jpegs} JPEGs of 512x384, {args.workers} workers")
            print("| size | images | seconds | images/s |\n|---|---|---|---|")
            for size, count, seconds, rate in bench_prepare(work, args.jpegs, args.prepare_sizes, args.workers):
                print(f"| {size}x{size} | {count} | {seconds:.1f} | {rate:.0f} |")
        if args.only in (None, "read"):
            print(f"\nread (random order, batch {args.batch_size}) beside training (mnist preset's U-Net, 3 channels)")
            print("| size | read images/s | train images/s | read / train |\n|---|---|---|---|")
            for size in args.read_sizes:
                read = bench_read(work, size, args.read_megabytes, args.batch_size, args.read_seconds)
                train = bench_train(size, args.train_batch_size, args.train_steps)
                print(f"| {size}x{size} | {read:.0f} | {train:.1f} | {read / train:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
