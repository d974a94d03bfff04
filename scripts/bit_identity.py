"""Bit-identity check for refactors: the same commands, run with ddpm from two source trees, must
give the same checkpoint tensors and samples.

The reference tree is a commit (checked out with ``git worktree`` into a temporary folder), the
other the working tree. Every command runs in both, with ``--precision fp32`` and one thread, and
then every ``model.*``, ``ema.*`` and ``optim.*`` tensor of every ``*.safetensors`` file and every
array of every ``*.npz`` file is compared with ``torch.equal`` / ``numpy.array_equal`` (metadata,
logs and pictures may differ). Prints one line per command and exits 1 if anything differs.

Usage::

    python scripts/bit_identity.py REF_COMMIT                 # every command
    python scripts/bit_identity.py REF_COMMIT --only train    # commands whose name contains a word
    python scripts/bit_identity.py REF_COMMIT --list

See docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
# The image counts are spelled as older commits know them (--num-samples, --n), so that any of
# them can be the reference.
TRAIN = "--precision fp32 --seed 7 --steps 24 --batch-size 32 --log-every 8 --checkpoint-every 12 --num-samples 4 --quiet"
SAMPLE = "--n 6 --batch-size 4 --seed 11 --precision fp32 --quiet"
DISTILL = "--teacher-steps 8 --batch-size 16 --precision fp32 --seed 3 --num-samples 4 --quiet"

# (name, arguments); runs later in the list may read the folders of earlier ones.
COMMANDS = [
    ("train-default", f"train {TRAIN}"),
    ("train-hybrid", f"train {TRAIN} --loss hybrid --variance learned-range"),
    ("train-importance", f"train {TRAIN} --loss hybrid --variance learned-range --timestep-sampling importance"),
    ("train-offset", f"train {TRAIN} --offset-noise 0.1"),
    ("train-selfcond", f"train {TRAIN} --self-condition"),
    ("train-vminsnr", f"train {TRAIN} --objective v --loss-weighting min-snr"),
    ("train-x0", f"train {TRAIN} --objective x0 --loss-weighting min-snr"),
    ("train-cond", f"train {TRAIN} --conditional"),
    ("train-accum", f"train {TRAIN} --grad-accum 2 --batch-size 16"),
    ("train-hflip", f"train {TRAIN} --hflip"),
    ("train-cond-sc", f"train {TRAIN} --conditional --self-condition --grad-accum 2 --batch-size 16"),
    ("train-resume", f"train {TRAIN} --steps 12"),
    ("train-resume", "train --resume train-resume --steps 24 --quiet"),
    ("distill-v", f"distill --checkpoint train-vminsnr --rounds 1 --steps-per-round 10 --checkpoint-every 5 {DISTILL}"),
    ("distill-eps", f"distill --checkpoint train-default --rounds 2 --steps-per-round 6 {DISTILL}"),
    ("s-default", f"sample --checkpoint train-default {SAMPLE}"),
    ("s-ddpm-100", f"sample --checkpoint train-default {SAMPLE} --sampler ddpm --steps 100"),
    ("s-ddpm-beta", f"sample --checkpoint train-default {SAMPLE} --sampler ddpm --steps 20 --variance beta --spacing leading"),
    ("s-ddim", f"sample --checkpoint train-default {SAMPLE} --sampler ddim --steps 20"),
    ("s-ddim-eta", f"sample --checkpoint train-default {SAMPLE} --sampler ddim --steps 20 --eta 0.5 --spacing linspace"),
    ("s-dpm", f"sample --checkpoint train-default {SAMPLE} --sampler dpm-solver++ --steps 15"),
    ("s-dyn", f"sample --checkpoint train-default {SAMPLE} --sampler ddim --steps 10 --dynamic-threshold"),
    ("s-noclip", f"sample --checkpoint train-default {SAMPLE} --sampler ddpm --steps 10 --no-clip --weights raw"),
    ("s-learned", f"sample --checkpoint train-hybrid {SAMPLE}"),
    ("s-selfcond", f"sample --checkpoint train-selfcond {SAMPLE} --sampler dpm-solver++ --steps 10"),
    ("s-v", f"sample --checkpoint train-vminsnr {SAMPLE} --sampler ddim --steps 10"),
    ("s-x0", f"sample --checkpoint train-x0 {SAMPLE}"),
    ("s-cond", f"sample --checkpoint train-cond --class 3 5 {SAMPLE}"),
    ("s-cond-w", f"sample --checkpoint train-cond --class all {SAMPLE} --guidance-scale 4 --sampler dpm-solver++ --steps 10"),
    ("s-student", f"sample --checkpoint distill-v/student {SAMPLE}"),
]


def run_all(src: Path, out: Path, commands: list[tuple[str, str]]) -> dict[str, int]:
    """Run ``commands`` with ddpm imported from ``src``, each writing ``out/NAME``: {name: exit code}."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    codes = {}
    for name, args in commands:
        argv = [sys.executable, "-m", "ddpm", *args.split()]
        if "--resume" not in args:
            argv += ["--out", name]
        with open(out / f"{name}.log", "a") as log:
            codes[name] = subprocess.run(argv, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return codes


def differences(a: Path, b: Path) -> tuple[int, list[str]]:
    """(values compared, what differs) between the safetensors and npz files below ``a`` and ``b``."""
    compared, differ = 0, []
    for fa in sorted(a.rglob("*.safetensors")):
        fb = b / fa.relative_to(a)
        if not fb.exists():
            differ.append(f"missing {fb.relative_to(b)}")
            continue
        ta, tb = load_file(fa), load_file(fb)
        keys = sorted(k for k in ta if k.split(".")[0] in ("model", "ema", "optim"))
        if keys != sorted(k for k in tb if k.split(".")[0] in ("model", "ema", "optim")):
            differ.append(f"tensor names differ in {fa.relative_to(a)}")
            continue
        compared += len(keys)
        differ += [f"{fa.relative_to(a)}: {k}" for k in keys if not torch.equal(ta[k], tb[k])]
    for fa in sorted(a.rglob("*.npz")):
        fb = b / fa.relative_to(a)
        if not fb.exists():
            differ.append(f"missing {fb.relative_to(b)}")
            continue
        za, zb = np.load(fa), np.load(fb)
        compared += len(za.files)
        differ += [f"{fa.relative_to(a)}: {k}" for k in za.files
                   if k not in zb.files or not np.array_equal(za[k], zb[k])]
    return compared, differ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref", help="the reference commit")
    p.add_argument("--only", nargs="*", help="commands whose name contains one of these words")
    p.add_argument("--list", action="store_true", help="list the commands and exit")
    p.add_argument("--keep", help="keep both output folders under this folder")
    args = p.parse_args(argv)
    chosen = [(n, c) for n, c in COMMANDS if not args.only or any(w in n for w in args.only)]
    if args.list:
        for name, command in chosen:
            print(f"{name:18s} ddpm {command}")
        return 0
    with tempfile.TemporaryDirectory(prefix="ddpm-bits-") as tmp:
        work = Path(args.keep or tmp)
        ref_tree = Path(tmp) / "ref-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(ref_tree), args.ref], check=True)
        try:
            ref_codes = run_all(ref_tree / "src", work / "ref", chosen)
            new_codes = run_all(ROOT / "src", work / "new", chosen)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_tree)], check=False)
        bad = 0
        for name in dict(chosen):
            if ref_codes[name] or new_codes[name]:
                print(f"{name:18s} exit {ref_codes[name]} (ref) / {new_codes[name]} (new): see {work}/*/{name}.log")
                bad += 1
                continue
            compared, differ = differences(work / "ref" / name, work / "new" / name)
            bad += bool(differ)
            print(f"{name:18s} {compared} values compared, {len(differ)} differ" + "".join(f"\n    {d}" for d in differ[:5]))
    print(f"{len(dict(chosen)) - bad} of {len(dict(chosen))} identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
