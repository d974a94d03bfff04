"""lucidrains' denoising-diffusion-pytorch API, on this project's U-Net and diffusion maths.

Code written against that library runs with its import changed::

    from ddpm.compat.lucidrains import GaussianDiffusion, Unet

    model = Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)   # no image size: any multiple of 8
    diffusion = GaussianDiffusion(model, image_size=128, timesteps=1000, sampling_timesteps=250)
    loss = diffusion(images)                  # images in [0, 1]
    samples = diffusion.sample(batch_size=4)  # DDIM over 250 steps, as there

Its argument names are accepted where they mean the same thing here, and this project's own
:class:`~ddpm.models.UnetConfig` names are accepted too. An argument with no equivalent is an
error that names the nearest one (:class:`ArgumentError`, a ``TypeError``). What each name
becomes is listed in ``docs/coming-from.md``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import fields

import torch

from ..diffusion import GaussianDiffusion as _GaussianDiffusion
from ..errors import ConfigError
from ..models import Unet as _Unet
from ..models import UnetConfig

__all__ = ["ArgumentError", "Unet", "GaussianDiffusion", "OBJECTIVES"]


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
    for name in options:
        if name not in allowed:
            raise ArgumentError(f"{owner}() got an unexpected argument {name!r}{nearest_name(name, allowed)}")


def _check_unet_arguments(options: dict) -> None:
    """:func:`check_arguments` for ``Unet``, with the reasons of the names that have no equivalent."""
    for name, value in options.items():
        if name in _NO_EQUIVALENT:
            raise ArgumentError(f"Unet({name}=...) has no equivalent in ddpm: {_NO_EQUIVALENT[name]}")
        if name in _AT_DEFAULT_ONLY and value != _AT_DEFAULT_ONLY[name][0]:
            raise ArgumentError(f"Unet({name}={value!r}) has no equivalent in ddpm: {_AT_DEFAULT_ONLY[name][1]}")
        if name == "attention_resolutions":
            raise ArgumentError(f"Unet({name}=...) names feature-map sizes, which need an image size; "
                                f"nearest: full_attn, or attention_levels (0 = the full image size)")
        if name in _DERIVED:
            raise ArgumentError(f"Unet({name}=...) is set from the other arguments here (image_size by "
                                f"GaussianDiffusion, in/out channels by self_condition and learned_variance)")
    check_arguments("Unet", options, (*_LUCIDRAINS_NAMES, *_PROJECT_NAMES))


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
        _check_unet_arguments(options)
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


# ----------------------------------------------------------------------------- GaussianDiffusion

OBJECTIVES = {"pred_noise": "eps", "pred_x0": "x0", "pred_v": "v"}     # theirs -> DiffusionConfig.objective
_DIFFUSION_NO_EQUIVALENT = {
    "immiscible": "noise is drawn independently of the images here (no immiscible assignment)",
}
_DIFFUSION_NAMES = ("image_size", "timesteps", "sampling_timesteps", "objective", "beta_schedule",
                    "schedule_fn_kwargs", "ddim_sampling_eta", "auto_normalize", "offset_noise_strength",
                    "min_snr_loss_weight", "min_snr_gamma", *_DIFFUSION_NO_EQUIVALENT)
# DiffusionConfig fields without a lucidrains name, which may be given by this project's name.
_DIFFUSION_PROJECT_NAMES = ("loss", "vlb_weight", "variance", "clip_denoised", "timestep_sampling")


class GaussianDiffusion(_GaussianDiffusion):
    """This project's :class:`~ddpm.diffusion.GaussianDiffusion` under the names of lucidrains' one.

    Their defaults are kept, so their code trains what it trained there: ``objective='pred_v'``
    (``'pred_noise'`` is the paper's eps, ``'pred_x0'`` x0) and ``beta_schedule='sigmoid'``
    (``'linear'``, ``'cosine'``: the same tables as there). ``sampling_timesteps`` below
    ``timesteps`` makes :meth:`sample` run DDIM over that many trailing steps with
    ``ddim_sampling_eta`` (as there); otherwise it is the paper's ancestral sampler over all T.
    ``offset_noise_strength`` is ``offset_noise``; ``min_snr_loss_weight=True`` with
    ``min_snr_gamma`` is ``loss_weighting="min-snr"``. ``auto_normalize=False`` takes and returns
    images in [-1, 1] instead of [0, 1]. The model's ``self_condition`` and ``learned_variance``
    become diffusion settings (a learned variance trains with the hybrid loss of Nichol &
    Dhariwal 2021).
    """

    def __init__(self, model, *, image_size, timesteps: int = 1000, sampling_timesteps: int | None = None,
                 objective: str = "pred_v", beta_schedule: str = "sigmoid", schedule_fn_kwargs: dict | None = None,
                 ddim_sampling_eta: float = 0.0, auto_normalize: bool = True, offset_noise_strength: float = 0.0,
                 min_snr_loss_weight: bool = False, min_snr_gamma: float = 5, **options):
        for name, why in _DIFFUSION_NO_EQUIVALENT.items():
            if options.pop(name, False):
                raise ArgumentError(f"GaussianDiffusion({name}=True) has no equivalent in ddpm: {why}")
        check_arguments("GaussianDiffusion", options, (*_DIFFUSION_NAMES, *_DIFFUSION_PROJECT_NAMES))
        if objective not in OBJECTIVES:
            raise ArgumentError(f"GaussianDiffusion(objective={objective!r}) must be one of "
                                f"{', '.join(OBJECTIVES)}{nearest_name(str(objective), OBJECTIVES)}")
        if schedule_fn_kwargs:
            raise ArgumentError("GaussianDiffusion(schedule_fn_kwargs=...) has no equivalent in ddpm: each schedule "
                                "has the fixed parameters of its paper; nearest: beta_schedule")
        learned = bool(getattr(model, "learned_variance", False))
        settings = {"timesteps": timesteps, "schedule": beta_schedule, "objective": OBJECTIVES[objective],
                    "offset_noise": float(offset_noise_strength), "min_snr_gamma": min_snr_gamma,
                    "loss_weighting": "min-snr" if min_snr_loss_weight else "uniform",
                    "self_condition": bool(getattr(model, "self_condition", False)),
                    **({"variance": "learned-range", "loss": "hybrid"} if learned else {}), **options}
        super().__init__(model, image_size=image_size, **settings)
        if sampling_timesteps is not None and not 1 <= sampling_timesteps <= timesteps:
            raise ConfigError(f"sampling_timesteps must be between 1 and timesteps={timesteps}; "
                              f"got {sampling_timesteps}")
        self.sampling_timesteps = timesteps if sampling_timesteps is None else sampling_timesteps
        self.is_ddim_sampling = self.sampling_timesteps < timesteps
        self.ddim_sampling_eta, self.auto_normalize = ddim_sampling_eta, auto_normalize
        self.sampling_options()                          # validates eta now rather than at the first sample

    @property
    def num_timesteps(self) -> int:
        return self.timesteps

    def sampling_options(self):
        """The :class:`~ddpm.samplers.SamplingOptions` :meth:`sample` runs: DDIM over
        ``sampling_timesteps`` when it is below T, else ancestral sampling over all T."""
        from ..samplers import SamplingOptions

        if self.is_ddim_sampling:
            return SamplingOptions(sampler="ddim", steps=self.sampling_timesteps, eta=float(self.ddim_sampling_eta))
        return SamplingOptions(sampler="ddpm")

    def forward(self, img: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The training loss of images in [0, 1] ([-1, 1] with ``auto_normalize=False``)."""
        if not self.auto_normalize:
            img = (img + 1) / 2
        return super().forward(img, *args, **kwargs)

    def sample(self, batch_size: int = 16, return_all_timesteps: bool = False, *, progress: bool = True):
        """``batch_size`` images in [0, 1] ([-1, 1] with ``auto_normalize=False``); the noise comes
        from torch's global generator, so ``torch.manual_seed`` reproduces them."""
        from ..generate import sample_images

        if return_all_timesteps:
            raise ArgumentError("GaussianDiffusion.sample(return_all_timesteps=True) has no equivalent here; "
                                "nearest: ddpm.GaussianDiffusion.sample(return_intermediates=True)")
        seed = int(torch.randint(2 ** 62, (1,)))
        images = sample_images(self, list(range(batch_size)), seed=seed, sampling=self.sampling_options(),
                               progress=progress)
        return images if self.auto_normalize else images * 2 - 1
