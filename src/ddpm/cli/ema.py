"""The ``ddpm`` command line of the learning-rate schedules, the moving averages and the post-hoc EMA
(docs/ema.md): the training options, ``--weights raw|ema|ema:D`` and the ``ddpm ema`` command.

Kept apart from the parser (:mod:`ddpm.cli.parser_train`, :mod:`ddpm.cli.parser`), which calls in with one
line each; nothing here imports torch until a command runs.
"""

from __future__ import annotations

import argparse

from .arg_types import nonneg_float, nonneg_int, number, positive_int
from ..errors import ConfigError

__all__ = ["WEIGHTS_HELP", "weights_type", "add_ema_options", "add_ema_command", "cmd_ema", "EXAMPLES_EMA"]


_count, _positive, _nonneg_float = nonneg_int, positive_int, nonneg_float

_decay = number(float, lambda v: 0 <= v <= 1, "an EMA decay in [0, 1]")
# sigma_rel of a power-function EMA (EDM2 Eq. 123): gamma > 0 gives 0 < sigma_rel < 1 / (2 sqrt 3)
_sigma_rel = number(float, lambda v: 0 < v < 0.28867513459481287, "a sigma_rel in (0, 0.2887)")
WEIGHTS_HELP = "ema (default: the first EMA), raw, or ema:D (the EMA of decay D, when the run kept several)"


def weights_type(text: str) -> str:
    """--weights: raw, ema or ema:D, checked as it is parsed (ddpm.ema.parse_weights, without importing torch)."""
    kind, sep, value = text.partition(":")
    if (kind in ("raw", "ema") and not sep) or (kind == "ema" and _decay_or_none(value) is not None):
        return text
    raise argparse.ArgumentTypeError(f"expected raw, ema or ema:DECAY (a decay in [0, 1]), got {text!r}")


def _decay_or_none(text: str) -> float | None:
    try:
        return _decay(text)
    except argparse.ArgumentTypeError:
        return None


class _EMADecays(argparse.Action):
    """--ema-decay D [D ...]: the first decay is ema_decay (the default weights), the others ema_extra_decays."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.ema_decay, namespace.ema_extra_decays = values[0], list(values[1:])


def add_ema_options(g) -> None:
    """Training: the learning-rate schedule, the moving averages and the post-hoc EMA snapshots (docs/ema.md)."""
    g.add_argument("--lr-schedule", choices=("constant", "cosine", "linear", "inverse-sqrt"),
                   help="after the warm-up (default constant): cosine or linear decay to --lr-min at --steps, or "
                        "inverse-sqrt, lr / sqrt(max(step / --lr-ref-steps, 1)) (EDM2)")
    g.add_argument("--lr-min", type=_nonneg_float, metavar="LR",
                   help="floor of the cosine and linear schedules (default 0)")
    g.add_argument("--lr-ref-steps", type=_count, metavar="N",
                   help="t_ref of inverse-sqrt (default 0: the warm-up length)")
    g.add_argument("--ema-decay", type=_decay, nargs="+", action=_EMADecays, metavar="D",
                   help="EMA decay(s) in [0, 1] (default 0.9999); with several, each average is kept and "
                        "checkpointed, the first is the default weights, --weights ema:D picks another")
    g.add_argument("--ema-snapshot-every", type=_count, metavar="N",
                   help="save the post-hoc EMA profiles to RUN/ema-snapshots every N steps, for ddpm ema "
                        "(EDM2; default 0: off)")
    g.add_argument("--ema-profiles", type=_sigma_rel, nargs="+", metavar="SIGMA_REL",
                   help="relative lengths of the tracked power-function profiles (default 0.05 0.10)")
    g.set_defaults(ema_extra_decays=None)             # set with --ema-decay's first value


EXAMPLES_EMA = """\
examples:
  ddpm train --data mnist --data-root DIR --steps 20000 --ema-snapshot-every 500 --out runs/mnist
  ddpm ema --checkpoint runs/mnist --sigma-rel 0.08 --out ema-0.08.safetensors
  ddpm sample --checkpoint ema-0.08.safetensors --num-images 64 --out samples/ema-0.08
  ddpm ema --checkpoint runs/mnist --sweep --sigma-rels 0.03 0.05 0.08 0.12
"""


def add_ema_command(sub) -> None:
    p = sub.add_parser("ema", help="post-hoc EMA: rebuild the average of any length from a run's snapshots",
                       description="Post-hoc EMA (Karras et al. 2024, EDM2): from the power-function averages "
                                   "a run saved with --ema-snapshot-every, rebuild the average of relative length "
                                   "SIGMA_REL at a stored step by least squares and write it as a checkpoint "
                                   "(--sigma-rel), or score a range of lengths with the run's training metric "
                                   "(--sweep). See docs/ema.md.",
                       epilog=EXAMPLES_EMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a run directory with ema-snapshots/")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma-rel", type=_sigma_rel, metavar="S", help="the relative length to rebuild")
    what.add_argument("--sweep", action="store_true",
                      help="score each of --sigma-rels; print a table, write ema-sweep.json and ema-sweep.png")
    p.add_argument("--step", type=_positive, metavar="N", help="the step to rebuild at (default: the last snapshot)")
    p.add_argument("--out", metavar="FILE", help="a file: with --sigma-rel, the checkpoint to write (required; not "
                                                "inside RUN_DIR/checkpoints)")
    p.add_argument("--sweep-dir", metavar="DIR", help="--sweep: the folder for ema-sweep.json and ema-sweep.png "
                                                     "(default RUN_DIR)")
    p.add_argument("--sigma-rels", type=_sigma_rel, nargs="+", metavar="S",
                   help="--sweep: the lengths to score (default 0.025 0.05 ... 0.25, those the profiles reach)")
    p.add_argument("--num-images", dest="n", type=_positive, metavar="N",
                   help="--sweep: images generated per length (default the run's --eval-num-images)")
    p.add_argument("--metric", choices=("fast", "fid", "kid", "is"),
                   help="--sweep: what to score (default the run's evaluation metric)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--device", default="auto")


def cmd_ema(args) -> int:
    from ..device import select_device                           # torch: loaded for the commands that use it
    from ..posthoc_ema_job import sweep, write_reconstruction   # the post-hoc EMA job: loaded for this command

    if args.sweep:
        if args.out:
            raise ConfigError("--out names the checkpoint of --sigma-rel; --sweep writes to --sweep-dir DIR")
        device = select_device(args.device)
        result = sweep(args.checkpoint, args.sigma_rels, step=args.step, n=args.n, metric=args.metric,
                       out_dir=args.sweep_dir, device=str(device), overwrite=args.overwrite)
        print(f"wrote {result.json_path}" + (f" and {result.plot}" if result.plot else ""))
        return 0
    if args.sigma_rels or args.n or args.metric or args.sweep_dir:
        raise ConfigError("--sigma-rels, --num-images, --metric and --sweep-dir apply to --sweep")
    if not args.out:
        raise ConfigError("--sigma-rel needs --out FILE, the checkpoint to write")
    out, rec = write_reconstruction(args.checkpoint, args.sigma_rel, args.out, step=args.step, overwrite=args.overwrite)
    print(f"rebuilt sigma_rel {rec.sigma_rel:g} (gamma {rec.gamma:.2f}) at step {rec.step} from "
          f"{len(rec.inputs)} stored averages ({len({s for s, _ in rec.inputs})} snapshots); relative error of the "
          f"fit {100 * rec.rel_error:.2f}%; wrote {out}")
    return 0
