"""SIGTERM during ``ddpm eval``'s reference feature extraction ends it between two batches, with the usual
one line. A real subprocess: the signal is sent (by the process to itself) as the LeNet features of the
3,000 reference images start, so it lands inside that phase whatever the machine's speed; without the
check between batches the extraction, and the evaluation, would run to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")

# The CLI, with LenetFeatures sending SIGTERM to its own process when it is handed the reference images.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from ddpm.evaluation import features
    from ddpm.cli import main

    extract = features.LenetFeatures.__call__

    def signalled(self, images):
        if len(images) >= 1000:                       # the reference set, not the 8 samples
            os.kill(os.getpid(), signal.SIGTERM)
        return extract(self, images)

    features.LenetFeatures.__call__ = signalled
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_during_reference_feature_extraction_stops_between_batches(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", images=rng.integers(0, 256, (3000, 8, 8, 1), dtype=np.uint8))
    np.savez(tmp_path / "samples.npz", images=rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8))
    argv = ["eval", "--samples", tmp_path / "samples.npz", "--data", tmp_path / "ref.npz", "--metric", "fast",
            "--cache-dir", tmp_path / "cache", "--device", "cpu", "--out", tmp_path / "scores.json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", DRIVER, *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ddpm: SIGTERM received: stopped while extracting image features"
    assert time.time() - start < 30
    assert not (tmp_path / "scores.json").exists() and not list((tmp_path / "cache").glob("**/*.npz"))
