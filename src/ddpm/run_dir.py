"""The life of a run directory, from its number to its pruned checkpoints.

* :func:`new_run_dir` numbers runs (``runs/001``, ``runs/002`` ...).
* :func:`prepare_run_dir` and :func:`claim_run_dir` create one, or take one back that holds no
  more than a run writes before its first checkpoint (:data:`BEFORE_FIRST_CHECKPOINT`), under
  its lock; :func:`claimed` does so for every process of a torchrun group at once.
* :func:`open_run` writes what a run writes when it starts (``config.json``, ``provenance.json``)
  and clears what a killed process left (temporary files, metrics logged after the checkpoint
  a resume starts from); :func:`prune_checkpoints` keeps the newest checkpoints and milestones.

The file primitives (atomic writes, the lock itself) are :mod:`ddpm.fileio`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL
import safetensors
import torch

from . import __version__
from . import distributed
from .checkpoint import list_checkpoints
from .errors import ConfigError, OutputError
from .fileio import LOCK_FILE, RunLock, atomic_write, check_output_path, write_json

__all__ = ["new_run_dir", "BEFORE_FIRST_CHECKPOINT", "prepare_run_dir", "check_restartable", "claim_run_dir",
           "claimed", "open_run", "append_provenance", "prune_checkpoints", "remove_stale_temporaries",
           "truncate_metrics"]


def new_run_dir(root: str | os.PathLike = "runs") -> Path:
    """The next free numbered directory ``root/NNN``."""
    root = Path(root)
    taken = [int(p.name) for p in root.glob("[0-9][0-9][0-9]*") if p.name.isdigit()] if root.is_dir() else []
    return root / f"{max(taken, default=0) + 1:03d}"


# What a run writes before its first checkpoint. A directory that holds no more than these (and no
# checkpoint) is a run stopped before it saved anything to resume from: the same command may start
# it again from step 0, and --resume starts it from its config.json (docs/robustness.md).
BEFORE_FIRST_CHECKPOINT = frozenset({"config.json", "provenance.json", "metrics.jsonl", "loss.png", "samples",
                                     "checkpoints", "tensorboard", "wandb", "wandb-run-id", "ema-snapshots",
                                     LOCK_FILE})


# ----------------------------------------------------------------------------- claiming

def prepare_run_dir(out: str | os.PathLike | None) -> Path:
    """Create the run directory: new, empty, or holding only what a run writes before its first checkpoint.

    Anything else (a checkpoint, files of another program) is an error: it would mix two runs.
    """
    run_dir = check_output_path(Path(out) if out is not None else new_run_dir(), directory=True)
    check_restartable(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}", exc.errno) from None
    return run_dir


def check_restartable(run_dir: Path) -> None:
    """Refuse a run directory that holds more than a run writes before its first checkpoint."""
    if not run_dir.is_dir():
        return
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in BEFORE_FIRST_CHECKPOINT
                    and not p.name.startswith("."))
    if others or list_checkpoints(run_dir):
        held = ", ".join(others[:3]) if others else "checkpoints"
        raise ConfigError(f"run directory {run_dir} already exists and is not empty ({held}); choose another "
                          "--out, or continue it with --resume")


def claim_run_dir(out: str | os.PathLike | None) -> tuple[Path, RunLock]:
    """:func:`prepare_run_dir`, then its lock, then the check again (another run may have saved meanwhile)."""
    run_dir = prepare_run_dir(out)
    lock = RunLock(run_dir).acquire()
    try:
        check_restartable(run_dir)
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


@contextlib.contextmanager
def claimed(out: str | os.PathLike | None, resume_dir: Path | None = None) -> Iterator[Path]:
    """The run directory every process of the run trains in, locked by rank 0 until the block ends.

    With ``resume_dir`` that directory, locked as it is; else ``out`` (None: the next free
    ``runs/NNN``, which rank 0 alone picks and the others take) claimed by :func:`claim_run_dir`.
    One rank's failure stops every rank with one message (:func:`ddpm.distributed.agree`).
    """
    main, lock, run_dir = distributed.is_main(), None, resume_dir
    with distributed.agree("claiming the run directory"):     # rank 0 holds the lock while the run writes
        if main and resume_dir is not None:
            lock = RunLock(resume_dir).acquire()
        elif main:
            run_dir, lock = claim_run_dir(out)
    try:
        if resume_dir is None:
            run_dir = Path(distributed.broadcast_object(None if not main else str(run_dir)))
        yield run_dir
    finally:
        if lock is not None:
            lock.release()


# ----------------------------------------------------------------------------- a run's start

def open_run(run_dir: Path, config: dict, step: int, resumed: bool) -> None:
    """What rank 0 writes and clears as the run starts from ``step`` (0, or the checkpoint's step)."""
    # config.json first: from the moment the directory holds anything, --resume can restart it.
    write_json(run_dir / "config.json", config)
    remove_stale_temporaries(run_dir)
    truncate_metrics(run_dir / "metrics.jsonl", step)    # a fresh start (step 0) keeps none
    append_provenance(run_dir, f"resume from step {step}" if resumed else "start")


def _provenance() -> dict:
    """Who ran what: command line, versions, git commit of the source tree when available."""
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "cwd": os.getcwd(),
            "host": platform.node(), "python": platform.python_version(),
            "versions": {"ddpm": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "pillow": PIL.__version__, "safetensors": safetensors.__version__},
            "git_commit": commit}


def append_provenance(run_dir: Path, event: str) -> None:
    """Add ``event`` with :func:`_provenance` to the run's ``provenance.json`` history."""
    path = run_dir / "provenance.json"
    history = json.loads(path.read_text()) if path.exists() else []
    write_json(path, history + [{"event": event, **_provenance()}])


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files left by a process killed mid-save (the checkpoints themselves are intact)."""
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (work lost since the checkpoint a resume starts from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue                     # a line cut short by a crash
    atomic_write(path, lambda tmp: tmp.write_text("".join(x + "\n" for x in kept)))


# ----------------------------------------------------------------------------- while it runs

def prune_checkpoints(run_dir: Path, keep_last: int, milestone_every: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, sparing milestones."""
    if keep_last <= 0:
        return
    found = list_checkpoints(run_dir)
    for step, path in found[:-keep_last]:
        if not (milestone_every and step % milestone_every == 0):
            path.unlink(missing_ok=True)
