"""lucidrains' denoising-diffusion-pytorch API, on this project's U-Net.

Code written against that library runs with its import changed::

    from ddpm.compat.lucidrains import Unet

    model = Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)   # no image size: any multiple of 8

Its argument names are accepted where they mean the same thing here, and this project's own
:class:`~ddpm.models.UnetConfig` names are accepted too. An argument with no equivalent is an
error that names the nearest one (:class:`ArgumentError`, a ``TypeError``). What each name
becomes is listed in ``docs/coming-from.md``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import fields

from ..errors import ConfigError
from ..models import Unet as _Unet
from ..models import UnetConfig

__all__ = ["ArgumentError", "Unet"]


class ArgumentError(ConfigError, TypeError):
    """An argument this project does not take, or takes with other values; the message names the nearest one."""


# lucidrains' arguments that only mean something here at their default ("off"): value, and the nearest name.
_AT_DEFAULT_ONLY = {
    "learned_sinusoidal_cond": (False, "the timestep embedding is the paper's fixed sinusoid; nearest: "
                                       "sinusoidal_pos_emb_theta=10000"),
    "random_fourier_features": (False, "the timestep embedding is the paper's fixed sinusoid; nearest: "
                                       "sinusoidal_pos_emb_theta=10000"),
    "learned_sinusoidal_dim": (16, "there is no learned sinusoidal embedding; nearest: dim, the embedding's width"),
    "sinusoidal_pos_emb_theta": (10000, "the sinusoid's base is fixed at 10000 (Vaswani et al. 2017)"),
}
# lucidrains' arguments with no equivalent at any value, and the nearest name.
_NO_EQUIVALENT = {
    "attn_dim_head": "a head here is (channels / attn_heads) wide; nearest: attn_heads",
}
_LUCIDRAINS_NAMES = ("dim", "dim_mults", "channels", "init_dim", "out_dim", "self_condition", "learned_variance",
                     "dropout", "attn_heads", "full_attn", "flash_attn", *_AT_DEFAULT_ONLY, *_NO_EQUIVALENT)
# UnetConfig fields a caller may give by this project's name (the others follow from the arguments above).
_PROJECT_NAMES = ("num_res_blocks", "attention_levels", "norm_groups", "num_classes", "norm_eps",
                  "downsample_padding", "attention_heads")
_DERIVED = {f.name for f in fields(UnetConfig)} - set(_PROJECT_NAMES) - {"dim", "dim_mults", "channels", "dropout"}


def nearest_name(name: str, known) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_arguments(owner: str, options: dict, allowed) -> None:
    """Refuse, one at a time, the ``options`` that ``owner`` does not take, naming the nearest allowed one."""
    for name, value in options.items():
        if name in _NO_EQUIVALENT:
            raise ArgumentError(f"{owner}({name}=...) has no equivalent in ddpm: {_NO_EQUIVALENT[name]}")
        if name in _AT_DEFAULT_ONLY:
            default, why = _AT_DEFAULT_ONLY[name]
            if value != default:
                raise ArgumentError(f"{owner}({name}={value!r}) has no equivalent in ddpm: {why}")
            continue
        if name == "attention_resolutions":
            raise ArgumentError(f"{owner}({name}=...) names feature-map sizes, which need an image size; "
                                f"nearest: full_attn, or attention_levels (0 = the full image size)")
        if name in _DERIVED:
            raise ArgumentError(f"{owner}({name}=...) is set from the other arguments here (image_size by "
                                f"GaussianDiffusion, in/out channels by self_condition and learned_variance)")
        if name not in allowed:
            raise ArgumentError(f"{owner}() got an unexpected argument {name!r}{nearest_name(name, allowed)}")


class Unet(_Unet):
    """This project's U-Net (Ho et al. 2020) under the names of lucidrains' ``Unet``.

    * ``dim``, ``dim_mults`` (default (1, 2, 4, 8)), ``channels``, ``dropout``: the same meaning.
    * ``self_condition``: the network takes [x_t, x0_prev] (2 x channels inputs);
      ``learned_variance``: it also outputs the variance interpolation (2 x channels outputs).
      :class:`GaussianDiffusion` reads both from the model: they are diffusion settings here.
    * ``full_attn``: one flag per level (or one for all) for full self-attention; by default,
      as there, only the innermost level. Levels without it have no attention here (lucidrains
      puts linear attention there). ``attn_heads``: heads per attention layer (default 4, as there).
    * ``flash_attn``: accepted; attention always runs through ``scaled_dot_product_attention``,
      which uses a fused (flash or memory-efficient) kernel where the device has one.
    * ``init_dim`` and ``out_dim`` only at the values they take here (``dim``; channels, doubled
      with ``learned_variance``).

    No image size: the network runs at any height and width that are multiples of
    ``downsample_factor``; ``GaussianDiffusion(model, image_size=...)`` fixes it. GroupNorm
    uses 32 groups, or the largest power of two below that divides ``dim``.
    """

    def __init__(self, dim: int, dim_mults=(1, 2, 4, 8), *, channels: int = 3, init_dim: int | None = None,
                 out_dim: int | None = None, self_condition: bool = False, learned_variance: bool = False,
                 dropout: float = 0.0, attn_heads=4, full_attn=None, flash_attn: bool = False, **options):
        check_arguments("Unet", options, (*_LUCIDRAINS_NAMES, *_PROJECT_NAMES))
        options = {k: v for k, v in options.items() if k in _PROJECT_NAMES}
        if init_dim not in (None, dim):
            raise ArgumentError(f"Unet(init_dim={init_dim}): the first convolution here has dim={dim} channels; "
                                f"nearest: dim")
        out_channels = channels * (2 if learned_variance else 1)
        if out_dim not in (None, out_channels):
            raise ArgumentError(f"Unet(out_dim={out_dim}): the output here has {out_channels} channels "
                                f"(channels, doubled with learned_variance); nearest: learned_variance")
        if not isinstance(flash_attn, bool):
            raise ArgumentError(f"Unet(flash_attn={flash_attn!r}) must be True or False")
        if "attention_levels" in options and full_attn is not None:
            raise ArgumentError("Unet got both full_attn and attention_levels; give one of them")
        levels = _attention_levels(full_attn, len(tuple(dim_mults)))
        config = UnetConfig(**{
            "image_size": None, "channels": channels, "dim": dim, "dim_mults": tuple(dim_mults),
            "num_res_blocks": 2, "attention_levels": levels, "dropout": dropout,
            "norm_groups": math.gcd(32, dim), "attention_heads": _heads(attn_heads),
            "in_channels": 2 * channels if self_condition else None,
            "out_channels": 2 * channels if learned_variance else None, **options})
        super().__init__(config)
        self.self_condition, self.learned_variance = self_condition, learned_variance
        self.out_dim, self.flash_attn = out_channels, flash_attn
        self.random_or_learned_sinusoidal_cond = False     # as lucidrains' GaussianDiffusion checks


def _attention_levels(full_attn, num_levels: int) -> tuple[int, ...]:
    """Levels with full attention from lucidrains' ``full_attn`` (None: the innermost level only)."""
    if full_attn is None:
        return (num_levels - 1,)
    flags = (full_attn,) * num_levels if isinstance(full_attn, bool) else tuple(full_attn)
    if len(flags) != num_levels or not all(isinstance(f, bool) for f in flags):
        raise ArgumentError(f"Unet(full_attn={full_attn!r}) must be one bool or one per level "
                            f"({num_levels} for these dim_mults)")
    return tuple(level for level, on in enumerate(flags) if on)


def _heads(attn_heads) -> int:
    """lucidrains' ``attn_heads`` (one count, or one per level): one count here, for every attention layer."""
    counts = {attn_heads} if isinstance(attn_heads, int) else set(attn_heads)
    if len(counts) != 1:
        raise ArgumentError(f"Unet(attn_heads={attn_heads!r}): every attention layer here has the same number "
                            f"of heads; give one count")
    return counts.pop()
