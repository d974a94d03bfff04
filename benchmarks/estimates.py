"""Does the time estimate hold? The estimate of ``ddpm train``'s automatic choice against the measured pace.

    .venv/bin/python benchmarks/estimates.py            # 7 configurations, 60 steps each (a quiet machine)
    .venv/bin/python benchmarks/estimates.py --quick    # 3 small ones, 4 steps: that the script runs

For each configuration (random images of side 8 to 64, grey and RGB, saved as an .npz), the run is resolved as
``ddpm train --dry-run`` resolves it (the automatic choice, then ``--steps`` and ``--batch-size``), its seconds
per step are estimated by :func:`ddpm.estimates.estimate_seconds_per_step` (as the choice line does), and the
same run is trained: its measured pace is the time between the first and the last row of metrics.jsonl (the
first step, the warm-up, left out, as in the estimate), with a row every ``--log-every`` steps (10; a row every
step costs what runs at the default of 50 do not pay). Prints a Markdown table; ``--out`` also writes JSON.
Results in benchmarks/RESULTS.md ("Estimates").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddpm.cli import main as ddpm
from ddpm.config import RunConfig
from ddpm.estimates import estimate_seconds_per_step

FULL = [(8, 1), (16, 1), (32, 1), (64, 1), (16, 3), (32, 3), (64, 3)]
QUICK = [(8, 1), (16, 1), (8, 3)]


def measure(side: int, channels: int, steps: int, batch: int, device: str, work: Path, log_every: int) -> dict:
    data = work / f"images-{side}-{channels}.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 256, (max(64, batch), side, side, channels), dtype=np.uint8))
    flags = ["--data", str(data), "--steps", str(steps), "--batch-size", str(batch), "--device", device,
             "--timesteps", "50"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert ddpm(["train", *flags, "--dry-run"]) == 0
    config = RunConfig.from_dict(json.loads(out.getvalue()))
    began = time.perf_counter()
    estimate = estimate_seconds_per_step(config, torch.device(device))
    estimating = time.perf_counter() - began
    run_dir = work / f"run-{side}-{channels}"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert ddpm(["train", *flags, "--log-every", str(log_every), "--checkpoint-every", "0", "--sample-every", "0",
                     "--num-images", "4", "--quiet", "--out", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "elapsed_s" in r]
    measured = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])
    return {"side": side, "channels": channels, "preset": config.preset, "batch": config.train.batch_size,
            "precision": config.train.precision, "steps": steps, "estimate_s_per_step": estimate,
            "measured_s_per_step": measured, "ratio": estimate / measured, "estimating_s": estimating}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 small configurations, 4 steps each")
    parser.add_argument("--steps", type=int, help="training steps per configuration (default 60; --quick 4)")
    parser.add_argument("--log-every", type=int, help="steps between metrics rows (default 10; --quick 1): a row every "
                        "step adds a cost that runs at the default of 50 do not have")
    parser.add_argument("--batch-size", type=int, default=32, help="default 32 (--quick 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    configurations = QUICK if args.quick else FULL
    steps = args.steps or (4 if args.quick else 60)
    log_every = args.log_every or (1 if args.quick else 10)
    batch = 4 if args.quick else args.batch_size
    print(f"device {args.device}, {steps} steps at batch {batch}, a metrics row every {log_every}; "
          f"torch threads {torch.get_num_threads()}")
    print("| side | channels | preset | estimate s/step | measured s/step | estimate / measured | estimating s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for side, channels in configurations:
            r = measure(side, channels, steps, batch, args.device, Path(work), log_every)
            rows.append(r)
            print(f"| {side} | {channels} | {r['preset']} | {r['estimate_s_per_step']:.4f} | "
                  f"{r['measured_s_per_step']:.4f} | {r['ratio']:.2f} | {r['estimating_s']:.1f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
