"""Progressive distillation, measured: quality against sampling steps for a teacher and its students.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distillation.py --teacher runs/digits-v --out /tmp/distill \\
        --teacher-steps 64 --rounds 4 --steps-per-round 500
    .venv/bin/python benchmarks/distillation.py --teacher RUN --out DIR --data-root ../shared/data/mnist ...

1. The teacher with each sampler (ancestral ``ddpm``, ``ddim`` with eta = 0, ``dpm-solver++``) at the
   step counts of the students and at its own starting count.
2. ``ddpm.distill.distill`` for ``--rounds`` rounds from ``--teacher-steps`` (timed per round), unless
   ``--out`` already holds a finished run (then only the evaluation is redone).
3. Each round's student with its own default sampler (DDIM over its N steps, no flags).

Every configuration generates the same ``--n`` images (per-image seeds) and is scored with the
project's fast metric (LeNet FID against the test split of the teacher's dataset); on the 8x8
digits also with the share of samples a logistic regression fitted on the real digits classifies
with confidence above 0.8 (as benchmarks/main_job.py; the LeNet is weak on 8x8 digits). Prints a
markdown table and writes ``--out/results.json``. Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ddpm.checkpoint import list_checkpoints
from ddpm.config import TrainConfig
from ddpm.distill import PLAN_FILE, DistillConfig, distill, load_teacher_config
from ddpm.evaluation import fast_metric, fast_reference
from ddpm.device import select_device
from ddpm.generate import generate, load_diffusion
from ddpm.images import make_grid, save_png

sys.path.insert(0, str(Path(__file__).parent))
from main_job import digits_classifier, recognisability  # noqa: E402

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint or run directory")
    parser.add_argument("--out", required=True, help="distillation run directory (reused when finished)")
    parser.add_argument("--teacher-steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the teacher's")
    parser.add_argument("--lr", type=float, default=None, help="default: the teacher's")
    parser.add_argument("--data-root", help="folder of the teacher's dataset files (mnist, fashion-mnist)")
    parser.add_argument("--n", type=int, default=500, help="images per configuration (default 500)")
    parser.add_argument("--teacher-samplers", default=",".join(SAMPLERS))
    parser.add_argument("--also-steps", default="64", help="more teacher step counts, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grids", help="write 64-image grids of the teacher and of each student into this folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = select_device(args.device)
    out = Path(args.out)
    teacher_path, teacher_config = load_teacher_config(args.teacher)
    data = teacher_config.data
    if args.data_root:
        from dataclasses import replace

        data = replace(data, root=args.data_root)
    reference = fast_reference(data.name, data_root=data.root, image_size=data.image_size, channels=data.channels)
    classifier = digits_classifier() if data.name == "digits" else None
    config = DistillConfig(teacher=str(teacher_path.resolve()), rounds=args.rounds, teacher_steps=args.teacher_steps)
    student_steps = [config.student_steps(r) for r in range(1, args.rounds + 1)]
    print(f"teacher {teacher_path} ({teacher_config.diffusion.objective} objective, T = "
          f"{teacher_config.diffusion.timesteps}), dataset {data.name}, {args.n} images per row, device {device} "
          f"({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})", flush=True)

    rows: list[dict] = []

    def score(label: str, sampler_name: str, steps: int, diffusion, grid_name: str | None = None,
              options: dict | None = None) -> None:
        start = time.perf_counter()
        images = generate(diffusion, args.n, batch_size=250, seed=0, progress=False, **(options or {}))
        row = {"model": label, "sampler": sampler_name, "steps": steps, "sampling_s": time.perf_counter() - start,
               **fast_metric(images, reference)}
        if classifier is not None:
            row["share_confident"] = recognisability(classifier, images)["share_confident"]
        rows.append(row)
        conf = f" | {row['share_confident']:.2f}" if classifier is not None else ""
        print(f"| {label} | {sampler_name} | {steps} | {row['fast_fid']:.2f} | {row['fast_kid']:.4f}{conf} | "
              f"{row['sampling_s']:.1f} |", flush=True)
        if args.grids and grid_name:
            save_png(Path(args.grids) / f"{grid_name}.png", make_grid(images[:64]))

    print("| model | sampler | steps | fast FID | fast KID |" + (" confident |" if classifier else "") + " sampling s |")
    print("|---|---|---|---|---|" + ("---|" if classifier else "") + "---|")

    # 1. The teacher with every sampler.
    teacher, _ = load_diffusion(teacher_path, device=device)
    for sampler in args.teacher_samplers.split(","):
        extra = [int(k) for k in args.also_steps.split(",") if k]
        for steps in sorted({*student_steps, args.teacher_steps, *extra}):
            score("teacher", sampler, steps, teacher, f"teacher-{sampler}-{steps}" if steps in (4, 8) else None,
                  {"sampler": sampler, "steps": steps})

    # 2. Distillation (skipped when --out holds a finished run of the same plan).
    last = out / f"round-{args.rounds:02d}"
    finished = (out / PLAN_FILE).is_file() and list_checkpoints(last) and (last / "samples.png").is_file()
    round_seconds = []
    if not finished:
        from dataclasses import replace

        train = replace(teacher_config.train, steps=args.steps_per_round, warmup_steps=0, init=None, eval_every=0,
                        milestone_every=0, sample_every=0, checkpoint_every=args.steps_per_round, device=str(device),
                        **{k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None})
        assert isinstance(train, TrainConfig)
        resume = (out / PLAN_FILE).is_file()           # a run stopped part-way: continue it
        result = distill(config, train, out, data=data, resume=resume, progress=True)
        round_seconds = [r.seconds for r in result.rounds]
        print(f"distillation: {result.seconds:.0f} s in all, per round {[round(s) for s in round_seconds]}", flush=True)
    else:
        print(f"{out} holds a finished run: evaluating it only", flush=True)

    # 3. Each student with its own defaults.
    for r, steps in enumerate(student_steps, start=1):
        student, _ = load_diffusion(out / f"round-{r:02d}", device=device)
        assert student.default_sampling.steps == steps
        score(f"student round {r}", "ddim (its default)", steps, student, f"student-{steps}")

    (out / "results.json").write_text(json.dumps({"rows": rows, "round_seconds": round_seconds,
                                                  "plan": vars(args)}, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
