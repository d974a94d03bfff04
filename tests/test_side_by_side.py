"""benchmarks/side_by_side.py: lanes of commands at once, and the first failure stops them all."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "side_by_side", Path(__file__).resolve().parents[1] / "benchmarks" / "side_by_side.py")
side_by_side = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(side_by_side)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_lanes_run_at_once_each_in_order_with_the_threads_asked(tmp_path):
    log = tmp_path / "log"
    mark = ("import os, time; "
            "open({log!r}, 'a').write(f'{name} {{os.environ[\"OMP_NUM_THREADS\"]}} {{time.time()}}\\n'); "
            "time.sleep({sleep})")
    a = [py(mark.format(log=str(log), name=name, sleep=0.5)) for name in ("a1", "a2")]
    b = [py(mark.format(log=str(log), name="b1", sleep=0))]
    side_by_side.run_lanes(a, b, threads=3)
    rows = {name: (threads, float(t)) for name, threads, t in (line.split() for line in log.read_text().splitlines())}
    assert set(rows) == {"a1", "a2", "b1"} and {threads for threads, _ in rows.values()} == {"3"}
    assert rows["a1"][1] + 0.5 <= rows["a2"][1]                 # a lane's commands one after another
    assert rows["b1"][1] < rows["a2"][1]                        # the lanes at once


def test_the_first_failure_stops_every_lane_at_once_and_names_its_command(tmp_path):
    never = tmp_path / "never"
    slow = [py("import time; time.sleep(60)"), py(f"open({str(never)!r}, 'w')")]
    failing = [py("import time, sys; time.sleep(0.3); sys.exit(3)")]
    start = time.monotonic()
    with pytest.raises(SystemExit, match=r"a command failed \(exit 3\): .*sys.exit\(3\)"):
        side_by_side.run_lanes(slow, failing)
    assert time.monotonic() - start < 30                        # the 60-second command was stopped
    assert not never.exists()                                   # and its lane started nothing more
