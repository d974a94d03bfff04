"""lucidrains' 1D family (``Unet1D``, ``GaussianDiffusion1D``, ``Trainer1D``, ``Dataset1D``) on this
project's 1D U-Net (:mod:`ddpm.models.unet1d`) and its diffusion maths, over sequences [B, C, L].

The diffusion is this project's :class:`~ddpm.gaussian_diffusion.GaussianDiffusion` with a
one-dimensional "image size" (L,): the loss, the schedule and every sampler broadcast over
[B, C, L] as over [B, C, H, W]. ``Trainer1D`` is a small loop of its own (the project's training
loop reads image datasets): Adam, gradient accumulation and clipping, the EMA of
:class:`ddpm.train.EMA`, mixed precision, and every ``save_and_sample_every`` steps a safetensors
checkpoint ``model-{milestone}.safetensors`` and ``num_samples`` EMA samples ``sample-{milestone}.npz``.
Import these names from :mod:`ddpm.compat.lucidrains`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, load_weights, save_checkpoint
from ..errors import ConfigError
from ..models.unet1d import Unet1D as _Unet1D, Unet1DConfig
from ..precision import autocast
from ..training_state import EMA
from .lucidrains_core import _AT_DEFAULT_ONLY, ArgumentError, GaussianDiffusion, _precision, check_arguments

__all__ = ["Unet1D", "GaussianDiffusion1D", "Trainer1D", "Dataset1D"]


class Unet1D(_Unet1D):
    """This project's 1D U-Net under the names of lucidrains' ``Unet1D``: ``dim``, ``dim_mults``,
    ``channels``, ``dropout``, ``attn_heads`` mean the same; ``self_condition`` and
    ``learned_variance`` double the input and output channels (diffusion settings, read by
    :class:`GaussianDiffusion1D`). Full attention sits in the middle, as there; the other levels
    have none (lucidrains puts linear attention there). GroupNorm replaces their RMSNorm."""

    def __init__(self, dim: int, init_dim: int | None = None, out_dim: int | None = None, dim_mults=(1, 2, 4, 8),
                 channels: int = 3, dropout: float = 0.0, self_condition: bool = False,
                 learned_variance: bool = False, attn_heads: int = 4, **options):
        for name, value in options.items():
            if name in _AT_DEFAULT_ONLY and value != _AT_DEFAULT_ONLY[name][0]:
                raise ArgumentError(f"Unet1D({name}={value!r}) has no equivalent in ddpm: {_AT_DEFAULT_ONLY[name][1]}")
            if name == "attn_dim_head" and value != 32:
                raise ArgumentError(f"Unet1D(attn_dim_head={value!r}) has no equivalent in ddpm: a head here is "
                                    f"(channels / attn_heads) wide; nearest: attn_heads")
        check_arguments("Unet1D", options, (*_AT_DEFAULT_ONLY, "attn_dim_head", "dim", "init_dim", "out_dim",
                                            "dim_mults", "channels", "dropout", "self_condition",
                                            "learned_variance", "attn_heads"))
        out_channels = channels * (2 if learned_variance else 1)
        if init_dim not in (None, dim) or out_dim not in (None, out_channels):
            raise ArgumentError(f"Unet1D(init_dim={init_dim}, out_dim={out_dim}): here they are dim={dim} and "
                                f"{out_channels} (channels, doubled with learned_variance)")
        super().__init__(Unet1DConfig(channels=channels, dim=dim, dim_mults=tuple(dim_mults), dropout=dropout,
                                      attention_heads=attn_heads, norm_groups=math.gcd(32, dim),
                                      in_channels=2 * channels if self_condition else None,
                                      out_channels=out_channels if learned_variance else None))
        self.self_condition, self.learned_variance, self.out_dim = self_condition, learned_variance, out_channels
        self.random_or_learned_sinusoidal_cond = False


class GaussianDiffusion1D(GaussianDiffusion):
    """lucidrains' ``GaussianDiffusion1D``: :class:`~ddpm.compat.lucidrains.GaussianDiffusion` over
    sequences [B, C, ``seq_length``] in [0, 1], with that class's defaults (``objective='pred_noise'``,
    ``beta_schedule='cosine'``). ``channels`` and ``self_condition`` are read from the model."""

    def __init__(self, model, *, seq_length: int, timesteps: int = 1000, sampling_timesteps: int | None = None,
                 objective: str = "pred_noise", beta_schedule: str = "cosine", ddim_sampling_eta: float = 0.0,
                 auto_normalize: bool = True, channels: int | None = None, self_condition: bool | None = None,
                 channel_first: bool = True):
        if not channel_first:
            raise ArgumentError("GaussianDiffusion1D(channel_first=False) has no equivalent in ddpm: sequences are "
                                "[B, C, L]; nearest: x.transpose(1, 2) before and after")
        for name, given in (("channels", channels), ("self_condition", self_condition)):
            if given is not None and given != getattr(model, name):
                raise ArgumentError(f"GaussianDiffusion1D({name}={given!r}) differs from the model's "
                                    f"{getattr(model, name)!r}; here it is read from the model")
        if not isinstance(seq_length, int) or seq_length < 1:
            raise ConfigError(f"seq_length must be a positive integer; got {seq_length!r}")
        super().__init__(model, image_size=(seq_length,), timesteps=timesteps, sampling_timesteps=sampling_timesteps,
                         objective=objective, beta_schedule=beta_schedule, ddim_sampling_eta=ddim_sampling_eta,
                         auto_normalize=auto_normalize)
        self.seq_length = seq_length

    def interpolate(self, x1, x2, t=None, lam: float = 0.5):
        raise ArgumentError("GaussianDiffusion1D.interpolate has no equivalent in ddpm (interpolation writes "
                            "images); nearest: ddpm.diffusion.q_sample on both, mix, then sample from t")


class Dataset1D(Dataset):
    """A tensor [N, C, L] as a dataset of its rows (copies), as there."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.tensor = tensor.clone()

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, idx: int) -> torch.Tensor:
        return self.tensor[idx].clone()


class Trainer1D:
    """lucidrains' ``Trainer1D``: trains ``diffusion_model`` in place on ``dataset`` (rows [C, L] in [0, 1]).

    ``train_batch_size``, ``gradient_accumulate_every``, ``train_lr``, ``train_num_steps``, ``adam_betas``,
    ``max_grad_norm``, ``num_samples``, ``results_folder`` mean the same; ``ema_decay`` d with
    ``ema_update_every`` k is an update every step with decay d^(1/k) (the same horizon, with the
    project's warm-up); ``amp`` is the device's mixed precision (``mixed_precision_type`` 'fp16',
    'bf16', 'no'). ``trainer.ema.ema_model`` is the diffusion with the moving average.
    """

    def __init__(self, diffusion_model: GaussianDiffusion1D, dataset: Dataset, *, train_batch_size: int = 16,
                 gradient_accumulate_every: int = 1, train_lr: float = 1e-4, train_num_steps: int = 100_000,
                 ema_update_every: int = 10, ema_decay: float = 0.995, adam_betas=(0.9, 0.99),
                 save_and_sample_every: int = 1000, num_samples: int = 25, results_folder="./results",
                 amp: bool = False, mixed_precision_type: str | None = None, split_batches: bool = True,
                 max_grad_norm: float = 1.0):
        for name, value in (("train_batch_size", train_batch_size), ("gradient_accumulate_every",
                            gradient_accumulate_every), ("train_num_steps", train_num_steps),
                            ("ema_update_every", ema_update_every), ("save_and_sample_every", save_and_sample_every)):
            if not isinstance(value, int) or value < 1:
                raise ArgumentError(f"Trainer1D({name}={value!r}) must be a positive integer")
        self.model, self.dataset = diffusion_model, dataset
        self.batch_size, self.grad_accum, self.train_num_steps = train_batch_size, gradient_accumulate_every, \
            train_num_steps
        self.save_and_sample_every, self.num_samples, self.max_grad_norm = save_and_sample_every, num_samples, \
            float(max_grad_norm)
        self.results_folder = Path(results_folder)
        self.precision = _precision(amp, mixed_precision_type)
        self.opt = torch.optim.Adam(diffusion_model.parameters(), lr=train_lr, betas=tuple(adam_betas))
        self.ema = EMA(diffusion_model, float(ema_decay) ** (1.0 / ema_update_every))
        self.ema.ema_model = self.ema.model          # lucidrains' name
        self.step = 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    def train(self) -> None:
        """Train to ``train_num_steps``; a milestone (checkpoint and samples) every ``save_and_sample_every``."""
        self.results_folder.mkdir(parents=True, exist_ok=True)
        loader = _cycle(DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True))
        scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16" and self.device.type == "cuda")
        with tqdm(initial=self.step, total=self.train_num_steps) as bar:
            while self.step < self.train_num_steps:
                self.model.train()
                total = 0.0
                for _ in range(self.grad_accum):
                    with autocast(self.device, self.precision):
                        loss = self.model(next(loader).to(self.device)) / self.grad_accum
                    total += float(loss.detach())
                    scaler.scale(loss).backward()
                scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                scaler.step(self.opt)
                scaler.update()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                self.ema.update(self.model)
                bar.set_description(f"loss: {total:.4f}")
                bar.update(1)
                if self.step % self.save_and_sample_every == 0:
                    self._milestone(self.step // self.save_and_sample_every)

    def _milestone(self, milestone: int) -> None:
        """``model-{milestone}.safetensors`` and ``num_samples`` EMA samples in ``sample-{milestone}.npz``."""
        self.save(milestone)
        self.ema.ema_model.eval()
        samples = self.ema.ema_model.sample(batch_size=self.num_samples, progress=False)
        np.savez(self.results_folder / f"sample-{milestone}.npz", samples=samples.float().cpu().numpy())

    def save(self, milestone: int) -> Path:
        tensors = {**{f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                   **{f"ema.{k}": v.detach().cpu().contiguous() for k, v in self.ema.model.state_dict().items()}}
        return save_checkpoint(self.results_folder / f"model-{milestone}.safetensors", tensors,
                               {"step": self.step, "ema_updates": self.ema.num_updates,
                                "config": {"unet1d": self.model.model.config.to_dict(),
                                           "seq_length": self.model.seq_length,
                                           "diffusion": dataclasses.asdict(self.model.config)}})

    def load(self, milestone: int) -> None:
        """Read ``model-{milestone}.safetensors``: the weights, the moving average and the step."""
        path = self.results_folder / f"model-{milestone}.safetensors"
        tensors, meta = load_checkpoint(path)
        load_weights(self.model, tensors, "model", str(path))
        load_weights(self.ema.model, tensors, "ema", str(path))
        self.step, self.ema.num_updates = int(meta["step"]), int(meta.get("ema_updates", 0))


def _cycle(loader: DataLoader):
    """The loader's batches forever, reshuffled each pass."""
    while True:
        yield from loader
