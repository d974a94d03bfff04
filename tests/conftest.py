"""Test-wide settings.

Torch runs single-threaded in tests: the tensors here are tiny, so one thread is as fast as
two on an idle machine, and far faster when another process shares the cores (two
processes with two OpenMP threads each on two cores spin against each other). Subprocesses
started by the CLI tests inherit OMP_NUM_THREADS=1 for the same reason.

``--precision auto`` (the default) resolves to fp32 throughout the suite (DDPM_PRECISION=fp32,
inherited by subprocesses too): tests that compare bits must not depend on which precision a
machine's probe prefers. tests/test_precision.py tests the automatic choice itself, with the
probe's result injected.

Ctrl-C reaches the tests as it reaches a command typed at a terminal. A suite started in the
background of a non-interactive shell (``pytest &``, nohup, some CI runners) inherits SIGINT
ignored, CPython then keeps it ignored, and so would every command the tests start (an ignored
signal survives ``exec``); ddpm rightly leaves such a signal ignored, and the tests of Ctrl-C would
test nothing. So SIGINT gets Python's usual handler here, which children see as the default action.
"""

import os
import signal

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DDPM_PRECISION", "fp32")
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import torch  # noqa: E402

torch.set_num_threads(1)
