"""Test-wide settings.

Torch runs single-threaded in tests: the tensors here are tiny, so one thread is as fast as
two on an idle machine, and far faster when another process shares the cores (two
processes with two OpenMP threads each on two cores spin against each other). Subprocesses
started by the CLI tests inherit OMP_NUM_THREADS=1 for the same reason.

``--precision auto`` (the default) resolves to fp32 throughout the suite (DDPM_PRECISION=fp32,
inherited by subprocesses too): tests that compare bits must not depend on which precision a
machine's probe prefers. tests/test_precision.py tests the automatic choice itself, with the
probe's result injected.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DDPM_PRECISION", "fp32")

import torch  # noqa: E402

torch.set_num_threads(1)
