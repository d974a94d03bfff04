"""Image-conditioned diffusion on the CPU: MNIST 4x super-resolution, RGB colorization, a two-stage cascade.

    .venv/bin/python benchmarks/image_conditioning.py --data-root ../shared/data/mnist --out OUT   # ~45 min, 2 cores
    .venv/bin/python benchmarks/image_conditioning.py --data-root DIR --out OUT --quick   # < 2 minutes

Training: every model is trained by ``ddpm train --time-limit`` (wall-clock minutes, ``--minutes``, 12 by
default) in a process of its own with one thread, two processes at a time (one per core of a 2-core machine),
so that models compared at equal CPU time train side by side and share whatever else the machine does:
first the single 28x28 model beside the cascade's two stages (half the budget each, one after the other),
then the super-resolution model beside the colorization model (half the budget).

1. MNIST 4x super-resolution (7x7 -> 28x28, ``ddpm train --task super-resolution --scale 4``):
   the LeNet accuracy (``ddpm.evaluation.classify``) on super-resolved test digits against bicubic
   upscaling and the originals, the consistency PSNR (area-downsampled output vs the 7x7 input), and
   the fast metric of each against the MNIST test set.
2. Colorization of 32x32 RGB crops of scikit-learn's two sample photos (``load_sample_images``): PSNR
   and SSIM against the grey baseline, and a labelled picture (condition / sample / target).
3. A cascade on MNIST (a 14x14 base model, then 2x super-resolution) against one 28x28 model trained
   for the same CPU time: the fast metric of each.

Prints markdown tables; every run directory and picture is written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ddpm.cli import main as ddpm
from ddpm.condition_job import condition_grid
from ddpm.conditions import given_condition, shown_condition
from ddpm.data import load_dataset
from ddpm.evaluation import classify, fast_metric, fast_reference
from ddpm.evaluation.conditioned import baseline_outputs, condition_scores, evaluate_conditioned
from ddpm.generate import generate, load_diffusion
from ddpm.images import save_png
from ddpm.pixels import to_tensor, to_uint8

sys.path.insert(0, str(Path(__file__).parent))
from side_by_side import run_lanes  # noqa: E402

PARTS = ("sr", "colorize", "cascade")
QUICK = dict(minutes=0.1, n=16, sample_steps=10, crops=64)
FULL = dict(minutes=12.0, n=1000, sample_steps=50, crops=2048)
MODEL = ["--dim", "32", "--dim-mults", "1", "2", "--attention-resolutions", "--batch-size", "64", "--lr", "1e-3",
         "--timesteps", "1000", "--num-images", "4", "--device", "cpu", "--quiet", "--checkpoint-every", "0"]


def train_command(out: Path, minutes: float, *args: str) -> list[str]:
    """``ddpm train`` for ``minutes`` of wall-clock time (--time-limit), at most 100,000 steps."""
    return [sys.executable, "-m", "ddpm", "train", *args, *MODEL, "--steps", "100000", "--time-limit", str(minutes),
            "--out", str(out)]


def training(out: Path, root: str, s: dict, parts: set[str]) -> None:
    """The models of ``parts``: the cascade's stages beside the single model, then super-resolution beside
    colorize. Colorize uses the ``mnist`` preset's recipe (its U-Net here is MODEL's, with 3 channels): the
    ``cifar10`` recipe's 5,000-step warm-up would keep the learning rate near zero for the whole budget."""
    half = s["minutes"] / 2
    mnist = ("--data", "mnist", "--data-root", root, "--preset", "mnist")
    if "cascade" in parts:
        run_lanes([train_command(out / "single28", s["minutes"], *mnist)],
                  [train_command(out / "base14", half, *mnist, "--image-size", "14"),
                   train_command(out / "sr2", half, "--task", "super-resolution", "--scale", "2", *mnist)])
    lanes = []
    if "sr" in parts:
        lanes.append([train_command(out / "sr4", s["minutes"], "--task", "super-resolution", "--scale", "4", *mnist)])
    if "colorize" in parts:
        np.savez(out / "crops.npz", images=photo_crops(s["crops"]))
        lanes.append([train_command(out / "colorize", half, "--task", "colorize", "--data", str(out / "crops.npz"),
                                    "--preset", "mnist", "--hflip")])
    if lanes:
        run_lanes(*lanes)


def super_resolution(out: Path, root: str, s: dict) -> None:
    diffusion, _ = load_diffusion(out / "sr4", device="cpu")
    test = load_dataset("mnist", data_root=root, split="test")
    targets, labels = test.images[:s["n"]], test.labels[:s["n"]]
    given = given_condition(diffusion.condition, to_tensor(targets))
    outputs = generate(diffusion, len(targets), seed=0, sampling=steps_sampling(s), progress=False,
                       conditions=given)
    bicubic = to_uint8(baseline_outputs(diffusion.condition, given, (28, 28), 1))
    scores = condition_scores(diffusion.condition, outputs, targets, given)
    scores.update({f"baseline_{k}": v for k, v in condition_scores(diffusion.condition, bicubic, targets,
                                                                    given).items()})
    reference = fast_reference("mnist", data_root=root)
    print("\n### MNIST 4x super-resolution (7x7 -> 28x28)\n")
    print("| images | LeNet accuracy | fast FID | PSNR | consistency PSNR |\n|---|---|---|---|---|")
    for name, images, prefix in (("super-resolved", outputs, ""), ("bicubic", bicubic, "baseline_"),
                                 ("originals", targets, None)):
        accuracy = float((classify(images).argmax(axis=1) == labels).mean())
        fid = fast_metric(images, reference)["fast_fid"]
        extra = ("-", "-") if prefix is None else (f"{scores[prefix + 'psnr']:.2f}",
                                                   f"{scores[prefix + 'consistency_psnr']:.2f}")
        print(f"| {name} | {accuracy:.3f} | {fid:.2f} | {extra[0]} | {extra[1]} |")
    save_png(out / "sr4.png", condition_grid(outputs[:8], to_uint8(shown_condition(diffusion.condition, given[:8],
                                                                                     (28, 28))), targets[:8], 1))


def steps_sampling(s: dict):
    from ddpm.generate import sampling_options

    return sampling_options(steps=s["sample_steps"])


def photo_crops(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``count`` random size x size crops of scikit-learn's two sample photos (halved first)."""
    from sklearn.datasets import load_sample_images         # an optional dependency of this benchmark only

    rng = np.random.default_rng(seed)
    photos = [np.asarray(photo[::2, ::2], np.uint8) for photo in load_sample_images().images]
    crops = []
    for k in range(count):
        photo = photos[k % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crops.append(photo[y:y + size, x:x + size])
    return np.stack(crops)


def colorize(out: Path, s: dict) -> None:
    held_out = photo_crops(16, seed=1)
    diffusion, _ = load_diffusion(out / "colorize", device="cpu")
    scores = evaluate_conditioned(diffusion, held_out, sampling=steps_sampling(s))
    print("\n### Colorization of 32x32 photo crops\n")
    print("| | PSNR | SSIM | consistency PSNR |\n|---|---|---|---|")
    for name, prefix in (("model", ""), ("grey (the condition)", "baseline_")):
        print(f"| {name} | {scores[prefix + 'psnr']:.2f} | {scores[prefix + 'ssim']:.3f} | "
              f"{scores[prefix + 'consistency_psnr']:.2f} |")
    given = given_condition(diffusion.condition, to_tensor(held_out[:8]))
    outputs = generate(diffusion, 8, sampling=steps_sampling(s), progress=False, conditions=given)
    shown = to_uint8(shown_condition(diffusion.condition, given, (32, 32)))
    save_png(out / "colorize.png", condition_grid(outputs, shown, held_out[:8], 1))
    print(f"\npicture: {out / 'colorize.png'}")


def cascade(out: Path, root: str, s: dict) -> None:
    half = s["minutes"] / 2
    base, sr, single = out / "base14", out / "sr2", out / "single28"
    steps = ["--steps", str(s["sample_steps"]), "--device", "cpu", "--quiet", "--num-images", str(s["n"])]
    assert ddpm(["sample", "--checkpoint", str(base), "--then", str(sr), *steps, "--out", str(out / "cascade")]) == 0
    assert ddpm(["sample", "--checkpoint", str(single), *steps, "--out", str(out / "single")]) == 0
    reference = fast_reference("mnist", data_root=root)
    print(f"\n### Cascade (14x14 base + 2x SR, {half:g} + {half:g} CPU-minutes) vs one 28x28 model "
          f"({s['minutes']:g} CPU-minutes)\n")
    print("| model | fast FID |\n|---|---|")
    for name, folder in (("cascade", "cascade"), ("single 28x28", "single")):
        images = np.load(out / folder / "samples.npz")["images"]
        print(f"| {name} | {fast_metric(images, reference)['fast_fid']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="the MNIST IDX folder")
    parser.add_argument("--out", required=True, help="a new directory for the runs and pictures")
    parser.add_argument("--quick", action="store_true", help="seconds of training per model: checks it runs (< 2 min)")
    parser.add_argument("--minutes", type=float, help="the training budget of the single and 4x models (default 12)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="which parts (default all)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # stopped: unwind, so the training runs stop too
    settings = dict(QUICK if args.quick else FULL)
    if args.minutes is not None:
        settings["minutes"] = args.minutes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    start = time.perf_counter()
    training(out, args.data_root, settings, set(args.parts))
    print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
    if "sr" in args.parts:
        super_resolution(out, args.data_root, settings)
    if "colorize" in args.parts:
        colorize(out, settings)
    if "cascade" in args.parts:
        cascade(out, args.data_root, settings)
    (out / "settings.json").write_text(json.dumps(settings))
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
