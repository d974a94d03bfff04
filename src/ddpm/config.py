"""Run configuration as typed dataclasses, validated when built.

A :class:`RunConfig` holds everything needed to rebuild a run: the U-Net architecture,
the diffusion process, the data and the training options. It is saved as JSON in the
run directory and inside every checkpoint, so sampling needs no training option again.
The presets' recipes are in :mod:`ddpm.recipes`, the layering of recipe, TOML file, checkpoint
and command line in :mod:`ddpm.resolve`, and the network a configuration describes is built by
:mod:`ddpm.build`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .conditions import ImageCondition
from .diffusion import LEARNED_VARIANCE, LOSS_WEIGHTINGS, LOSSES, OBJECTIVES, VARIANCES
from .edm import FORMULATIONS, P_MEAN, P_STD, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from .errors import ConfigError
from .lr_schedules import LR_SCHEDULES
from .models import UnetConfig, preset_config
from .samplers import SamplingOptions
from .schedules import SCHEDULES
from .timestep_sampling import TIMESTEP_SAMPLINGS

__all__ = ["DiffusionConfig", "DataConfig", "TrainConfig", "RunConfig", "check_keys",
           "check_model_options", "TRAINING_METRICS", "default_training_metric", "MAX_TIMESTEPS", "MAX_IMAGE_SIDE",
           "MAX_DIM", "SEED_LIMIT"]


# Bounds on the numbers a configuration may hold: wide enough for any real run, narrow enough that
# a typo (or a hostile checkpoint header) is refused before anything is allocated.
MAX_TIMESTEPS = 100_000          # T
MAX_IMAGE_SIDE = 4_096           # pixels per side
MAX_DIM = 4_096                  # the U-Net's base channel count
SEED_LIMIT = 2 ** 63             # seeds are in [0, 2^63)
MAX_COUNT = 10 ** 9              # steps, intervals
MAX_BATCH = 65_536               # images per forward pass, micro-batches, images per grid


# The metrics --eval-every can log during training and --keep-best can compare (ddpm.evaluation.training).
TRAINING_METRICS = ("fast", "fid", "kid", "is")


def default_training_metric(channels: int, image_size: tuple[int, int]) -> str:
    """``fast`` for grey images of 28x28 or smaller (MNIST-like data on a CPU), ``fid`` otherwise."""
    return "fast" if channels == 1 and max(image_size) <= 28 else "fid"


def _allowed(cls, exclude: tuple[str, ...] = ()) -> list[str]:
    return [f.name for f in fields(cls) if f.name not in exclude]


def check_keys(d: dict, cls, section: str, where: str = "", exclude: tuple[str, ...] = ()) -> None:
    """Unknown keys named with their section and the keys allowed there."""
    unknown = sorted(set(d) - set(_allowed(cls, exclude)))
    if unknown:
        raise ConfigError(f"{where}unknown option(s) {', '.join(map(repr, unknown))} in [{section}]; "
                          f"allowed: {', '.join(_allowed(cls, exclude))}")


def _from_dict(cls, d: dict, section: str):
    if not isinstance(d, dict):
        raise ConfigError(f"[{section}] must be a table of options")
    check_keys(d, cls, section)
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
    # The formulation: ddpm (the discrete T-step process above) or edm (Karras et al. 2022: a network
    # trained in sigma space, ddpm.edm; none of the options above but clip_denoised apply, the ones below do).
    formulation: str = "ddpm"
    sigma_data: float = SIGMA_DATA     # EDM Table 1: the data's standard deviation
    p_mean: float = P_MEAN             # ln sigma ~ N(P_mean, P_std^2) in training
    p_std: float = P_STD
    sigma_min: float = SIGMA_MIN       # the noise levels sampling spans
    sigma_max: float = SIGMA_MAX

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
        self._check_formulation()

    def _check_formulation(self) -> None:
        """EDM's options, and what has no meaning in the other formulation: refused one by one."""
        _choice(self.formulation, FORMULATIONS, "formulation")
        _check_float(self.sigma_data, "sigma_data", 0.0, 100.0, lo_open=True)
        _check_float(self.p_mean, "p_mean", -20.0, 20.0)
        _check_float(self.p_std, "p_std", 0.0, 20.0, lo_open=True)
        _check_float(self.sigma_min, "sigma_min", 0.0, 1e6, lo_open=True)
        _check_float(self.sigma_max, "sigma_max", 0.0, 1e6, lo_open=True)
        if self.sigma_min >= self.sigma_max:
            raise ConfigError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        defaults = DiffusionConfig.__dataclass_fields__
        if self.formulation == "ddpm":
            for name in _EDM_FIELDS:
                if getattr(self, name) != defaults[name].default:
                    raise ConfigError(f"--{name.replace('_', '-')} applies to --formulation edm only")
            return
        for name, flag in _DDPM_ONLY.items():
            if getattr(self, name) != defaults[name].default:
                raise ConfigError(f"{flag} {_flag_value(getattr(self, name))} has no meaning with --formulation edm "
                                  "(a network trained in sigma space; see docs/continuous-time.md)")

    def to_dict(self) -> dict:
        """The configuration section; a ddpm model's without the EDM fields (its files stay as they were)."""
        d = asdict(self)
        return {k: v for k, v in d.items() if k not in ("formulation", *_EDM_FIELDS)} if self.formulation == "ddpm" else d

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


_EDM_FIELDS = ("sigma_data", "p_mean", "p_std", "sigma_min", "sigma_max")
# The ddpm options EDM's loss and denoiser (ddpm.edm) do not have, with their flags.
_DDPM_ONLY = {"timesteps": "--timesteps", "schedule": "--schedule", "objective": "--objective",
              "loss_weighting": "--loss-weighting", "variance": "--variance", "loss": "--loss",
              "timestep_sampling": "--timestep-sampling", "offset_noise": "--offset-noise",
              "self_condition": "--self-condition", "min_snr_gamma": "min_snr_gamma", "vlb_weight": "--vlb-weight"}


def _flag_value(value) -> str:
    return "" if value is True else str(value)


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
    image_column: str | None = None               # a Hugging Face dataset's image column (None: the first Image one)
    label_column: str | None = None               # its label column (None: label or labels, when there is one)
    condition_data: str | None = None             # paired image conditions: row k conditions image k (ddpm.data.pairs)

    def __post_init__(self) -> None:
        if self.fingerprint is not None and not (isinstance(self.fingerprint, dict) and set(self.fingerprint) == {
                "num_images", "image_shape", "sample_sha256"}):
            raise ConfigError(f"data fingerprint must hold num_images, image_shape and sample_sha256; "
                              f"got {self.fingerprint!r}")
        for name in ("name", "root", "condition_data"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif not (isinstance(value, str) or (value is None and name != "name")):
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
        for name in ("image_column", "label_column"):      # ddpm.data.hub: hf:NAME or a save_to_disk folder
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip() and value.isprintable()):
                raise ConfigError(f"data {name.replace('_', ' ')} must be a column name; got {value!r}")
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
    ema_extra_decays: tuple[float, ...] = ()   # further averages kept besides ema_decay's (ema@D.* in checkpoints)
    ema_profiles: tuple[float, ...] = (0.05, 0.10)   # sigma_rel of the post-hoc EMA profiles (EDM2), when snapshotting
    ema_snapshot_every: int = 0        # steps between post-hoc EMA snapshots (ema-snapshots/; 0: off, no profiles)
    lr_schedule: str = "constant"      # constant | cosine | linear | inverse-sqrt, after the warm-up (ddpm.lr_schedules)
    lr_min: float = 0.0                # floor of the cosine and linear schedules
    lr_ref_steps: int = 0              # t_ref of inverse-sqrt (0: the warm-up length)
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
    tracker: str = "tensorboard"       # tensorboard | wandb | none: where scalars, grids and the config go besides
                                       # metrics.jsonl (ddpm.tracking)
    wandb_project: str = ""            # --tracker wandb: the W&B project ("": $WANDB_PROJECT, else ddpm)
    wandb_name: str = ""               # --tracker wandb: the W&B run's display name ("": W&B's choice)

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "max_bad_steps"):
            _check_int(getattr(self, name), name.replace("_", " "), 1, MAX_COUNT)
        for name in ("batch_size", "grad_accum", "num_samples", "eval_samples"):
            _check_int(getattr(self, name), name.replace("_", " "), 1, MAX_BATCH)
        for name in ("sample_every", "checkpoint_every", "warmup_steps", "keep_last", "milestone_every", "eval_every",
                     "ema_snapshot_every", "lr_ref_steps"):
            _check_int(getattr(self, name), name.replace("_", " "), 0, MAX_COUNT)
        _choice(self.optimizer, ("adam", "adamw"), "optimizer")
        self._check_evaluation()
        _choice(self.precision, ("auto", "fp32", "bf16", "fp16"), "precision")
        _check_float(self.lr, "learning rate", 0.0, lo_open=True)
        _check_float(self.weight_decay, "weight decay", 0.0)
        _check_float(self.grad_clip, "gradient clipping norm", 0.0)
        _check_float(self.ema_decay, "EMA decay", 0.0, 1.0)
        self._check_averages_and_lr()
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
        self._check_tracker()

    def _check_tracker(self) -> None:
        """--tracker is one of TRACKERS; the W&B project and name are strings, given with --tracker wandb only."""
        _choice(self.tracker, ("tensorboard", "wandb", "none"), "tracker")
        for name in ("wandb_project", "wandb_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or any(c in value for c in "\n\r\0"):
                raise ConfigError(f"{name.replace('_', ' ')} must be a string on one line; got {value!r}")
            if value and self.tracker != "wandb":
                raise ConfigError(f"--{name.replace('_', '-')} names a Weights & Biases run: give --tracker wandb as well")

    def _check_averages_and_lr(self) -> None:
        """Extra EMA decays in [0, 1] (none twice), post-hoc profile lengths, and the lr schedule."""
        for name in ("ema_extra_decays", "ema_profiles"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ConfigError(f"{name.replace('_', ' ')} must be a list of numbers; got {getattr(self, name)!r}")
        for d in self.ema_extra_decays:
            _check_float(d, "EMA decay", 0.0, 1.0)
        decays = [float(self.ema_decay), *map(float, self.ema_extra_decays)]
        if len(set(decays)) != len(decays):
            raise ConfigError(f"each EMA decay may be given once; got {', '.join(map(repr, decays))}")
        self.ema_extra_decays = tuple(decays[1:])
        for s in self.ema_profiles:             # power-function lengths (EDM2 Eq. 123): gamma > 0
            _check_float(s, "post-hoc EMA sigma_rel", 0.0, 1.0 / (2.0 * math.sqrt(3.0)), lo_open=True, hi_open=True)
        if self.ema_snapshot_every and not self.ema_profiles:
            raise ConfigError("--ema-snapshot-every needs at least one post-hoc EMA profile (--ema-profiles)")
        if len(set(map(float, self.ema_profiles))) != len(self.ema_profiles):
            raise ConfigError(f"each post-hoc EMA profile may be given once; got {list(self.ema_profiles)!r}")
        self.ema_profiles = tuple(float(s) for s in self.ema_profiles)
        _choice(self.lr_schedule, LR_SCHEDULES, "lr schedule")
        _check_float(self.lr_min, "lr min", 0.0, float(self.lr))
        if self.lr_schedule in ("cosine", "linear") and self.steps <= self.warmup_steps:
            raise ConfigError(f"the {self.lr_schedule} lr schedule needs --steps ({self.steps}) above "
                              f"--warmup-steps ({self.warmup_steps})")

    def _check_evaluation(self) -> None:
        """--eval-metric, --keep-best and --inception-weights agree with --eval-every and with each other."""
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
        if self.keep_best:
            return self.keep_best
        return self.eval_metric if self.eval_metric != "auto" else default_training_metric(channels, tuple(image_size))

    def global_batch_size(self, world_size: int = 1) -> int:
        """Images per optimizer step over all processes: batch_size x world_size x grad_accum."""
        return self.batch_size * world_size * self.grad_accum


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
    condition: ImageCondition | None = None    # an image-conditioned model (SR3, Palette): what c is (ddpm.conditions)

    def __post_init__(self) -> None:
        if self.condition is not None:
            if not isinstance(self.condition, ImageCondition):
                raise ConfigError(f"condition must be an ImageCondition; got {self.condition!r}")
            if self.model.image_size is not None:
                self.condition.check_image_size(tuple(self.model.image_size))
        if (self.condition is not None and self.condition.task == "paired") != (self.data.condition_data is not None):
            raise ConfigError("--condition-data is the condition source of --task paired (and paired needs it)")
        if self.model.kind == "unet1d":
            _check_sequence_run(self)

    @property
    def conditional(self) -> bool:
        """Class-conditional (``model.num_classes`` set): training feeds labels, with label dropout."""
        return self.model.num_classes is not None

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model.to_dict(), "diffusion": self.diffusion.to_dict(),
                "data": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.data).items()
                         if not (k == "condition_data" and v is None)},
                "train": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.train).items()},
                **({"sampling": self.sampling.to_dict()} if self.sampling is not None else {}),
                **({"choice": self.choice} if self.choice is not None else {}),
                **({"condition": asdict(self.condition)} if self.condition is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        if not isinstance(d, dict) or "model" not in d:
            raise ConfigError("configuration has no [model] section")
        if not isinstance(d.get("preset", "custom"), str):
            raise ConfigError(f"preset must be a string; got {d['preset']!r}")
        unknown = sorted(set(d) - {"preset", "model", "diffusion", "data", "train", "sampling", "choice",
                                 "condition"})
        if unknown:
            raise ConfigError(f"unknown configuration section(s): {', '.join(unknown)}")
        try:
            return cls(preset=d.get("preset", "custom"),
                       model=_from_dict(UnetConfig, d["model"], "model"),
                       diffusion=_from_dict(DiffusionConfig, d.get("diffusion", {}), "diffusion"),
                       data=_from_dict(DataConfig, d.get("data", {}), "data"),
                       train=_from_dict(TrainConfig, d.get("train", {}), "train"),
                       sampling=None if d.get("sampling") is None
                       else _from_dict(SamplingOptions, d["sampling"], "sampling"), choice=d.get("choice"),
                       condition=None if d.get("condition") is None
                       else _from_dict(ImageCondition, d["condition"], "condition"))
        except TypeError as exc:  # a value of the wrong type that the validators could not compare
            raise ConfigError(f"invalid configuration: {exc}") from None

    @classmethod
    def for_preset(cls, preset: str, **model_overrides) -> "RunConfig":
        return cls(preset=preset, model=preset_config(preset, **model_overrides))


# What a sequence run (model kind unet1d, data [N, C, L]) refuses, with the reason: these options act on
# images, or on parts of the image U-Net that the 1D U-Net (ddpm.models.unet1d) does not have.
_NOT_FOR_SEQUENCES = (
    (lambda c: c.data.hflip, "--hflip flips images"),
    (lambda c: c.data.image_size is not None, "--image-size resizes images; a sequence keeps its length L"),
    (lambda c: c.data.channels is not None, "--channels converts images' colours; a sequence keeps its channels"),
    (lambda c: c.condition is not None, "--task trains an image-conditioned model"),
    (lambda c: c.model.num_classes is not None, "--conditional needs class labels, which the 1D U-Net does not take"),
    (lambda c: c.train.eval_every > 0, "--eval-every scores images (FID, KID, IS, the fast metric)"),
    (lambda c: c.train.grad_checkpointing, "--grad-checkpointing is an option of the image U-Net"),
)
_IMAGE_UNET_ONLY = ("use_scale_shift_norm", "resblock_updown", "attention_head_dim", "downsample_padding",
                    "flip_sin_to_cos", "freq_shift", "timestep_scale", "norm_eps")


def _check_sequence_run(config: RunConfig) -> None:
    """Refuse, in one line, what has no meaning for a sequence model (data [N, C, L], a 1D U-Net)."""
    for applies, why in _NOT_FOR_SEQUENCES:
        if applies(config):
            raise ConfigError(f"{why}; this is a sequence model (data [N, C, L], a 1D U-Net)")
    defaults = UnetConfig.__dataclass_fields__
    for name in _IMAGE_UNET_ONLY:
        if getattr(config.model, name) != defaults[name].default:
            raise ConfigError(f"model {name} is an option of the image U-Net; the 1D U-Net of a sequence model "
                              "has no such part")


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
