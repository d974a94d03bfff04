"""The paper's U-Net (Ho et al. 2020, Appendix B) over sequences: [B, C, L] instead of [B, C, H, W].

The same structure as :class:`ddpm.models.unet.Unet`, with 1D convolutions: a sinusoidal timestep
embedding through an MLP, residual blocks (GroupNorm, SiLU, convolution; the embedding added
between the two convolutions), self-attention over all positions at the chosen levels and in the
middle, stride-2 downsampling and nearest-neighbour x2 upsampling, and skip connections between
the two halves. The last layer of each residual branch starts at zero, as in the paper's code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .unet import Dropout, _zero, norm_silu, timestep_embedding

__all__ = ["Unet1D", "Unet1DConfig"]


@dataclass(frozen=True)
class Unet1DConfig:
    """The 1D U-Net's shape; the fields mean what :class:`~ddpm.models.UnetConfig`'s do."""

    channels: int = 1                       # C of the sequences [B, C, L]
    dim: int = 64                           # channels of the first level
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()  # levels with self-attention (the middle always has it)
    attention_heads: int = 4
    dropout: float = 0.0
    norm_groups: int = 8
    in_channels: int | None = None          # None: channels (2 x channels with self-conditioning)
    out_channels: int | None = None         # None: channels (2 x channels with a learned variance)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_mults", tuple(self.dim_mults))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if self.channels < 1 or self.dim < 1 or not self.dim_mults or min(self.dim_mults) < 1:
            raise ConfigError("Unet1D: channels, dim and every dim_mult must be positive")
        if any(not 0 <= level < len(self.dim_mults) for level in self.attention_levels):
            raise ConfigError(f"Unet1D: attention_levels {self.attention_levels} must be levels 0.."
                              f"{len(self.dim_mults) - 1}")
        for width in {self.dim * m for m in self.dim_mults}:
            if width % self.norm_groups or width % self.attention_heads:
                raise ConfigError(f"Unet1D: a level of {width} channels is not divisible by norm_groups="
                                  f"{self.norm_groups} and attention_heads={self.attention_heads}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.dim_mults) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock1D(nn.Module):
    """Residual block with the timestep embedding added between the two convolutions."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv1d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = Dropout(dropout)
        self.conv2 = _zero(nn.Conv1d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = h + self.emb_proj(F.silu(emb))[:, :, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        return h + self.shortcut(x)


class AttentionBlock1D(nn.Module):
    """Self-attention over all positions of the sequence, with a residual connection."""

    def __init__(self, ch: int, groups: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, n).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)            # softmax(q k^T / sqrt(d)) v
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, n))


class Downsample1D(nn.Module):
    """Stride-2 convolution of width 3: L -> L / 2."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """Nearest-neighbour x2, then a convolution of width 3: L -> 2 L."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Unet1D(nn.Module):
    """``forward(x_t, t)``: x_t [B, in_channels, L] (L a multiple of ``downsample_factor``) and 0-based
    timestep indices t [B] -> [B, out_channels, L]. Built from a :class:`Unet1DConfig` or its fields."""

    def __init__(self, config: Unet1DConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = Unet1DConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a Unet1DConfig or keyword options, not both")
        self.config = cfg = config
        self.channels, self.image_size = cfg.channels, None      # any length that downsamples
        self.in_channels = cfg.in_channels or cfg.channels
        self.downsample_factor = cfg.downsample_factor
        ch, emb_dim, groups = cfg.dim, cfg.dim * 4, cfg.norm_groups

        def res(a: int, b: int) -> ResBlock1D:
            return ResBlock1D(a, b, emb_dim, cfg.dropout, groups)

        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv1d(self.in_channels, ch, 3, padding=1)
        skip_chs, cur = [ch], ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.dim_mults):
            for _ in range(cfg.num_res_blocks):
                blocks = [res(cur, ch * mult)]
                cur = ch * mult
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock1D(cur, groups, cfg.attention_heads))
                self.down.append(nn.ModuleList(blocks))
                skip_chs.append(cur)
            if level != len(cfg.dim_mults) - 1:
                self.down.append(nn.ModuleList([Downsample1D(cur)]))
                skip_chs.append(cur)
        self.mid = nn.ModuleList([res(cur, cur), AttentionBlock1D(cur, groups, cfg.attention_heads), res(cur, cur)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.dim_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = [res(cur + skip_chs.pop(), ch * mult)]
                cur = ch * mult
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock1D(cur, groups, cfg.attention_heads))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample1D(cur)]))
        self.norm_out = nn.GroupNorm(groups, cur)
        self.conv_out = _zero(nn.Conv1d(cur, cfg.out_channels or cfg.channels, 3, padding=1))
        for m in self.modules():                # Glorot-uniform weights, zero biases (the paper's code)
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                (nn.init.zeros_ if getattr(m, "zero_init", False) else nn.init.xavier_uniform_)(m.weight)
                nn.init.zeros_(m.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock1D) else block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, {self.in_channels}, L], got {list(x.shape)}")
        if x.shape[2] % self.downsample_factor:
            raise ValueError(f"x has length {x.shape[2]}; this network's length must be a multiple of "
                             f"{self.downsample_factor}")
        emb = self.time_mlp(timestep_embedding(t, self.config.dim).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock1D):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, emb)
        return self.conv_out(norm_silu(self.norm_out, h))
