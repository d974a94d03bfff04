"""Errors a user can cause, each mapped to one exit code of the CLI.

The CLI prints ``ddpm: error: <message>`` for these and exits with ``exit_code``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DdpmError(Exception):
    """Base class for user-facing errors (bad option, bad data, bad checkpoint)."""

    exit_code = 1


class ConfigError(DdpmError, ValueError):
    """An option or configuration value is invalid (exit code 2)."""

    exit_code = 2


class DataError(DdpmError):
    """A dataset is missing, empty, corrupt or of the wrong shape (exit code 3)."""

    exit_code = 3


class CheckpointError(DdpmError):
    """A checkpoint is missing, truncated, foreign or inconsistent (exit code 4)."""

    exit_code = 4


class TrainingError(DdpmError):
    """Training cannot go on, e.g. too many non-finite steps in a row (exit code 5)."""

    exit_code = 5


class TrainingInterrupted(DdpmError):
    """SIGINT or SIGTERM stopped training after a checkpoint was written (exit code 130 or 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class OutputError(ConfigError, OSError):
    """An output path cannot be used or written: below a file, read-only, an existing file without
    ``--overwrite``, a full disk (exit code 2). Still an :class:`OSError` for code that catches those."""

    exit_code = 2

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class RunLocked(OutputError):
    """Another process holds the run directory's lock (exit code 2)."""
