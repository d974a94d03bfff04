"""Post-hoc EMA lengths against the default EMA, what the snapshots cost, and the learning-rate schedules,
on MNIST with the ``mnist`` recipe.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/posthoc_ema.py --data-root ../shared/data/mnist \\
        --out-dir /tmp/posthoc --json /tmp/posthoc/results.json
    .venv/bin/python benchmarks/posthoc_ema.py --data-root ../shared/data/mnist --out-dir /tmp/q --quick

1. One run of the ``mnist`` recipe with ``--ema-snapshot-every`` (EDM2's two profiles, sigma_rel
   0.05 and 0.10). After the same training, the fast metric (LeNet FID against the MNIST test split)
   of the default EMA (decay 0.9999 with warm-up, the recipe's) and of each post-hoc length
   rebuilt by ``ddpm ema`` (``ddpm.posthoc_ema_job.sweep``), all sampled alike: DPM-Solver++ in 25
   steps, the evaluation seed, ``--n`` images.
2. The snapshots' cost: their bytes on disk (against one checkpoint's), the time of one profile
   update and of one snapshot save, against the measured time of a training step.
3. The learning-rate schedules (constant, cosine, linear, inverse-sqrt) of the ``mnist`` recipe at a
   fixed CPU budget (``--minutes``, default 12): the step count that budget allows is measured from
   run 1's step time (or, when part 1 does not run in this process, from a 30-step probe run, or
   given as ``--budget-steps``), each schedule trains that many steps, and its EMA is scored as above.

``--parts`` picks parts (default ``123``). On 2 cores, parts ``12`` and ``3`` can run as two processes
side by side (one thread each): each schedule run then has one core, with the same neighbour throughout.
The long-run check of a schedule is ``--parts 3 --budget-steps 10000 --schedules constant cosine``
(hours on 2 CPU cores; minutes with ``--device cuda``). With ``--checkpoint-every K`` a schedule run that was
stopped (or killed) continues from its newest checkpoint when the same command runs again, bit for bit,
so a long check can span several sittings. ``--draws K`` scores each schedule's EMA on K draws of images and
gives their mean and sd: a draw of 1,000 images moved the fast FID of one 10,000-step model from 8.4 to 13.5
(RESULTS.md).

``--quick`` shrinks everything (a U-Net of width 8, T = 100, 20 steps and 8 per schedule, 32 images) to check the
script end to end in under two minutes; its figures mean nothing. Runs single-threaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ddpm.checkpoint import list_checkpoints
from ddpm.evaluation.training import TrainingEvaluator
from ddpm.generate import generate, load_diffusion
from ddpm.lr_schedules import LR_SCHEDULES
from ddpm.posthoc_ema import PowerEMA, list_snapshots, save_snapshot
from ddpm.posthoc_ema_job import sweep
from ddpm.resolve import resolve_train_config
from ddpm.seeding import derive_seed
from ddpm.train import train


def configure(args, out: Path, steps: int, **train_options):
    """The ``mnist`` recipe on MNIST (``--dim`` wide), ``steps`` steps, with ``train_options``."""
    flags = {"data": {"name": "mnist", "root": args.data_root},
             "model": {"dim": args.dim}, **({"diffusion": {"timesteps": 100}} if args.quick else {}),
             "train": {"steps": steps, "checkpoint_every": steps, "log_every": max(steps // 10, 1), "num_samples": 4,
                       "device": args.device, "precision": "fp32", **({"batch_size": args.batch_size} if args.batch_size else {}),
                       **({"warmup_steps": 2} if args.quick else {}), **train_options}}
    return resolve_train_config(flags, preset="mnist")


def score_ema(run_dir: Path, evaluator, n: int, device: str = "cpu", draw: int = 0) -> float:
    """The run's default EMA scored as ddpm.train_eval.evaluate and ddpm ema --sweep score theirs (draw 0);
    draw k > 0 scores other images of the same model, from their own seed."""
    diffusion, meta = load_diffusion(run_dir, device=device)
    seed = derive_seed(meta["run_config"].train.seed, 3, *([draw] if draw else []))
    images = generate(diffusion, n, batch_size=min(n, 256), seed=seed, progress=False, sampler="dpm-solver++", steps=25)
    return float(evaluator(images)[evaluator.headline])


def score_draws(run_dir: Path, evaluator, args) -> list[float]:
    """:func:`score_ema` of ``--draws`` draws (the first the evaluation seed's)."""
    return [score_ema(run_dir, evaluator, args.n, args.device, draw) for draw in range(args.draws)]


def mean_sd(values: list[float]) -> str:
    """``"12.31"`` for one value, ``"12.31 +- 0.84 (3 draws)"`` (sample sd) for several."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} ({len(values)} draws)"


def seconds_per_step(run_dir: Path, steps: int, *, setup: bool = True) -> float:
    """Training time per step from the metrics lines: the last one's over all steps (set-up included, the final
    sample grid not), or with ``setup=False`` between the first and the last line (a short probe's pace)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    if setup or len(rows) < 2:
        return rows[-1]["elapsed_s"] / steps
    return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])


def disk_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def snapshot_cost(run_dir: Path, seconds_per_step: float) -> dict:
    """Bytes of the snapshots against a checkpoint; one profile update and one save, timed."""
    diffusion, _ = load_diffusion(run_dir, weights="raw")
    model = diffusion.model.train()
    power = PowerEMA(model)
    start = time.perf_counter()
    for t in range(1, 21):
        power.update(model, t)
    update = (time.perf_counter() - start) / 20
    start = time.perf_counter()
    path = save_snapshot(run_dir / "timing", 1, power)
    save = time.perf_counter() - start
    snapshots = [p for _, p in list_snapshots(run_dir)]
    return {"snapshots": len(snapshots), "snapshot_bytes": disk_bytes(snapshots[:1]),
            "all_snapshots_bytes": disk_bytes(snapshots), "checkpoint_bytes": disk_bytes([list_checkpoints(run_dir)[-1][1]]),
            "update_s": update, "save_s": save, "step_s": seconds_per_step,
            "update_share_of_step": update / seconds_per_step, "timing_file_bytes": path.stat().st_size}


def plot_sweep(results: dict, path: Path) -> Path:
    """Fast FID against the post-hoc EMA length, the default EMA's as a line across: the picture of part 1."""
    from matplotlib.figure import Figure

    rows = results["posthoc"]
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([r["sigma_rel"] for r in rows], [r["fast_fid"] for r in rows], "o-", label="post-hoc EMA (rebuilt by ddpm ema)")
    ax.axhline(results["default_ema"]["fast_fid"], color="tab:red", linestyle="--",
               label=f"EMA decay {results['default_ema']['decay']:g} with warm-up (the recipe's)")
    ax.set(xlabel="sigma_rel (EMA length relative to the training steps)", ylabel="fast FID (LeNet; lower is better)",
           title=f"MNIST, mnist recipe, {results['steps']:,} steps: EMA length chosen after training "
                 f"({results['n']} images each)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def lr_schedules(args, out: Path, evaluator, step_s: float | None, save) -> dict:
    """Each schedule for the steps ``--minutes`` allow, its EMA scored; the step time probed when not known."""
    if args.budget_steps is None and step_s is None:
        probe = 4 if args.quick else 30
        config, data = configure(args, out, probe)
        train(config, out / "probe", data=data, progress=False)
        step_s = seconds_per_step(out / "probe", probe, setup=False)
    steps = args.budget_steps or max(int(60 * args.minutes / step_s), 8 if args.quick else 400)  # > the warm-up
    print(f"lr schedules: {steps} steps each ({args.minutes:g} CPU-minutes at "
          f"{'?' if step_s is None else f'{1e3 * step_s:.0f}'} ms a step)\n| schedule | fast FID (EMA) |\n|---|---|",
          flush=True)
    figures = {"minutes": args.minutes, "steps": steps, "step_s": step_s, "fast_fid": {}, "final_loss": {}}
    for name in args.schedules:
        every = {"checkpoint_every": args.checkpoint_every} if args.checkpoint_every else {}
        config, data = configure(args, out, steps, lr_schedule=name, **every)
        run = out / f"lr-{name}"
        result = train(config, run, data=data, progress=False, resume=bool(list_checkpoints(run)))
        draws = score_draws(run, evaluator, args)
        figures["fast_fid"][name] = statistics.mean(draws)
        figures.setdefault("fast_fid_draws", {})[name] = draws
        figures["final_loss"][name] = result.final_loss
        print(f"| {name} | {mean_sd(draws)} |", flush=True)
        save(figures)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="folder with the MNIST IDX files")
    parser.add_argument("--out-dir", help="run directories are written here (must not exist)")
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end check (< 2 minutes); figures meaningless")
    parser.add_argument("--steps", type=int, default=5000, help="steps of the post-hoc EMA run")
    parser.add_argument("--snapshot-every", type=int, default=250)
    parser.add_argument("--minutes", type=float, default=12.0, help="CPU budget of each lr-schedule run")
    parser.add_argument("--dim", type=int, default=32, help="U-Net base width (the mnist preset's: 32)")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's (64)")
    parser.add_argument("--n", type=int, default=1000, help="images per score")
    parser.add_argument("--parts", default="123", help="which parts to run (default 123)")
    parser.add_argument("--draws", type=int, default=1,
                        help="part 3: score each schedule's EMA on this many draws of --n images, the first "
                             "the evaluation seed's (default 1); the table gives the mean and sd")
    parser.add_argument("--budget-steps", type=int, help="steps of each lr-schedule run (default: from --minutes)")
    parser.add_argument("--checkpoint-every", type=int,
                        help="checkpoint each lr-schedule run every K steps (default: at its end only); a run "
                             "with a checkpoint continues from it")
    parser.add_argument("--schedules", nargs="+", choices=LR_SCHEDULES, default=list(LR_SCHEDULES),
                        help="part 3's schedules (default: every one)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: the 10,000-step check of part 3, "
                        "--parts 3 --budget-steps 10000 --schedules constant cosine, takes minutes on a GPU")
    parser.add_argument("--replot", metavar="PNG", help="only draw part 1's plot from --json's figures into PNG")
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=[0.025, 0.05, 0.075, 0.1, 0.15, 0.2])
    args = parser.parse_args()
    if args.quick:
        args.steps, args.snapshot_every, args.minutes, args.dim, args.batch_size, args.n = 20, 5, 0.01, 8, 16, 32
        args.sigma_rels = [0.05, 0.1]
    if args.replot:
        if not args.json:
            parser.error("--replot draws from --json's figures: give --json")
        print(plot_sweep(json.loads(Path(args.json).read_text()), Path(args.replot)))
        return
    if not (args.data_root and args.out_dir):
        parser.error("--data-root and --out-dir are required")
    if args.draws < 1:
        parser.error(f"--draws must be at least 1; got {args.draws}")
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=bool(args.checkpoint_every))     # a resumable run's folder may be there
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread", flush=True)

    evaluator = TrainingEvaluator.build("fast", "mnist", data_root=args.data_root, image_size=(28, 28), channels=1)
    results = {"quick": args.quick, "dim": args.dim, "n": args.n}
    step_s = None

    def save(lr_figures=None):    # after each part and each schedule: a stopped run keeps what it measured
        if lr_figures is not None:
            results["lr_schedules"] = lr_figures
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    if "1" in args.parts:   # the post-hoc EMA run, its default EMA and its rebuilt lengths
        config, data = configure(args, out, args.steps, ema_snapshot_every=args.snapshot_every)
        result = train(config, out / "posthoc", data=data, progress=False)
        step_s = seconds_per_step(out / "posthoc", args.steps)
        default = score_ema(out / "posthoc", evaluator, args.n, args.device)
        print(f"default EMA (decay {config.train.ema_decay}): fast FID {default:.2f}", flush=True)
        swept = sweep(out / "posthoc", args.sigma_rels, n=args.n, metric="fast", out_dir=out, device=args.device)
        results.update({"steps": args.steps, "batch_size": config.train.batch_size, "step_s": step_s,
                        "default_ema": {"decay": config.train.ema_decay, "fast_fid": default},
                        "posthoc": swept.rows, "final_loss": result.final_loss})
        save()
        print(f"plot: {plot_sweep(results, out / 'posthoc-ema.png')}")
    if "2" in args.parts:   # what the snapshots cost
        results["cost"] = cost = snapshot_cost(out / "posthoc", step_s or seconds_per_step(out / "posthoc", args.steps))
        print(f"snapshots: {cost['snapshots']} x {cost['snapshot_bytes'] / 1e6:.2f} MB (a checkpoint: "
              f"{cost['checkpoint_bytes'] / 1e6:.2f} MB); profile update {1e3 * cost['update_s']:.2f} ms "
              f"({100 * cost['update_share_of_step']:.1f}% of a {1e3 * cost['step_s']:.0f} ms step), "
              f"save {1e3 * cost['save_s']:.1f} ms", flush=True)
        save()
    if "3" in args.parts:   # the lr schedules at a fixed budget
        save(lr_schedules(args, out, evaluator, step_s, save))


if __name__ == "__main__":
    main()
