"""A run's configuration resolved from its layers: recipe, TOML file, checkpoint and command line.

A new run (:func:`resolve_train_config`) is its preset's recipe (:data:`ddpm.recipes.RECIPES`) <
a TOML file (:func:`load_toml`) < the command-line options, merged section by section
(:func:`merge_layers`); a fine-tuning run (:func:`resolve_init_config`) takes its architecture from
the ``--init`` checkpoint; a resumed run (:func:`resume_config`) keeps its saved configuration,
of which only the steps, the device, grad_accum, a time limit and the precision may change.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .checkpoint import load_newest_verified, read_metadata
from .config import DataConfig, DiffusionConfig, RunConfig, TrainConfig, check_keys, check_model_options
from .conditions import ImageCondition
from .data import data_source, load_dataset
from .data.pairs import load_paired_data
from .errors import CheckpointError, ConfigError, DataError
from .models import PRESETS, UnetConfig, preset_config
from .recipes import DEFAULT_PRESET_FOR_DATA, RECIPES, choose, choose_sequences

__all__ = ["merge_layers", "merge_over_recipe", "TRAIN_KEY_ALIASES", "load_toml", "dataset_num_classes",
           "resolve_train_config", "check_overridden_values", "INIT_MAY_CHANGE", "resolve_init_config", "checkpoint_global_batch",
           "per_process_batch", "RESUME_MAY_CHANGE", "resume_config"]


# ----------------------------------------------------------------------------- layers and TOML files

def merge_layers(*layers: dict) -> dict:
    """Merge configuration dictionaries section by section; later layers win."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict):
                out[key] = {**out.get(key, {}), **value}
            elif value is not None:
                out[key] = value
    return out


def merge_over_recipe(preset: str | None, *layers: dict) -> dict:
    """``layers`` (checkpoint, file, options) merged over the ``preset``'s recipe, the lowest layer.
    A recipe loss weighting gives way to a chosen ``loss = vlb``, which has no use for it (the bound
    is not a weighted mean squared error), so ``--loss vlb`` works with every preset; the recipe's
    diffusion options all give way to ``formulation = edm``, which has none of them."""
    given = merge_layers(*layers)
    recipe = {section: dict(options) for section, options in RECIPES.get(preset, {}).items()}
    chosen = given.get("diffusion", {})
    if chosen.get("loss") == "vlb" and "loss_weighting" not in chosen:
        recipe.get("diffusion", {}).pop("loss_weighting", None)
    if chosen.get("formulation") == "edm":                # EDM's loss has its own weighting (ddpm.edm)
        recipe.pop("diffusion", None)
    return merge_layers(recipe, given)


# [train] keys that may also be written as the command line spells their options (``--num-images``,
# ``--eval-num-images``): the key it stands for.
TRAIN_KEY_ALIASES = {"num_images": "num_samples", "eval_num_images": "eval_samples"}


def _train_key_aliases(table: dict, path) -> dict:
    """``table`` with the keys of :data:`TRAIN_KEY_ALIASES` renamed; both spellings of one key are an error."""
    for alias, key in TRAIN_KEY_ALIASES.items():
        if alias in table:
            if key in table:
                raise ConfigError(f"{path}: [train] gives both {key} and {alias}, which are the same option; "
                                  "keep one")
            table = {**{k: v for k, v in table.items() if k != alias}, key: table[alias]}
    return table


def load_toml(path: str | os.PathLike) -> dict:
    """Read a TOML configuration file: optional ``preset`` and tables [model], [diffusion], [data], [train],
    [condition] (an image-conditioned model: ``task``, ``scale``, ``noise``, ``data``, as ``--task``,
    ``--scale``, ``--condition-noise`` and ``--condition-data`` give them).

    A file that is binary or not UTF-8, an unknown table or an unknown key in a table (named with
    its section and the keys allowed there) is one :class:`ConfigError`. [train] also takes the
    keys :data:`TRAIN_KEY_ALIASES` names (``num_images`` for ``num_samples``, ...).
    """
    d = _parse_toml(path)
    unknown = sorted(set(d) - {"preset", "model", "diffusion", "data", "train", "condition"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; "
                          "expected preset and the tables [model], [diffusion], [data], [train], [condition]")
    _check_condition_table(d.get("condition", {}), path)
    if "preset" in d and not isinstance(d["preset"], str):
        raise ConfigError(f"{path}: preset must be a string; got {d['preset']!r}")
    if isinstance(d.get("train"), dict):
        d["train"] = _train_key_aliases(d["train"], path)
    tables = {"model": UnetConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}
    for section, cls in tables.items():
        if section not in d:
            continue
        if not isinstance(d[section], dict):
            raise ConfigError(f"{path}: {section} must be a table [{section}]; got {d[section]!r}")
        check_keys(d[section], cls, section, where=f"{path}: ")
    check_model_options(d.get("model", {}), where=f"{path}: ")
    return d


CONDITION_FLAGS = {"task": "--task", "scale": "--scale", "noise": "--condition-noise", "data": "--condition-data"}


def _check_condition_table(table, path) -> None:
    """[condition]: a table of the keys :data:`CONDITION_FLAGS` names (their values are checked as the options')."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: condition must be a table [condition]; got {table!r}")
    unknown = sorted(set(table) - set(CONDITION_FLAGS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} in [condition]; "
                          f"expected {', '.join(CONDITION_FLAGS)}")
    for key, kinds, what in (("task", str, "string"), ("data", str, "string"), ("scale", int, "whole number"),
                             ("noise", (int, float), "number")):
        if key in table and (not isinstance(table[key], kinds) or isinstance(table[key], bool)):
            raise ConfigError(f"{path}: [condition] {key} = {table[key]!r} is not a {what}")


def condition_layers(file_layer: dict, flags: dict | None) -> dict:
    """The image condition's options: the file's [condition] table < the options given (``flags``: task, scale,
    noise, data, None where not given)."""
    return {**file_layer.get("condition", {}), **{k: v for k, v in (flags or {}).items() if v is not None}}


def _parse_toml(path: str | os.PathLike) -> dict:
    """The TOML document in ``path``; unreadable, binary, non-UTF-8 or malformed files are one line."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1_000_001)
    except FileNotFoundError:
        raise ConfigError(f"no such configuration file: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror or exc}") from None
    if len(raw) > 1_000_000:
        raise ConfigError(f"configuration file {path} is over 1 MB; a TOML configuration is a few lines")
    if b"\0" in raw:
        raise ConfigError(f"configuration file {path} is a binary file, not TOML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- a new run, a fine-tuning run

def dataset_num_classes(data) -> int:
    """The class count of a labelled dataset: its class names, else the largest label + 1."""
    if data.labels is None:
        raise DataError(f"--conditional needs class labels, and dataset {data.name!r} has none (use class "
                        "subfolders, an .npz with a 'labels' array, or digits / mnist / fashion-mnist / cifar10)")
    return len(data.class_names) if data.class_names else int(data.labels.max()) + 1


def resolve_train_config(flags: dict, *, preset: str | None = None, config_file: str | None = None,
                         conditional: bool = False, label_dropout_given: bool = False, condition: dict | None = None):
    """A new run's configuration: the preset's recipe < the ``config_file`` (TOML) < ``flags`` (sections
    of options, as :func:`merge_layers` takes them). The model's image size and channels come from the
    data, which is loaded here. A folder or .npz given without a preset gets the preset and recipe that
    :func:`ddpm.recipes.choose` picks from its size and count (``RunConfig.choice`` says why); its path is
    recorded absolute, with its fingerprint. ``condition`` (task, scale, noise, data: the options of an
    image-conditioned model, :func:`image_condition`) adds the condition. Returns (config, data)."""
    file_layer = load_toml(config_file) if config_file else {}
    condition = condition_layers(file_layer, condition)
    init = flags.get("train", {}).get("init") or file_layer.get("train", {}).get("init")
    if init:
        return resolve_init_config(init, flags, file_layer, preset=preset, config_file=config_file,
                                   conditional=conditional, condition=condition)
    data_name = flags.get("data", {}).get("name") or file_layer.get("data", {}).get("name") or "digits"
    preset = preset or file_layer.get("preset") or DEFAULT_PRESET_FOR_DATA.get(data_name)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} in {config_file}; choose from {', '.join(PRESETS)}")
    for key in ("image_size", "channels"):
        if key in file_layer.get("model", {}):
            raise ConfigError(f"{config_file}: set {key} under [data]; the model takes it from the data")
    merged = merge_over_recipe(preset, file_layer, flags)
    check_overridden_values(file_layer, flags, merged, config_file)
    data_cfg, diffusion_cfg, train_cfg = _sections(merged)
    data = _load_training_data(data_cfg, (condition or {}).get("data"))
    choice = None
    if preset is None:                       # a folder or .npz without a preset: chosen from the data
        choice = (choose_sequences(data.image_size[0], data.channels, data.num_images) if data.is_sequences
                  else choose(data.image_size, data.channels, data.num_images))
        preset = choice.preset
        # The chosen preset's recipe brings its diffusion options; its train options are the choice's.
        diffusion = merge_over_recipe(preset, file_layer, flags).get("diffusion", {})
        _, diffusion_cfg, train_cfg = _sections(merge_layers({"train": choice.train}, file_layer, flags,
                                                             {"diffusion": diffusion}))
    if data.path is not None:                # the run finds its data from any directory, and knows it again
        data_cfg = replace(data_cfg, name=data.path, fingerprint=data.fingerprint())
    image_cond = image_condition(condition, data)
    if image_cond is not None and image_cond.task == "paired":
        source = condition["data"]
        data_cfg = replace(data_cfg, condition_data=os.path.abspath(source) if Path(source).exists() else str(source))
    model_layer = {**merged.get("model", {}), "image_size": data.image_size, "channels": data.channels}
    if data.is_sequences:                    # float [N, C, L]: a 1D U-Net (ddpm.models.unet1d)
        model_layer["kind"] = "unet1d"
        data_cfg = _sequence_data(data_cfg, file_layer, flags)
    if conditional:
        model_layer["num_classes"] = dataset_num_classes(data)
        if data.class_names and len(data.class_names) == model_layer["num_classes"]:
            model_layer["class_names"] = tuple(data.class_names)
    elif label_dropout_given and model_layer.get("num_classes") is None:
        raise ConfigError("--label-dropout applies to class-conditional models; add --conditional")
    try:
        model_cfg = preset_config(preset, **model_layer)
    except TypeError as exc:
        raise ConfigError(f"invalid [model] option: {exc}") from None
    return RunConfig(preset=preset, model=model_cfg, diffusion=diffusion_cfg, data=data_cfg, train=train_cfg,
                     choice=None if choice is None else choice.reason, condition=image_cond), data


def _sequence_data(data_cfg: DataConfig, file_layer: dict, flags: dict) -> DataConfig:
    """A sequence run's data options: a preset recipe's random flips (an image augmentation) left out,
    unless the file or the command line asked for them (which the run's configuration then refuses)."""
    asked = any(layer.get("data", {}).get("hflip") is not None for layer in (file_layer, flags))
    return data_cfg if asked else replace(data_cfg, hflip=False)


def _load_training_data(d: DataConfig, condition_data=None):
    """The training images ``d`` names; with ``condition_data`` (paired), holding their conditions row by row."""
    if condition_data is None:
        return load_dataset(d.name, data_root=d.root, split=d.split, image_size=d.image_size, channels=d.channels,
                            strict=d.strict, image_column=d.image_column, label_column=d.label_column)
    return load_paired_data(d.name, condition_data, data_root=d.root, split=d.split, image_size=d.image_size,
                            channels=d.channels)


def image_condition(options: dict | None, data) -> ImageCondition | None:
    """The :class:`~ddpm.conditions.ImageCondition` of ``--task`` (with ``--scale``, ``--condition-noise``,
    ``--condition-data``) for the training ``data``: the condition has the targets' channels
    (super-resolution), one (colorize: luminance) or the paired conditions' own."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    task = options.get("task")
    if task is None:
        given = sorted(k for k in options if k != "task")
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to image-conditioned models; add --task")
        return None
    if (task == "paired") != ("data" in options):
        raise ConfigError("--condition-data is the condition source of --task paired, and paired needs it")
    if task == "paired":
        channels = data.conditions.shape[3]
    else:
        channels = 1 if task == "colorize" else data.channels
    if task == "colorize" and data.channels != 3:
        raise ConfigError(f"colorize needs RGB targets (3 channels); {data.name} has {data.channels} "
                          "(pass --channels 3)")
    cond = ImageCondition(task=task, channels=channels, scale=options.get("scale"),
                          noise=float(options.get("noise", 0.0)))
    cond.check_image_size(data.image_size)
    return cond


def check_overridden_values(file_layer: dict, flags: dict, merged: dict, config_file) -> None:
    """Validate the file's values that options override, which the merged configuration never sees: each
    section as if the file had won on every key it gives (``batch_size = -8`` under ``--batch-size 8``
    is refused all the same). [model] values are checked when the file is read (:func:`load_toml`)."""
    for section, cls in (("data", DataConfig), ("diffusion", DiffusionConfig), ("train", TrainConfig)):
        given = file_layer.get(section, {})
        overridden = sorted(k for k, v in flags.get(section, {}).items() if v is not None and k in given)
        if not overridden:
            continue
        try:
            cls(**{**merged.get(section, {}), **given})
        except (ConfigError, TypeError) as exc:
            spelled = {key: alias for alias, key in TRAIN_KEY_ALIASES.items()}       # num_samples: --num-images
            options = ", ".join("--" + spelled.get(k, k).replace("_", "-") for k in overridden)
            raise ConfigError(f"{config_file}: {exc} (overridden by {options}, but every value given is "
                              "checked; fix or remove it in the file)") from None


def _sections(merged: dict) -> tuple[DataConfig, DiffusionConfig, TrainConfig]:
    try:
        return (DataConfig(**merged.get("data", {})), DiffusionConfig(**merged.get("diffusion", {})),
                TrainConfig(**merged.get("train", {})))
    except TypeError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


# Model options that may differ from an --init checkpoint's: they change no weight's shape.
INIT_MAY_CHANGE = {"dropout"}


def _check_init_model(saved: RunConfig, source: str, flags: dict, file_layer: dict, *, preset, config_file,
                      conditional: bool) -> None:
    """Refuse a preset, [model] value or option that contradicts the checkpoint's architecture."""
    file_preset = preset or file_layer.get("preset")
    if file_preset is not None and file_preset != saved.preset:
        where = "--preset" if preset else f"preset in {config_file}"
        raise ConfigError(f"{where} {file_preset} contradicts {source}, whose model is {saved.preset!r}; "
                          "leave it out: the architecture comes from the checkpoint")
    model = saved.model.to_dict()
    for layer, is_file in ((file_layer, True), (flags, False)):
        for key, value in layer.get("model", {}).items():
            old = model.get(key)
            same = list(value) == list(old) if isinstance(value, (list, tuple)) and old is not None else value == old
            if not same and key not in INIT_MAY_CHANGE:
                given = f"{key} = {value} in {config_file}" if is_file else f"--{key.replace('_', '-')} {value}"
                raise ConfigError(f"{given} contradicts {source}, whose model has {key} = {old}")
    if conditional and not saved.conditional:
        raise ConfigError(f"--conditional contradicts {source}, whose model is unconditional")


def resolve_init_config(init: str, flags: dict, file_layer: dict, *, preset: str | None = None,
                        config_file: str | None = None, conditional: bool = False, condition: dict | None = None):
    """A fine-tuning run's configuration: the architecture of the ``init`` checkpoint and, unless the
    file or the options say otherwise, its diffusion settings and image size; the preset's recipe
    below them. An image-conditioned checkpoint keeps its condition (a paired one takes new pairs from
    ``condition['data']``). Returns (config, data)."""
    meta = read_metadata(init)
    try:
        saved = RunConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"--init {meta['path']} has an unusable configuration: {exc}") from None
    source = f"--init {init}"
    _check_init_model(saved, source, flags, file_layer, preset=preset, config_file=config_file,
                      conditional=conditional)
    sequences = saved.model.kind == "unet1d"      # a sequence keeps its length and channels: nothing to resize
    base = {"diffusion": saved.to_dict()["diffusion"],
            "data": {} if sequences else {"image_size": saved.model.image_size, "channels": saved.model.channels}}
    merged = merge_over_recipe(saved.preset, base, file_layer, flags)
    check_overridden_values(file_layer, flags, merged, config_file)
    data_cfg, diffusion_cfg, train_cfg = _sections(merged)
    for what, ours, theirs in (("self_condition", diffusion_cfg.self_condition, saved.diffusion.self_condition),
                               ("learned variance", diffusion_cfg.learned_variance, saved.diffusion.learned_variance)):
        if ours != theirs:             # the network's input or output channels would change
            raise ConfigError(f"{what} = {ours} contradicts {source}, whose model has {what} = {theirs}")
    pairs = _init_condition(saved.condition, condition or {}, source)
    data = _load_training_data(data_cfg, pairs)
    if sequences and (tuple(data.image_size), data.channels) != (tuple(saved.model.image_size), saved.model.channels):
        raise DataError(f"{data.name} holds sequences of {data.channels}x{data.image_size[0]}; {source}'s model "
                        f"takes {saved.model.channels}x{saved.model.image_size[0]}")
    if pairs is not None:
        if data.conditions.shape[3] != saved.condition.channels:
            raise DataError(f"--condition-data {pairs} has {data.conditions.shape[3]}-channel conditions; "
                            f"{source}'s model takes {saved.condition.channels}")
        data_cfg = replace(data_cfg, condition_data=os.path.abspath(pairs) if Path(pairs).exists() else str(pairs))
    model = {**saved.model.to_dict(), **{k: v for k, v in merged.get("model", {}).items() if k in INIT_MAY_CHANGE}}
    return RunConfig(preset=saved.preset, model=UnetConfig(**model), diffusion=diffusion_cfg, data=data_cfg,
                     train=train_cfg, condition=saved.condition), data


def _init_condition(saved: ImageCondition | None, given: dict, source: str) -> str | None:
    """Fine-tuning keeps the checkpoint's condition: the options may repeat it, not change it (the network's
    input channels would). Returns the paired model's new condition source (None for the other tasks)."""
    if saved is None:
        if given:
            key = sorted(given)[0]
            raise ConfigError(f"{CONDITION_FLAGS[key]} with --init: {source} is not image-conditioned, and "
                              "fine-tuning keeps its model's inputs; train a new run for an image condition")
        return None
    for key in ("task", "scale", "noise"):
        have = getattr(saved, key)
        if key in given and given[key] != have:
            raise ConfigError(f"{CONDITION_FLAGS[key]} {given[key]} contradicts {source}, whose model has "
                              f"{key} = {have}; fine-tuning keeps the checkpoint's condition")
    if (saved.task == "paired") != ("data" in given):
        raise ConfigError(f"fine-tuning the paired model {source} takes its pairs: give --condition-data"
                          if saved.task == "paired" else "--condition-data is the condition source of paired models")
    return given.get("data")


# ----------------------------------------------------------------------------- a resumed run

def checkpoint_global_batch(meta: dict) -> int:
    """The global batch (images per optimizer step) a checkpoint was trained with.

    Checkpoints written before data parallelism do not store it: there ``batch_size`` meant the
    images per optimizer step (split into grad_accum micro-batches), so it is the global batch.
    """
    if "global_batch" in meta:
        return int(meta["global_batch"])
    return int(meta["config"]["train"]["batch_size"])


def per_process_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    """The per-process batch that keeps ``global_batch`` with ``world_size`` processes and ``grad_accum``."""
    if global_batch % (world_size * grad_accum):
        raise ConfigError(f"the run's global batch of {global_batch} images does not divide among {world_size} "
                          f"process(es) x grad_accum {grad_accum}; resume with a number of processes and "
                          f"--grad-accum whose product divides {global_batch}")
    return global_batch // (world_size * grad_accum)


# What a resumed run may change (batch_size only as the per-process share of the saved global batch).
RESUME_MAY_CHANGE = {("train", "steps"), ("train", "device"), ("train", "grad_accum"), ("train", "time_limit"),
                     ("train", "precision")}


def _check_resume_flags(saved: RunConfig, meta: dict, flags: dict, flag_names: dict, *, preset, conditional,
                        world_size: int, grad_accum: int, batch_size: int | None) -> int:
    """Refuse options that contradict the saved run; returns the per-process batch that keeps its global batch."""
    if preset and preset != saved.preset:
        raise ConfigError(f"--preset {preset} differs from the run's saved preset {saved.preset}")
    if conditional and not saved.conditional:
        raise ConfigError("--conditional differs from the run's saved model, which is unconditional")
    global_batch = checkpoint_global_batch(meta)
    per_process = per_process_batch(global_batch, world_size, grad_accum)
    if batch_size is not None and batch_size != per_process:
        raise ConfigError(f"--batch-size {batch_size} does not keep the run's global batch of {global_batch} "
                          f"images with {world_size} process(es) and grad_accum {grad_accum} (that takes "
                          f"--batch-size {per_process}, or leave it out)")
    saved_dict = saved.to_dict()
    for section, values in flags.items():
        for key, value in values.items():
            if key == "batch_size":
                continue
            old = saved_dict[section][key]
            same = (list(value) == list(old)) if isinstance(value, tuple) and old is not None else value == old
            if not same and (section, key) not in RESUME_MAY_CHANGE:
                name = flag_names.get((section, key), f"[{section}] {key}")
                raise ConfigError(f"{name} {value} differs from the run's saved value {old}; a resumed run "
                                  "keeps its configuration (only --steps, --device, --grad-accum, --time-limit "
                                  "and --precision may change)")
    return per_process


def _saved_config(run_dir: Path) -> RunConfig:
    """The config.json of a run that has no checkpoint yet."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from (and no config.json to restart from)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); start the run again with its ddpm train command") from None
    return RunConfig.from_dict(d)


def _moved_data(saved: DataConfig, name: str) -> DataConfig:
    """The run's data config pointed at ``name``: its own place, or a copy that the fingerprint recorded at
    the start of the run will recognise (checked when it is loaded, :func:`ddpm.training_data.load_training_data`)."""
    new = data_source(name)
    if new in (saved.name, data_source(saved.name)):
        return saved
    if saved.fingerprint is None:
        raise ConfigError(f"--data {name} differs from the run's saved value {saved.name}, and the run recorded no "
                          "fingerprint to recognise a moved copy by")
    return replace(saved, name=new)


def resume_config(run_dir, flags: dict, *, world_size: int = 1, flag_names: dict | None = None, out=None,
                  config=None, preset: str | None = None, conditional: bool = False, steps: int | None = None,
                  device: str | None = None, grad_accum: int | None = None, batch_size: int | None = None,
                  time_limit: float | None = None):
    """The resume policy: the saved configuration of ``run_dir``'s newest checkpoint, which the options
    (``flags``, as sections) must repeat except the steps, the device, grad_accum and a time limit.

    The global batch is kept: the per-process batch follows from ``world_size`` and grad_accum.
    ``flag_names`` names each (section, key) in messages. Returns (config, run_dir).
    """
    run_dir = Path(run_dir)
    if out and Path(out).resolve() != run_dir.resolve():
        raise ConfigError("--out and --resume name different directories; a resumed run stays in its own")
    if config:
        raise ConfigError("--config cannot be combined with --resume: the run keeps its saved configuration")
    if (run_dir / "round.json").is_file():
        raise ConfigError(f"{run_dir} is a distillation round; continue it with ddpm distill --resume {run_dir.parent}")
    loaded = load_newest_verified(run_dir)          # a newer checkpoint that fails is skipped, with a warning
    if loaded is not None:
        meta = loaded[1]
        saved = RunConfig.from_dict(meta["config"])
    else:                                           # stopped before its first checkpoint: restart from step 0
        saved = _saved_config(run_dir)
        meta = {"step": 0, "global_batch": saved.train.global_batch_size(world_size)}
    if flags.get("data", {}).get("name") is not None:          # --data: the same dataset, maybe moved
        saved = replace(saved, data=_moved_data(saved.data, flags["data"]["name"]))
        flags = {**flags, "data": {k: v for k, v in flags["data"].items() if k != "name"}}
    grad_accum = grad_accum or saved.train.grad_accum
    per_process = _check_resume_flags(saved, meta, flags, flag_names or {}, preset=preset, conditional=conditional,
                                      world_size=world_size, grad_accum=grad_accum, batch_size=batch_size)
    # The recorded precision, unless the options name one (auto resolves afresh in train()).
    precision = flags.get("train", {}).get("precision") or saved.train.precision
    train_cfg = replace(saved.train, steps=steps or saved.train.steps, device=device or saved.train.device,
                        precision=precision, batch_size=per_process, grad_accum=grad_accum,
                        time_limit=time_limit or 0.0)       # a time limit is this command's, not the run's
    # A final checkpoint without samples.png (killed while drawing it) is completed by resuming.
    done = meta["step"]
    finished = train_cfg.steps < done or (train_cfg.steps == done and (run_dir / "samples.png").is_file())
    if finished:
        raise ConfigError(f"{run_dir} is already at step {meta['step']}; pass --steps N with N > {meta['step']} "
                          "to extend it")
    return replace(saved, train=train_cfg), run_dir
