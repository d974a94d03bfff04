"""Run configuration as typed dataclasses, validated when built.

A :class:`RunConfig` holds everything needed to rebuild a run: the U-Net architecture,
the diffusion process, the data and the training options. It is saved as JSON in the
run directory and inside every checkpoint, so sampling needs no training option again.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .diffusion import LEARNED_VARIANCE, LOSS_WEIGHTINGS, LOSSES, OBJECTIVES, VARIANCES
from .errors import ConfigError
from .models import UnetConfig, preset_config
from .schedules import SCHEDULES
from .timestep_sampling import TIMESTEP_SAMPLINGS

__all__ = ["DiffusionConfig", "DataConfig", "TrainConfig", "SamplingConfig", "RunConfig", "DEFAULT_PRESET_FOR_DATA",
           "RECIPES", "per_process_batch", "build_model", "load_toml", "merge_layers",
           "dataset_num_classes", "resolve_train_config", "checkpoint_global_batch", "RESUME_MAY_CHANGE",
           "resume_config"]

# The U-Net preset used when --preset is not given, by dataset name.
DEFAULT_PRESET_FOR_DATA = {"digits": "digits", "mnist": "mnist", "fashion-mnist": "mnist", "cifar10": "cifar10"}


def _from_dict(cls, d: dict, section: str):
    if not isinstance(d, dict):
        raise ConfigError(f"[{section}] must be a table of options")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) in [{section}]: {', '.join(unknown)}")
    return cls(**d)


def _is_int(value: Any) -> bool:
    """A real integer: bools (True == 1) and floats are refused rather than silently taken."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(value: Any, choices, what: str) -> None:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass
class DiffusionConfig:
    """The diffusion process (Ho et al. 2020 defaults)."""

    timesteps: int = 1000              # T
    schedule: str = "linear"           # linear | cosine | sigmoid
    objective: str = "eps"             # what the network predicts: eps | x0 | v
    loss_weighting: str = "uniform"    # uniform (L_simple) | min-snr
    min_snr_gamma: float = 5.0
    variance: str = "posterior"        # sigma_t^2: posterior (beta-tilde) | beta | learned-range (Nichol & Dhariwal 2021)
    clip_denoised: bool = True         # clip the x0 estimate to [-1, 1] while sampling
    # Improved DDPM and other training variants (docs/notation.md); the defaults are the paper's training.
    loss: str = "simple"               # simple (L_simple) | hybrid (L_simple + vlb_weight L_vlb) | vlb (L_vlb alone)
    vlb_weight: float = 0.001          # lambda of the hybrid loss (Nichol & Dhariwal 2021, Sec. 3.1)
    timestep_sampling: str = "uniform"  # uniform | importance (p_t ~ sqrt(E[L_t^2]), Sec. 3.3)
    offset_noise: float = 0.0          # strength of a per-(sample, channel) constant added to eps (0: off)
    self_condition: bool = False       # feed the previous x0 estimate back as extra input (Chen et al. 2023)

    def __post_init__(self) -> None:
        if not _is_int(self.timesteps) or self.timesteps < 2:
            raise ConfigError(f"timesteps must be an integer >= 2; got {self.timesteps!r}")
        _choice(self.schedule, tuple(SCHEDULES), "schedule")
        _choice(self.objective, OBJECTIVES, "objective")
        _choice(self.loss_weighting, LOSS_WEIGHTINGS, "loss weighting")
        _choice(self.variance, VARIANCES, "variance")
        if not self.min_snr_gamma > 0:
            raise ConfigError(f"min_snr_gamma must be > 0; got {self.min_snr_gamma}")
        _choice(self.loss, LOSSES, "loss")
        _choice(self.timestep_sampling, TIMESTEP_SAMPLINGS, "timestep sampling")
        if not _is_number(self.vlb_weight) or not self.vlb_weight > 0:
            raise ConfigError(f"vlb_weight must be a number > 0; got {self.vlb_weight!r}")
        if not _is_number(self.offset_noise) or not self.offset_noise >= 0:
            raise ConfigError(f"offset noise strength must be a number >= 0; got {self.offset_noise!r}")
        if not isinstance(self.self_condition, bool):
            raise ConfigError(f"self_condition must be true or false; got {self.self_condition!r}")
        self._check_combination()

    def _check_combination(self) -> None:
        """Refuse combinations that train nothing or estimate nothing (README, "Improved DDPM")."""
        learned = self.variance == LEARNED_VARIANCE
        if learned and self.loss == "simple":
            raise ConfigError("learned variances need an L_vlb term: L_simple does not train them; "
                              "use --loss hybrid (Nichol & Dhariwal's choice) or --loss vlb")
        if self.loss == "hybrid" and not learned:
            raise ConfigError("the hybrid loss's L_vlb term only trains a learned variance (the mean is under a "
                              "stop-gradient there); add --variance learned-range, or use --loss vlb to train a "
                              "fixed-variance model on the bound")
        if self.timestep_sampling == "importance" and self.loss == "simple":
            raise ConfigError("importance sampling of timesteps reduces the variance of L_vlb; it needs "
                              "--loss vlb or --loss hybrid")
        if self.loss == "vlb" and self.loss_weighting != "uniform":
            raise ConfigError("a loss weighting applies to the mean squared error; the pure L_vlb objective "
                              "has none (use --loss-weighting uniform or --loss hybrid)")
        if self.loss == "vlb" and self.offset_noise > 0:
            raise ConfigError("offset noise changes the forward process, so L_vlb would no longer be the bound; "
                              "use offset noise with --loss simple or hybrid")

    @property
    def learned_variance(self) -> bool:
        """The network has 2C output channels (the second C interpolate the log-variance)."""
        return self.variance == LEARNED_VARIANCE


@dataclass
class DataConfig:
    """Where the training images come from."""

    name: str = "digits"                          # digits | mnist | fashion-mnist | a folder | an .npz file
    root: str | None = None                       # folder holding the IDX files of mnist / fashion-mnist
    split: str = "train"                          # train | test
    image_size: tuple[int, int] | None = None     # resize + center-crop to (H, W); None keeps the native size
    channels: int | None = None                   # 1 grey, 3 RGB, 4 RGBA; None keeps the native channels
    hflip: bool = False                           # random horizontal flips
    strict: bool = False                          # an unreadable image is an error instead of skipped
    fingerprint: dict | None = None               # a folder's or .npz's count, shape and content hash, recorded
                                                  # when the run starts (ddpm.data.dataset_fingerprint)

    def __post_init__(self) -> None:
        if self.fingerprint is not None and not (isinstance(self.fingerprint, dict) and set(self.fingerprint) == {
                "num_images", "image_shape", "sample_sha256"}):
            raise ConfigError(f"data fingerprint must hold num_images, image_shape and sample_sha256; "
                              f"got {self.fingerprint!r}")
        for name in ("name", "root"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif not (isinstance(value, str) or (value is None and name == "root")):
                raise ConfigError(f"data {name} must be a string; got {value!r}")
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        if self.image_size is not None:
            size = tuple(self.image_size)
            if len(size) != 2 or not all(_is_int(s) and s >= 1 for s in size):
                raise ConfigError(f"image size must be a positive integer or H W; got {self.image_size!r}")
            self.image_size = size
        _choice(self.split, ("train", "test"), "split")
        if self.channels is not None:
            if not _is_int(self.channels):
                raise ConfigError(f"channels must be 1, 3 or 4; got {self.channels!r}")
            _choice(self.channels, (1, 3, 4), "channels")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. The defaults are the built-in digits run (about 5 CPU-minutes)."""

    steps: int = 2000                  # optimizer steps
    batch_size: int = 128              # images per forward pass of each process; an optimizer step sees
                                       # batch_size x processes x grad_accum images (the global batch)
    grad_accum: int = 1                # micro-batches per optimizer step
    optimizer: str = "adam"            # adam | adamw
    lr: float = 1e-3                   # peak learning rate (the paper: 2e-4 for CIFAR-10)
    weight_decay: float = 0.0          # AdamW's decoupled weight decay (0 with adam)
    adam_betas: tuple[float, float] = (0.9, 0.999)   # Adam's (beta1, beta2), PyTorch's defaults
    warmup_steps: int = 0              # linear learning-rate warm-up (the paper's code: 5000)
    grad_clip: float = 1.0             # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.9999          # decay of the exponential moving average of the weights
    ema_warmup: bool = True            # decay_n = min(ema_decay, (1 + n) / (10 + n)), so short runs are usable
    precision: str = "fp32"            # fp32 | bf16 (autocast) | fp16 (autocast + gradient scaler, CUDA)
    grad_checkpointing: bool = False   # recompute activations in the backward pass (less memory)
    max_bad_steps: int = 10            # consecutive non-finite steps tolerated before training stops
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N | mps
    init: str | None = None            # start from this checkpoint's EMA weights (fine-tuning)
    log_every: int = 50                # steps between metrics-log lines
    sample_every: int = 0              # steps between sample grids (0: only at the end)
    checkpoint_every: int = 1000       # steps between checkpoints (the last step is always saved)
    keep_last: int = 3                 # checkpoints kept besides milestones (0 keeps all)
    milestone_every: int = 0           # checkpoints at multiples of this are never deleted (0: none)
    num_samples: int = 64              # images in each sample grid
    eval_every: int = 0                # steps between fast-metric evaluations of the EMA model (0: never)
    eval_samples: int = 256            # images generated for each evaluation
    label_dropout: float = 0.1         # class-conditional models: P(label replaced by the null label) (Ho & Salimans 2022)
    time_limit: float = 0.0            # minutes: stop (saving a checkpoint and the final grid) once reached; 0: none

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "num_samples", "log_every", "max_bad_steps", "eval_samples"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer; got {value!r}")
        for name in ("sample_every", "checkpoint_every", "warmup_steps", "keep_last", "milestone_every", "eval_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be a non-negative integer; got {value!r}")
        _choice(self.optimizer, ("adam", "adamw"), "optimizer")
        _choice(self.precision, ("fp32", "bf16", "fp16"), "precision")
        if not _is_number(self.lr) or not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0; got {self.lr!r}")
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise ConfigError(f"weight decay must be >= 0; got {self.weight_decay!r}")
        betas = self.adam_betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
                _is_number(b) and 0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"adam betas must be two numbers in [0, 1); got {betas!r}")
        self.adam_betas = tuple(float(b) for b in betas)
        if not _is_number(self.grad_clip) or not self.grad_clip >= 0:
            raise ConfigError(f"gradient clipping norm must be >= 0; got {self.grad_clip!r}")
        if not _is_number(self.ema_decay) or not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1]; got {self.ema_decay!r}")
        if not _is_number(self.label_dropout) or not 0.0 <= self.label_dropout <= 1.0:
            raise ConfigError(f"label dropout must be in [0, 1]; got {self.label_dropout!r}")
        if not _is_number(self.time_limit) or not self.time_limit >= 0:
            raise ConfigError(f"time limit must be >= 0 minutes; got {self.time_limit!r}")
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer; got {self.seed!r}")
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        for name in ("ema_warmup", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name.replace('_', ' ')} must be true or false; got {getattr(self, name)!r}")

    def global_batch_size(self, world_size: int = 1) -> int:
        """Images per optimizer step over all processes: batch_size x world_size x grad_accum."""
        return self.batch_size * world_size * self.grad_accum


def per_process_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    """The per-process batch that keeps ``global_batch`` with ``world_size`` processes and ``grad_accum``."""
    if global_batch % (world_size * grad_accum):
        raise ConfigError(f"the run's global batch of {global_batch} images does not divide among {world_size} "
                          f"process(es) x grad_accum {grad_accum}; resume with a number of processes and "
                          f"--grad-accum whose product divides {global_batch}")
    return global_batch // (world_size * grad_accum)


@dataclass
class SamplingConfig:
    """The sampler a checkpoint asks for when the user chooses none (``ddpm sample`` without sampler flags).

    Ordinary runs have none (``RunConfig.sampling`` is None: the library default applies). A
    distilled student (``ddpm distill``) records the deterministic DDIM over the N steps it was
    trained for. The fields mean what they mean in :class:`~ddpm.samplers.SamplingOptions`.
    """

    sampler: str = "ddim"
    steps: int | None = None           # None: all T steps
    spacing: str = "trailing"
    eta: float | None = None           # ddim only
    clip: bool | None = None           # None: the checkpoint's diffusion.clip_denoised

    def __post_init__(self) -> None:
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise ConfigError(f"sampling steps must be a positive integer; got {self.steps!r}")
        if self.clip is not None and not isinstance(self.clip, bool):
            raise ConfigError(f"sampling clip must be true or false; got {self.clip!r}")
        self.options()                 # validates the sampler, spacing and eta

    def options(self):
        """These defaults as :class:`~ddpm.samplers.SamplingOptions`."""
        from .samplers import SamplingOptions

        return SamplingOptions(sampler=self.sampler, steps=self.steps, spacing=self.spacing, eta=self.eta,
                               clip=self.clip)


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.json`` and inside each checkpoint."""

    preset: str
    model: UnetConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig | None = None     # sampler defaults for this checkpoint (None: the library's)
    choice: str | None = None                  # why the preset and recipe were chosen, when no preset was given

    @property
    def conditional(self) -> bool:
        """Class-conditional (``model.num_classes`` set): training feeds labels, with label dropout."""
        return self.model.num_classes is not None

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model.to_dict(), "diffusion": asdict(self.diffusion),
                "data": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.data).items()},
                "train": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.train).items()},
                **({"sampling": asdict(self.sampling)} if self.sampling is not None else {}),
                **({"choice": self.choice} if self.choice is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict) or "model" not in d:
            raise ConfigError("configuration has no [model] section")
        unknown = sorted(set(d) - {"preset", "model", "diffusion", "data", "train", "sampling", "choice"})
        if unknown:
            raise ConfigError(f"unknown configuration section(s): {', '.join(unknown)}")
        try:
            return cls(preset=d.get("preset", "custom"),
                       model=_from_dict(UnetConfig, d["model"], "model"),
                       diffusion=_from_dict(DiffusionConfig, d.get("diffusion", {}), "diffusion"),
                       data=_from_dict(DataConfig, d.get("data", {}), "data"),
                       train=_from_dict(TrainConfig, d.get("train", {}), "train"),
                       sampling=None if d.get("sampling") is None
                       else _from_dict(SamplingConfig, d["sampling"], "sampling"), choice=d.get("choice"))
        except TypeError as exc:  # a value of the wrong type that the validators could not compare
            raise ConfigError(f"invalid configuration: {exc}") from None

    @classmethod
    def for_preset(cls, preset: str, **model_overrides) -> "RunConfig":
        return cls(preset=preset, model=preset_config(preset, **model_overrides))


def build_model(config: RunConfig):
    """The U-Net that ``config`` describes.

    The diffusion options decide its channel counts, the network never learns why: 2C outputs
    with a learned variance (prediction, then the variance interpolation), 2C inputs with
    self-conditioning ([x_t, x0_prev]).
    """
    from dataclasses import replace

    from .models import Unet

    c, d, m = config.model.channels, config.diffusion, config.model
    io = {"in_channels": 2 * c if d.self_condition else c, "out_channels": 2 * c if d.learned_variance else c}
    for key, value in io.items():
        if getattr(m, key) not in (None, value):
            raise ConfigError(f"model {key} = {getattr(m, key)} contradicts the diffusion options, which need {value}")
    if io == {"in_channels": c, "out_channels": c}:
        return Unet(m)
    return Unet(replace(m, **io))


# ----------------------------------------------------------------------------- recipes and files

# The training recipe that goes with each preset: data and train defaults, which a TOML
# file (--config) and then command-line flags override.
RECIPES: dict[str, dict[str, dict]] = {
    "digits": {},                                  # the TrainConfig defaults are the digits run
    # lr 1e-3 (5e-4 before): faster progress on CPU budgets (benchmarks/RESULTS.md, "Time to quality").
    "mnist": {"train": dict(batch_size=64, lr=1e-3, warmup_steps=200, steps=10_000,
                            checkpoint_every=2_000, sample_every=2_000)},
    # Ho et al. 2020, Appendix B: batch 128, Adam 2e-4, 5,000 warm-up steps, EMA 0.9999,
    # random horizontal flips, 800k steps (dropout 0.1 is part of the cifar10 model preset).
    "cifar10": {"train": dict(batch_size=128, lr=2e-4, warmup_steps=5_000, ema_decay=0.9999, steps=800_000,
                              log_every=100, checkpoint_every=10_000, sample_every=10_000,
                              milestone_every=100_000),
                "data": dict(hflip=True)},
    # The 256x256 models: batch 64, 2e-5 (CelebA-HQ), 0.5M steps.
    "celebahq256": {"train": dict(batch_size=64, lr=2e-5, warmup_steps=5_000, steps=500_000, log_every=100,
                                  checkpoint_every=10_000, sample_every=10_000, milestone_every=100_000),
                    "data": dict(hflip=True)},
}


def load_toml(path: str | os.PathLike) -> dict:
    """Read a TOML configuration file: optional ``preset`` and tables [model], [diffusion], [data], [train]."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no such configuration file: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    unknown = sorted(set(d) - {"preset", "model", "diffusion", "data", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; "
                          "expected preset and the tables [model], [diffusion], [data], [train]")
    if "preset" in d and not isinstance(d["preset"], str):
        raise ConfigError(f"{path}: preset must be a string; got {d['preset']!r}")
    for section in ("model", "diffusion", "data", "train"):
        if section in d and not isinstance(d[section], dict):
            raise ConfigError(f"{path}: {section} must be a table [{section}]; got {d[section]!r}")
    return d


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


# ----------------------------------------------------------------------------- resolving a run's configuration

def dataset_num_classes(data) -> int:
    """The class count of a labelled dataset: its class names, else the largest label + 1."""
    from .errors import DataError

    if data.labels is None:
        raise DataError(f"--conditional needs class labels, and dataset {data.name!r} has none (use class "
                        "subfolders, an .npz with a 'labels' array, or digits / mnist / fashion-mnist / cifar10)")
    return len(data.class_names) if data.class_names else int(data.labels.max()) + 1


def resolve_train_config(flags: dict, *, preset: str | None = None, config_file: str | None = None,
                         conditional: bool = False, label_dropout_given: bool = False):
    """A new run's configuration: the preset's recipe < the ``config_file`` (TOML) < ``flags`` (sections
    of options, as :func:`merge_layers` takes them). The model's image size and channels come from the
    data, which is loaded here. A folder or .npz given without a preset gets the preset and recipe that
    :func:`ddpm.auto.choose` picks from its size and count (``RunConfig.choice`` says why); its path is
    recorded absolute, with its fingerprint. Returns (config, data)."""
    from .data import load_dataset
    from .models import PRESETS

    file_layer = load_toml(config_file) if config_file else {}
    data_name = flags.get("data", {}).get("name") or file_layer.get("data", {}).get("name") or "digits"
    preset = preset or file_layer.get("preset") or DEFAULT_PRESET_FOR_DATA.get(data_name)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} in {config_file}; choose from {', '.join(PRESETS)}")
    for key in ("image_size", "channels"):
        if key in file_layer.get("model", {}):
            raise ConfigError(f"{config_file}: set {key} under [data]; the model takes it from the data")
    merged = merge_layers(RECIPES.get(preset, {}), file_layer, flags)
    data_cfg, diffusion_cfg, train_cfg = _sections(merged)
    data = load_dataset(data_cfg.name, data_root=data_cfg.root, split=data_cfg.split,
                        image_size=data_cfg.image_size, channels=data_cfg.channels, strict=data_cfg.strict)
    choice = None
    if preset is None:                       # a folder or .npz without a preset: chosen from the data
        from .auto import choose

        choice = choose(data.image_size, data.channels, data.num_images)
        preset = choice.preset
        _, _, train_cfg = _sections(merge_layers({"train": choice.train}, file_layer, flags))
    if data.path is not None:                # the run finds its data from any directory, and knows it again
        data_cfg = replace(data_cfg, name=data.path, fingerprint=data.fingerprint())
    model_layer = {**merged.get("model", {}), "image_size": data.image_size, "channels": data.channels}
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
                     choice=None if choice is None else choice.reason), data


def _sections(merged: dict) -> tuple[DataConfig, DiffusionConfig, TrainConfig]:
    try:
        return (DataConfig(**merged.get("data", {})), DiffusionConfig(**merged.get("diffusion", {})),
                TrainConfig(**merged.get("train", {})))
    except TypeError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def checkpoint_global_batch(meta: dict) -> int:
    """The global batch (images per optimizer step) a checkpoint was trained with.

    Checkpoints written before data parallelism do not store it: there ``batch_size`` meant the
    images per optimizer step (split into grad_accum micro-batches), so it is the global batch.
    """
    if "global_batch" in meta:
        return int(meta["global_batch"])
    return int(meta["config"]["train"]["batch_size"])


# What a resumed run may change (batch_size only as the per-process share of the saved global batch).
RESUME_MAY_CHANGE = {("train", "steps"), ("train", "device"), ("train", "grad_accum"), ("train", "time_limit")}


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
                                  "keeps its configuration (only --steps, --device, --grad-accum and --time-limit "
                                  "may change)")
    return per_process


def _moved_data(saved: DataConfig, name: str) -> DataConfig:
    """The run's data config pointed at ``name``: its own place, or a copy that the fingerprint recorded at
    the start of the run will recognise (checked when it is loaded, :func:`ddpm.train.load_training_data`)."""
    from .data import data_source

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
    from dataclasses import replace

    from .checkpoint import list_checkpoints, read_metadata
    from .errors import CheckpointError

    run_dir = Path(run_dir)
    if out and Path(out).resolve() != run_dir.resolve():
        raise ConfigError("--out and --resume name different directories; a resumed run stays in its own")
    if config:
        raise ConfigError("--config cannot be combined with --resume: the run keeps its saved configuration")
    if (run_dir / "round.json").is_file():
        raise ConfigError(f"{run_dir} is a distillation round; continue it with ddpm distill --resume {run_dir.parent}")
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from")
    meta = read_metadata(found[-1][1])
    saved = RunConfig.from_dict(meta["config"])
    if flags.get("data", {}).get("name") is not None:          # --data: the same dataset, maybe moved
        saved = replace(saved, data=_moved_data(saved.data, flags["data"]["name"]))
        flags = {**flags, "data": {k: v for k, v in flags["data"].items() if k != "name"}}
    grad_accum = grad_accum or saved.train.grad_accum
    per_process = _check_resume_flags(saved, meta, flags, flag_names or {}, preset=preset, conditional=conditional,
                                      world_size=world_size, grad_accum=grad_accum, batch_size=batch_size)
    train_cfg = replace(saved.train, steps=steps or saved.train.steps, device=device or saved.train.device,
                        batch_size=per_process, grad_accum=grad_accum,
                        time_limit=time_limit or 0.0)       # a time limit is this command's, not the run's
    if train_cfg.steps <= meta["step"]:
        raise ConfigError(f"{run_dir} is already at step {meta['step']}; pass --steps N with N > {meta['step']} "
                          "to extend it")
    return replace(saved, train=train_cfg), run_dir
