"""``python -m ddpm`` and the ``ddpm`` console script: the command-line interface.

This entry point imports nothing heavy before it can answer Ctrl-C: ``ddpm`` itself is light (its
torch-backed names are lazy) and :func:`ddpm.cli.main` catches an interrupt in its own imports.
"""

import sys


def run() -> int:
    """``ddpm ...``: exit code 130 and one line ``ddpm: interrupted`` whenever Ctrl-C arrives."""
    try:
        from .cli import main       # an import here, inside the handling of Ctrl-C
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
