"""SIGINT / SIGTERM during training: a request to stop after the current step (and save it).

:class:`StopSignals` turns the first signal into a flag the training loop checks after each step;
a second one stops at once. ``ddpm train`` installs it before the run directory exists.
"""

from __future__ import annotations

import signal
import threading
import time

__all__ = ["StopSignals"]


class StopSignals:
    """Turn SIGINT / SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
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
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
