"""Export to and import from the Hugging Face diffusers format (``DDPMPipeline`` folders).

A ``DDPMPipeline`` folder holds ``model_index.json``, ``unet/`` (a ``UNet2DModel`` config and
safetensors weights) and ``scheduler/`` (a ``DDPMScheduler`` config). :func:`export_diffusers`
writes one from a checkpoint, with a Hub model card (``README.md``, :mod:`ddpm.interop.model_card`)
and the run's ``samples.png``; :func:`import_diffusers` turns one into a checkpoint. diffusers is
the optional extra ``ddpm[diffusers]``, imported only here and only when a conversion runs.

**The U-Net.** ``UNet2DModel`` expresses our U-Net exactly when it is configured as below (each
setting checked numerically in ``tests/test_diffusers_interop.py``). Ours (:class:`~ddpm.models.UnetConfig`)
on the left, diffusers' on the right:

* ``dim * dim_mults`` (with ``dim_mults[0] == 1``): ``block_out_channels``;
* ``num_res_blocks``: ``layers_per_block`` (both build one more block a level on the way up);
* attention at a level's resolution: ``AttnDownBlock2D`` / ``AttnUpBlock2D`` at that level;
* the middle (residual block, attention, residual block): ``UNetMidBlock2D``, ``add_attention=True``;
* ``attention_heads``: ``attention_head_dim`` = channels per head (None: one head per layer);
  ``attention_head_dim`` (a fixed head width, so wider levels get more heads, diffusers' default of
  8): ``attention_head_dim``;
* ``norm_groups``, ``norm_eps``: ``norm_num_groups``, ``norm_eps``;
* the sinusoidal embedding at frequencies exp(-ln(10000) i / (dim/2 - ``freq_shift``)), sines then
  cosines or (``flip_sin_to_cos``) cosines then sines: ``freq_shift``, ``flip_sin_to_cos`` (the
  paper's code: False and 1; diffusers' defaults, which its own training script uses: True and 0);
* ``downsample_padding`` ``symmetric`` / ``same``: ``downsample_padding`` 1 / 0 (0 pads one zero
  row and column after, TensorFlow's SAME);
* the time embedding added between the two convolutions: ``resnet_time_scale_shift="default"``;
* ``dropout``: ``dropout``.

Weights map module by module (:mod:`ddpm.interop.diffusers_weights`); the one reshaping is the
attention: our ``qkv`` 1x1 convolution (3C output channels: q, k, v, each head-major) is diffusers'
``to_q``, ``to_k``, ``to_v`` linear layers, and ``proj_out`` is ``to_out.0``. Both scale the logits
by 1/sqrt(channels per head).

**The scheduler.** ``DDPMScheduler`` gets T and the betas (by name -- ``linear`` 1e-4..0.02 or
``squaredcos_cap_v2`` -- only at T = 1000 and when its table equals ours; otherwise as
``trained_betas``), ``variance_type`` ``fixed_small`` (our ``posterior``, beta-tilde) or
``fixed_large`` (``beta``), ``prediction_type`` ``epsilon`` / ``sample`` / ``v_prediction`` (our
``eps`` / ``x0`` / ``v``) and ``clip_sample`` (``clip_denoised``). Both ancestral samplers add no
noise at t = 0, so their one difference there -- the variance they would use (diffusers: beta_0
with ``fixed_large``; ours: beta-tilde_1, as the paper's code) -- never changes a sample.

With fewer steps than T, DDPMPipeline adds noise at every step whose timestep is above 0, the
last one included, where ours adds none; with ``fixed_small`` that noise has variance 0 (to float
precision), with ``fixed_large`` it does not. So the exported ``timestep_spacing`` is ``trailing``
(the spacing of ``ddpm sample``) for ``fixed_small`` -- with the same noise,
``DDPMPipeline(num_inference_steps=K)`` follows ``ddpm sample --sampler ddpm --steps K`` -- and
``leading``, whose last timestep is 0, for ``fixed_large`` (there it follows ``... --spacing
leading``). Over all T steps every spacing is the paper's sampler.

Refused, with one line saying why: class-conditional models (DDPMPipeline passes no labels),
outputs other than one image's channels (learned variances), ``dim_mults[0] != 1``, attention
heads of different widths, and any configuration field this module does not know with a
non-default value. Import first checks every option it reads against ddpm's bounds
(:mod:`ddpm.interop.diffusers_bounds`), then refuses other block types, ``scale_shift`` time
conditioning, missing files, pickled ``.bin`` weights (never unpickled), corrupt safetensors, non-DDPM schedulers,
beta tables that match none of our schedules and weights that are not floating point. Export
copies the run's ``samples.png`` only from inside the run directory (a symbolic link out of it
is skipped with a warning).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint import load_checkpoint, save_checkpoint, split_prefix
from ..config import DataConfig, DiffusionConfig, RunConfig
from ..ema import parse_weights, select_weights
from ..errors import CheckpointError, ConfigError
from ..fileio import check_output_path, fsync_dir
from ..models import PRESETS, UnetConfig, preset_config
from ..schedules import SCHEDULES, NoiseSchedule
from .diffusers_weights import (expected_shapes, level_resolutions, state_dict_from_diffusers,
                                state_dict_to_diffusers)
from .diffusers_bounds import (UNEXPRESSIBLE, attention_heads, check_scheduler_bounds, check_unet_bounds,
                               check_unet_expressible)
from .model_card import SAMPLES_NAME, model_card, run_dir_of

__all__ = ["require_diffusers", "unet_to_diffusers_config", "unet_from_diffusers_config",
           "scheduler_to_diffusers_config", "diffusion_from_diffusers_scheduler",
           "export_diffusers", "import_diffusers",
           "WEIGHTS_NAME"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INSTALL_HINT = "pip install 'ddpm[diffusers]' (or pip install diffusers)"

OBJECTIVE_TO_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TO_TYPE = {"posterior": "fixed_small", "beta": "fixed_large"}
# fixed_small_log draws exp(0.5 log beta-tilde) = sqrt(beta-tilde): the same sampler as fixed_small.
TYPE_TO_VARIANCE = {"fixed_small": "posterior", "fixed_small_log": "posterior", "fixed_large": "beta"}

# Fields whose values matter to sampling and are mapped below; the others must keep their defaults.
_UNET_MAPPED = {"image_size", "channels", "dim", "dim_mults", "num_res_blocks", "attention_levels",
                "attention_resolutions", "dropout", "norm_groups", "attention_heads", "out_channels", "num_classes",
                "norm_eps", "downsample_padding", "flip_sin_to_cos", "freq_shift", "attention_head_dim"}
_DIFFUSION_MAPPED = {"timesteps", "schedule", "objective", "variance", "clip_denoised"}
_DIFFUSION_TRAINING_ONLY = {"loss_weighting", "min_snr_gamma",            # shape the loss, not the sampler
                            "loss", "vlb_weight", "timestep_sampling", "offset_noise"}


def require_diffusers(what: str = "converting to or from diffusers"):
    """The ``diffusers`` module, or a one-line error that names the extra to install."""
    try:
        import diffusers                # here: optional dependency (the diffusers extra)
    except ImportError as exc:
        if exc.name not in (None, "diffusers"):          # installed, but one of its own imports fails
            raise ConfigError(f"{what} needs diffusers, which failed to import ({exc}); reinstall it: "
                              f"{INSTALL_HINT}") from None
        raise ConfigError(f"{what} needs the diffusers package, which is not installed: {INSTALL_HINT}") from None
    return diffusers


def _unknown_non_defaults(obj, mapped: set[str]) -> list[str]:
    """Fields of dataclass ``obj`` outside ``mapped`` whose value differs from the field's default."""
    out = []
    for f in dataclasses.fields(obj):
        if f.name in mapped:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if getattr(obj, f.name) != default:
            out.append(f"{f.name}={getattr(obj, f.name)!r}")
    return out


# ----------------------------------------------------------------------------- configurations

def unet_to_diffusers_config(m: UnetConfig) -> dict:
    """The ``UNet2DModel`` configuration that computes exactly what :class:`~ddpm.models.Unet` ``(m)`` does.

    Raises :class:`ConfigError` for an architecture ``UNet2DModel`` cannot express.
    """
    cannot = "diffusers' UNet2DModel cannot express this model"
    if m.num_classes is not None:
        raise ConfigError(f"{cannot}: it is class-conditional (num_classes={m.num_classes}), and DDPMPipeline "
                          "passes no class labels")
    if m.out_channels not in (None, m.channels):
        raise ConfigError(f"{cannot}: it outputs {m.out_channels} channels for {m.channels}-channel images "
                          "(learned variances or another output), which DDPMPipeline cannot sample")
    if m.dim_mults[0] != 1:
        raise ConfigError(f"{cannot}: dim_mults starts at {m.dim_mults[0]}, but UNet2DModel's first level "
                          "has the input convolution's width (dim_mults[0] must be 1)")
    unknown = _unknown_non_defaults(m, _UNET_MAPPED)
    if unknown:
        raise ConfigError(f"{cannot}: the export does not know the model option(s) {', '.join(unknown)}")
    attn = [r in m.attention_resolutions for r in level_resolutions(m)]
    channels = [m.dim * k for k in m.dim_mults]
    head_dim = m.attention_head_dim                  # None, diffusers: one head as wide as the block
    if m.attention_heads != 1:
        widths = {c // m.attention_heads for c, a in zip(channels, attn) if a} | {channels[-1] // m.attention_heads}
        if len(widths) != 1:
            raise ConfigError(f"{cannot}: with {m.attention_heads} heads the attention layers have heads of "
                              f"widths {sorted(widths)}, but UNet2DModel gives every head the same width")
        head_dim = widths.pop()
    h, w = m.image_size
    return {
        "sample_size": h if h == w else [h, w],
        "in_channels": m.channels, "out_channels": m.channels, "center_input_sample": False,
        "time_embedding_type": "positional", "time_embedding_dim": None,
        "flip_sin_to_cos": m.flip_sin_to_cos, "freq_shift": m.freq_shift,   # frequencies exp(-ln(1e4) i / (half - shift))
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D", "add_attention": True,
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": channels, "layers_per_block": m.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 0 if m.downsample_padding == "same" else 1,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": float(m.dropout), "act_fn": "silu",
        "attention_head_dim": head_dim, "norm_num_groups": m.norm_groups, "attn_norm_num_groups": None,
        "norm_eps": float(m.norm_eps), "resnet_time_scale_shift": "default",
        "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
    }


def _with_defaults(cls, config: dict, source: str) -> dict:
    """``config`` completed with the defaults of ``cls.__init__`` (as diffusers does for older configs).

    A key the installed diffusers does not know (a newer version's option) is refused unless it is
    null or false: it might change what the network computes.
    """
    params = {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
              if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(k for k, v in config.items() if not k.startswith("_") and k not in params
                     and v not in (None, False))
    if unknown:
        raise CheckpointError(f"{source} has option(s) {', '.join(unknown)} unknown to the installed diffusers "
                              "(written by a newer version?); ddpm cannot tell what they change")
    return {name: config.get(name, p.default) for name, p in params.items()}


def unet_from_diffusers_config(config: dict) -> UnetConfig:
    """The :class:`~ddpm.models.UnetConfig` equal to a ``UNet2DModel`` configuration (missing keys take
    UNet2DModel's defaults). Raises :class:`CheckpointError` for one our U-Net cannot express."""
    diffusers = require_diffusers()
    c = _with_defaults(diffusers.UNet2DModel, config, "the UNet2DModel configuration")
    check_unet_bounds(c)
    check_unet_expressible(c)
    chans, dim = list(c["block_out_channels"]), c["block_out_channels"][0]
    attn = [b == "AttnDownBlock2D" for b in c["down_block_types"]]
    size = c["sample_size"]
    image_size = (size, size) if isinstance(size, int) else tuple(size)
    heads, head_dim = attention_heads(c)
    levels = [min(image_size) // 2 ** i for i in range(len(chans))]
    try:
        return UnetConfig(image_size=image_size, channels=c["in_channels"], dim=dim,
                          dim_mults=tuple(ch // dim for ch in chans), num_res_blocks=c["layers_per_block"],
                          attention_resolutions=tuple(r for r, a in zip(levels, attn) if a),
                          dropout=float(c["dropout"]), norm_groups=c["norm_num_groups"], attention_heads=heads,
                          attention_head_dim=head_dim, norm_eps=float(c["norm_eps"]),
                          downsample_padding="same" if c["downsample_padding"] == 0 else "symmetric",
                          flip_sin_to_cos=c["flip_sin_to_cos"], freq_shift=c["freq_shift"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{UNEXPRESSIBLE}: {exc}") from None


def scheduler_to_diffusers_config(d: DiffusionConfig) -> dict:
    """The ``DDPMScheduler`` configuration of our diffusion process. Raises :class:`ConfigError` when
    DDPMPipeline cannot run it."""
    diffusers = require_diffusers()
    unknown = _unknown_non_defaults(d, _DIFFUSION_MAPPED | _DIFFUSION_TRAINING_ONLY)
    if unknown:
        raise ConfigError(f"DDPMScheduler cannot express this diffusion: the export does not know the "
                          f"option(s) {', '.join(unknown)}")
    if d.variance not in VARIANCE_TO_TYPE:
        raise ConfigError(f"DDPMScheduler cannot express variance {d.variance!r}; "
                          f"only {', '.join(VARIANCE_TO_TYPE)}")
    base = {"num_train_timesteps": d.timesteps, "variance_type": VARIANCE_TO_TYPE[d.variance],
            "prediction_type": OBJECTIVE_TO_PREDICTION[d.objective], "clip_sample": bool(d.clip_denoised),
            "clip_sample_range": 1.0, "thresholding": False, "steps_offset": 0,
            # See the module docstring: trailing is ddpm sample's spacing; leading ends at t = 0, where
            # DDPMPipeline's fixed_large adds no noise (at a later last step it would, and ours never does).
            "timestep_spacing": "trailing" if d.variance == "posterior" else "leading",
            "rescale_betas_zero_snr": False, "trained_betas": None}
    betas = NoiseSchedule(d.schedule, d.timesteps).betas
    named = {"linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
             "cosine": {"beta_schedule": "squaredcos_cap_v2"}}.get(d.schedule)
    if named is not None and d.timesteps == 1000:
        theirs = diffusers.DDPMScheduler(**base, **named).betas.double()
        if torch.allclose(theirs, betas, rtol=1e-5, atol=1e-9):
            return {**base, "beta_start": 1e-4, "beta_end": 0.02, **named}
    return {**base, "beta_schedule": "linear", "beta_start": float(betas[0]), "beta_end": float(betas[-1]),
            "trained_betas": betas.tolist()}


def diffusion_from_diffusers_scheduler(config: dict) -> DiffusionConfig:
    """Our :class:`~ddpm.config.DiffusionConfig` for a ``DDPMScheduler`` configuration. The betas must
    equal (to float32 precision) one of our schedules at the same T. Raises :class:`CheckpointError`."""
    diffusers = require_diffusers()
    c = _with_defaults(diffusers.DDPMScheduler, config, "the DDPMScheduler configuration")
    check_scheduler_bounds(c)
    cannot = "ddpm cannot express this DDPMScheduler"
    if c["variance_type"] not in TYPE_TO_VARIANCE:
        raise CheckpointError(f"{cannot}: variance_type {c['variance_type']!r} (only "
                              f"{', '.join(TYPE_TO_VARIANCE)}; learned variances are not supported)")
    prediction = {v: k for k, v in OBJECTIVE_TO_PREDICTION.items()}.get(c["prediction_type"])
    if prediction is None:
        raise CheckpointError(f"{cannot}: prediction_type {c['prediction_type']!r}")
    if c["thresholding"]:
        raise CheckpointError(f"{cannot}: thresholding=True (sample with 'ddpm sample --dynamic-threshold' instead)")
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        raise CheckpointError(f"{cannot}: clip_sample_range={c['clip_sample_range']} (only 1.0)")
    T = c["num_train_timesteps"]
    try:
        betas = diffusers.DDPMScheduler(**c).betas.double()
    except (ValueError, NotImplementedError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{cannot}: {exc}") from None
    if not isinstance(T, int) or T < 2 or len(betas) != T:
        raise CheckpointError(f"{cannot}: {len(betas)} betas for num_train_timesteps={T}")
    for name, make in SCHEDULES.items():
        try:
            ours = make(T)
        except ConfigError:
            continue
        if torch.allclose(ours, betas, rtol=1e-5, atol=1e-9):
            return DiffusionConfig(timesteps=T, schedule=name, objective=prediction,
                                   variance=TYPE_TO_VARIANCE[c["variance_type"]], clip_denoised=bool(c["clip_sample"]))
    what = "trained_betas" if c["trained_betas"] is not None else f"beta_schedule={c['beta_schedule']!r}"
    raise CheckpointError(f"{cannot}: its betas ({what}, T={T}) match none of ddpm's schedules "
                          f"({', '.join(SCHEDULES)} at T={T})")


# ----------------------------------------------------------------------------- export

def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def _check_out_dir(out: Path) -> None:
    check_output_path(out, directory=True)          # below a file, read-only: refused before any work
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; choose a new or empty directory (nothing is overwritten)")


def _ordinary_permissions(root: Path) -> None:
    """Files readable as the umask allows (0644 under the usual 022), as any other file the user writes;
    safetensors' writer leaves 0600, which hides the weights from anyone the folder is shared with."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~umask)


def _run_file(run_dir: Path, name: str) -> Path | None:
    """The regular file ``run_dir / name`` resolved, if it stays inside the run directory. A symbolic
    link out of it (to any file on the machine) is skipped with a warning, never copied into an export."""
    path = run_dir / name
    if not path.is_file():
        return None
    target = path.resolve()
    if not target.is_relative_to(run_dir.resolve()):
        print(f"ddpm: warning: {path} is a symbolic link out of the run directory (to {target}); "
              "it is not copied into the export", file=sys.stderr)
        return None
    return target


def _write_card(folder: Path, meta: dict, config: RunConfig, *, weights: str, parameters: int,
                command: str) -> None:
    """``README.md`` (the model card) and, when the run has one, a copy of its ``samples.png``."""
    run_dir = run_dir_of(Path(meta["path"]))
    source = _run_file(run_dir, SAMPLES_NAME) if run_dir is not None else None
    samples = source is not None
    if samples:
        shutil.copyfile(source, folder / SAMPLES_NAME)         # the resolved file, not the link
    card = model_card(meta, config, weights=weights, parameters=parameters, export_command=command,
                      samples=samples, run_dir=run_dir)
    (folder / "README.md").write_text(card, encoding="utf-8")


def _io_reason(exc: BaseException) -> str:
    """The system's words for a failed write: an OSError's strerror, or the message inside a
    SafetensorError (which wraps the OS error as text, e.g. ``IoError(Os { code: 28, ... message: "..." })``)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    found = re.search(r'message: "([^"]+)"', str(exc))
    return found.group(1) if found else " ".join(str(exc).split())


def _exportable_config(meta: dict) -> RunConfig:
    """The checkpoint's configuration, refused when a DDPMPipeline cannot sample its model."""
    try:
        config = RunConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{meta['path']} has an unusable configuration: {exc}") from None
    if config.condition is not None:                # DDPMPipeline has no input for c (docs/conditioning.md)
        raise ConfigError(f"DDPMPipeline cannot sample {meta['path']}: it is image-conditioned "
                          f"({config.condition.task}) and the pipeline passes no condition image")
    if config.model.kind == "unet1d":               # UNet2DModel and DDPMPipeline make images
        raise ConfigError(f"{meta['path']} is a sequence model (a 1D U-Net over [N, C, L]); diffusers' "
                          "DDPMPipeline makes images, so it cannot be exported")
    if config.diffusion.formulation == "edm":
        raise ConfigError("an EDM model has no DDPMScheduler (it is trained in sigma space); it cannot be exported "
                          "to diffusers")
    return config


def export_diffusers(checkpoint: str | os.PathLike, out: str | os.PathLike, *, weights: str = "ema",
                     command: str | None = None) -> Path:
    """Write a ``DDPMPipeline`` folder ``out`` from a checkpoint (file or run directory).

    ``weights`` is ``"ema"`` (the default, what ``ddpm sample`` uses), ``"raw"`` or ``"ema:D"``. Beside the
    pipeline the folder gets a model card, ``README.md``, naming ``command`` (the export's command
    line; default: the equivalent ``ddpm export``), and a copy of the run's ``samples.png``. The
    folder is written beside ``out`` under a temporary name and renamed into place, so a failure
    leaves nothing behind; an existing non-empty ``out`` is refused. Returns ``out``.
    """
    diffusers = require_diffusers("ddpm export --format diffusers")
    parse_weights(weights)                              # raw, ema or ema:D, checked before any read
    out = Path(out)
    _check_out_dir(out)
    tensors, meta = load_checkpoint(checkpoint)
    config = _exportable_config(meta)
    unet_config = unet_to_diffusers_config(config.model)
    scheduler_config = scheduler_to_diffusers_config(config.diffusion)
    prefix = select_weights(tensors, meta, weights)
    state = split_prefix(tensors, prefix)
    shapes = expected_shapes(config.model)
    if set(state) != set(shapes) or any(state[k].shape != s for k, s in shapes.items()):
        raise CheckpointError(f"{meta['path']}: the {prefix}.* weights do not match the model's architecture")
    with torch.device("meta"):                      # no weights to initialise: they come from the checkpoint
        unet = diffusers.UNet2DModel(**unet_config)
    try:
        unet.load_state_dict(state_dict_to_diffusers({k: v.float() for k, v in state.items()}, config.model),
                             strict=True, assign=True)
    except RuntimeError as exc:                     # a mapping error is a bug, not a user mistake
        raise AssertionError(f"the diffusers weight mapping is incomplete: {exc}") from None
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler_config))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if command is None:
        command = shlex.join(["ddpm", "export", "--checkpoint", str(checkpoint), "--out", str(out), "--weights", weights])
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        _write_card(tmp, meta, config, weights=weights, parameters=sum(t.numel() for t in state.values()),
                    command=command)
        _ordinary_permissions(tmp)
        _fsync_tree(tmp)
        if out.is_dir():
            out.rmdir()                              # empty (checked above); rename needs it gone
        os.rename(tmp, out)
    except (OSError, SafetensorError) as exc:          # a full disk, an I/O error, a read-only file system
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {out}: {_io_reason(exc)}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


# ----------------------------------------------------------------------------- import

def _read_json(path: Path, folder: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a diffusers DDPMPipeline folder: {path.relative_to(folder)} is missing")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return value


def _read_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """The UNet's safetensors weights; pickled ``.bin`` files are refused, never loaded."""
    path = unet_dir / WEIGHTS_NAME
    if not path.is_file():
        if (unet_dir / f"{WEIGHTS_NAME}.index.json").is_file():
            raise CheckpointError(f"{unet_dir} holds sharded weights, which ddpm does not read; "
                                  f"save them as one {WEIGHTS_NAME}")
        if any(unet_dir.glob("*.bin")):
            raise CheckpointError(f"{unet_dir} holds only pickled .bin weights, which ddpm never loads (unpickling "
                                  f"runs code); convert them to {WEIGHTS_NAME} first")
        raise CheckpointError(f"{unet_dir} has no {WEIGHTS_NAME}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    for name in sorted(tensors):
        if not tensors[name].is_floating_point():     # converting integers to weights would hide the damage
            raise CheckpointError(f"{path}: tensor {name} holds {str(tensors[name].dtype).replace('torch.', '')} "
                                  "values; weights must be floating point")
    return tensors


def _component(index: dict, name: str, expected: str, folder: Path) -> None:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == expected):
        raise CheckpointError(f"{folder}/model_index.json: the {name} is {entry!r}; ddpm imports only a "
                              f"{expected} (a DDPMPipeline folder)")


def import_diffusers(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert a ``DDPMPipeline`` folder into a checkpoint file ``out`` that every ddpm command reads.

    The weights are stored as both ``ema.*`` and ``model.*`` (diffusers keeps one set); the
    configuration is derived from ``unet/config.json`` and ``scheduler/scheduler_config.json``.
    An existing ``out`` is refused. Returns ``out``.
    """
    require_diffusers("ddpm import --format diffusers")
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise CheckpointError(f"no such folder: {folder}")
    if out.exists():
        raise ConfigError(f"--out {out} already exists; choose a new checkpoint path (nothing is overwritten)")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out} must end in .safetensors")
    check_output_path(out, overwrite=True)          # below a file, read-only: refused before any work
    index = _read_json(folder / "model_index.json", folder)
    _component(index, "unet", "UNet2DModel", folder)
    _component(index, "scheduler", "DDPMScheduler", folder)
    unet_json = _read_json(folder / "unet" / "config.json", folder)
    scheduler_json = _read_json(folder / "scheduler" / "scheduler_config.json", folder)
    for path, value, cls in ((folder / "unet" / "config.json", unet_json, "UNet2DModel"),
                             (folder / "scheduler" / "scheduler_config.json", scheduler_json, "DDPMScheduler")):
        if value.get("_class_name", cls) != cls:
            raise CheckpointError(f"{path} describes a {value.get('_class_name')}, not a {cls}")
    model = unet_from_diffusers_config(unet_json)
    diffusion = diffusion_from_diffusers_scheduler(scheduler_json)
    state = state_dict_from_diffusers(_read_weights(folder / "unet"), model, str(folder / "unet" / WEIGHTS_NAME))
    preset = next((name for name in PRESETS if preset_config(name) == model), "custom")
    config = RunConfig(preset=preset, model=model, diffusion=diffusion,
                       data=DataConfig(image_size=model.image_size, channels=model.channels))
    tensors = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.{k}": v.clone() for k, v in state.items()}}
    meta = {"step": 0, "config": config.to_dict(),
            "imported_from": {"format": "diffusers", "path": str(folder.resolve()),
                              "diffusers_version": unet_json.get("_diffusers_version")}}
    return save_checkpoint(out, tensors, meta)
