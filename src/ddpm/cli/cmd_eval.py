"""``ddpm eval`` and ``ddpm inspect``: a checkpoint's metrics, and what it holds."""

from __future__ import annotations

import json

from ..checkpoint import load_checkpoint, read_metadata
from ..checkpoint_schema import weight_group
from ..errors import DdpmError
from ..evaluation.conditioned import evaluate_checkpoint
from ..evaluation.pipeline import EvalConfig, evaluate
from ..fileio import check_output_path, write_json
from .common import SIGMA_OPTIONS, checkpoint_arg, show_progress


def cmd_inspect(args) -> int:
    tensors, meta = load_checkpoint(checkpoint_arg(args.path, args.checkpoint, "the checkpoint to inspect"))
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(f"checkpoint: {meta['path']}")
    print(f"step:       {meta.get('step')}")
    print(f"format:     version {meta.get('format_version')}")
    sampling = meta.get("config", {}).get("sampling")
    if sampling:
        steps = sampling.get("steps") or "all T"
        print(f"sampling:   {sampling.get('sampler')}, {steps} steps ({sampling.get('spacing')} spacing), "
              "used by the commands that sample when neither --sampler nor --steps is given, or --sampler "
              "names it")
    groups: dict[str, list] = {}
    for name, t in tensors.items():          # ema@0.999.* and phema.0.* are groups of their own
        groups.setdefault((weight_group(name) or (name.split(".", 1)[0],))[0], []).append(t)
    print("tensors:")
    for prefix, ts in sorted(groups.items()):
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in ts})
        print(f"  {prefix + '.*':<10} {len(ts):5d} tensors  {sum(t.numel() for t in ts):>13,d} values  "
              f"{', '.join(dtypes)}")
    print("configuration:")
    print(json.dumps(meta.get("config", {}), indent=2))
    return 0


def cmd_eval(args) -> int:
    for option, path in (("--out", args.out), ("--nn-grid", args.nn_grid)):
        if path:                        # before any work: an existing file needs --overwrite
            check_output_path(path, overwrite=args.overwrite, option=option)
    if args.checkpoint and _is_image_conditioned(args.checkpoint):
        results = evaluate_checkpoint(args, progress=show_progress(args))
    else:
        results = _evaluate(args)
    if results is None:               # a process other than rank 0 under torchrun
        return 0
    for key, value in results.items():
        if key != "bpd_terms":
            print(f"{key:>18}: {value:.6g}" if isinstance(value, float) else f"{key:>18}: {value}")
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


def _evaluate(args):
    """The metrics of ``ddpm eval`` (ddpm.evaluation.pipeline)."""
    names = ("metric", "checkpoint", "samples", "data", "data_root", "split", "image_column", "n", "ref_n", "features",
             "inception", "inception_weights", "inception_resize", "ref_stats", "save_stats", "cache_dir", "nn_grid",
             "sampler", "steps", "spacing", "eta", *SIGMA_OPTIONS, "class_label", "guidance_scale", "batch_size",
             "seed", "device", "weights", "precision", "probes", "ode_solver", "ode_steps")
    options = {name: getattr(args, name) for name in names}
    return evaluate(EvalConfig(metrics=tuple(options.pop("metric")), progress=show_progress(args), **options))


def _is_image_conditioned(checkpoint) -> bool:
    try:
        return read_metadata(checkpoint)["config"].get("condition") is not None
    except DdpmError:                                 # the eval pipeline reports an unreadable checkpoint
        return False
