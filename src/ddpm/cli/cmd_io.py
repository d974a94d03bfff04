"""``ddpm export``, ``ddpm import`` and ``ddpm prepare``: checkpoints to and from other formats, and
datasets decoded once. The optional packages (diffusers, huggingface_hub) load inside ddpm.interop."""

from __future__ import annotations

from ..data.prepare import prepare_dataset
from ..errors import ConfigError
from ..interop.diffusers import export_diffusers, import_diffusers
from ..interop.hub import diffusers_snapshot, openai_state_dict_source, push_to_hub
from ..interop.openai import import_openai
from .common import checkpoint_arg


def cmd_export(args) -> int:
    if args.private and not args.push_to_hub:
        raise ConfigError("--private applies to --push-to-hub OWNER/NAME; give that too")
    out = export_diffusers(args.checkpoint, args.out, weights=args.weights)
    print(f"wrote a diffusers DDPMPipeline folder to {out} ({args.weights} weights of {args.checkpoint})")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"uploaded it to {url}")
    return 0


def cmd_import(args) -> int:
    if args.format == "openai":
        source = checkpoint_arg(args.folder, args.checkpoint, "the state dict to import")
        if not args.flags:
            raise ConfigError("--format openai needs --flags \"...\": the flags the model was built with")
        if source.startswith("hf://"):
            source = openai_state_dict_source(source)
        print(f"wrote checkpoint {import_openai(source, args.out, args.flags)} from {source}")
        return 0
    if args.flags:
        raise ConfigError("--flags applies to --format openai only")
    folder = checkpoint_arg(args.folder, args.checkpoint, "the diffusers folder to import")
    if folder.startswith("hf://"):
        folder = str(diffusers_snapshot(folder))
    out = import_diffusers(folder, args.out)
    print(f"wrote checkpoint {out} from the diffusers folder {folder}")
    return 0


def cmd_prepare(args) -> int:
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        raise ConfigError("--image-size takes N or H W")
    size = None if args.image_size is None else tuple(args.image_size * 2 if len(args.image_size) == 1
                                                      else args.image_size)
    result = prepare_dataset(args.data, args.out, data_root=args.data_root, split=args.split, image_size=size,
                             channels=args.channels, strict=args.strict, workers=args.workers,
                             progress=not args.quiet, image_column=args.image_column, label_column=args.label_column)
    n, height, width, channels = result.shape
    resumed = f", {result.resumed_rows} of them by an interrupted run" if result.resumed_rows else ""
    skipped = (f"; {len(result.skipped)} unreadable file(s) skipped (first: {result.skipped[0]})" if result.skipped
               else "")
    print(f"prepared {n} images of {height}x{width}x{channels} in {result.path}{resumed}{skipped}")
    return 0
