"""The noise-prediction U-Net of Ho et al. 2020 (Appendix B), after PixelCNN++ / Wide ResNet.

Structure, as in the paper's reference implementation:

* a sinusoidal embedding of the timestep index followed by a two-layer MLP (width 4 x base);
* at each resolution level, ``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3x3 conv, the
  projected time embedding added, GroupNorm, SiLU, dropout, 3x3 conv, with a 1x1 shortcut when
  the channel count changes), self-attention after each block at the chosen levels, and a
  stride-2 3x3 convolution to go down a level;
* a middle of residual block, attention, residual block;
* the mirror image going up (``num_res_blocks + 1`` blocks a level, each fed the matching skip
  connection, nearest-neighbour upsampling followed by a 3x3 convolution, computed as one
  stride-2 transposed convolution with the equivalent 4x4 kernel);
* GroupNorm, SiLU and a 3x3 convolution to the output channels.

Off by default, three options of OpenAI's improved-/guided-diffusion networks (Nichol & Dhariwal
2021, Dhariwal & Nichol 2021; ``ddpm.interop.openai``): the embedding as a scale and shift after
the second GroupNorm of each residual block, residual blocks that go down and up a level, and a
constant factor on t before its embedding.

The network sees only ``(x_t, t)``, plus an optional class label ``y``: ``t`` is the 0-based
timestep index, never the schedule. With ``num_classes`` set, a learned class embedding is added
to the timestep embedding (class-conditional model); index ``num_classes`` is the "no label"
(null) token that classifier-free guidance trains and samples with (Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .presets import preset_fields

__all__ = ["UnetConfig", "Unet", "preset_config", "timestep_embedding", "check_image_size", "DOWNSAMPLE_PADDINGS",
           "MODEL_KINDS"]

DOWNSAMPLE_PADDINGS = ("symmetric", "same")
MODEL_KINDS = ("unet2d", "unet1d")          # images [B, C, H, W] (Unet) | sequences [B, C, L] (unet1d.Unet1D)


def check_image_size(image_size, num_levels: int) -> tuple[int, int]:
    """``image_size`` as (H, W), refused unless both sides halve evenly ``num_levels - 1`` times."""
    factor = 2 ** (num_levels - 1)
    if len(image_size) == 1:            # a sequence model's (L,)
        if image_size[0] % factor:
            raise ConfigError(f"sequence length {image_size[0]} must be divisible by {factor} for {num_levels} "
                              f"resolution levels; pad or crop the sequences, or use fewer levels (dim_mults)")
        return image_size
    h, w = image_size
    if h % factor or w % factor:
        raise ConfigError(f"image size {h}x{w} must be divisible by {factor} for {num_levels} resolution levels; "
                          f"use a size that is a multiple of {factor}, or a model with fewer levels (dim_mults)")
    return h, w


def _format_hw(size) -> str:
    return f"{size[0]}x{size[1]}"


def _levels_tuple(value, name: str) -> tuple[int, ...] | None:
    """A list of integers as a tuple; refuses a single number, strings and bools."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, int, float)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{name} must be a list of integers, got {value!r}")
    return tuple(value)


@dataclass
class UnetConfig:
    """Architecture of :class:`Unet`. The defaults are the paper's CIFAR-10 model.

    The network has ``len(dim_mults)`` resolution levels: level 0 works at the image size and
    each further level at half the size of the one above, so H and W must be divisible by
    2^(levels - 1) (:attr:`downsample_factor`). Self-attention is placed per level
    (``attention_levels``, counted from the top), so one shape fits every image size it can
    downsample. Configurations written before name the same places by feature-map size
    (``attention_resolutions``, the shorter side: the paper's attention "at 16x16" of a 32x32
    model is level 1). Either may be given; once built, the config holds both, the sizes
    resolved for ``image_size`` (None when the size is left open). Given neither, attention
    sits at level 1, as in the paper (nowhere in a one-level network).
    """

    image_size: tuple[int, int] | None = (32, 32)  # (H, W) the model is trained at; None: any size it can downsample
    channels: int = 3                             # image channels in and out
    dim: int = 128                                # base channel count ("ch" in the paper's code)
    dim_mults: tuple[int, ...] = (1, 2, 2, 2)     # channel multiplier at each resolution level
    num_res_blocks: int = 2                       # residual blocks per level on the way down
    attention_levels: tuple[int, ...] | None = None  # levels with self-attention, 0 = full size (None: see above)
    attention_resolutions: tuple[int, ...] | None = None  # the same places as feature-map sizes (shorter side)
    dropout: float = 0.1
    norm_groups: int = 32                         # GroupNorm groups (the paper: 32)
    attention_heads: int = 1                      # the paper uses one head
    out_channels: int | None = None               # defaults to ``channels`` (2C: with a learned variance)
    in_channels: int | None = None                # defaults to ``channels`` (2C: [x_t, x0_prev], self-conditioning)
    num_classes: int | None = None                # class-conditional with this many classes; None: unconditional
    class_names: tuple[str, ...] | None = None    # the name of each class (label k: class_names[k]); None: unnamed
    norm_eps: float = 1e-5                        # GroupNorm epsilon (the paper's TensorFlow code: 1e-6)
    downsample_padding: str = "symmetric"         # symmetric: one zero row/column on each side of the stride-2
                                                  # conv; same: TensorFlow's SAME, one after and none before
                                                  # (the paper's code, and diffusers' downsample_padding=0)
    # The timestep embedding (see timestep_embedding); the defaults are the paper's code, diffusers'
    # UNet2DModel defaults are flip_sin_to_cos=True, freq_shift=0.
    flip_sin_to_cos: bool = False                 # cosines first, then sines
    freq_shift: float = 1.0                       # frequencies exp(-ln(10000) i / (dim/2 - freq_shift))
    attention_head_dim: int | None = None         # channels per head, so wider levels get more heads;
                                                  # None: every attention layer has attention_heads heads
    # Options of Nichol & Dhariwal 2021 and Dhariwal & Nichol 2021 (OpenAI's improved-diffusion and
    # guided-diffusion networks, ddpm.interop.openai); the defaults leave the paper's network as it is.
    use_scale_shift_norm: bool = False            # the embedding gives a scale and shift after the 2nd GroupNorm
    resblock_updown: bool = False                 # go down / up a level with a residual block (average pooling /
                                                  # nearest upsampling inside it) instead of a convolution
    timestep_scale: float = 1.0                   # the embedding sees t * timestep_scale (improved-diffusion's
                                                  # rescale_timesteps: 1000 / T)
    kind: str = "unet2d"                          # unet2d: images [B, C, H, W]; unet1d: sequences [B, C, L]
                                                  # (ddpm.models.unet1d), image_size = (L,)

    def __post_init__(self) -> None:
        size, sides = self.image_size, 1 if self.kind == "unet1d" else 2
        if size is not None:
            self.image_size = (size,) * sides if isinstance(size, int) else tuple(int(s) for s in size)
        self.dim_mults = tuple(int(m) for m in self.dim_mults)
        if self.class_names is not None and not isinstance(self.class_names, (str, bytes)):
            self.class_names = tuple(self.class_names)
        self.validate()
        self.attention_levels, self.attention_resolutions = self._resolve_attention()

    def _check_kind(self) -> None:
        """The kind, and an image size of its rank: (H, W) for images, (L,) for sequences."""
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        sides = 1 if self.kind == "unet1d" else 2
        if self.image_size is not None and (len(self.image_size) != sides or min(self.image_size) < 1):
            raise ConfigError(f"image_size must be a positive int or {'(L,)' if sides == 1 else '(H, W)'}, "
                              f"got {self.image_size}")

    def validate(self) -> None:
        self._check_kind()
        if self.channels < 1:
            raise ConfigError(f"channels must be >= 1, got {self.channels}")
        for name in ("in_channels", "out_channels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.dim < 1 or not self.dim_mults or min(self.dim_mults) < 1:
            raise ConfigError("dim and every dim_mults entry must be positive")
        if self.num_res_blocks < 1:
            raise ConfigError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        k = self.num_classes
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"num_classes must be a positive integer or None, got {self.num_classes!r}")
        names = self.class_names
        if names is not None:
            if not (isinstance(names, tuple) and all(isinstance(n, str) and n.strip() for n in names)
                    and len(set(names)) == len(names)):
                raise ConfigError(f"class_names must be distinct non-empty strings, got {names!r}")
            if len(names) != k:
                raise ConfigError(f"class_names name {len(names)} classes, but num_classes is {k}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ConfigError(f"downsample_padding must be one of {', '.join(DOWNSAMPLE_PADDINGS)}, "
                              f"got {self.downsample_padding!r}")
        if self.dim % 2:
            raise ConfigError(f"dim must be even (sinusoidal embedding), got {self.dim}")
        if not isinstance(self.flip_sin_to_cos, bool):
            raise ConfigError(f"flip_sin_to_cos must be true or false, got {self.flip_sin_to_cos!r}")
        if (isinstance(self.freq_shift, bool) or not isinstance(self.freq_shift, (int, float))
                or not self.freq_shift < self.dim // 2):
            raise ConfigError(f"freq_shift must be a number below dim / 2 = {self.dim // 2}, got {self.freq_shift!r}")
        d = self.attention_head_dim
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ConfigError(f"attention_head_dim must be a positive integer or None, got {d!r}")
            if self.attention_heads != 1:
                raise ConfigError("set attention_heads or attention_head_dim, not both")
        for name in ("use_scale_shift_norm", "resblock_updown"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        scale = self.timestep_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1e4:
            raise ConfigError(f"timestep_scale must be a number in (0, 10000], got {scale!r}")
        for c in {self.dim * m for m in self.dim_mults}:
            if c % self.norm_groups:
                raise ConfigError(f"channel count {c} is not divisible by norm_groups={self.norm_groups}")
            if c % self.attention_heads:
                raise ConfigError(f"channel count {c} is not divisible by attention_heads={self.attention_heads}")
            if d is not None and c % d:
                raise ConfigError(f"channel count {c} is not divisible by attention_head_dim={d}")
        if self.image_size is not None:
            check_image_size(self.image_size, len(self.dim_mults))

    @property
    def downsample_factor(self) -> int:
        """2^(levels - 1): image height and width must be multiples of it."""
        return 2 ** (len(self.dim_mults) - 1)

    def feature_map_sizes(self, image_size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """(H, W) of the feature maps at each level, for ``image_size`` (default: the config's)."""
        size = image_size if image_size is not None else self.image_size
        if size is None:
            raise ConfigError("this model's image size is open; give one to resolve its feature-map sizes")
        h, w = check_image_size(size, len(self.dim_mults))
        return [(h // 2 ** i, w // 2 ** i) for i in range(len(self.dim_mults))]

    def _resolve_attention(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """(attention_levels, attention_resolutions) from whichever was given; given both, they must agree."""
        levels = _levels_tuple(self.attention_levels, "attention_levels")
        sizes = _levels_tuple(self.attention_resolutions, "attention_resolutions")
        count = len(self.dim_mults)
        if levels is None and sizes is None:
            levels = (1,) if count > 1 else ()
        if levels is not None:
            missing = [level for level in levels if not 0 <= level < count]
            if missing:
                raise ConfigError(f"attention_levels {missing} do not exist: a network with {count} level(s) "
                                  f"has levels 0..{count - 1}, counted from the full image size")
            if len(set(levels)) != len(levels):
                raise ConfigError(f"attention_levels {list(levels)} name a level twice")
            levels = tuple(sorted(levels))
        if sizes is not None and self.kind == "unet1d":
            raise ConfigError("a sequence model places attention by level: give attention_levels")
        if sizes is not None:
            if self.image_size is None:
                raise ConfigError("attention_resolutions are feature-map sizes, which need an image_size; "
                                  "give attention_levels for a model whose image size is open")
            shorter = [min(size) for size in self.feature_map_sizes()]
            unknown = [r for r in sizes if r not in shorter]
            if unknown:
                raise ConfigError(f"attention_resolutions {unknown} match no level; the levels are {sorted(shorter)}")
            by_size = tuple(sorted({shorter.index(r) for r in sizes}))
            if levels is not None and by_size != levels:
                raise ConfigError(f"attention_levels {list(levels)} and attention_resolutions {list(sizes)} disagree: "
                                  f"at {_format_hw(self.image_size)} the levels' sizes are {shorter}; give one of them")
            levels = by_size
        if self.image_size is None or self.kind == "unet1d":
            return levels, None
        return levels, tuple(min(self.feature_map_sizes()[level]) for level in levels)

    def heads(self, ch: int) -> int:
        """Attention heads of a layer with ``ch`` channels."""
        return self.attention_heads if self.attention_head_dim is None else ch // self.attention_head_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["kind"] == "unet2d":           # the images' network: its files stay as they were before kinds
            del d["kind"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UnetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def preset_config(name: str, **overrides) -> UnetConfig:
    """The :class:`UnetConfig` of preset ``name`` (``ddpm.models.presets.PRESETS``), with fields replaced by
    ``overrides`` (:func:`~ddpm.models.presets.preset_fields` says how attention overrides combine)."""
    return UnetConfig(**preset_fields(name, **overrides))


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding of timestep indices (Vaswani et al. 2017, as in the paper's code).

    Frequencies exp(-log(10000) i / (dim/2 - freq_shift)), i = 0..dim/2-1; sines then cosines, or
    cosines then sines with ``flip_sin_to_cos``. The defaults are the paper's code; diffusers'
    ``UNet2DModel`` defaults to ``flip_sin_to_cos=True, freq_shift=0``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]
    waves = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    return torch.cat(waves, dim=1)


def _zero(module: nn.Module) -> nn.Module:
    """Mark a layer to start at zero (the paper's ``init_scale=0`` on the last layer of each branch)."""
    module.zero_init = True
    return module


class _KeepAndScale(torch.autograd.Function):
    """y = x * keep * scale, saving the boolean mask (1 byte per element) for the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class Dropout(nn.Module):
    """Inverted dropout, with a CPU path 3 to 4 times faster than ``nn.Dropout``'s.

    On the CPU, PyTorch draws one Mersenne-Twister number per element for ``nn.Dropout``; in the
    ``cifar10`` and ``mnist`` presets that took 6% and 13% of a training step. Here each 64-bit
    draw gives four 16-bit uniforms, and an element is kept when its uniform clears
    ``p`` rounded to a multiple of 2^-16 (p = 0.1 becomes 0.100006); kept elements are scaled by
    1 / (1 - that p), so E[y] = x exactly. Other devices use ``F.dropout`` (their generators are fast).
    The draws come from torch's default generator, as ``nn.Dropout``'s do, so seeding, resume and
    gradient checkpointing (which replays the generator state) behave the same.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        dropped = round(self.p * 65536)                       # of the 65536 values of a 16-bit uniform
        n = x.numel()
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)
        keep = (bits[:n] >= -32768 + dropped).view(x.shape)
        return _KeepAndScale.apply(x, keep, 65536 / (65536 - dropped))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(GroupNorm(x)); in place when no gradient is recorded (sampling), sparing a tensor."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


def resample(x: torch.Tensor, direction: str | None) -> torch.Tensor:
    """x unchanged (None), nearest-neighbour x2 upsampled ("up") or 2x2 average-pooled ("down")."""
    if direction == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.avg_pool2d(x, 2) if direction == "down" else x


class ResBlock(nn.Module):
    """Residual block with the timestep embedding added between the two convolutions.

    ``scale_shift``: the embedding gives (scale, shift) and h = GroupNorm(h) (1 + scale) + shift
    (Nichol & Dhariwal 2021's ``use_scale_shift_norm``). ``resample`` "up" / "down": the block
    also changes the resolution, resampling both branches before its first convolution (Dhariwal
    & Nichol 2021's ``resblock_updown``); such a block has as many channels out as in.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int, eps: float = 1e-5,
                 scale_shift: bool = False, resample: str | None = None):
        super().__init__()
        self.scale_shift, self.resample = scale_shift, resample
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.scale_shift or self.resample:
            return self._forward_openai(x, emb)
        # The adds go in place: a convolution's backward pass needs its input, never its output.
        h = self.conv1(norm_silu(self.norm1, x))
        h += self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        return h.add_(self.shortcut(x))

    def _forward_openai(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(resample(norm_silu(self.norm1, x), self.resample))
        x = resample(x, self.resample)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection."""

    def __init__(self, ch: int, groups: int, heads: int, eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)            # softmax(q k^T / sqrt(d)) v
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution; ``padding="same"`` pads one zero row and column after (TensorFlow's SAME)."""

    def __init__(self, ch: int, padding: str = "symmetric"):
        super().__init__()
        self.pad_after = padding == "same"
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if self.pad_after else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_after:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def fold_upsampling_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The 4x4 kernel [C_in, C_out, 4, 4] of the stride-2 transposed convolution (padding 1) that
    equals nearest-neighbour x2 upsampling followed by a 3x3 convolution (padding 1) with ``weight``
    [C_out, C_in, 3, 3].

    Output row 2i + a of the upsampled convolution sees input rows i - 1 and i (a = 0) or i and
    i + 1 (a = 1), with two of the 3x3 kernel's rows landing on one input row; the transposed
    convolution's four rows are therefore w_2, w_1 + w_2, w_0 + w_1, w_0, and the same along the
    columns. The sums are additions, in the weight's own precision, outside any autocast.
    """
    def fold(w: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack((w2, w1 + w2, w0 + w1, w0), dim)

    return fold(fold(weight.transpose(0, 1), 2), 3)       # stacked afresh: contiguous, as oneDNN prefers


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution, computed as one stride-2
    transposed convolution with the folded kernel (:func:`fold_upsampling_kernel`): the same
    function and the same 3x3 parameters, 16 multiplications per input pixel and channel pair
    where the upsampled convolution makes 36."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, fold_upsampling_kernel(self.conv.weight), self.conv.bias, stride=2, padding=1)


# Arguments of lucidrains' Unet that UnetConfig does not take: ddpm.compat.lucidrains.Unet takes them.
_LUCIDRAINS_ONLY = ("flash_attn", "full_attn", "attn_heads", "attn_dim_head", "init_dim", "out_dim", "self_condition",
                    "learned_variance", "learned_sinusoidal_cond", "random_fourier_features", "learned_sinusoidal_dim",
                    "sinusoidal_pos_emb_theta")


def _check_unet_keywords(kwargs: dict) -> None:
    """One TypeError for a keyword UnetConfig lacks, pointing lucidrains' names to the compatible class."""
    known = {f.name for f in fields(UnetConfig)}
    for name in kwargs:
        if name in _LUCIDRAINS_ONLY:
            raise TypeError(f"ddpm.Unet() got lucidrains' argument {name!r}; with lucidrains' arguments use "
                            f"`from ddpm.compat.lucidrains import Unet` (docs/coming-from.md)")
        if name not in known:
            raise TypeError(f"ddpm.Unet() got an unexpected argument {name!r}; it takes the UnetConfig fields: "
                            f"{', '.join(sorted(known))}")


class Unet(nn.Module):
    """The paper's U-Net. ``Unet(dim=64, dim_mults=(1, 2), image_size=16, channels=1, ...)``
    takes the fields of :class:`UnetConfig` as keywords; ``Unet.from_preset(name)`` builds a
    named preset (see :mod:`ddpm.models.presets`). Its weights do not depend on the image
    size: it runs on any height and width that are multiples of ``downsample_factor``.

    ``forward(x_t, t, y=None)`` takes x_t of shape [B, in_channels (default C), H, W] and 0-based timestep indices ``t``
    (LongTensor [B]) and returns a tensor of shape [B, out_channels, H, W]. A class-conditional
    model (``num_classes`` set) also takes class labels ``y`` (LongTensor [B] in 0..num_classes,
    where ``num_classes`` is the null label); ``y=None`` means unconditional (all null).
    """

    def __init__(self, config: UnetConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            _check_unet_keywords(kwargs)
            config = UnetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UnetConfig or keyword options, not both")
        self.config = cfg = config
        self.image_size, self.channels = cfg.image_size, cfg.channels   # image_size None: any downsample-able size
        self.downsample_factor = cfg.downsample_factor
        self.in_channels = cfg.in_channels or cfg.channels
        ch, emb_dim, groups, eps = cfg.dim, cfg.dim * 4, cfg.norm_groups, cfg.norm_eps
        ss = cfg.use_scale_shift_norm
        out_channels = cfg.out_channels or cfg.channels

        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.num_classes = cfg.num_classes
        if cfg.num_classes is not None:      # one extra row: the null label of classifier-free guidance
            self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(self.in_channels, ch, 3, padding=1)

        skip_chs = [ch]
        self.down = nn.ModuleList()
        cur = ch
        for level, mult in enumerate(cfg.dim_mults):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, emb_dim, cfg.dropout, groups, eps, ss)]
                cur = ch * mult
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock(cur, groups, cfg.heads(cur), eps))
                self.down.append(nn.ModuleList(blocks))
                skip_chs.append(cur)
            if level != len(cfg.dim_mults) - 1:
                self.down.append(nn.ModuleList([
                    ResBlock(cur, cur, emb_dim, cfg.dropout, groups, eps, ss, "down") if cfg.resblock_updown
                    else Downsample(cur, cfg.downsample_padding)]))
                skip_chs.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, cfg.dropout, groups, eps, ss),
                                  AttentionBlock(cur, groups, cfg.heads(cur), eps),
                                  ResBlock(cur, cur, emb_dim, cfg.dropout, groups, eps, ss)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.dim_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + skip_chs.pop(), ch * mult, emb_dim, cfg.dropout, groups, eps, ss)]
                cur = ch * mult
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock(cur, groups, cfg.heads(cur), eps))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([
                    ResBlock(cur, cur, emb_dim, cfg.dropout, groups, eps, ss, "up") if cfg.resblock_updown
                    else Upsample(cur)]))

        self.gradient_checkpointing = False     # recompute residual blocks in the backward pass
        self.norm_out = nn.GroupNorm(groups, cur, eps=eps)
        self.conv_out = _zero(nn.Conv2d(cur, out_channels, 3, padding=1))
        self._init_weights()

    def _init_weights(self) -> None:
        """Glorot-uniform ("fan_avg") weights and zero biases, as in the paper's code;
        the last layer of every residual branch stays zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if getattr(m, "zero_init", False):
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Unet":
        return cls(preset_config(name, **overrides))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _run(self, blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if not isinstance(block, ResBlock):
                h = block(h)
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, emb, use_reentrant=False)    # dropout's RNG state is replayed
            else:
                h = block(h, emb)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, {self.in_channels}, H, W], got {list(x.shape)}")
        if x.shape[2] % self.downsample_factor or x.shape[3] % self.downsample_factor:
            raise ValueError(f"x is {x.shape[2]}x{x.shape[3]}; this network's height and width must be "
                             f"multiples of {self.downsample_factor}")
        if not torch.is_tensor(t) or t.ndim == 0:          # one timestep for the whole batch
            t = torch.as_tensor(t, device=x.device).reshape(1).expand(x.shape[0])
        if self.config.timestep_scale != 1.0:
            t = t.float() * self.config.timestep_scale
        emb = self.time_mlp(timestep_embedding(t, self.config.dim, flip_sin_to_cos=self.config.flip_sin_to_cos,
                                               freq_shift=self.config.freq_shift).to(x.dtype))
        if self.num_classes is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(y).to(emb.dtype)
        elif y is not None:
            raise ValueError("class labels y given to an unconditional model (num_classes is None)")
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock) and blocks[0].resample is None:   # not a resampling block
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, emb)
        return self.conv_out(norm_silu(self.norm_out, h))
