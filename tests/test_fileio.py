"""Safe writes: write errors as one error naming the path, output checks, staged outputs, the run lock."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from ddpm.errors import OutputError, RunLocked
from ddpm.fileio import LOCK_FILE, RunLock, atomic_write, check_output_path, staged_dir


def _listing(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----------------------------------------------------------------------------- atomic_write

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_write_error_names_the_path_and_keeps_the_old_file(tmp_path, code):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError(code, os.strerror(code))

    with pytest.raises(OutputError, match=f"cannot write {target}: {os.strerror(code)}") as info:
        atomic_write(target, failing)
    assert isinstance(info.value, OSError) and info.value.errno == code and info.value.exit_code == 2
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["grid.png"]


def test_write_below_a_file_says_so(tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OutputError, match="plain is a file, not a directory"):
        atomic_write(tmp_path / "plain" / "sub" / "a.json", lambda tmp: tmp.write_text("{}"))
    assert (tmp_path / "plain").read_text() == "x"


# ----------------------------------------------------------------------------- check_output_path

def test_output_checks_refuse_before_creating_anything(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [(tmp_path / "file" / "out", {}, "is a file, not a directory"),
             (tmp_path / "file", {}, "already exists; choose another path or pass --overwrite"),
             (tmp_path / "folder", {}, "is a directory; a file is expected"),
             (tmp_path / "file", {"directory": True}, "exists and is not a directory")]
    for path, options, message in cases:
        with pytest.raises(OutputError, match=message):
            check_output_path(path, **options)
    assert _listing(tmp_path) == ["file", "folder"]
    assert check_output_path(tmp_path / "file", overwrite=True) == tmp_path / "file"
    assert check_output_path(tmp_path / "new" / "deeper" / "a.json") == tmp_path / "new" / "deeper" / "a.json"
    assert check_output_path(tmp_path / "folder", directory=True) == tmp_path / "folder"
    assert _listing(tmp_path) == ["file", "folder"]


def test_output_check_names_a_read_only_file_system(tmp_path, monkeypatch):
    class ReadOnly:
        f_flag = os.ST_RDONLY

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode))
    with pytest.raises(OutputError, match="permission denied"):
        check_output_path(tmp_path / "a" / "b.json")
    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly())
    with pytest.raises(OutputError, match=f"cannot write in {tmp_path} \\(read-only file system\\)"):
        check_output_path(tmp_path / "a" / "b.json")


# ----------------------------------------------------------------------------- staged_dir

def test_staged_outputs_appear_together(tmp_path):
    out = tmp_path / "samples"
    with staged_dir(out) as stage:
        (stage / "grid.png").write_text("grid")
        (stage / "images").mkdir()
        (stage / "images" / "000000.png").write_text("0")
        assert not out.exists()                      # nothing is visible before the block ends
    assert _listing(tmp_path) == ["samples", "samples/grid.png", "samples/images", "samples/images/000000.png"]


def test_staged_outputs_replace_their_namesakes_and_keep_the_rest(tmp_path):
    out = tmp_path / "samples"
    (out / "images").mkdir(parents=True)
    (out / "images" / "000007.png").write_text("old image")
    (out / "grid.png").write_text("old grid")
    (out / "notes.txt").write_text("mine")
    with staged_dir(out) as stage:
        (stage / "grid.png").write_text("new grid")
        (stage / "images").mkdir()
        (stage / "images" / "000000.png").write_text("0")
    assert (out / "grid.png").read_text() == "new grid" and (out / "notes.txt").read_text() == "mine"
    assert _listing(out) == ["grid.png", "images", "images/000000.png", "images/000007.png", "notes.txt"]
    assert not list(tmp_path.glob(".samples.tmp-*"))


def test_a_failure_while_staging_leaves_nothing(tmp_path):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "grid.png").write_text("old grid")
    with pytest.raises(OSError, match="No space"):
        with staged_dir(out) as stage:
            (stage / "grid.png").write_text("new grid")
            (stage / "images").mkdir()
            (stage / "images" / "000000.png").write_text("0")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert _listing(tmp_path) == ["samples", "samples/grid.png"]
    assert (out / "grid.png").read_text() == "old grid"


# ----------------------------------------------------------------------------- RunLock

def test_a_second_lock_names_the_holder_and_a_release_frees_it(tmp_path):
    with RunLock(tmp_path):
        info = json.loads((tmp_path / LOCK_FILE).read_text())
        assert info == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(RunLocked, match=f"in use by another ddpm process \\(PID {os.getpid()} on host "
                                            f"{socket.gethostname()}\\)") as exc:
            RunLock(tmp_path).acquire()
        assert exc.value.exit_code == 2
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == info        # the refused process wrote nothing
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):                                                  # free again
        pass


HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "elsewhere"}).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_killed_holder_releases_the_lock(tmp_path):
    """A crash (kill -9) leaves the lock file behind, but not the lock: the next process proceeds."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"PID {holder.pid} on host elsewhere"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).exists()
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
