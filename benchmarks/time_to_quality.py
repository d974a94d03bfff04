"""Time to quality on MNIST: the same CPU budget for ddpm, diffusers and denoising-diffusion-pytorch.

Each system trains on the 60,000 MNIST training digits for the same wall-clock budget (default 12
minutes) at batch 64 with 2 threads, then generates 1,000 images from its EMA weights with its
default fast sampler, in a subprocess of its own. All samples are scored the same way, with the
project's fast metric (Frechet distance of LeNet features against the 10,000 test digits, lower
is better), and shown side by side in one grid.

* ddpm: the ``mnist`` preset and its recipe, ``ddpm train --time-limit``, then the default sampler,
  with ddpm's defaults throughout, ``--precision auto`` included (what it resolved to is recorded
  in the row, from the run's ``config.json``).
* diffusers: ``UNet2DModel(block_out_channels=(32, 64, 128), layers_per_block=2)`` with attention in
  the middle level and 8 normalisation groups, ``DDPMScheduler`` defaults, Adam 2e-4, ``EMAModel``
  with warm-up; DDIM with 50 steps.
* denoising-diffusion-pytorch: ``Unet(dim=32, dim_mults=(1, 2, 4), channels=1)`` and its
  ``GaussianDiffusion`` defaults with ``sampling_timesteps=50`` (its DDIM), Adam 2e-4, ``ema_pytorch.EMA``.

denoising-diffusion-pytorch imports torchvision, which does not import beside the project's CPU
torch build, so it runs from a virtual environment of its own (``--ldp-python``), for example:

    python3 -m venv .bench/peers && .bench/peers/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        denoising-diffusion-pytorch==2.3.4
    .venv/bin/python benchmarks/time_to_quality.py --data-root ../shared/data/mnist \\
        --ldp-python .bench/peers/bin/python --out .bench/ttq          # about 55 minutes idle

``--minutes 0.5 --n 64`` gives a quick smoke run. Each system's figures are kept in the output folder
(``ours.json``, ...), and the table scores every system found there, so a later run adds a row:
``--systems ours --precision fp32`` measures ``ddpm train/sample --precision fp32`` as ``ours-fp32``,
``--systems ours --ours-steps 10000`` trains ddpm for 10,000 steps instead of the time budget
(the long-run reference, row ``ours-10000-steps``), and ``--ours-flags "--loss-weighting min-snr"
--ours-label min-snr`` measures a recipe candidate as row ``ours-min-snr``.
Results are recorded in benchmarks/RESULTS.md.
Neither peer is a dependency of the project.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


# --- MNIST without the project (the peers' processes cannot import it) -------------------------------

def read_idx_images(root: str) -> np.ndarray:
    import gzip

    for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"):
        path = Path(root) / name
        if path.exists():
            raw = (gzip.open if name.endswith(".gz") else open)(path, "rb").read()
            n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
            return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)
    raise SystemExit(f"no MNIST training images in {root}")


class Budget:
    """Wall-clock budget of the training loop, checked once per optimizer step."""

    def __init__(self, minutes: float):
        self.seconds, self.start = minutes * 60, time.perf_counter()

    def left(self) -> bool:
        return time.perf_counter() - self.start < self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def batches(images: np.ndarray, batch_size: int, seed: int):
    """Shuffled batches in [-1, 1], [B, 1, H, W], forever (drop-last at the end of each epoch)."""
    import torch

    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(images))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            x = torch.from_numpy(images[order[i:i + batch_size]]).float()[:, None] / 127.5 - 1.0
            yield x


# --- workers -------------------------------------------------------------------------------------

def worker_diffusers(args) -> dict:
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    images = read_idx_images(args.data_root)
    model = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 128),
                        layers_per_block=2, norm_num_groups=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler()
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    budget, steps, data = Budget(args.minutes), 0, batches(images, args.batch_size, args.seed)
    while budget.left():
        x0 = next(data)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],))
        loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.step(model.parameters())
        steps += 1
    train_seconds = budget.elapsed()
    ema.copy_to(model.parameters())
    model.eval()
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(args.steps)
    generator = torch.Generator().manual_seed(args.seed + 1)
    start, out = time.perf_counter(), []
    with torch.inference_mode():
        for i in range(0, args.n, args.sample_batch):
            x = torch.randn(min(args.sample_batch, args.n - i), 1, 28, 28, generator=generator)
            for t in ddim.timesteps:
                x = ddim.step(model(x, t).sample, t, x).prev_sample
            out.append(x)
    return finish(args, torch.cat(out), steps, train_seconds, time.perf_counter() - start, float(loss))


def worker_ldp(args) -> dict:
    import torch
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(args.seed)
    images = read_idx_images(args.data_root)
    model = Unet(dim=32, dim_mults=(1, 2, 4), channels=1)
    diffusion = GaussianDiffusion(model, image_size=28, sampling_timesteps=args.steps)
    ema = EMA(diffusion, beta=0.9999, update_every=1)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=2e-4)
    budget, steps, data = Budget(args.minutes), 0, batches(images, args.batch_size, args.seed)
    while budget.left():
        loss = diffusion((next(data) + 1) / 2)          # it takes images in [0, 1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update()
        steps += 1
    train_seconds = budget.elapsed()
    ema.ema_model.eval()
    torch.manual_seed(args.seed + 1)
    start, out = time.perf_counter(), []
    with torch.inference_mode():
        for i in range(0, args.n, args.sample_batch):
            out.append(ema.ema_model.sample(batch_size=min(args.sample_batch, args.n - i)) * 2 - 1)
    return finish(args, torch.cat(out), steps, train_seconds, time.perf_counter() - start, float(loss))


def finish(args, x, steps: int, train_seconds: float, sample_seconds: float, loss: float) -> dict:
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(dtype=__import__("torch").uint8)
    images = images.permute(0, 2, 3, 1).numpy()
    np.save(Path(args.out) / f"{args.system}.npy", images)
    return {"system": args.system, "optimizer_steps": steps, "train_seconds": train_seconds,
            "images_per_s": steps * args.batch_size / train_seconds, "final_loss": loss,
            "sample_seconds": sample_seconds, "n": len(images)}


def run_ours(args) -> dict:
    """``ddpm train`` and ``ddpm sample`` exactly as a user runs them (with ``--precision``)."""
    out = Path(args.out)
    name = "ours" if args.precision == "auto" else f"ours-{args.precision}"
    if args.ours_steps:
        name += f"-{args.ours_steps}-steps"
    if args.ours_label:
        name += f"-{args.ours_label}"
    budget = (["--steps", str(args.ours_steps)] if args.ours_steps
              else ["--steps", "1000000", "--time-limit", str(args.minutes)])
    run = out / f"{name}-run"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    ddpm = [sys.executable, "-m", "ddpm"]
    start = time.perf_counter()
    subprocess.run([*ddpm, "train", "--data", "mnist", "--data-root", args.data_root, "--preset", "mnist",
                    "--batch-size", str(args.batch_size), *budget, "--checkpoint-every", "0", "--seed", str(args.seed), "--num-images", "16",
                    "--precision", args.precision, *shlex.split(args.ours_flags), "--out", str(run)], check=True, env=env)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    steps = rows[-1]["step"]
    start = time.perf_counter()
    subprocess.run([*ddpm, "sample", "--checkpoint", str(run), "--num-images", str(args.n), "--seed", str(args.seed + 1),
                    "--batch-size", str(args.sample_batch), "--precision", args.precision, "--out",
                    str(out / f"{name}-samples")], check=True, env=env)
    sample_seconds = time.perf_counter() - start
    images = np.load(out / f"{name}-samples" / "samples.npz")["images"]
    np.save(out / f"{name}.npy", images)
    precision = json.loads((run / "config.json").read_text())["train"]["precision"]
    return {"system": name, "precision": precision, "optimizer_steps": steps, "train_seconds": wall,
            "images_per_s": steps * args.batch_size / wall, "final_loss": rows[-1]["loss"],
            "sample_seconds": sample_seconds, "n": len(images)}


# --- driver ----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # stopped: unwind, so subprocess.run stops its child
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--minutes", type=float, default=12.0, help="training budget per system")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=1000, help="images generated and scored per system")
    parser.add_argument("--steps", type=int, default=50, help="the peers' DDIM steps")
    parser.add_argument("--sample-batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", nargs="+", choices=("ours", "diffusers", "ldp"),
                        default=["ours", "diffusers", "ldp"])
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="ours only: ddpm train/sample --precision (default auto, ddpm's default; a forced "
                             "one is the row ours-fp32 or ours-bf16)")
    parser.add_argument("--ours-steps", type=int, help="ours only: train this many steps instead of --minutes "
                                                       "(the 10,000-step reference)")
    parser.add_argument("--ours-flags", default="", help="ours only: more `ddpm train` options, e.g. a recipe "
                                                          "candidate: \"--loss-weighting min-snr\" (needs --ours-label)")
    parser.add_argument("--ours-label", help="ours only: the row's name is ours-LABEL")
    parser.add_argument("--ldp-python", help="python of a virtual environment with denoising-diffusion-pytorch")
    parser.add_argument("--out", default=".bench/ttq")
    parser.add_argument("--worker", choices=("diffusers", "ldp"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ours_flags and not args.ours_label:
        parser.error("--ours-flags needs --ours-label, so that the row is not taken for the defaults")
    Path(args.out).mkdir(parents=True, exist_ok=True)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        args.system = args.worker
        print(json.dumps((worker_diffusers if args.worker == "diffusers" else worker_ldp)(args)))
        return

    for system in args.systems:
        print(f"--- {system}: training for {args.minutes} minutes", file=sys.stderr, flush=True)
        if system == "ours":
            result = run_ours(args)
            (Path(args.out) / f"{result['system']}.json").write_text(json.dumps(result))
            continue
        python = args.ldp_python if system == "ldp" else sys.executable
        if python is None:
            print("    skipped: no --ldp-python", file=sys.stderr)
            continue
        cmd = [python, str(HERE), "--worker", system, *(sys.argv[1:] if argv is None else argv)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        (Path(args.out) / f"{system}.json").write_text(proc.stdout.strip().splitlines()[-1])

    # Every system measured in this folder so far, this run's and earlier runs' (e.g. a later bf16 row).
    labels = {"ours": "ddpm", "ours-bf16": "ddpm (bf16)", "diffusers": "diffusers",   # as the figure names them
              "ldp": "denoising-diffusion-pytorch"}
    ours = sorted(p.stem for p in Path(args.out).glob("ours*.json"))
    results = [json.loads((Path(args.out) / f"{name}.json").read_text()) for name in (*ours, "diffusers", "ldp")
               if (Path(args.out) / f"{name}.json").is_file()]
    from ddpm.evaluation import fast_metric, fast_reference
    from ddpm.images import make_grid, save_png, side_by_side

    reference = fast_reference("mnist", data_root=args.data_root)
    grids, names = [], []
    for r in results:
        images = np.load(Path(args.out) / f"{r['system']}.npy")
        r.update(fast_metric(images, reference))
        grids.append(make_grid(images[:64], nrow=8))
        names.append(labels.get(r["system"], r["system"].replace("ours", "ddpm", 1)))
    save_png(Path(args.out) / "grids.png", side_by_side(grids, names))
    print(f"{'system':<22} {'steps':>7} {'img/s':>7} {'train s':>8} {'sample s':>9} {'fast FID':>9} {'fast KID':>9}")
    for r in results:
        print(f"{r['system'] + (' ' + r['precision'] if 'precision' in r else ''):<22} {r['optimizer_steps']:>7} {r['images_per_s']:7.1f} {r['train_seconds']:8.0f} "
              f"{r['sample_seconds']:9.0f} {r['fast_fid']:9.2f} {r['fast_kid']:9.4f}")
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
