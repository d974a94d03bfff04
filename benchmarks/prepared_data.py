"""Prepared datasets: how fast ``ddpm prepare`` decodes, and how fast training can read the result.

Four measurements, each printed as a table:

* ``prepare``: images/s of :func:`ddpm.data.prepare.prepare_dataset` on a folder of JPEGs (synthetic
  photos of 512x384, made from scikit-learn's two sample photos, shifted and noised so no two
  files are alike), at each ``--prepare-sizes`` (cover resize + center crop), with
  ``--workers`` decoding threads.
* ``read``: images/s delivered to the training loop from a prepared dataset's memory map, as
  training takes them: a random permutation cut into batches, each batch's rows read by fancy
  indexing (sorted, so the disk is read forward) and turned into float32 NCHW by ``to_tensor``.
  The dataset is written just before, so its pages are in the page cache: this is the rate of
  the reading code, not of a cold disk.
* ``rss``: peak anonymous memory (RssAnon, which leaves out memory-mapped file pages) of
  ``ddpm train`` on a synthetic prepared dataset of each ``--rss-megabytes``, polled from
  ``/proc/PID/status`` every 20 ms: it should not grow with the dataset (by default 100 MB against
  4 GB, 24 steps of 4 images; the 4 GB dataset needs that much free space in the temporary folder).
* ``train``: images/s of one training step (forward, MSE, backward, Adam) of the ``mnist``
  preset's U-Net at the same size with 3 channels, on this CPU, as the figure reading must beat
  by far (the ratio column: read / train).

    .venv/bin/python benchmarks/prepared_data.py                  # all four, a few minutes
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
    from ddpm.data.prepare import prepare_dataset

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

    from ddpm.pixels import to_tensor

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

    if steps > 1:
        step()                                                # warm-up, unless one step is all there is time for
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def write_synthetic_prepared(folder: Path, num_images: int, size: int) -> None:
    """A prepared dataset of ``num_images`` grey ``size`` x ``size`` images of cheap pseudo-random pixels."""
    from numpy.lib.format import open_memmap

    from ddpm.data import prepare, prepared

    folder.mkdir(parents=True)
    images = open_memmap(folder / prepared.IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(num_images, size, size, 1))
    tile = np.random.default_rng(0).integers(0, 256, (4096, size, size, 1), dtype=np.uint8)
    for start in range(0, num_images, len(tile)):
        chunk = images[start:start + len(tile)]
        chunk[:] = tile[:len(chunk)] ^ np.uint8(start // len(tile) % 256)     # no two chunks alike
    images.flush()
    del images
    prepare._write_description(folder, None, {"data": "synthetic", "root": None, "split": None}, None, 0)


def peak_rss_anon(command: list[str]) -> tuple[int, float]:
    """Peak RssAnon (bytes) of a subprocess, polled from /proc every 20 ms, and its wall time."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {proc.returncode}")
    return peak, time.perf_counter() - start


def bench_rss(work: Path, sizes_mb: list[int], steps: int, batch_size: int) -> list[tuple]:
    """Peak RssAnon of ``ddpm train`` (the mnist preset's shape at 64x64) on prepared datasets of each size."""
    import sys

    config = work / "rss.toml"
    config.write_text("[model]\nattention_resolutions = [16]\n")   # the mnist preset attends at a quarter of the side
    rows = []
    for megabytes in sizes_mb:
        num_images = megabytes * 1_000_000 // (64 * 64)
        folder = work / f"rss-{megabytes}"
        write_synthetic_prepared(folder, num_images, 64)
        command = [sys.executable, "-m", "ddpm", "train", "--data", str(folder), "--preset", "mnist",
                   "--config", str(config), "--steps", str(steps), "--batch-size", str(batch_size),
                   "--timesteps", "50", "--num-images", "1", "--sample-every", "0", "--checkpoint-every", "0",
                   "--quiet", "--out", str(work / f"run-{megabytes}")]
        peak, seconds = peak_rss_anon(command)
        rows.append((megabytes, num_images, peak, seconds))
        for file in folder.iterdir():
            file.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("prepare", "read", "rss"), help="one part (read includes train)")
    parser.add_argument("--jpegs", type=int, default=400, help="JPEGs to prepare")
    parser.add_argument("--prepare-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--read-sizes", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--read-megabytes", type=int, default=400, help="size of each synthetic read dataset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--read-seconds", type=float, default=5.0)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--train-batch-size", type=int, default=8, help="at 32x32; smaller at larger sizes")
    parser.add_argument("--rss-megabytes", type=int, nargs="+", default=[100, 4000],
                        help="sizes of the prepared datasets trained on for peak RssAnon")
    parser.add_argument("--rss-steps", type=int, default=24)
    parser.add_argument("--rss-batch-size", type=int, default=4)
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
                # The batch shrinks with the image (same pixels per step), so 256x256 ends in minutes.
                batch = max(1, args.train_batch_size * 32 * 32 // (size * size))
                train = bench_train(size, batch, args.train_steps if batch > 1 else 1)
                print(f"| {size}x{size} | {read:.0f} | {train:.3g} | {read / train:.0f}x |", flush=True)
        if args.only in (None, "rss"):
            print(f"\npeak RssAnon of ddpm train, mnist preset's shape at 64x64x1, {args.rss_steps} steps of "
                  f"{args.rss_batch_size}")
            print("| dataset | images | peak RssAnon | wall |\n|---|---|---|---|")
            for megabytes, num_images, peak, seconds in bench_rss(work, args.rss_megabytes, args.rss_steps,
                                                                  args.rss_batch_size):
                print(f"| {megabytes} MB | {num_images} | {peak / 2**20:.0f} MiB | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
