"""Import OpenAI's improved-diffusion and guided-diffusion checkpoints (``ddpm import --format openai``).

Nichol & Dhariwal 2021 (improved-diffusion) and Dhariwal & Nichol 2021 (guided-diffusion)
released their models as PyTorch state dicts (``*.pt``) plus the command-line flags that built
them (``--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True ...``). Their
``UNetModel`` is the paper's U-Net with options that :class:`~ddpm.models.UnetConfig` also has:

* ``num_channels`` / ``channel_mult``: ``dim`` / ``dim_mults`` (``channel_mult`` left empty takes
  the repositories' table by image size; a first multiplier other than 1 is refused);
* ``attention_resolutions`` (feature-map sizes): ``attention_resolutions``;
* ``num_heads`` / ``num_head_channels``: ``attention_heads`` / ``attention_head_dim``;
* ``use_scale_shift_norm``, ``resblock_updown``: the options of the same names;
* ``class_cond``: ``num_classes`` (the row count of ``label_emb``; our extra null row is zero);
* ``learn_sigma``: 2C output channels and the ``learned-range`` variance (Eq. 15);
* ``rescale_timesteps`` (the network sees t * 1000 / T): ``timestep_scale``;
* their timestep embedding (cosines first, frequencies exp(-ln(10^4) i / (dim/2))):
  ``flip_sin_to_cos=True``, ``freq_shift=0``.

The attention's fused ``qkv`` projection is ordered (head, q/k/v, channel) in improved-diffusion
and in guided-diffusion without ``use_new_attention_order``; ours is (q/k/v, head, channel), so
those rows are permuted on import. 1-D convolutions (``qkv``, ``proj_out``) get a trailing 1x1.

The file is read with ``torch.load(weights_only=True)`` only: a pickle that would run code is
refused, never executed. Every tensor's name and shape is checked against the network the flags
describe before anything is written.
"""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import save_checkpoint
from ..config import DataConfig, DiffusionConfig, RunConfig
from ..errors import CheckpointError, ConfigError
from ..fileio import check_output_path
from ..models import Unet, UnetConfig
from ..schedules import NoiseSchedule

__all__ = ["parse_openai_flags", "openai_configs", "read_openai_state_dict", "state_dict_from_openai",
           "import_openai"]

# improved_diffusion/script_util.py: model_and_diffusion_defaults().
IMPROVED_DEFAULTS = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                         attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
                         class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                         use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
                         use_checkpoint=False, use_scale_shift_norm=True)
# guided_diffusion/script_util.py adds these and changes two defaults.
GUIDED_ONLY = dict(num_head_channels=-1, channel_mult="", resblock_updown=False, use_fp16=False,
                   use_new_attention_order=False)
GUIDED_DEFAULTS = {**IMPROVED_DEFAULTS, **GUIDED_ONLY, "rescale_timesteps": False, "rescale_learned_sigmas": False}
# Flags that change training or the sampling loop only; accepted and not used.
IGNORED = {"timestep_respacing", "use_kl", "rescale_learned_sigmas", "use_checkpoint", "use_fp16", "use_ddim",
           "batch_size", "num_samples", "clip_denoised"}
# channel_mult by image size when the flag is empty (both repositories' create_model).
CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}

ATTENTION_KEYS = {"norm": "norm", "qkv": "qkv", "proj_out": "proj_out"}
RESBLOCK_KEYS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "shortcut": "skip_connection"}


def _to_bool(name: str, text: str) -> bool:
    value = text.lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise ConfigError(f"--flags: --{name} takes True or False, got {text!r}")


def parse_openai_flags(text: str) -> dict:
    """The flags of an improved-/guided-diffusion command line as typed values, over the repository's
    defaults: guided-diffusion's when a flag only it has is given, improved-diffusion's otherwise."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"--flags is not a readable command line: {exc}") from None
    given: dict[str, str] = {}
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            raise ConfigError(f"--flags: expected --name value pairs, found {word!r}")
        name, eq, value = word[2:].partition("=")
        if not eq:
            if not words:
                raise ConfigError(f"--flags: --{name} has no value")
            value = words.pop(0)
        given[name] = value
    defaults = GUIDED_DEFAULTS if set(given) & set(GUIDED_ONLY) else IMPROVED_DEFAULTS
    unknown = sorted(set(given) - set(defaults) - IGNORED)
    if unknown:
        raise ConfigError(f"--flags: unknown flag(s) --{', --'.join(unknown)}; give the model and diffusion flags "
                          "of improved-diffusion or guided-diffusion")
    flags = dict(defaults)
    for name, value in given.items():
        default = defaults.get(name)
        if isinstance(default, bool):
            flags[name] = _to_bool(name, value)
            continue
        try:
            if isinstance(default, int):
                flags[name] = int(value)
            elif isinstance(default, float):
                flags[name] = float(value)
            else:
                flags[name] = value
        except ValueError:
            raise ConfigError(f"--flags: --{name} takes a {type(default).__name__}, got {value!r}") from None
    return flags


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--flags: --{name} must be comma-separated integers, got {text!r}") from None


def openai_configs(flags: dict, num_classes: int | None = None) -> tuple[UnetConfig, DiffusionConfig]:
    """The network and diffusion the flags describe (``num_classes``: rows of the class embedding)."""
    size = flags["image_size"]
    if flags.get("channel_mult"):
        mult = _int_list(flags["channel_mult"], "channel_mult")
    elif size in CHANNEL_MULT:
        mult = CHANNEL_MULT[size]
    else:
        raise ConfigError(f"--flags: the repositories have no channel_mult for image_size {size}; give --channel_mult")
    if mult[0] != 1:
        raise ConfigError(f"channel_mult {','.join(map(str, mult))}: ddpm's U-Net needs a first multiplier of 1")
    if flags["num_heads_upsample"] not in (-1, flags["num_heads"]):
        raise ConfigError("num_heads_upsample differs from num_heads; ddpm's U-Net has one head count both ways")
    if flags["class_cond"] and num_classes is None:
        raise ConfigError("--class_cond True, but the weights have no label_emb.weight")
    head_channels = flags.get("num_head_channels", -1)
    model = UnetConfig(
        image_size=size, channels=3, dim=flags["num_channels"], dim_mults=mult,
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=_int_list(flags["attention_resolutions"], "attention_resolutions"),
        dropout=flags["dropout"], norm_groups=32,
        attention_heads=1 if head_channels != -1 else flags["num_heads"],
        attention_head_dim=head_channels if head_channels != -1 else None,
        out_channels=6 if flags["learn_sigma"] else 3, num_classes=num_classes if flags["class_cond"] else None,
        norm_eps=1e-5, downsample_padding="symmetric", flip_sin_to_cos=True, freq_shift=0.0,
        use_scale_shift_norm=flags["use_scale_shift_norm"], resblock_updown=flags.get("resblock_updown", False),
        timestep_scale=1000.0 / flags["diffusion_steps"] if flags["rescale_timesteps"] else 1.0)
    if flags["noise_schedule"] not in ("linear", "cosine"):
        raise ConfigError(f"--flags: noise_schedule must be linear or cosine, got {flags['noise_schedule']!r}")
    learned = flags["learn_sigma"]
    diffusion = DiffusionConfig(
        timesteps=flags["diffusion_steps"], schedule=flags["noise_schedule"],
        objective="x0" if flags["predict_xstart"] else "eps",
        variance="learned-range" if learned else ("posterior" if flags["sigma_small"] else "beta"),
        loss=("vlb" if flags["use_kl"] else "hybrid") if learned else "simple")
    return model, diffusion


def read_openai_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pt`` state dict, read with ``torch.load(weights_only=True)`` (never a
    pickle that runs code), or of a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} holds more than tensors; ddpm loads state dicts only with "
                              f"weights_only=True and refused it ({first})") from None
    except Exception as exc:           # corrupt zip, truncated file, not a torch file at all
        raise CheckpointError(f"{path} is not a readable state dict: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} is not a state dict (a dictionary of named tensors)")
    return state


def _module_names(model: Unet) -> list[tuple[str, str, torch.nn.Module]]:
    """(our module name, theirs, module) for every block of ``model``, in the order both build them."""
    pairs = [("conv_in", "input_blocks.0.0", model.conv_in)]
    for i, blocks in enumerate(model.down):
        pairs += [(f"down.{i}.{j}", f"input_blocks.{i + 1}.{j}", b) for j, b in enumerate(blocks)]
    pairs += [(f"mid.{j}", f"middle_block.{j}", b) for j, b in enumerate(model.mid)]
    k, width = -1, 0                       # their output block, and how many layers it has so far
    for i, blocks in enumerate(model.up):
        resampling = not hasattr(blocks[0], "resample") or blocks[0].resample is not None
        if not resampling:
            k, width = k + 1, 0            # a resampling layer joins the output block before it
        for j, b in enumerate(blocks):
            pairs.append((f"up.{i}.{j}", f"output_blocks.{k}.{width}", b))
            width += 1
    return pairs


def _attention_rows(w: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """qkv rows from their (head, q/k/v, channel) order to our (q/k/v, head, channel) when ``legacy``."""
    if not legacy:
        return w
    return w.reshape(heads, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def state_dict_from_openai(theirs: dict[str, torch.Tensor], model: Unet, *, legacy_attention: bool,
                           source: str) -> dict[str, torch.Tensor]:
    """Our state dict for ``model`` from an improved-/guided-diffusion one; every name and shape checked."""
    names = {"time_mlp.0": "time_embed.0", "time_mlp.2": "time_embed.2",
             "norm_out": "out.0", "conv_out": "out.2"}
    heads = {}
    for ours, their, module in _module_names(model):
        kind = type(module).__name__
        if kind == "ResBlock":
            names.update({f"{ours}.{a}": f"{their}.{b}" for a, b in RESBLOCK_KEYS.items()})
        elif kind == "AttentionBlock":
            names.update({f"{ours}.{a}": f"{their}.{b}" for a, b in ATTENTION_KEYS.items()})
            heads[f"{ours}.qkv"] = module.heads
        elif kind in ("Downsample", "Upsample"):
            names[f"{ours}.conv"] = f"{their}.{'op' if kind == 'Downsample' else 'conv'}"
        else:
            names[ours] = their
    out, used = {}, set()
    for key, param in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if key == "class_emb.weight":
            their_key, expected = "label_emb.weight", (param.shape[0] - 1, param.shape[1])
        else:
            their_key, expected = f"{names[module]}.{leaf}", param.shape
            if param.ndim == 4 and param.shape[-2:] == (1, 1) and module.rsplit(".", 1)[-1] in ("qkv", "proj_out"):
                expected = param.shape[:3]                  # their 1-D convolution
        if their_key not in theirs:
            raise CheckpointError(f"{source}: no tensor {their_key} (for {key}); do the --flags match the model?")
        t = theirs[their_key]
        if tuple(t.shape) != tuple(expected):
            raise CheckpointError(f"{source}: {their_key} has shape {list(t.shape)}, but the --flags give "
                                  f"{list(expected)}; do the --flags match the model?")
        used.add(their_key)
        t = t.float()
        if key == "class_emb.weight":
            t = torch.cat([t, torch.zeros(1, t.shape[1])])   # the null label: no class embedding
        elif module in heads:
            t = _attention_rows(t, heads[module], legacy_attention)
        out[key] = t.reshape(param.shape).contiguous()
    extra = sorted(set(theirs) - used)
    if extra:
        raise CheckpointError(f"{source}: tensor(s) {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} "
                              "have no place in the network the --flags describe")
    return out


def import_openai(path: str | os.PathLike, out: str | os.PathLike, flags: str) -> Path:
    """Convert an improved-/guided-diffusion state dict (``path``) built with the command-line
    ``flags`` into a checkpoint file ``out`` that every ddpm command reads. Returns ``out``."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} already exists; choose a new checkpoint path (nothing is overwritten)")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out} must end in .safetensors")
    check_output_path(out, overwrite=True)          # below a file, read-only: refused before any work
    parsed = parse_openai_flags(flags)
    openai_configs(parsed, num_classes=1)           # refuse bad flags before reading a large file
    NoiseSchedule(parsed["noise_schedule"], parsed["diffusion_steps"])   # a schedule every sampler can build
    theirs = read_openai_state_dict(path)
    label = theirs.get("label_emb.weight")
    model_config, diffusion = openai_configs(parsed, None if label is None else int(label.shape[0]))
    with torch.device("meta"):
        model = Unet(model_config)
    state = state_dict_from_openai(theirs, model, legacy_attention=not parsed.get("use_new_attention_order", False),
                                   source=str(path))
    config = RunConfig(preset="custom", model=model_config, diffusion=diffusion,
                       data=DataConfig(image_size=model_config.image_size, channels=3))
    tensors = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.{k}": v.clone() for k, v in state.items()}}
    meta = {"step": 0, "config": config.to_dict(),
            "imported_from": {"format": "openai", "path": str(Path(path).resolve()), "flags": flags}}
    return save_checkpoint(out, tensors, meta)
