"""Data-parallel plumbing: the process group that ``torchrun`` sets up, and the few collectives we use.

``torchrun --nproc_per_node N -m ddpm train ...`` starts N processes and tells each its place
through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :func:`init` joins the group those variables describe: gloo for CPU tensors
and, when CUDA is present, NCCL for CUDA tensors (one group, ``cpu:gloo,cuda:nccl``), with a
finite timeout (``DDPM_DIST_TIMEOUT`` seconds, default 1800) so that a vanished peer ends in an
error rather than a hang. Without those variables nothing is initialised and every helper here
is the world-size-1 identity, so the single-process path runs the same code.

Errors: a collective that fails because a peer died or timed out raises :class:`PeerLost` (one
line, printed by each survivor). An error that every rank raises alike (a bad option, a
non-finite loss, a signal: decisions taken on all-reduced values) is printed by rank 0 only;
:func:`agree` turns one rank's error in a block of set-up code into the same error on every rank.
"""

from __future__ import annotations

import contextlib
import os
import re
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .device import select_device
from .errors import ConfigError, DdpmError

__all__ = ["PeerLost", "Reported", "launched", "env_world_size", "init", "shutdown", "is_initialized", "rank",
           "local_rank", "world_size", "is_main", "barrier", "all_reduce_sum", "broadcast_object", "all_gather_cat", "gather_arrays",
           "agree", "collective", "is_peer_failure", "shard_range", "training_device", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class PeerLost(DdpmError):
    """Another process of the group died or stopped answering (exit code 6)."""

    exit_code = 6


class Reported(DdpmError):
    """An error that another rank raised and rank 0 prints; this rank exits with its code, silently."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def launched() -> bool:
    """True when started by torchrun (or another launcher that sets the env:// variables)."""
    return all(name in os.environ for name in _ENV)


def env_world_size() -> int:
    """The world size the launcher announced (1 when not launched), readable before :func:`init`."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _timeout_s() -> float:
    text = os.environ.get("DDPM_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"DDPM_DIST_TIMEOUT must be a number of seconds; got {text!r}") from None
    if not value > 0:
        raise ConfigError(f"DDPM_DIST_TIMEOUT must be > 0; got {text!r}")
    return value


def init() -> bool:
    """Join the launcher's process group (idempotent); False when not launched (one process)."""
    if not launched() or is_initialized():
        return is_initialized()
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=_timeout_s()))
    except (RuntimeError, ValueError, OSError) as exc:      # rendezvous failed or timed out
        raise PeerLost(f"could not join the process group at {os.environ['MASTER_ADDR']}:"
                       f"{os.environ['MASTER_PORT']}: {_first_line(exc)}") from None
    return True


_broken = False          # a collective failed: the group cannot be torn down collectively any more


def every_rank(exc: DdpmError) -> DdpmError:
    """Mark an error that every rank raises alike (decided the same way everywhere, or by :func:`agree`)."""
    exc.every_rank = True
    return exc


def raised_by_every_rank(exc: BaseException) -> bool:
    return world_size() > 1 and getattr(exc, "every_rank", False)


def shutdown(completed: bool = False) -> None:
    """Leave the process group (at exit); harmless when none was joined. After a command that
    ``completed`` on every rank, or failed alike on every rank (:func:`every_rank`), the ranks first
    meet at a barrier, so that none leaves while a peer is still finishing. Rank 0 writes the last
    files alone and prints a shared error, and torchrun stops the other workers as soon as one exits,
    which could stop rank 0 before it speaks; a rank that tore its connections down early could also
    see its peer close the sockets under it and abort at exit. After a lost
    peer the group is left as it is (tearing it down could wait on the dead peer): the process is
    about to exit."""
    if is_initialized() and not _broken:
        with contextlib.suppress(Exception):
            if completed:
                barrier("leaving the process group")
            dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _reason(exc: BaseException) -> str:
    """The gist of a backend error: its first sentence, without the source-file prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(exc))
    return text.split(". ")[0][:160]


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the process group (a dead peer, a timeout) rather than from the computation."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and bool(re.search(r"gloo|nccl|[Cc]onnection|peer|timed out", str(exc)))


@contextlib.contextmanager
def collective(what: str):
    """Turn a process-group failure inside a block (e.g. DDP's gradient all-reduce in backward) into
    :class:`PeerLost`; other errors pass unchanged."""
    if world_size() == 1:
        yield
        return
    try:
        yield
    except DdpmError:
        raise
    except RuntimeError as exc:
        if not is_peer_failure(exc):
            raise
        global _broken
        _broken = True
        raise PeerLost(f"rank {rank()} of {world_size()}: lost contact with the other processes during {what} "
                       f"(a peer exited, was killed or timed out: {_reason(exc)})") from None


@contextlib.contextmanager
def _collective(what: str):
    """Turn a failed collective (a dead peer, a timeout) into :class:`PeerLost`."""
    try:
        yield
    except DdpmError:
        raise
    except (RuntimeError, ValueError, OSError) as exc:   # gloo / NCCL errors are RuntimeErrors (DistBackendError)
        global _broken
        _broken = True
        raise PeerLost(f"rank {rank()} of {world_size()}: lost contact with the other processes during {what} "
                       f"(a peer exited, was killed or timed out: {_reason(exc)})") from None


def barrier(what: str = "a barrier") -> None:
    if world_size() > 1:
        with _collective(what):
            dist.barrier()


def all_reduce_sum(values: list[float], what: str = "an all-reduce") -> list[float]:
    """Element-wise sum of small float lists over all ranks (float64 on the CPU, through gloo)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    with _collective(what):
        dist.all_reduce(t)
    return t.tolist()


def all_gather_cat(tensor: torch.Tensor, what: str = "an all-gather") -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0 in rank order (same shape on every rank); identity for one.

    CPU tensors go through gloo, CUDA tensors through NCCL.
    """
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    with _collective(what):
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_arrays(arrays: tuple[np.ndarray, ...], what: str = "gathering samples") -> tuple[np.ndarray, ...] | None:
    """Rank 0 receives every rank's arrays, concatenated in rank order (along axis 0 of each); others get None.

    Ranks may hold different numbers of rows (contiguous shards of unequal length).
    """
    if world_size() == 1:
        return arrays
    received = [None] * world_size() if is_main() else None
    with _collective(what):
        dist.gather_object(arrays, received, dst=0)
    if not is_main():
        return None
    return tuple(np.concatenate([r[i] for r in received]) for i in range(len(arrays)))


def broadcast_object(obj, what: str = "a broadcast"):
    """Rank 0's ``obj`` (picklable) on every rank; identity for one process."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    with _collective(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def agree(what: str = "set-up"):
    """Run a block on every rank; if any rank raised a user error, every rank raises one.

    The lowest failing rank's error is re-raised on that rank (rank 0) or announced by rank 0 as
    ``rank r: message``; the other ranks raise :class:`Reported` with the same exit code, which
    the CLI does not print. One clear line in all, instead of one per rank or a hang.
    """
    error: DdpmError | None = None
    try:
        yield
    except DdpmError as exc:
        if world_size() == 1:
            raise
        error = exc
    if world_size() == 1:
        return
    mine = None if error is None else (str(error), error.exit_code)
    outcomes = [None] * world_size()
    with _collective(what):
        dist.all_gather_object(outcomes, mine)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    first, (message, code) = failed[0]
    if rank() == first == 0:
        raise every_rank(error)
    if is_main():
        raise every_rank(Reported(f"rank {first}: {message}", code))
    raise every_rank(Reported(message, code))


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of ``n`` items that rank ``rank_`` of ``world`` handles (sizes differ by <= 1)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return n * r // w, n * (r + 1) // w


def training_device(name: str) -> torch.device:
    """The device this rank trains or samples on: ``cuda:LOCAL_RANK`` under torchrun with CUDA."""
    device = select_device(name)
    if world_size() == 1:
        return device
    if device.type == "cuda":
        if name not in ("auto", "cuda"):
            raise ConfigError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; "
                              "pass --device cuda or auto")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"device {device.type!r} cannot train with several processes; use cuda or cpu")
    return device
