"""Make the figures of docs/guide.md with the `ddpm viz` commands, so the guide cannot go stale.

    python scripts/make_guide_figures.py --out docs/images/guide            # full: the 5-minute digits run
    python scripts/make_guide_figures.py --out docs/images/guide --steps 600  # medium: a shorter digits run
    python scripts/make_guide_figures.py --out docs/images/guide --run runs/001  # figures of an existing run
    python scripts/make_guide_figures.py --quick --out /tmp/guide            # seconds: a few steps (CI)

It trains a digits model (the main job's recipe, `ddpm train` with its defaults, plus a sample grid
every fifth of the run) in a temporary run directory unless --run names one, then writes
schedule.png, forward.png, reverse.png and training.png into --out. --quick trains a tiny model for
4 steps with T = 50: the pictures are noise, but every command of the guide runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ddpm.cli import main as ddpm

FIGURES = ("schedule.png", "forward.png", "reverse.png", "training.png")


def run(*argv: str) -> None:
    """Run one ddpm command in this process; stop with its exit code if it fails."""
    print("ddpm", " ".join(argv), file=sys.stderr)
    code = ddpm(list(argv))
    if code != 0:
        raise SystemExit(code)


def train_digits(run_dir: Path, *, quick: bool, steps: int | None) -> None:
    if quick:
        run("train", "--steps", "4", "--batch-size", "8", "--timesteps", "50", "--num-images", "4",
            "--log-every", "1", "--sample-every", "2", "--quiet", "--out", str(run_dir))
        return
    options = ["--steps", str(steps)] if steps else []
    total = steps or 2000                                     # the digits recipe's length
    run("train", *options, "--num-images", "16", "--sample-every", str(max(1, total // 5)),
        "--out", str(run_dir))


def make_figures(out: Path, run_dir: Path, *, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run("viz", "schedule", "--out", str(out / "schedule.png"))
    run("viz", "forward", "--data", "digits", "--num-images", "4", "--out", str(out / "forward.png"))
    reverse = ["--num-images", "2", "--steps", "5", "--device", "cpu"] if quick else ["--num-images", "4", "--device", "cpu"]
    run("viz", "reverse", "--checkpoint", str(run_dir), *reverse, "--out", str(out / "reverse.png"))
    run("viz", "training", str(run_dir), "--out", str(out / "training.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the PNGs (docs/images/guide for the guide)")
    parser.add_argument("--quick", action="store_true", help="a tiny 4-step model: seconds, for CI")
    parser.add_argument("--steps", type=int, help="train this many steps instead of the recipe's 2,000")
    parser.add_argument("--run", metavar="RUN_DIR", help="use this run directory instead of training one")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.run:
        make_figures(out, Path(args.run), quick=args.quick)
        return 0
    with tempfile.TemporaryDirectory(prefix="ddpm-guide-") as tmp:
        run_dir = Path(tmp) / "digits"
        train_digits(run_dir, quick=args.quick, steps=args.steps)
        make_figures(out, run_dir, quick=args.quick)
    print(f"wrote {', '.join(FIGURES)} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
