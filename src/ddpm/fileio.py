"""Safe file writes: a crash, a full disk or a second process never leaves a half-written run.

* :func:`atomic_write` writes every file the project writes (checkpoints, configs, images,
  arrays): a temporary file beside the target, fsync, rename over the target, fsync the directory.
  The previous version stays intact until the rename. A write error (full disk, permission,
  read-only file system) becomes one :class:`~ddpm.errors.OutputError` naming the path.
* :func:`check_output_path` refuses an output before any work starts: below a file, not
  writable, or an existing file without ``overwrite``.
* :func:`staged_dir` writes several files into a temporary folder and moves them into place
  only when all of them are written, so a failure leaves none of them behind.
* :class:`RunLock` is an exclusive, OS-level lock on a run directory (``fcntl.flock``), which
  the operating system releases when its process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputError, RunLocked

__all__ = ["atomic_write", "write_json", "fsync_dir", "check_output_path", "staged_dir", "RunLock", "LOCK_FILE"]

LOCK_FILE = ".lock"


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _file_above(path: Path) -> Path | None:
    """The first ancestor of ``path`` that exists and is not a directory (None: there is none)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _make_parent(path: Path) -> None:
    """Create the folder ``path`` goes in; a file in the way is named as such, not as 'File exists'."""
    blocker = _file_above(path)
    if blocker is not None:
        raise OutputError(f"cannot write {path}: {blocker} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {path.parent}: {_reason(exc)}", exc.errno) from None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically.

    Any exception from writing, syncing or renaming removes the temporary file; the file
    previously at ``path`` is untouched. An :class:`OSError` is re-raised as
    :class:`~ddpm.errors.OutputError` (still an ``OSError``) naming ``path``.
    """
    path = Path(path)
    _make_parent(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OutputError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {_reason(exc)}", exc.errno) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_output_path(path: str | os.PathLike, *, directory: bool = False, overwrite: bool = False,
                      option: str = "--out") -> Path:
    """Refuse an output path before any work starts; returns it as a :class:`Path`.

    Refused: a path below a file, a path whose nearest existing folder cannot be written
    (permissions, read-only file system), a directory where a file is expected (or a file
    where a directory is), and an existing file unless ``overwrite``. Nothing is created.
    """
    if isinstance(path, str) and not path.strip():       # Path("") is ".": the current directory, never meant
        raise OutputError(f"{option} is an empty path; name a file or folder ('.' for the current directory)")
    path = Path(path)
    blocker = _file_above(path)
    if blocker is not None:
        raise OutputError(f"{option} {path}: {blocker} is a file, not a directory")
    if path.exists() or path.is_symlink():
        if directory and not path.is_dir():
            raise OutputError(f"{option} {path} exists and is not a directory")
        if not directory and path.is_dir():
            raise OutputError(f"{option} {path} is a directory; a file is expected")
        if not directory and not overwrite:
            raise OutputError(f"{option} {path} already exists; choose another path or pass --overwrite")
    target = path if path.is_dir() else next(p for p in path.parents if p.exists())
    if not _writable(target):
        raise OutputError(f"{option} {path}: cannot write in {target} ({_why_not_writable(target)})")
    return path


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _why_not_writable(folder: Path) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except (OSError, AttributeError):
        pass
    return "permission denied"


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; when the block succeeds, move its entries into ``out``.

    A failure inside the block removes the temporary folder, so ``out`` never holds part of the
    new files: it gets all of them or none (moving them is renames only). Files of ``out`` with
    the same names are replaced (the caller has checked ``--overwrite``); other entries are kept.
    """
    out = Path(out)
    _make_parent(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"cannot write in {out.parent}: {_reason(exc)}", exc.errno) from None
    try:
        yield tmp
        _move_entries(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_entries(src: Path, out: Path) -> None:
    """Rename ``src`` to ``out``, or, where ``out`` exists, every entry of ``src`` into it: files
    replace their namesakes, folders are merged (``images/`` keeps the images of other indices)."""
    try:
        if not out.exists():
            os.replace(src, out)
            fsync_dir(out.parent)
            return
        for entry in sorted(src.iterdir()):
            dest = out / entry.name
            if entry.is_dir() and dest.is_dir() and not dest.is_symlink():
                _move_entries(entry, dest)
            else:
                os.replace(entry, dest)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot move the new files into {out}: {_reason(exc)}", exc.errno) from None
    fsync_dir(out)


class RunLock:
    """An exclusive lock on a run directory while one process writes it (a context manager).

    ``fcntl.flock`` on ``RUN_DIR/.lock``, which names the holder's PID and host. The operating
    system drops the lock when the process ends (a crash or ``kill -9`` included), so a stale
    file never blocks the next run. A second process gets :class:`~ddpm.errors.RunLocked`
    naming the holder. Where ``fcntl`` is missing (Windows) the lock is a no-op. Some network
    file systems do not honour ``flock`` (docs/robustness.md).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl                    # here: POSIX only
        except ModuleNotFoundError:         # no flock on this platform
            return self
        for _ in range(10):                 # retry when the holder removed the file as we opened it
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                raise RunLocked(f"{self.path.parent} is in use by another ddpm process ({holder}); "
                                "wait for it to finish or stop it first") from None
            if self._same_file(fd):
                self._fd = fd
                self._write_holder(fd)
                return self
            os.close(fd)
        raise RunLocked(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()              # while still locked: the next process makes a fresh file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot create the lock file {self.path}: {_reason(exc)}", exc.errno) from None

    def _same_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except OSError:
            return False

    def _holder(self, fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode())
            return f"PID {int(info['pid'])} on host {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its PID and host unknown"

    def _write_holder(self, fd: int) -> None:
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
        except OSError as exc:
            self.release()
            raise OutputError(f"cannot write the lock file {self.path}: {_reason(exc)}", exc.errno) from None
