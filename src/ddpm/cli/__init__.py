"""The ``ddpm`` command line: a thin layer of validated options over the library.

Exit codes: 0 success, 2 usage or configuration error, 3 data error, 4 checkpoint error, 5 training
stopped (non-finite steps), 6 another process of a torchrun group was lost, 128 + N stopped by signal N.
User mistakes print one line, ``ddpm: error: ...``, never a traceback.

Under torchrun (``torchrun --nproc_per_node N -m ddpm train|distill|sample|eval ...``) every process
runs the same command: ``train`` and ``distill`` train data-parallel, ``sample`` and ``eval
--checkpoint`` split the image indices among the processes, and rank 0 writes the files and the
messages.

The package: this module parses, dispatches and turns errors into one line; ``parser.py`` builds the
parser from ``parser_*.py`` (one per group of commands; ``options.py`` what they share, ``arg_types.py``
the checked value types, ``choices.py`` the library's names), none of which imports torch; ``cmd_*.py``
run the commands (``common.py`` what they share; ``ema.py`` is both the options and the command of the
EMAs). A command's module is imported only when that command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys

from ..errors import ConfigError, DdpmError, OutputError, TrainingInterrupted
from .parser import build_parser


# The commands that share their work among the processes torchrun starts.
DISTRIBUTED_COMMANDS = ("train", "sample", "eval", "distill")


# Each command and the module of ddpm.cli that runs it (its function: cmd_<command>).
COMMANDS = {"train": "cmd_train", "sample": "cmd_sample", "interpolate": "cmd_sample", "inspect": "cmd_eval",
            "eval": "cmd_eval", "viz": "cmd_sample", "export": "cmd_io", "import": "cmd_io", "distill": "cmd_train",
            "inpaint": "cmd_editing", "edit": "cmd_editing", "invert": "cmd_editing", "prepare": "cmd_io",
            "ema": "ema"}


def _command(name: str):
    """The function that runs command ``name``, its module imported now: only the command that runs loads its
    modules (torch among them), never ``--help``."""
    return getattr(importlib.import_module(f"{__name__}.{COMMANDS[name]}"), f"cmd_{name}")


# Commands whose long phases are samplers (ddpm.signals.check_stop); train installs its own handlers.
STOPPABLE_COMMANDS = ("sample", "eval", "interpolate", "inpaint", "edit", "invert")


def _stop_signals(command: str):
    """SIGINT / SIGTERM as a request to stop at the sampler's next step, for the commands that check it."""
    from ..signals import StopSignals   # reason: the CLI loads a command's modules when it runs

    return StopSignals() if command in STOPPABLE_COMMANDS else contextlib.nullcontext()


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):      # stdout is not a real file (e.g. under a test's capture)
        pass


# OSError numbers that mean the environment (disk, permissions, limits), never a bug: one line, no traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG,
                                errno.EIO, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EMFILE,
                                errno.ENFILE, errno.ENOMEM})


def _one_line(exc: BaseException) -> str:
    """An error message on one line, whatever a library put in it."""
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    """The ``ddpm`` command; Ctrl-C at any moment, the heavy imports of the start included, is one line."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .. import distributed      # after parsing: torch is imported by a command, never by --help

    code = None
    shared_error = False            # every rank failed alike: they leave together, after rank 0 has spoken
    try:
        distributed.init()          # under torchrun: join the process group (a no-op otherwise)
        if distributed.world_size() > 1 and args.command not in DISTRIBUTED_COMMANDS:
            raise distributed.every_rank(ConfigError(f"ddpm {args.command} runs in one process; "
                                                     "start it without torchrun"))
        from ..interop.hub import resolve_hub_args       # --checkpoint hf://OWNER/NAME: the downloaded file
        resolve_hub_args(args)
        command = _command(args.command)
        with _stop_signals(args.command):   # SIGINT / SIGTERM stop a sampling command between its steps
            code = command(args)
        sys.stdout.flush()                  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        # The reader went away (ddpm inspect --json | head): stop quietly, as a process killed by SIGPIPE.
        _discard_stdout()
        return 128 + 13
    except TrainingInterrupted as exc:
        if distributed.is_main():
            print(f"ddpm: {exc}", file=sys.stderr)
        return exc.exit_code
    except DdpmError as exc:
        # Under torchrun, rank 0 speaks for errors every rank shares (decided together, or gathered
        # by distributed.agree); a lost peer is news only the rank that saw it can give.
        if distributed.is_main() or isinstance(exc, distributed.PeerLost):
            print(f"ddpm: error: {_one_line(exc)}", file=sys.stderr)
        shared_error = distributed.raised_by_every_rank(exc)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise                   # not the disk, permissions or limits: a bug, which keeps its traceback
        print(f"ddpm: error: cannot write {exc.filename or 'a file'}: {exc.strerror or exc}", file=sys.stderr)
        return OutputError.exit_code
    except MemoryError:
        print("ddpm: error: out of memory; choose a smaller model, image size or batch size", file=sys.stderr)
        return ConfigError.exit_code
    finally:
        distributed.shutdown(completed=code == 0 or shared_error)
