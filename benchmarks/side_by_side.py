"""Commands side by side, for comparisons at equal CPU time (continuous_time.py, image_conditioning.py).

On a 2-core machine two processes of one thread each get one core each for the whole budget, and share
whatever else the machine does alike: a fair "equal CPU time" even on a machine that is not idle. Where one
core is free and the other carries a steady single-threaded load throughout, one lane with every command
(one after another) is the fair choice instead.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait


def run_lanes(*lanes: list[list[str]], threads: int = 1) -> None:
    """Each lane (a list of commands run one after another) at once, every command a process of its own with
    ``threads`` threads (``OMP_NUM_THREADS``).

    When a command fails, or this script is stopped (Ctrl-C, or SIGTERM turned into ``SystemExit`` by its
    handler), every running command is stopped and no lane starts another; a failure ends in ``SystemExit``
    naming the command.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running: list[subprocess.Popen] = []
    lock = threading.Lock()             # no command starts once stopping has begun
    stopping = False

    def run_lane(commands: list[list[str]]) -> None:
        for command in commands:
            with lock:
                if stopping:
                    return
                process = subprocess.Popen(command, env=env)
                running.append(process)
            if process.wait() != 0 and not stopping:
                raise SystemExit(f"a command failed (exit {process.returncode}): {shlex.join(command)}")

    pool = ThreadPoolExecutor(max(len(lanes), 1))
    try:
        futures = [pool.submit(run_lane, lane) for lane in lanes]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:         # a failure first: the finally clause then stops the other lanes at once
            future.result()
    finally:
        with lock:
            stopping = True
            for process in running:
                if process.poll() is None:
                    process.terminate()
        for process in running:
            process.wait()
        pool.shutdown()
