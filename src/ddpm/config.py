"""Run configuration as typed dataclasses, validated when built.

A :class:`RunConfig` holds everything needed to rebuild a run: the U-Net architecture,
the diffusion process, the data and the training options. It is saved as JSON in the
run directory and inside every checkpoint, so sampling needs no training option again.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .diffusion import LEARNED_VARIANCE, LOSS_WEIGHTINGS, LOSSES, OBJECTIVES, VARIANCES
from .errors import ConfigError
from .models import UnetConfig, preset_config
from .samplers import SamplingOptions
from .schedules import SCHEDULES
from .timestep_sampling import TIMESTEP_SAMPLINGS

__all__ = ["DiffusionConfig", "DataConfig", "TrainConfig", "RunConfig", "DEFAULT_PRESET_FOR_DATA",
           "RECIPES", "merge_over_recipe", "INIT_MAY_CHANGE", "resolve_init_config", "per_process_batch", "build_model", "load_toml", "merge_layers",
           "dataset_num_classes", "resolve_train_config", "checkpoint_global_batch", "RESUME_MAY_CHANGE",
           "resume_config", "check_model_options", "model_bytes", "training_bytes_at_least",
           "check_training_memory", "MAX_TIMESTEPS", "MAX_IMAGE_SIDE", "MAX_DIM", "SEED_LIMIT"]

# The U-Net preset used when --preset is not given, by dataset name.
DEFAULT_PRESET_FOR_DATA = {"digits": "digits", "mnist": "mnist", "fashion-mnist": "mnist", "cifar10": "cifar10"}


# Bounds on the numbers a configuration may hold: wide enough for any real run, narrow enough that
# a typo (or a hostile checkpoint header) is refused before anything is allocated.
MAX_TIMESTEPS = 100_000          # T
MAX_IMAGE_SIDE = 4_096           # pixels per side
MAX_DIM = 4_096                  # the U-Net's base channel count
SEED_LIMIT = 2 ** 63             # seeds are in [0, 2^63)
MAX_COUNT = 10 ** 9              # steps, intervals
MAX_BATCH = 65_536               # images per forward pass, micro-batches, images per grid


def _allowed(cls, exclude: tuple[str, ...] = ()) -> list[str]:
    return [f.name for f in fields(cls) if f.name not in exclude]


def _check_keys(d: dict, cls, section: str, where: str = "", exclude: tuple[str, ...] = ()) -> None:
    """Unknown keys named with their section and the keys allowed there."""
    unknown = sorted(set(d) - set(_allowed(cls, exclude)))
    if unknown:
        raise ConfigError(f"{where}unknown option(s) {', '.join(map(repr, unknown))} in [{section}]; "
                          f"allowed: {', '.join(_allowed(cls, exclude))}")


def _from_dict(cls, d: dict, section: str):
    from .models import UnetConfig

    if not isinstance(d, dict):
        raise ConfigError(f"[{section}] must be a table of options")
    _check_keys(d, cls, section)
    if cls is UnetConfig:
        check_model_options(d)
    return cls(**d)


def _is_int(value: Any) -> bool:
    """A real integer: bools (True == 1) and floats are refused rather than silently taken."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(value: Any, what: str, lo: int, hi: int) -> None:
    """An integer in [lo, hi], or one line stating the range."""
    if not _is_int(value) or not lo <= value <= hi:
        raise ConfigError(f"{what} must be an integer from {lo:,} to {hi:,}; got {value!r}")


def _check_float(value: Any, what: str, lo: float = 0.0, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    """A finite number in the range (NaN and inf refused), or one line stating the range."""
    ok = (_is_number(value) and math.isfinite(value) and (value > lo if lo_open else value >= lo)
          and (value < hi if hi_open else value <= hi))
    if not ok:
        if hi == math.inf:
            bound = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            bound = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{what} must be a finite number {bound}; got {value!r}")


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
        _check_int(self.timesteps, "timesteps", 2, MAX_TIMESTEPS)
        _choice(self.schedule, tuple(SCHEDULES), "schedule")
        _choice(self.objective, OBJECTIVES, "objective")
        _choice(self.loss_weighting, LOSS_WEIGHTINGS, "loss weighting")
        _choice(self.variance, VARIANCES, "variance")
        _check_float(self.min_snr_gamma, "min_snr_gamma", 0.0, lo_open=True)
        _choice(self.loss, LOSSES, "loss")
        _choice(self.timestep_sampling, TIMESTEP_SAMPLINGS, "timestep sampling")
        _check_float(self.vlb_weight, "vlb_weight", 0.0, lo_open=True)
        _check_float(self.offset_noise, "offset noise strength", 0.0)
        if not isinstance(self.self_condition, bool):
            raise ConfigError(f"self_condition must be true or false; got {self.self_condition!r}")
        self._check_combination()

    def _check_combination(self) -> None:
        """Refuse combinations that train nothing or estimate nothing (docs/improved-ddpm.md)."""
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
            if len(size) != 2 or not all(_is_int(s) and 1 <= s <= MAX_IMAGE_SIDE for s in size):
                raise ConfigError(f"image size must be an integer or H W, each from 1 to {MAX_IMAGE_SIDE:,}; "
                                  f"got {self.image_size!r}")
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
    eval_metric: str = "auto"          # fast | fid | kid | is; auto: fast for grey images of 28x28 or smaller, else fid
    keep_best: str = ""                # fast | fid | kid | is: keep checkpoints/best.safetensors, the best so far ("": off)
    inception_weights: str = ""        # the full 2015 Inception-v3 (pt_inception-2015-12-05) for eval_metric = is
    label_dropout: float = 0.1         # class-conditional models: P(label replaced by the null label) (Ho & Salimans 2022)
    time_limit: float = 0.0            # minutes: stop (saving a checkpoint and the final grid) once reached; 0: none

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "max_bad_steps"):
            _check_int(getattr(self, name), name.replace("_", " "), 1, MAX_COUNT)
        for name in ("batch_size", "grad_accum", "num_samples", "eval_samples"):
            _check_int(getattr(self, name), name.replace("_", " "), 1, MAX_BATCH)
        for name in ("sample_every", "checkpoint_every", "warmup_steps", "keep_last", "milestone_every", "eval_every"):
            _check_int(getattr(self, name), name.replace("_", " "), 0, MAX_COUNT)
        _choice(self.optimizer, ("adam", "adamw"), "optimizer")
        self._check_evaluation()
        _choice(self.precision, ("auto", "fp32", "bf16", "fp16"), "precision")
        _check_float(self.lr, "learning rate", 0.0, lo_open=True)
        _check_float(self.weight_decay, "weight decay", 0.0)
        _check_float(self.grad_clip, "gradient clipping norm", 0.0)
        _check_float(self.ema_decay, "EMA decay", 0.0, 1.0)
        _check_float(self.label_dropout, "label dropout", 0.0, 1.0)
        _check_float(self.time_limit, "time limit (minutes)", 0.0)
        _check_int(self.seed, "seed", 0, SEED_LIMIT - 1)
        if self.init is not None and not isinstance(self.init, (str, os.PathLike)):
            raise ConfigError(f"init must be a checkpoint path; got {self.init!r}")
        betas = self.adam_betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
                _is_number(b) and 0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"adam betas must be two numbers in [0, 1); got {betas!r}")
        self.adam_betas = tuple(float(b) for b in betas)
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        for name in ("ema_warmup", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name.replace('_', ' ')} must be true or false; got {getattr(self, name)!r}")

    def _check_evaluation(self) -> None:
        """--eval-metric, --keep-best and --inception-weights agree with --eval-every and with each other."""
        from .evaluation.training import TRAINING_METRICS

        _choice(self.eval_metric, ("auto", *TRAINING_METRICS), "eval metric")
        _choice(self.keep_best, ("", *TRAINING_METRICS), "keep best")
        if self.keep_best and not self.eval_every:
            raise ConfigError(f"--keep-best {self.keep_best} compares evaluations: give --eval-every N as well")
        if self.keep_best and self.eval_metric not in ("auto", self.keep_best):
            raise ConfigError(f"--keep-best {self.keep_best} compares the evaluation metric: give --eval-metric "
                              f"{self.keep_best} (or leave it out); got --eval-metric {self.eval_metric}")
        if "is" in (self.eval_metric, self.keep_best) and self.eval_every and not self.inception_weights:
            raise ConfigError("the Inception Score needs the full 2015 Inception network: give --inception-weights "
                              "pt_inception-2015-12-05-6726825d.pth")

    def evaluation_metric(self, channels: int, image_size) -> str:
        """The metric of --eval-every: --keep-best's or --eval-metric's, else the default for the images' kind."""
        from .evaluation.training import default_training_metric

        if self.keep_best:
            return self.keep_best
        return self.eval_metric if self.eval_metric != "auto" else default_training_metric(channels, tuple(image_size))

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
class RunConfig:
    """Everything a run needs; saved as ``config.json`` and inside each checkpoint."""

    preset: str
    model: UnetConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingOptions | None = None    # sampler defaults for this checkpoint (None: the library's)
    choice: str | None = None                  # why the preset and recipe were chosen, when no preset was given

    @property
    def conditional(self) -> bool:
        """Class-conditional (``model.num_classes`` set): training feeds labels, with label dropout."""
        return self.model.num_classes is not None

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model.to_dict(), "diffusion": asdict(self.diffusion),
                "data": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.data).items()},
                "train": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.train).items()},
                **({"sampling": self.sampling.to_dict()} if self.sampling is not None else {}),
                **({"choice": self.choice} if self.choice is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict) or "model" not in d:
            raise ConfigError("configuration has no [model] section")
        if not isinstance(d.get("preset", "custom"), str):
            raise ConfigError(f"preset must be a string; got {d['preset']!r}")
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
                       else _from_dict(SamplingOptions, d["sampling"], "sampling"), choice=d.get("choice"))
        except TypeError as exc:  # a value of the wrong type that the validators could not compare
            raise ConfigError(f"invalid configuration: {exc}") from None

    @classmethod
    def for_preset(cls, preset: str, **model_overrides) -> "RunConfig":
        return cls(preset=preset, model=preset_config(preset, **model_overrides))


# Bounds on the [model] options (UnetConfig fields), checked before a UnetConfig is built: in a
# TOML file and in a checkpoint's header. (name: (low, high)); tuples are checked entry by entry.
_MODEL_INTS = {"channels": (1, 64), "dim": (1, MAX_DIM), "num_res_blocks": (1, 64), "norm_groups": (1, MAX_DIM),
               "attention_heads": (1, MAX_DIM), "in_channels": (1, 128), "out_channels": (1, 128),
               "num_classes": (1, 1_000_000)}
_MODEL_TUPLES = {"dim_mults": (1, 64, 8), "attention_resolutions": (1, MAX_IMAGE_SIDE, 16)}   # (low, high, entries)


def check_model_options(d: dict, where: str = "") -> None:
    """Refuse [model] values out of bounds (dim 1..4,096, image sides 1..4,096, ...) or of the wrong type."""
    for name, (lo, hi) in _MODEL_INTS.items():
        if d.get(name) is not None:
            _check_int(d[name], f"{where}model {name}", lo, hi)
    for name, (lo, hi, most) in _MODEL_TUPLES.items():
        value = d.get(name)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) > most:
            raise ConfigError(f"{where}model {name} must be a list of at most {most} integers; got {value!r}")
        for v in value:
            _check_int(v, f"{where}each model {name} entry", lo, hi)
    if "image_size" in d:
        size = d["image_size"]
        sides = [size] if not isinstance(size, (list, tuple)) else list(size)
        if len(sides) not in (1, 2) or not all(_is_int(v) and 1 <= v <= MAX_IMAGE_SIDE for v in sides):
            raise ConfigError(f"{where}model image_size must be an integer or [H, W], each from 1 to "
                              f"{MAX_IMAGE_SIDE:,}; got {size!r}")
    for name, lo, hi in (("dropout", 0.0, 1.0), ("norm_eps", 0.0, 1.0)):
        if name in d:
            _check_float(d[name], f"{where}model {name}", lo, hi, lo_open=name == "norm_eps",
                         hi_open=name == "dropout")


def model_bytes(config: RunConfig) -> int:
    """Bytes of the model's float32 parameters, counted on the meta device (nothing is allocated)."""
    import torch

    with torch.device("meta"):
        model = _unet(config)
    return 4 * sum(p.numel() for p in model.parameters())


def training_bytes_at_least(config: RunConfig) -> int:
    """A lower bound on training memory: weights, gradients, Adam's two moments and the EMA (5 copies
    of the parameters), plus the activations of the top level's residual blocks kept for the backward pass."""
    m, tc = config.model, config.train
    h, w = m.image_size
    blocks = 1 if tc.grad_checkpointing else 2 * m.num_res_blocks + 1
    activations = 4 * tc.batch_size * m.dim * m.dim_mults[0] * h * w * blocks
    return 5 * model_bytes(config) + activations


def _device_bytes(device) -> int | None:
    """Total memory of ``device`` (physical memory for the CPU); None where unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


def _check_fits(need: int, device, what: str) -> None:
    have = _device_bytes(device)
    if have is not None and need > have:
        raise ConfigError(f"{what} at least {_gib(need)}, more than the {_gib(have)} of the {device} device; "
                          "choose a smaller model (dim, dim_mults, num_res_blocks), image size or batch size")


def check_training_memory(config: RunConfig, device) -> None:
    """Refuse, before anything is built, a run whose lower-bound memory exceeds the device's."""
    _check_fits(training_bytes_at_least(config), device, "training this model takes")


def _unet(config: RunConfig):
    """The U-Net of ``config``, built on the current default device."""
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


def build_model(config: RunConfig):
    """The U-Net that ``config`` describes.

    The diffusion options decide its channel counts, the network never learns why: 2C outputs
    with a learned variance (prediction, then the variance interpolation), 2C inputs with
    self-conditioning ([x_t, x0_prev]). It is built on the CPU, so its weights must fit the
    machine's memory: that is checked first, on the meta device.
    """
    _check_fits(model_bytes(config), "cpu", "this model's weights take")
    return _unet(config)


# ----------------------------------------------------------------------------- recipes and files

# The training recipe that goes with each preset: data and train defaults, which a TOML
# file (--config) and then command-line flags override.
RECIPES: dict[str, dict[str, dict]] = {
    "digits": {},                                  # the TrainConfig defaults are the digits run
    # lr 1e-3 (5e-4 before): faster progress on CPU budgets; min-SNR-5 weighting (Hang et al. 2023; uniform
    # L_simple before): a lower fast FID at 12 CPU-minutes and after 10,000 steps (benchmarks/RESULTS.md,
    # "Time to quality" and "min-SNR over 10,000 steps").
    "mnist": {"train": dict(batch_size=64, lr=1e-3, warmup_steps=200, steps=10_000,
                            checkpoint_every=2_000, sample_every=2_000),
              "diffusion": dict(loss_weighting="min-snr")},
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


def merge_over_recipe(preset: str | None, *layers: dict) -> dict:
    """``layers`` (checkpoint, file, options) merged over the ``preset``'s recipe, the lowest layer.
    A recipe loss weighting gives way to a chosen ``loss = vlb``, which has no use for it (the bound
    is not a weighted mean squared error), so ``--loss vlb`` works with every preset."""
    given = merge_layers(*layers)
    recipe = {section: dict(options) for section, options in RECIPES.get(preset, {}).items()}
    chosen = given.get("diffusion", {})
    if chosen.get("loss") == "vlb" and "loss_weighting" not in chosen:
        recipe.get("diffusion", {}).pop("loss_weighting", None)
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
    """Read a TOML configuration file: optional ``preset`` and tables [model], [diffusion], [data], [train].

    A file that is binary or not UTF-8, an unknown table or an unknown key in a table (named with
    its section and the keys allowed there) is one :class:`ConfigError`. [train] also takes the
    keys :data:`TRAIN_KEY_ALIASES` names (``num_images`` for ``num_samples``, ...).
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from .models import UnetConfig

    d = _parse_toml(path, tomllib)
    unknown = sorted(set(d) - {"preset", "model", "diffusion", "data", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; "
                          "expected preset and the tables [model], [diffusion], [data], [train]")
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
        _check_keys(d[section], cls, section, where=f"{path}: ")
    check_model_options(d.get("model", {}), where=f"{path}: ")
    return d


def _parse_toml(path: str | os.PathLike, tomllib) -> dict:
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
    init = flags.get("train", {}).get("init") or file_layer.get("train", {}).get("init")
    if init:
        return resolve_init_config(init, flags, file_layer, preset=preset, config_file=config_file,
                                   conditional=conditional)
    data_name = flags.get("data", {}).get("name") or file_layer.get("data", {}).get("name") or "digits"
    preset = preset or file_layer.get("preset") or DEFAULT_PRESET_FOR_DATA.get(data_name)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} in {config_file}; choose from {', '.join(PRESETS)}")
    for key in ("image_size", "channels"):
        if key in file_layer.get("model", {}):
            raise ConfigError(f"{config_file}: set {key} under [data]; the model takes it from the data")
    merged = merge_over_recipe(preset, file_layer, flags)
    data_cfg, diffusion_cfg, train_cfg = _sections(merged)
    data = load_dataset(data_cfg.name, data_root=data_cfg.root, split=data_cfg.split,
                        image_size=data_cfg.image_size, channels=data_cfg.channels, strict=data_cfg.strict)
    choice = None
    if preset is None:                       # a folder or .npz without a preset: chosen from the data
        from .auto import choose

        choice = choose(data.image_size, data.channels, data.num_images)
        preset = choice.preset
        # The chosen preset's recipe brings its diffusion options; its train options are the choice's.
        diffusion = merge_over_recipe(preset, file_layer, flags).get("diffusion", {})
        _, diffusion_cfg, train_cfg = _sections(merge_layers({"train": choice.train}, file_layer, flags,
                                                             {"diffusion": diffusion}))
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
                        config_file: str | None = None, conditional: bool = False):
    """A fine-tuning run's configuration: the architecture of the ``init`` checkpoint and, unless the
    file or the options say otherwise, its diffusion settings and image size; the preset's recipe
    below them. Returns (config, data)."""
    from .checkpoint import read_metadata
    from .data import load_dataset
    from .errors import CheckpointError

    meta = read_metadata(init)
    try:
        saved = RunConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"--init {meta['path']} has an unusable configuration: {exc}") from None
    source = f"--init {init}"
    _check_init_model(saved, source, flags, file_layer, preset=preset, config_file=config_file,
                      conditional=conditional)
    base = {"diffusion": saved.to_dict()["diffusion"],
            "data": {"image_size": saved.model.image_size, "channels": saved.model.channels}}
    merged = merge_over_recipe(saved.preset, base, file_layer, flags)
    try:
        data_cfg = DataConfig(**merged.get("data", {}))
        diffusion_cfg = DiffusionConfig(**merged.get("diffusion", {}))
        train_cfg = TrainConfig(**merged.get("train", {}))
    except TypeError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    for what, ours, theirs in (("self_condition", diffusion_cfg.self_condition, saved.diffusion.self_condition),
                               ("learned variance", diffusion_cfg.learned_variance, saved.diffusion.learned_variance)):
        if ours != theirs:             # the network's input or output channels would change
            raise ConfigError(f"{what} = {ours} contradicts {source}, whose model has {what} = {theirs}")
    data = load_dataset(data_cfg.name, data_root=data_cfg.root, split=data_cfg.split,
                        image_size=data_cfg.image_size, channels=data_cfg.channels, strict=data_cfg.strict)
    model = {**saved.model.to_dict(), **{k: v for k, v in merged.get("model", {}).items() if k in INIT_MAY_CHANGE}}
    return RunConfig(preset=saved.preset, model=UnetConfig(**model), diffusion=diffusion_cfg, data=data_cfg,
                     train=train_cfg), data


def checkpoint_global_batch(meta: dict) -> int:
    """The global batch (images per optimizer step) a checkpoint was trained with.

    Checkpoints written before data parallelism do not store it: there ``batch_size`` meant the
    images per optimizer step (split into grad_accum micro-batches), so it is the global batch.
    """
    if "global_batch" in meta:
        return int(meta["global_batch"])
    return int(meta["config"]["train"]["batch_size"])


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
    import json

    from .errors import CheckpointError

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

    from .checkpoint import load_newest_verified

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
