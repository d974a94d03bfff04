"""The model card (``README.md``) of an exported ``DDPMPipeline`` folder, as the Hugging Face Hub reads it.

A YAML header the Hub indexes (``library_name: diffusers``, the pipeline's tags, the dataset when it
is one the Hub knows), then what a reader asks first: samples, how to load it, what it was trained
on and how, and the commands that made it. Everything comes from the checkpoint's metadata and its
run directory (``samples.png``, ``provenance.json``); nothing is guessed.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..data.sources import has_splits
from ..config import RunConfig

__all__ = ["model_card", "run_dir_of", "training_commands", "SAMPLES_NAME"]

SAMPLES_NAME = "samples.png"
TAGS = ("pytorch", "diffusers", "unconditional-image-generation")
# Built-in datasets and their names on the Hub; a folder or an .npz of one's own has none.
HUB_DATASETS = {"mnist": "mnist", "fashion-mnist": "fashion_mnist", "cifar10": "cifar10"}


def public(text: str) -> str:
    """``text`` without the local file system: an absolute path (``/home/ana/photos``, ``~/photos``,
    ``C:\\photos``) becomes its last name (``photos``); ``--flag=PATH`` keeps its flag. A card is published."""
    flag, eq, value = text.partition("=") if text.startswith("-") else ("", "", text)
    windows = len(value) > 2 and value[1] == ":" and value[2] in "\\/"
    if value.startswith(("/", "~")) or windows:
        value = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or value
    return flag + eq + value


def public_command(command: str) -> str:
    """A command line with each absolute path replaced by its last name (:func:`public`)."""
    try:
        return shlex.join(public(arg) for arg in shlex.split(command))
    except ValueError:                       # unbalanced quotes: not a command line to rewrite
        return command


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file belongs to (``RUN/checkpoints/step-N.safetensors``), or None."""
    if checkpoint.parent.name == "checkpoints" and (checkpoint.parent.parent / "config.json").is_file():
        return checkpoint.parent.parent
    return None


def training_commands(run_dir: Path | None) -> list[str]:
    """The ``ddpm train`` / ``ddpm distill`` commands of a run, in order, from its ``provenance.json``.

    Only command lines that name the command are kept: one started in-process (from Python)
    records its host program's arguments, which say nothing about the run. A ``provenance.json``
    that is a symbolic link out of the run directory is not read.
    """
    path = None if run_dir is None else run_dir / "provenance.json"
    if path is None or not path.is_file() or not path.resolve().is_relative_to(run_dir.resolve()):
        return []                   # none, or a symbolic link out of the run directory: not the run's
    try:
        events = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    out = []
    for event in events if isinstance(events, list) else []:
        argv = event.get("argv") if isinstance(event, dict) else None
        if isinstance(argv, list) and len(argv) > 1 and argv[1] in ("train", "distill"):
            out.append(shlex.join(["ddpm", *map(str, argv[1:])]))
    return out


def _yaml_header(config: RunConfig) -> str:
    lines = ["---", "library_name: diffusers", "tags:", *(f"- {tag}" for tag in TAGS)]
    hub = HUB_DATASETS.get(config.data.name)
    if hub is not None:
        lines += ["datasets:", f"- {hub}"]
    return "\n".join([*lines, "---"])


def _training_section(config: RunConfig, meta: dict) -> list[str]:
    d, t, m = config.diffusion, config.train, config.model
    global_batch = meta.get("global_batch", t.batch_size)
    lines = [f"- dataset: `{public(config.data.name)}`" + (f" (`{config.data.split}` split)" if has_splits(config.data.name) else ""),
             f"- images: {m.channels} channel(s), {m.image_size[0]}x{m.image_size[1]}",
             f"- training steps: {meta.get('step')}",
             f"- model: the U-Net of Ho et al. 2020 (Appendix B), preset `{config.preset}`",
             f"- diffusion: T = {d.timesteps}, `{d.schedule}` schedule, predicts `{d.objective}`, "
             f"`{d.variance}` variance, `{d.loss}` loss",
             f"- recipe: {t.optimizer}, lr {t.lr:g} (warm-up {t.warmup_steps} steps), batch {global_batch}, "
             f"gradient clip {t.grad_clip:g}, EMA decay {t.ema_decay:g}, {t.precision}, seed {t.seed}"]
    if t.init:
        lines.append(f"- fine-tuned from `{public(t.init)}`")
    imported = meta.get("imported_from")
    if imported:
        lines.append(f"- imported from a {imported.get('format')} folder (`{public(str(imported.get('path')))}`); "
                     "training steps count from the import")
    return lines


def model_card(meta: dict, config: RunConfig, *, weights: str, parameters: int, export_command: str,
               samples: bool, run_dir: Path | None) -> str:
    """The text of ``README.md`` for the folder exported from checkpoint ``meta`` (with ``config``)."""
    name = run_dir.name if run_dir is not None else Path(meta["path"]).stem
    lines = [_yaml_header(config), "", f"# {name}: a DDPM for unconditional image generation", "",
             f"A denoising diffusion probabilistic model (Ho et al. 2020), {parameters / 1e6:.2f}M parameters, "
             f"trained with ddpm and exported as a diffusers `DDPMPipeline` ({weights} weights).", ""]
    if samples:
        lines += ["## Samples", "", f"![samples of the run](./{SAMPLES_NAME})", "",
                  "The run's last sample grid (EMA weights on the left, raw weights on the right).", ""]
    lines += ["## Usage", "", "```python", "from diffusers import DDPMPipeline", "",
              'pipe = DDPMPipeline.from_pretrained("path/to/this/folder")',
              "images = pipe(batch_size=16, num_inference_steps=50).images   # PIL images", "```", "",
              "## Training", "", *_training_section(config, meta), "", "## How it was made", ""]
    commands = [public_command(c) for c in training_commands(run_dir)]
    export_command = public_command(export_command)
    lines += ["```", *commands, export_command, "```"] if commands else [
        "The training command was not recorded (the run was started from Python, or this checkpoint has "
        "no run directory). The export:", "", "```", export_command, "```"]
    return "\n".join(lines) + "\n"
