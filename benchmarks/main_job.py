"""The main job, measured: ``ddpm train`` with no arguments, then ``ddpm sample``.

Runs both commands exactly as a user would (subprocesses), times them, and scores the
samples with a classifier fitted on the real digits' train split: a recognisable digit
is one the classifier assigns to a class with high confidence. Real test images and
uniform noise are scored the same way, as the two ends of the scale.

    .venv/bin/python benchmarks/main_job.py                 # about 7 minutes on 2 CPU cores
    .venv/bin/python benchmarks/main_job.py --grid docs/images/digits-samples.png

Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def digits_classifier():
    """Logistic regression on the real digits train split (pixels scaled to [0, 1])."""
    from sklearn.linear_model import LogisticRegression

    from ddpm.data import load_dataset

    train = load_dataset("digits")
    x = train.images.reshape(train.num_images, -1) / 255.0
    return LogisticRegression(max_iter=2000, C=1.0).fit(x, train.labels)


def recognisability(classifier, images: np.ndarray) -> dict:
    """Mean top-class probability, the share above 0.8, and how many of the 10 classes occur."""
    p = classifier.predict_proba(images.reshape(len(images), -1) / 255.0)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    counts = np.bincount(pred, minlength=10)
    return {"mean_confidence": float(conf.mean()), "share_confident": float((conf > 0.8).mean()),
            "classes_present": int((counts > 0).sum()), "class_counts": counts.tolist()}


def ddpm_cli(*args: str) -> float:
    """Run ``python -m ddpm ARGS``; return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddpm", *args], check=True)
    return time.perf_counter() - start


def run(n_samples: int = 256, workdir: str | None = None, grid: str | None = None) -> dict:
    from ddpm.data import load_dataset

    work = Path(workdir or tempfile.mkdtemp(prefix="ddpm-main-job-"))
    run_dir, out = work / "run", work / "samples"
    train_s = ddpm_cli("train", "--out", str(run_dir))
    sample_s = ddpm_cli("sample", "--checkpoint", str(run_dir), "--num-images", str(n_samples),
                        "--batch-size", str(n_samples), "--out", str(out), "--quiet")
    samples = np.load(out / "samples.npz")["images"]
    clf = digits_classifier()
    test = load_dataset("digits", split="test").images
    noise = np.random.default_rng(0).integers(0, 256, test.shape).astype(np.uint8)
    result = {"train_s": train_s, "sample_s": sample_s, "n_samples": n_samples,
              "samples": recognisability(clf, samples), "real_test": recognisability(clf, test),
              "noise": recognisability(clf, noise), "run_dir": str(run_dir)}
    if grid:
        shutil.copyfile(run_dir / "samples.png", grid)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="samples to score (default 256)")
    parser.add_argument("--workdir", help="where the run goes (default: a new temporary folder)")
    parser.add_argument("--grid", help="copy the run's sample grid here")
    args = parser.parse_args()
    import torch

    r = run(args.n, args.workdir, args.grid)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"ddpm train (defaults): {r['train_s']:.0f} s wall, including its final 64-image grid")
    print(f"ddpm sample --n {r['n_samples']}: {r['sample_s']:.0f} s wall (the default sampler)")
    print("| images | mean confidence | share > 0.8 | classes present |")
    print("|---|---|---|---|")
    for name in ("samples", "real_test", "noise"):
        s = r[name]
        print(f"| {name} | {s['mean_confidence']:.3f} | {s['share_confident']:.3f} | {s['classes_present']}/10 |")
    print("class counts of the samples:", r["samples"]["class_counts"])


if __name__ == "__main__":
    main()
