"""``python -m ddpm`` for tests launched by torchrun, with four test-only additions.

* ``DDPM_TEST_DIGEST_DIR``: at exit every rank writes ``rank<R>.json`` with the checksum
  (:func:`ddpm.checkpoint.tensor_checksum`) of the weights it trained, taken from the module it
  handed to DistributedDataParallel, so a test can compare the replicas of all ranks.
* ``DDPM_TEST_KILL_RANK`` and ``DDPM_TEST_KILL_AT_STEP``: that rank sends itself
  ``DDPM_TEST_KILL_SIGNAL`` (default KILL, as a crashed or OOM-killed worker dies; TERM as a
  scheduler stops a job) when it reaches that optimizer step (1-based).
* ``DDPM_TEST_ROWS_DIR``: at exit every rank writes ``rows<R>.json``, mapping each step to the
  first pixel of every image the lazy reader of a prepared dataset handed to that step (a test
  dataset stores each image's row number there), so a test can see which rows each rank read.
* ``DDPM_TEST_SLOW_SPEAKER``: rank 0 waits that many seconds before it prints an error line, as a
  loaded machine can delay it, so a test can see that its peers wait for it before they exit.

Production code has no such hooks: the worker patches torch's classes before running the CLI.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ddpm.checkpoint import tensor_checksum
from ddpm.cli import main

wrapped = []
_ddp_init = DistributedDataParallel.__init__


def _capture(self, module, *args, **kwargs):
    _ddp_init(self, module, *args, **kwargs)
    wrapped.append(module)


DistributedDataParallel.__init__ = _capture

if "DDPM_TEST_KILL_RANK" in os.environ and os.environ["RANK"] == os.environ["DDPM_TEST_KILL_RANK"]:
    kill_at, steps = int(os.environ["DDPM_TEST_KILL_AT_STEP"]), [0]
    kill_signal = signal.Signals["SIG" + os.environ.get("DDPM_TEST_KILL_SIGNAL", "KILL")]
    for optimizer_class in (torch.optim.Adam, torch.optim.AdamW):
        def step(self, *args, _step=optimizer_class.step, **kwargs):
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), kill_signal)
            return _step(self, *args, **kwargs)
        optimizer_class.step = step

rows_read: dict[int, list[int]] = {}
if "DDPM_TEST_ROWS_DIR" in os.environ:
    from ddpm.data.prepared import BatchPrefetcher

    def get(self, step, _get=BatchPrefetcher.get):
        x, y = _get(self, step)
        rows_read[step] = x[:, 0, 0, 0].tolist()
        return x, y
    BatchPrefetcher.get = get

if "DDPM_TEST_SLOW_SPEAKER" in os.environ and os.environ["RANK"] == "0":
    import time

    import ddpm.cli

    def slow_one_line(exc, _one_line=ddpm.cli._one_line):
        time.sleep(float(os.environ["DDPM_TEST_SLOW_SPEAKER"]))
        return _one_line(exc)
    ddpm.cli._one_line = slow_one_line

code = main(sys.argv[1:])
if "DDPM_TEST_ROWS_DIR" in os.environ:
    path = Path(os.environ["DDPM_TEST_ROWS_DIR"]) / f"rows{os.environ['RANK']}.json"
    path.write_text(json.dumps(rows_read))
if os.environ.get("DDPM_TEST_DIGEST_DIR") and wrapped:
    model = wrapped[-1]                  # the U-Net that DDP wraps
    digest = tensor_checksum({f"model.{k}": v for k, v in model.state_dict().items()})
    path = Path(os.environ["DDPM_TEST_DIGEST_DIR"]) / f"rank{os.environ['RANK']}.json"
    path.write_text(json.dumps({"rank": int(os.environ["RANK"]), "model_checksum": digest}))
sys.exit(code)
