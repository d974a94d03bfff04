"""Training throughput with 1 and 2 data-parallel processes (torchrun, gloo on the CPU) at a fixed global batch.

Each configuration runs ``ddpm train`` in a subprocess (under ``python -m torch.distributed.run``
for several processes) and reads ``images_per_s`` from the run's metrics.jsonl, leaving out the
first logging window (start-up). Prints one row per configuration as Markdown.

    python benchmarks/ddp_scaling.py --preset digits --global-batch 64 --steps 60
    python benchmarks/ddp_scaling.py --preset mnist --data mnist --data-root ../shared/data/mnist --global-batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, threads: int, args, out: Path) -> dict:
    common = ["train", "--preset", args.preset, "--steps", str(args.steps), "--batch-size",
              str(args.global_batch // procs), "--log-every", str(args.log_every), "--checkpoint-every", "0",
              "--num-images", "4", "--device", "cpu", "--quiet", "--out", str(out)]
    if args.data:
        common += ["--data", args.data]
    if args.data_root:
        common += ["--data-root", args.data_root]
    if procs == 1:
        cmd = [sys.executable, "-m", "ddpm", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "ddpm", *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows[1:]]
    return {"procs": procs, "threads": threads, "images_per_s": statistics.median(rates), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--data")
    p.add_argument("--data-root")
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--configs", default="1x1,2x1,1x2", help="PROCSxTHREADS,... (threads per process)")
    args = p.parse_args()
    print(f"preset {args.preset}, global batch {args.global_batch}, {args.steps} steps, "
          f"median images/s over logging windows after the first\n")
    print("| processes x threads | per-process batch | images/s | wall s (incl. start-up, final grid) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(args.configs.split(",")):
            procs, threads = map(int, config.split("x"))
            r = run(procs, threads, args, Path(tmp) / f"run{i}")
            print(f"| {procs} x {threads} | {args.global_batch // procs} | {r['images_per_s']:.0f} | {r['wall_s']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
