"""The names a typical DDPM tutorial builds by hand, on this project's machinery.

Tutorials assemble a ``NoiseSchedule(timesteps, beta_start, beta_end, schedule_type)``, a
``DDPM(model, ...)`` with ``q_sample``, ``p_sample``, ``training_loss`` and
``sample(batch_size, image_size, channels, device)``, a ``UNet(image_size, base_channels,
channel_mults, num_res_blocks, attention_resolutions)``, its ``ResBlock(in_ch, out_ch, time_dim)``,
an EMA of the weights and a mixed-precision step. Here each is a thin layer over the project's
own schedule tables (:class:`ddpm.NoiseSchedule`), free functions (``ddpm.diffusion``,
``ddpm.denoiser``, ``ddpm.losses``, ``ddpm.samplers``) and network (:class:`ddpm.Unet`), with the
tutorials' conventions: data in [-1, 1], 0-based timesteps, eps prediction. ``docs/coming-from.md``
maps every name.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..denoiser import make_denoiser, p_mean_variance
from ..diffusion import q_sample
from ..errors import ConfigError
from ..losses import training_losses
from ..models import Unet
from ..models.unet import ResBlock as _ResBlock
from ..precision import autocast
from ..samplers import sample_ancestral
from ..schedules import NoiseSchedule as _NoiseSchedule, extract
from ..training_state import EMA

__all__ = ["NoiseSchedule", "DDPM", "UNet", "ResBlock", "EMA", "autocast"]


class NoiseSchedule(_NoiseSchedule):
    """:class:`ddpm.NoiseSchedule` under a tutorial's arguments: ``"linear"`` is beta from ``beta_start``
    to ``beta_end`` over ``timesteps`` steps; ``"cosine"`` (and ``"sigmoid"``) the project's own
    schedule of that name, which takes no end points. Tables are float64."""

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 schedule_type: str = "linear"):
        if schedule_type == "linear":
            if not 0 < beta_start <= beta_end < 1:
                raise ConfigError(f"NoiseSchedule needs 0 < beta_start <= beta_end < 1; got {beta_start}, {beta_end}")
            super().__init__(betas=torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64))
            self.kind = "linear"
        else:
            super().__init__(schedule_type, timesteps)
        self.sqrt_recip_alphas = (1.0 / self.alphas).sqrt()

    @staticmethod
    def get(values: torch.Tensor, t: torch.Tensor, x_shape) -> torch.Tensor:
        """``values[t]`` shaped [B, 1, ..., 1] to broadcast against a tensor of shape ``x_shape``."""
        return values[t.to(values.device)].reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


class DDPM(nn.Module):
    """The paper's process around an eps-predicting ``model`` (Ho et al. 2020), data in [-1, 1]."""

    def __init__(self, model: nn.Module, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 schedule_type: str = "linear"):
        super().__init__()
        self.model, self.timesteps = model, timesteps
        self.schedule = NoiseSchedule(timesteps, beta_start, beta_end, schedule_type)
        for name in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "posterior_variance"):
            self.register_buffer(name, getattr(self.schedule, name).float())

    def _schedule(self, device: torch.device) -> _NoiseSchedule:
        return self.schedule.to(device)

    def q_sample(self, x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        """(x_t, noise): x_t ~ q(x_t | x_0) (Eq. 4) with the given or a fresh ``noise``."""
        noise = torch.randn_like(x_0) if noise is None else noise
        return q_sample(self._schedule(x_0.device), x_0, t, noise), noise

    @torch.no_grad()
    def p_sample(self, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True) -> torch.Tensor:
        """x_{t-1} ~ p(x_{t-1} | x_t) with sigma_t^2 = beta-tilde; no noise where t = 0 (Algorithm 2)."""
        p = p_mean_variance(self.model, self._schedule(x_t.device), x_t, t, clip_denoised=clip_denoised)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *((1,) * (x_t.ndim - 1)))
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * torch.randn_like(x_t)

    def training_loss(self, x_0: torch.Tensor) -> torch.Tensor:
        """L_simple (Eq. 14) of data ``x_0`` in [-1, 1], t uniform in {0, ..., T-1}."""
        t = torch.randint(0, self.timesteps, (x_0.shape[0],), device=x_0.device)
        return training_losses(self.model, self._schedule(x_0.device), x_0, t, torch.randn_like(x_0)).mean()

    @torch.no_grad()
    def sample(self, batch_size: int, image_size: int, channels: int = 3, device: str = "cuda",
               show_progress: bool = True) -> torch.Tensor:
        """``batch_size`` samples in [-1, 1] by the paper's ancestral sampler over all T steps."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"DDPM.sample(device={str(device)!r}): CUDA is not available here; pass device='cpu'")
        if not isinstance(image_size, int) or image_size < 1 or not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"DDPM.sample(image_size={image_size!r}, channels={channels!r}) takes positive integers")
        schedule = self._schedule(device)
        denoiser = make_denoiser(self.model, schedule, objective="eps", clip=True)
        x_T = torch.randn(batch_size, channels, image_size, image_size, device=device)
        bar = tqdm(total=self.timesteps, desc="Sampling", disable=not show_progress)
        x0 = sample_ancestral(denoiser, x_T, schedule, list(range(self.timesteps - 1, -1, -1)),
                              noise=lambda: torch.randn_like(x_T), callback=lambda info: bar.update(1))
        bar.close()
        return x0


def UNet(image_size: int = 64, in_channels: int = 3, out_channels: int | None = None, base_channels: int = 64,
         channel_mults=(1, 2, 2, 4), num_res_blocks: int = 2, attention_resolutions=(16,), dropout: float = 0.0,
         num_heads: int = 1, groups: int = 32) -> Unet:
    """:class:`ddpm.Unet` under a tutorial's names: ``base_channels`` is ``dim``, ``channel_mults``
    ``dim_mults``, ``attention_resolutions`` the feature-map sizes with self-attention."""
    return Unet(image_size=image_size, channels=in_channels, out_channels=out_channels, dim=base_channels,
                dim_mults=tuple(channel_mults), num_res_blocks=num_res_blocks,
                attention_resolutions=tuple(attention_resolutions), dropout=dropout, attention_heads=num_heads,
                norm_groups=groups)


class ResBlock(_ResBlock):
    """The U-Net's residual block as tutorials call it: ``ResBlock(in_ch, out_ch, time_dim)``, then
    ``block(x, t_emb)``; GroupNorm with 8 groups (``groups``), SiLU, the embedding added between
    the two convolutions, a 1x1 shortcut when the widths differ."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float = 0.0, groups: int = 8):
        super().__init__(in_ch, out_ch, time_dim, dropout, groups)


def gather(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped to broadcast against ``x`` (the project's :func:`ddpm.schedules.extract`)."""
    return extract(values, t, x)
