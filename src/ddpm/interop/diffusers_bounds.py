"""Types and ddpm's own bounds of the diffusers configurations ``ddpm import`` reads, checked before
anything is derived or built from them: a width, a side, a count or a number of timesteps beyond
what ddpm trains (:mod:`ddpm.config`'s ``MAX_*``) is refused in one line naming the option, never
allocated."""

from __future__ import annotations

import math

from ..config import MAX_DIM, MAX_IMAGE_SIDE, MAX_TIMESTEPS
from ..errors import CheckpointError

__all__ = ["check_unet_bounds", "check_scheduler_bounds"]


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
