"""Test-wide settings.

Torch runs single-threaded in tests: the tensors here are tiny, so one thread is as fast as
two on an idle machine, and far faster when another process shares the cores (two
processes with two OpenMP threads each on two cores spin against each other). Subprocesses
started by the CLI tests inherit OMP_NUM_THREADS=1 for the same reason.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
