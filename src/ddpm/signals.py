"""SIGINT / SIGTERM: a request to stop at the next cheap point (and, in training, save the run).

:class:`StopSignals` turns the first signal into a flag; a second one stops at once. The training loop
checks the flag after each step; every sampler (sample grids, in-training evaluation, ``ddpm sample``,
``ddpm eval``, the editing commands) checks it before each network evaluation through
:func:`check_stop` (called by :func:`ddpm.sampling.run_sampler`), which raises :class:`Stopped`.
``ddpm train`` installs the handlers before the run directory exists; the sampling commands when they start.
"""

from __future__ import annotations

import signal
import threading
import time

from .errors import TrainingInterrupted

__all__ = ["StopSignals", "Stopped", "check_stop", "stop_requested"]

_ACTIVE: list["StopSignals"] = []          # the handlers installed now, innermost last


class Stopped(TrainingInterrupted):
    """A stop signal reached a phase that checks :func:`check_stop`; exit code 128 + the signal's number."""

    def __init__(self, signum: int, doing: str = "sampling"):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received: stopped while {doing}", 128 + signum)


def stop_requested() -> int | None:
    """The stop signal received by the innermost installed :class:`StopSignals`, if any."""
    return _ACTIVE[-1].received if _ACTIVE else None


def check_stop(doing: str = "sampling") -> None:
    """Raise :class:`Stopped` when a stop was requested (cheap: called between sampler steps)."""
    signum = stop_requested()
    if signum is not None:
        raise Stopped(signum, doing)


class StopSignals:
    """Turn SIGINT / SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue            # started to ignore it (``cmd &`` in a script, nohup): keep ignoring it
                self._previous[sig] = signal.signal(sig, self._handle)
        _ACTIVE.append(self)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            # Ctrl-C under torchrun reaches a worker twice at once (from the terminal, and forwarded
            # by torchrun): that is still one request to stop after the step.
            if signum == self.received and time.monotonic() - self._received_at < 2.0:
                return
            raise KeyboardInterrupt                 # a second signal: stop at once
        self.received, self._received_at = signum, time.monotonic()

    def __exit__(self, *exc):
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
