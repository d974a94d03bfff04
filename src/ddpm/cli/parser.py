"""The ``ddpm`` command's argument parser: every command's options, their checks as they are parsed,
help texts and examples, one module per group of commands (``parser_*.py``). Building it imports no
torch, so ``ddpm --help`` and ``ddpm COMMAND --help`` answer at once; :mod:`ddpm.cli` runs the commands."""

from __future__ import annotations

import argparse

from .. import __version__
from .ema import add_ema_command
from .options import Parser
from .parser_editing import add_edit, add_inpaint, add_invert
from .parser_eval import add_eval, add_inspect
from .parser_io import add_export, add_import, add_prepare
from .parser_sample import add_interpolate, add_sample, add_viz
from .parser_train import add_distill, add_train


EXAMPLES_MAIN = """\
examples:
  ddpm train                                   # 8x8 digits, about 5 minutes on a laptop CPU
  ddpm train --data mnist --data-root ../shared/data/mnist --steps 20000
  ddpm sample --checkpoint runs/001 --num-images 64 --out samples/digits
  ddpm inspect runs/001
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models: train, sample, evaluate, edit.",
                    epilog=EXAMPLES_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_train(sub)
    add_sample(sub)
    add_interpolate(sub)
    add_inspect(sub)
    add_eval(sub)
    add_viz(sub)
    add_export(sub)
    add_import(sub)
    add_distill(sub)
    add_inpaint(sub)
    add_edit(sub)
    add_invert(sub)
    add_prepare(sub)
    add_ema_command(sub)
    _refuse_empty_out(parser)
    return parser


def _output_path(text: str) -> str:
    """An argparse type for ``--out``: an empty path would be the current directory, never what was meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder ('.' for the current directory)")
    return text


def _refuse_empty_out(parser: argparse.ArgumentParser) -> None:
    """Give every command's ``--out`` (those of ``viz``'s subcommands too) the type :func:`_output_path`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _refuse_empty_out(command)
        elif "--out" in action.option_strings and action.type is None:
            action.type = _output_path
