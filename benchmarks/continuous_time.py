"""The continuous-time layer on MNIST: sigma samplers and spacings, EDM training, the exact likelihood.

    .venv/bin/python benchmarks/continuous_time.py --checkpoint runs/NNN --data-root ../shared/data/mnist \\
        --out .bench/continuous                 # (a), (b) and (c) on a quiet machine: a few hours
    .venv/bin/python benchmarks/continuous_time.py --data-root ../shared/data/mnist --quick --out /tmp/ct
                                                # a smoke run of every part, under 2 minutes

(a) Quality against network evaluations (NFE): every sampler (``ddpm.samplers.SAMPLERS``) with every
    spacing (``SPACING_CHOICES``) on one trained ``mnist`` checkpoint at NFE 10, 20, 35, 50, 100, and
    every sampler at 1000 (its default spacing; the best of them is the reference). ``--samplers``,
    ``--spacings`` and ``--reference-samplers`` take a part of that grid (to split it over processes);
    ``continuous_time.py --merge OUT1/results.json OUT2/results.json ...`` prints the parts as one table. Heun takes
    (NFE + 1) / 2 steps (two evaluations a step but the last), the others NFE steps. The same
    ``--n`` images (per-image seeds: image k from ``derive_seed(0, k)``) in every row, scored with
    the fast metric (LeNet FID/KID against the test split); NFE is counted at the network. ``--seed S`` draws
    other images for the same rows (image k from ``derive_seed(S, k)``): how far a row's score moves with the
    draw; ``--merge`` lists those rows apart from the seed-0 grid.
(b) EDM against the current ``mnist`` recipe at equal CPU time: ``ddpm train --preset mnist --batch-size 64
    --time-limit MINUTES`` (12 by default, batch 64 as benchmarks/time_to_quality.py) with and without
    ``--formulation edm``, both at once, each in its own process with ``--threads`` threads (1 on a 2-core
    machine: each run has one core for the budget), each then scored with its best sampler at <= 35 NFE.
(c) ``bpd-ode`` (the probability-flow ODE's NLL, rk45) against ``bpd`` (the variational bound) on the
    checkpoint of (a), on the same ``--bpd-n`` test images.

Prints markdown tables and writes them, with every row as JSON, into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path


from ddpm.data import load_dataset
from ddpm.evaluation import fast_metric, fast_reference
from ddpm.evaluation.likelihood import evaluate_bpd
from ddpm.evaluation.ode_likelihood import evaluate_bpd_ode
from ddpm.evaluation.reference import subset_indices
from ddpm.device import select_device
from ddpm.generate import generate, load_diffusion
from ddpm.samplers import SAMPLERS, SPACING_CHOICES, SamplingOptions

sys.path.insert(0, str(Path(__file__).parent))
from side_by_side import run_lanes  # noqa: E402

NFES = (10, 20, 35, 50, 100)
REFERENCE_NFE = 1000
# (b): the candidates at <= 35 NFE of each formulation (sampler, steps, spacing).
DDPM_CANDIDATES = (("ddpm", 35, "trailing"), ("ddim", 35, "trailing"), ("dpm-solver++", 20, "trailing"),
                   ("dpm-solver++", 35, "karras"), ("heun", 18, "karras"), ("dpm-solver++-sde", 35, "karras"))
EDM_CANDIDATES = (("heun", 18, "karras"), ("euler", 35, "karras"), ("euler-ancestral", 35, "karras"),
                  ("dpm-solver++-sde", 35, "karras"))


def steps_for(sampler: str, nfe: int) -> int:
    """Sampler steps giving ``nfe`` network evaluations: Heun's last step is an Euler step (2 K - 1)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def score(diffusion, reference, sampling: SamplingOptions, n: int, batch_size: int, seed: int = 0) -> dict:
    """The fast metric of ``n`` images (image k's own noise from ``seed``), the NFE counted at the network, seconds."""
    calls = [0]
    hook = diffusion.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    start = time.perf_counter()
    try:
        images = generate(diffusion, n, batch_size=batch_size, seed=seed, progress=False, sampling=sampling)
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    return {"sampler": sampling.sampler, "steps": sampling.steps, "spacing": sampling.spacing, "seed": seed,
            "nfe": calls[0] // math.ceil(n / batch_size), **fast_metric(images, reference), "seconds": seconds}


def row(r: dict) -> str:
    return (f"| {r['sampler']} | {r['spacing']} | {r['steps']} | {r['nfe']} | {r['fast_fid']:.2f} | "
            f"{r['fast_kid']:.4f} | {r['seconds']:.1f} |")


HEADER = "| sampler | spacing | steps | NFE | fast FID | fast KID | seconds |\n|---|---|---|---|---|---|---|"


def part_a(diffusion, reference, args) -> list[dict]:
    """Every sampler x spacing at each NFE, then every sampler at the reference NFE."""
    print("\n(a) quality against NFE\n" + HEADER, flush=True)
    rows = []
    for nfe in args.nfes:
        for sampler in args.samplers:
            for spacing in args.spacings:
                steps = steps_for(sampler, nfe)
                if steps > diffusion.timesteps:
                    continue
                rows.append(score(diffusion, reference, SamplingOptions(sampler=sampler, steps=steps, spacing=spacing),
                                  args.n, args.batch_size, args.seed))
                print(row(rows[-1]), flush=True)
    reference_rows = [score(diffusion, reference, SamplingOptions(sampler=s, steps=min(steps_for(s, args.reference_nfe),
                                                                                       diffusion.timesteps)),
                            args.n, args.batch_size, args.seed) for s in args.reference_samplers]
    for r in reference_rows:
        print(row(r), flush=True)
    if reference_rows:
        best = min(reference_rows, key=lambda r: r["fast_fid"])
        print(f"best at NFE {best['nfe']}: {best['sampler']} ({best['fast_fid']:.2f})")
    return rows + [{**r, "reference": True} for r in reference_rows]


def merge_a(paths: list[str]) -> str:
    """(a)'s rows from the results.json of processes that split the grid: one table per measure (fast FID and
    fast KID, by sampler and spacing against NFE; the reference rows apart), and the <= 20 NFE target's verdict."""
    everything = [r for path in paths for r in json.loads(Path(path).read_text()).get("a", [])]
    rows = [r for r in everything if not r.get("seed")]
    grid = [r for r in rows if not r.get("reference")]
    column = {r["nfe"]: min([k for k in NFES if k >= r["nfe"]] or [r["nfe"]]) for r in grid}   # Heun: 2 K - 1
    nfes = sorted(set(column.values()))
    lines = []
    for measure in ("fast_fid", "fast_kid"):
        lines += [f"\n{measure}\n", "| sampler | spacing | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                  "|---|---|" + "---|" * len(nfes)]
        for sampler in SAMPLERS:
            for spacing in SPACING_CHOICES:
                cells = {column[r["nfe"]]: r[measure] for r in grid if (r["sampler"], r["spacing"]) == (sampler, spacing)}
                if cells:
                    lines.append(f"| {sampler} | {spacing} | " + " | ".join(f"{cells[k]:.2f}" if k in cells else ""
                                                                         for k in nfes) + " |")
    for r in rows:
        if r.get("reference"):
            lines.append(f"\nreference: {r['sampler']} ({r['spacing']}) at NFE {r['nfe']}: fast FID {r['fast_fid']:.2f}, "
                         f"fast KID {r['fast_kid']:.2f}")
    reseeded = [r for r in everything if r.get("seed")]
    for r in sorted(reseeded, key=lambda r: (r["sampler"], r["spacing"], r["nfe"], r["seed"])):
        lines.append(f"\nseed {r['seed']}: {r['sampler']} ({r['spacing']}) at NFE {r['nfe']}: fast FID "
                     f"{r['fast_fid']:.2f}, fast KID {r['fast_kid']:.2f}")
    draws: dict = {}
    for r in everything:
        draws.setdefault((r["sampler"], r["spacing"], r["nfe"]), []).append(r["fast_fid"])
    for (sampler, spacing, nfe), fids in draws.items():
        if len(fids) > 1:     # the spread of one row over its image draws: how far apart two rows may land by chance
            mean = sum(fids) / len(fids)
            sd = math.sqrt(sum((f - mean) ** 2 for f in fids) / (len(fids) - 1))
            lines.append(f"\n{sampler} ({spacing}) at NFE {nfe} over {len(fids)} draws of images: fast FID "
                         f"{mean:.2f} +- {sd:.2f} (sd; {min(fids):.2f} to {max(fids):.2f})")
    best = min(rows, key=lambda r: r["fast_fid"])
    low = min((r for r in grid if r["nfe"] <= 20), key=lambda r: r["fast_fid"])
    lines.append(f"\nbest at any NFE: {best['sampler']} {best['spacing']} NFE {best['nfe']}: {best['fast_fid']:.2f}; "
                 f"best at <= 20 NFE: {low['sampler']} {low['spacing']} NFE {low['nfe']}: {low['fast_fid']:.2f} "
                 f"({100 * (low['fast_fid'] / best['fast_fid'] - 1):+.1f}%; target: within +10%)")
    return "\n".join(lines)


def train_command(args, out: Path, name: str, flags: list[str]) -> tuple[list[str], Path]:
    """``ddpm train`` for the time budget, as a user runs it (the command and its run directory)."""
    run = out / f"{name}-run"
    return [sys.executable, "-m", "ddpm", "train", "--data", "mnist", "--data-root", args.data_root,
            "--preset", "mnist", "--batch-size", "64", "--steps", "1000000", "--time-limit", str(args.minutes),
            "--checkpoint-every", "0", "--seed", "0", "--num-images", "1" if args.quick else "16", "--quiet", *flags,
            *args.model_flags.split(), "--out", str(run)], run


def train_runs(args, out: Path, runs: dict[str, list[str]]) -> dict[str, Path]:
    """Every run of ``runs`` (name: flags) at once, each in a process of its own with ``--threads`` threads
    (``--sequential``: one after another); see side_by_side.py for when each is fair."""
    started = {name: train_command(args, out, name, flags) for name, flags in runs.items()}
    commands = [command for command, _ in started.values()]
    run_lanes(*([commands] if args.sequential else [[command] for command in commands]), threads=args.threads)
    return {name: run for name, (_, run) in started.items()}


def part_b(args, out: Path, reference) -> list[dict]:
    """EDM against the mnist recipe at equal training time, each with its best sampler at <= 35 NFE."""
    print(f"\n(b) EDM against the mnist recipe, {args.minutes} minutes each\n"
          "| formulation | optimizer steps | " + HEADER.splitlines()[0][2:] + "\n|---|---|" + HEADER.splitlines()[1][1:])
    results = []
    runs = train_runs(args, out, {"ddpm": args.ddpm_flags.split(), "edm": ["--formulation", "edm"]})
    for name, candidates in (("ddpm", DDPM_CANDIDATES), ("edm", EDM_CANDIDATES)):
        diffusion, meta = load_diffusion(runs[name], device=select_device(args.device))
        tried = [score(diffusion, reference, SamplingOptions(sampler=s, steps=min(k, args.max_steps), spacing=sp),
                       args.n, args.batch_size) for s, k, sp in candidates]
        best = min(tried, key=lambda r: r["fast_fid"])
        results.append({"formulation": name, "optimizer_steps": meta["step"], "best": best, "tried": tried})
        print(f"| {name} | {meta['step']} " + row(best), flush=True)
    return results


def part_c(diffusion, args) -> dict:
    """bpd-ode (rk45) beside the bound, on the same test images."""
    test = load_dataset("mnist", data_root=args.data_root, split="test")
    images = test.images[subset_indices(test.num_images, args.bpd_n)]
    start = time.perf_counter()
    bound = evaluate_bpd(diffusion, images, batch_size=args.batch_size, seed=0, progress=False)
    bound_seconds, start = time.perf_counter() - start, time.perf_counter()
    ode = evaluate_bpd_ode(diffusion, images, probes=args.probes, solver=args.ode_solver, steps=args.ode_steps,
                           batch_size=args.batch_size, seed=0)
    ode_seconds = time.perf_counter() - start
    print(f"\n(c) likelihood on {len(images)} test images\n| measure | bits/dim | stderr | NFE | seconds |\n|---|---|---|---|---|\n"
          f"| bpd (bound, T = {diffusion.timesteps}) | {bound.bpd:.4f} | {bound.stderr:.4f} | {diffusion.timesteps} | "
          f"{bound_seconds:.1f} |\n| bpd-ode ({args.ode_solver}, {args.probes} probe(s)) | {ode['bpd_ode']:.4f} | "
          f"{ode['bpd_ode_stderr']:.4f} | {ode['bpd_ode_nfe']} | {ode_seconds:.1f} |")
    return {"bpd": bound.bpd, "bpd_stderr": bound.stderr, "bpd_seconds": bound_seconds, **ode,
            "bpd_ode_seconds": ode_seconds}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a trained mnist run for (a) and (c) (default: the ddpm run of (b))")
    parser.add_argument("--data-root", required=True, help="folder of the MNIST IDX files")
    parser.add_argument("--out", required=True, help="a folder for the runs and results.json")
    parser.add_argument("--parts", default="abc", help="which parts to run (default abc)")
    parser.add_argument("--n", type=int, default=1000, help="images per row (default 1000)")
    parser.add_argument("--nfes", default=",".join(map(str, NFES)), help="comma-separated NFEs of (a)")
    parser.add_argument("--reference-nfe", type=int, default=REFERENCE_NFE)
    parser.add_argument("--seed", type=int, default=0,
                        help="(a)'s images: image k from derive_seed(SEED, k) (default 0, the grid's)")
    parser.add_argument("--samplers", nargs="*", choices=list(SAMPLERS), default=list(SAMPLERS),
                        help="(a)'s samplers (default: every one); with --spacings and --reference-samplers, "
                             "(a) splits into processes that run side by side")
    parser.add_argument("--spacings", nargs="+", choices=SPACING_CHOICES, default=list(SPACING_CHOICES),
                        help="(a)'s spacings (default: every one)")
    parser.add_argument("--reference-samplers", nargs="*", choices=list(SAMPLERS), default=list(SAMPLERS),
                        help="the samplers run at --reference-nfe (default: every one; none: no reference rows)")
    parser.add_argument("--minutes", type=float, default=12.0, help="training budget of each run in (b)")
    parser.add_argument("--threads", type=int, default=1, help="threads of each training run of (b) (default 1)")
    parser.add_argument("--sequential", action="store_true",
                        help="(b): train the runs one after another, not side by side (one core free, the other "
                             "steadily busy)")
    parser.add_argument("--model-flags", default="", help="extra ddpm train flags for both runs of (b)")
    parser.add_argument("--ddpm-flags", default="", help="extra ddpm train flags for the ddpm run of (b) only")
    parser.add_argument("--bpd-n", type=int, default=100, help="test images for (c)")
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--ode-solver", default="rk45")
    parser.add_argument("--ode-steps", type=int)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a tiny model trained for 0.1 minutes, 8 images, NFE 4, reference NFE 8, "
                             "2 test images with rk4 in 2 steps")
    args = parser.parse_args()
    if args.quick:
        args.n, args.nfes, args.reference_nfe, args.minutes, args.bpd_n = 8, "4", 8, 0.1, 2
        args.ode_solver, args.ode_steps = "rk4", 2
        args.model_flags = args.model_flags or "--dim 8 --dim-mults 1 2 --num-res-blocks 1"
        args.ddpm_flags = args.ddpm_flags or "--timesteps 50"
    args.nfes = [int(k) for k in args.nfes.split(",")]
    args.max_steps = 4 if args.quick else 1000          # (b)'s candidates: at most this many steps
    return args


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # stopped: unwind, so the training runs stop too
    if sys.argv[1:2] == ["--merge"]:
        print(merge_a(sys.argv[2:]))
        return
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = fast_reference("mnist", data_root=args.data_root)
    results: dict = {"args": {k: v for k, v in vars(args).items()}}
    if "b" in args.parts:
        results["b"] = part_b(args, out, reference)
    checkpoint = args.checkpoint or (out / "ddpm-run" if (out / "ddpm-run").exists() else None)
    if checkpoint is None and set(args.parts) & {"a", "c"}:
        checkpoint = train_runs(args, out, {"ddpm": args.ddpm_flags.split()})["ddpm"]
    if set(args.parts) & {"a", "c"}:
        diffusion, meta = load_diffusion(checkpoint, device=select_device(args.device), precision="fp32")
        results["checkpoint"] = {"path": str(meta["path"]), "step": meta["step"]}
        if "a" in args.parts:
            results["a"] = part_a(diffusion, reference, args)
        if "c" in args.parts:
            results["c"] = part_c(diffusion, args)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
