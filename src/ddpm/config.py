"""Run configuration as typed dataclasses, validated when built.

A :class:`RunConfig` holds everything needed to rebuild a run: the U-Net architecture,
the diffusion process, the data and the training options. It is saved as JSON in the
run directory and inside every checkpoint, so sampling needs no training option again.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .diffusion import LEARNED_VARIANCE, LOSS_WEIGHTINGS, LOSSES, OBJECTIVES, VARIANCES
from .errors import ConfigError
from .models import UnetConfig, preset_config
from .schedules import SCHEDULES
from .timestep_sampling import TIMESTEP_SAMPLINGS

__all__ = ["DiffusionConfig", "DataConfig", "TrainConfig", "SamplingConfig", "RunConfig", "DEFAULT_PRESET_FOR_DATA",
           "RECIPES", "per_process_batch", "build_model", "build_diffusion", "load_toml", "merge_layers"]

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

    def __post_init__(self) -> None:
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
    warmup_steps: int = 0              # linear learning-rate warm-up (the paper's code: 5000)
    grad_clip: float = 1.0             # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.9999          # decay of the exponential moving average of the weights
    ema_warmup: bool = True            # decay_n = min(ema_decay, (1 + n) / (10 + n)), so short runs are usable
    precision: str = "auto"            # auto (ddpm.precision.resolve_precision; the run records what it chose) |
                                       # fp32 (bit-reproducible) | bf16 (autocast) | fp16 (autocast + gradient scaler, CUDA)
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
        _choice(self.precision, ("auto", "fp32", "bf16", "fp16"), "precision")
        if not _is_number(self.lr) or not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0; got {self.lr!r}")
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise ConfigError(f"weight decay must be >= 0; got {self.weight_decay!r}")
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

    @property
    def conditional(self) -> bool:
        """Class-conditional (``model.num_classes`` set): training feeds labels, with label dropout."""
        return self.model.num_classes is not None

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model.to_dict(), "diffusion": asdict(self.diffusion),
                "data": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.data).items()},
                "train": asdict(self.train),
                **({"sampling": asdict(self.sampling)} if self.sampling is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict) or "model" not in d:
            raise ConfigError("configuration has no [model] section")
        unknown = sorted(set(d) - {"preset", "model", "diffusion", "data", "train", "sampling"})
        if unknown:
            raise ConfigError(f"unknown configuration section(s): {', '.join(unknown)}")
        try:
            return cls(preset=d.get("preset", "custom"),
                       model=_from_dict(UnetConfig, d["model"], "model"),
                       diffusion=_from_dict(DiffusionConfig, d.get("diffusion", {}), "diffusion"),
                       data=_from_dict(DataConfig, d.get("data", {}), "data"),
                       train=_from_dict(TrainConfig, d.get("train", {}), "train"),
                       sampling=None if d.get("sampling") is None
                       else _from_dict(SamplingConfig, d["sampling"], "sampling"))
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


def build_diffusion(config: RunConfig, model=None):
    """A :class:`~ddpm.diffusion.GaussianDiffusion` for ``config`` around ``model`` (built if None)."""
    from .diffusion import GaussianDiffusion

    d = config.diffusion
    diffusion = GaussianDiffusion(model if model is not None else build_model(config),
                                  image_size=config.model.image_size, channels=config.model.channels,
                                  timesteps=d.timesteps, schedule=d.schedule, objective=d.objective,
                                  loss_weighting=d.loss_weighting, min_snr_gamma=d.min_snr_gamma,
                                  variance=d.variance, clip_denoised=d.clip_denoised, loss=d.loss,
                                  vlb_weight=d.vlb_weight, self_condition=d.self_condition,
                                  offset_noise=d.offset_noise)
    if config.sampling is not None:
        diffusion.default_sampling = config.sampling.options()
    return diffusion


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
