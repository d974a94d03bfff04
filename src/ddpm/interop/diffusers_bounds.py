"""Types and ddpm's own bounds of the diffusers configurations ``ddpm import`` reads, checked before
anything is derived or built from them: a width, a side, a count or a number of timesteps beyond
what ddpm trains (:mod:`ddpm.config`'s ``MAX_*``) is refused in one line naming the option, never
allocated. Then the layers a UNet2DModel configuration asks for are checked against those of ddpm's
U-Net (:func:`check_unet_expressible`)."""

from __future__ import annotations

import math

from ..config import MAX_DIM, MAX_IMAGE_SIDE, MAX_TIMESTEPS
from ..errors import CheckpointError

__all__ = ["check_unet_bounds", "check_scheduler_bounds", "check_unet_expressible", "attention_heads"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# UNet2DModel options that ddpm reads, with ddpm's own bounds (ddpm.config: MAX_DIM, MAX_IMAGE_SIDE).
_UNET_INTS = {"in_channels": (1, 64), "out_channels": (1, 64), "layers_per_block": (1, 64),
              "norm_num_groups": (1, MAX_DIM), "downsample_padding": (0, 1)}
_UNET_OPTIONAL_INTS = {"attention_head_dim": (1, 64 * MAX_DIM), "time_embedding_dim": (1, 4 * 64 * MAX_DIM),
                       "attn_norm_num_groups": (1, MAX_DIM)}
_UNET_NUMBERS = {"dropout": (0.0, 1.0), "norm_eps": (0.0, 1.0), "freq_shift": (-1e6, 1e6),
                 "mid_block_scale_factor": (-1e6, 1e6)}


def check_unet_bounds(c: dict) -> None:
    """Every UNet2DModel option ddpm reads, checked for type and ddpm's bounds before anything is built:
    a width, a side or a count beyond what ddpm trains is refused, never allocated."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise CheckpointError(f"the UNet2DModel configuration has {name}={c.get(name)!r}; expected {what}")

    for name, (lo, hi) in _UNET_INTS.items():
        need(_is_int(c[name]) and lo <= c[name] <= hi, name, f"an integer from {lo} to {hi:,}")
    for name, (lo, hi) in _UNET_OPTIONAL_INTS.items():
        c.setdefault(name, None)
        need(c[name] is None or (_is_int(c[name]) and lo <= c[name] <= hi), name,
             f"null or an integer from {lo} to {hi:,}")
    for name, (lo, hi) in _UNET_NUMBERS.items():
        need(_is_number(c[name]) and lo <= c[name] <= hi, name, f"a number from {lo} to {hi}")
    chans = c["block_out_channels"]
    need(isinstance(chans, (list, tuple)) and 1 <= len(chans) <= 8
         and all(_is_int(ch) and 1 <= ch <= 64 * MAX_DIM for ch in chans) and chans[0] <= MAX_DIM,
         "block_out_channels", f"1 to 8 integers, the first at most {MAX_DIM:,}, each at most {64 * MAX_DIM:,}")
    for name in ("down_block_types", "up_block_types"):
        need(isinstance(c[name], (list, tuple)) and all(isinstance(b, str) for b in c[name]), name,
             "a list of block names")
    size = c["sample_size"]
    sides = list(size) if isinstance(size, (list, tuple)) else [size]
    need(len(sides) in (1, 2) and all(_is_int(v) and 1 <= v <= MAX_IMAGE_SIDE for v in sides), "sample_size",
         f"an integer or [height, width], each from 1 to {MAX_IMAGE_SIDE:,}")
    for name in ("flip_sin_to_cos", "center_input_sample"):
        need(isinstance(c[name], bool), name, "true or false")


def check_scheduler_bounds(c: dict) -> None:
    """The DDPMScheduler options ddpm reads, checked for type and ddpm's bounds (T at most
    MAX_TIMESTEPS) before diffusers builds any table from them."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            shown = c[name] if not isinstance(c[name], list) else f"a list of {len(c[name])}"
            raise CheckpointError(f"the DDPMScheduler configuration has {name}={shown!r}; expected {what}")

    T = c["num_train_timesteps"]
    need(_is_int(T) and 2 <= T <= MAX_TIMESTEPS, "num_train_timesteps", f"an integer from 2 to {MAX_TIMESTEPS:,}")
    for name in ("beta_start", "beta_end"):
        need(_is_number(c[name]) and 0 <= c[name] < 1, name, "a number in [0, 1)")
    betas = c["trained_betas"]
    need(betas is None or (isinstance(betas, list) and len(betas) == T
                           and all(_is_number(b) and 0 < b < 1 for b in betas)),
         "trained_betas", f"null or {T} numbers in (0, 1)")
    for name in ("variance_type", "prediction_type", "beta_schedule"):
        need(isinstance(c[name], str), name, "a name")
    for name in ("clip_sample", "thresholding"):
        need(isinstance(c[name], bool), name, "true or false")
    need(_is_number(c["clip_sample_range"]), "clip_sample_range", "a number")


UNEXPRESSIBLE = "ddpm's U-Net cannot express this UNet2DModel"


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{UNEXPRESSIBLE}: {what}")


def check_unet_expressible(c: dict) -> None:
    """Raise :class:`CheckpointError` unless ddpm's U-Net has the layers of the UNet2DModel configuration
    ``c`` (its defaults filled in, its bounds checked): positional time embedding, SiLU, conv resampling,
    attention mirrored between the down and up blocks, widths that are multiples of the first."""
    _need(c["time_embedding_type"] == "positional", f"time_embedding_type={c['time_embedding_type']!r} "
                                                    "(only 'positional')")
    _need(c["resnet_time_scale_shift"] == "default",
          f"resnet_time_scale_shift={c['resnet_time_scale_shift']!r} (only 'default': the time embedding added)")
    _need(c["class_embed_type"] is None and c["num_class_embeds"] is None, "it is class-conditional")
    _need(not c["center_input_sample"], "center_input_sample=True")
    _need(c["act_fn"] in ("silu", "swish"), f"act_fn={c['act_fn']!r} (only silu)")
    _need(c["mid_block_type"] == "UNetMidBlock2D" and c["add_attention"] is not False,
          f"mid_block_type={c['mid_block_type']!r}, add_attention={c['add_attention']} "
          "(only UNetMidBlock2D with attention)")
    _need(c["mid_block_scale_factor"] == 1, f"mid_block_scale_factor={c['mid_block_scale_factor']} (only 1)")
    _need(c["downsample_type"] == "conv" and c["upsample_type"] == "conv",
          f"downsample_type={c['downsample_type']!r}, upsample_type={c['upsample_type']!r} (only 'conv')")
    _need(c["downsample_padding"] in (0, 1), f"downsample_padding={c['downsample_padding']} (only 0 or 1)")
    _need(c["in_channels"] == c["out_channels"],
          f"out_channels={c['out_channels']} differs from in_channels={c['in_channels']} (learned variances?)")
    groups = c["norm_num_groups"]
    _need(groups is not None, "norm_num_groups=None")
    _need(c["attn_norm_num_groups"] in (None, groups), f"attn_norm_num_groups={c['attn_norm_num_groups']} "
                                                       f"differs from norm_num_groups={groups}")
    _check_blocks(c)


def _check_blocks(c: dict) -> None:
    """The down/up block lists, their attention and widths, and the sample size of ``c``."""
    down, up, chans = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    _need(all(b in ("DownBlock2D", "AttnDownBlock2D") for b in down),
          f"down_block_types {down} (only DownBlock2D and AttnDownBlock2D)")
    _need(all(b in ("UpBlock2D", "AttnUpBlock2D") for b in up),
          f"up_block_types {up} (only UpBlock2D and AttnUpBlock2D)")
    _need(len(down) == len(up) == len(chans) >= 1, "the block lists differ in length")
    attn = [b == "AttnDownBlock2D" for b in down]
    _need([b == "AttnUpBlock2D" for b in reversed(up)] == attn,
          f"attention in {up} does not mirror {down}")
    dim = chans[0]
    _need(all(isinstance(ch, int) and ch % dim == 0 for ch in chans),
          f"block_out_channels {chans} are not multiples of the first")
    _need(c["time_embedding_dim"] in (None, 4 * dim), f"time_embedding_dim={c['time_embedding_dim']} (only 4 x {dim})")
    _need(c["sample_size"] is not None, "it has no sample_size")


def attention_heads(c: dict) -> tuple[int, int | None]:
    """(attention_heads, attention_head_dim) of UnetConfig for the checked configuration ``c``: one head
    count when ``attention_head_dim`` gives the same count at every attention layer, else a fixed head
    width (diffusers' default: more heads where wider)."""
    if c["attention_head_dim"] is None:
        return 1, None
    d, chans = c["attention_head_dim"], list(c["block_out_channels"])
    attn = [b == "AttnDownBlock2D" for b in c["down_block_types"]]
    widths = [ch for ch, a in zip(chans, attn) if a] + [chans[-1]]          # the attention layers' widths
    _need(isinstance(d, int) and d >= 1 and all(ch % d == 0 for ch in widths),
          f"attention_head_dim={d!r} does not divide the attention layers' channels {sorted(set(widths))}")
    counts = {ch // d for ch in widths}
    if len(counts) == 1:
        return counts.pop(), None                   # one head count everywhere: attention_heads
    return 1, d
