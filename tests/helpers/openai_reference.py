"""An independent reference of improved-diffusion's / guided-diffusion's ``UNetModel``, written
from the published architecture as plain functions over a state dict with their key names.

``reference_state_dict(arch, generator)`` draws random weights under exactly their names and
shapes; ``reference_forward(state, arch, x, t, y)`` computes their forward pass. Nothing here
imports ddpm: the import test compares ddpm's converted network against these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Arch:
    image_size: int
    model_channels: int
    channel_mult: tuple
    num_res_blocks: int
    attention_resolutions: tuple       # feature-map sizes
    num_heads: int = 1
    num_head_channels: int = -1
    learn_sigma: bool = False
    num_classes: int | None = None
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    new_attention_order: bool = False
    rescale_steps: int | None = None   # rescale_timesteps with this T: the network sees t * 1000 / T
    in_channels: int = 3

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def heads(self, ch: int) -> int:
        return self.num_heads if self.num_head_channels == -1 else ch // self.num_head_channels


def _layout(a: Arch):
    """The blocks of UNetModel.__init__, as (key prefix, kind, in channels, out channels) lists."""
    emb = a.model_channels * 4
    shapes = {"time_embed.0.weight": (emb, a.model_channels), "time_embed.0.bias": (emb,),
              "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,)}
    if a.num_classes:
        shapes["label_emb.weight"] = (a.num_classes, emb)
    ch = a.model_channels
    inputs = [[("input_blocks.0.0", "conv", a.in_channels, ch)]]
    chans, ds = [ch], 1
    for level, mult in enumerate(a.channel_mult):
        for _ in range(a.num_res_blocks):
            layers = [("res", ch, mult * a.model_channels)]
            ch = mult * a.model_channels
            if a.image_size // ds in a.attention_resolutions:
                layers.append(("attn", ch, ch))
            inputs.append(layers)
            chans.append(ch)
        if level != len(a.channel_mult) - 1:
            inputs.append([("down_res" if a.resblock_updown else "down", ch, ch)])
            chans.append(ch)
            ds *= 2
    middle = [("res", ch, ch), ("attn", ch, ch), ("res", ch, ch)]
    outputs = []
    for level, mult in list(enumerate(a.channel_mult))[::-1]:
        for i in range(a.num_res_blocks + 1):
            layers = [("res", ch + chans.pop(), a.model_channels * mult)]
            ch = a.model_channels * mult
            if a.image_size // ds in a.attention_resolutions:
                layers.append(("attn", ch, ch))
            if level and i == a.num_res_blocks:
                layers.append(("up_res" if a.resblock_updown else "up", ch, ch))
                ds //= 2
            outputs.append(layers)
    return shapes, inputs, middle, outputs, ch


def _layer_shapes(prefix: str, kind: str, cin: int, cout: int, emb: int, a: Arch) -> dict:
    if kind == "conv":
        return {f"{prefix}.weight": (cout, cin, 3, 3), f"{prefix}.bias": (cout,)}
    if kind in ("res", "down_res", "up_res"):
        s = {f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
             f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": (cout,),
             f"{prefix}.emb_layers.1.weight": ((2 if a.use_scale_shift_norm else 1) * cout, emb),
             f"{prefix}.emb_layers.1.bias": ((2 if a.use_scale_shift_norm else 1) * cout,),
             f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
             f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": (cout,)}
        if cin != cout:
            s.update({f"{prefix}.skip_connection.weight": (cout, cin, 1, 1), f"{prefix}.skip_connection.bias": (cout,)})
        return s
    if kind == "attn":
        return {f"{prefix}.norm.weight": (cin,), f"{prefix}.norm.bias": (cin,),
                f"{prefix}.qkv.weight": (3 * cin, cin, 1), f"{prefix}.qkv.bias": (3 * cin,),
                f"{prefix}.proj_out.weight": (cin, cin, 1), f"{prefix}.proj_out.bias": (cin,)}
    name = "op" if kind == "down" else "conv"
    return {f"{prefix}.{name}.weight": (cin, cin, 3, 3), f"{prefix}.{name}.bias": (cin,)}


def reference_state_dict(a: Arch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights (every tensor nonzero, zero-initialised layers included) under their names."""
    shapes, inputs, middle, outputs, ch = _layout(a)
    emb = a.model_channels * 4
    shapes.update(_layer_shapes("input_blocks.0.0", "conv", a.in_channels, a.model_channels, emb, a))
    for i, layers in enumerate(inputs[1:], start=1):
        for j, (kind, cin, cout) in enumerate(layers):
            shapes.update(_layer_shapes(f"input_blocks.{i}.{j}", kind, cin, cout, emb, a))
    for j, (kind, cin, cout) in enumerate(middle):
        shapes.update(_layer_shapes(f"middle_block.{j}", kind, cin, cout, emb, a))
    for i, layers in enumerate(outputs):
        for j, (kind, cin, cout) in enumerate(layers):
            shapes.update(_layer_shapes(f"output_blocks.{i}.{j}", kind, cin, cout, emb, a))
    shapes.update({"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.weight": (a.out_channels, ch, 3, 3),
                   "out.2.bias": (a.out_channels,)})
    state = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        w = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        if name.endswith((".0.weight", "norm.weight")) and len(shape) == 1:
            w = 1 + 0.1 * w                                  # GroupNorm scales near 1
        state[name] = w
    return state


# ----------------------------------------------------------------------------- forward

def _emb(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _gn(s, p, x):
    return F.group_norm(x.float(), 32, s[f"{p}.weight"], s[f"{p}.bias"], eps=1e-5)


def _res(s, p, x, emb, a: Arch, kind: str):
    h = F.silu(_gn(s, f"{p}.in_layers.0", x))
    if kind == "up_res":
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    elif kind == "down_res":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = F.conv2d(h, s[f"{p}.in_layers.2.weight"], s[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), s[f"{p}.emb_layers.1.weight"], s[f"{p}.emb_layers.1.bias"])[:, :, None, None]
    if a.use_scale_shift_norm:
        scale, shift = torch.chunk(e, 2, dim=1)
        h = _gn(s, f"{p}.out_layers.0", h) * (1 + scale) + shift
    else:
        h = _gn(s, f"{p}.out_layers.0", h + e)
    h = F.conv2d(F.silu(h), s[f"{p}.out_layers.3.weight"], s[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in s:
        x = F.conv2d(x, s[f"{p}.skip_connection.weight"], s[f"{p}.skip_connection.bias"])
    return x + h


def _attn(s, p, x, a: Arch):
    b, c, hh, ww = x.shape
    heads = a.heads(c)
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(s, f"{p}.norm", flat), s[f"{p}.qkv.weight"], s[f"{p}.qkv.bias"])
    d = c // heads
    if a.new_attention_order:        # QKVAttention: q, k, v first, then heads
        q, k, v = (z.reshape(b * heads, d, -1) for z in qkv.chunk(3, dim=1))
    else:                            # QKVAttentionLegacy: heads first, then q, k, v
        q, k, v = qkv.reshape(b * heads, 3 * d, -1).split(d, dim=1)
    scale = 1 / math.sqrt(math.sqrt(d))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    h = F.conv1d(h, s[f"{p}.proj_out.weight"], s[f"{p}.proj_out.bias"])
    return (flat + h).reshape(b, c, hh, ww)


def _layer(s, p, kind, x, emb, a):
    if kind in ("res", "up_res", "down_res"):
        return _res(s, p, x, emb, a, kind)
    if kind == "attn":
        return _attn(s, p, x, a)
    if kind == "down":
        return F.conv2d(x, s[f"{p}.op.weight"], s[f"{p}.op.bias"], stride=2, padding=1)
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    return F.conv2d(x, s[f"{p}.conv.weight"], s[f"{p}.conv.bias"], padding=1)


@torch.no_grad()
def reference_forward(s: dict, a: Arch, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
    """UNetModel.forward(x, t, y) of the repositories, from the state dict ``s``."""
    _, inputs, middle, outputs, _ = _layout(a)
    if a.rescale_steps:
        t = t.float() * (1000.0 / a.rescale_steps)
    emb = _emb(t, a.model_channels)
    emb = F.linear(F.silu(F.linear(emb, s["time_embed.0.weight"], s["time_embed.0.bias"])),
                   s["time_embed.2.weight"], s["time_embed.2.bias"])
    if a.num_classes:
        emb = emb + s["label_emb.weight"][y]
    h = F.conv2d(x, s["input_blocks.0.0.weight"], s["input_blocks.0.0.bias"], padding=1)
    hs = [h]
    for i, layers in enumerate(inputs[1:], start=1):
        for j, (kind, _, _) in enumerate(layers):
            h = _layer(s, f"input_blocks.{i}.{j}", kind, h, emb, a)
        hs.append(h)
    for j, (kind, _, _) in enumerate(middle):
        h = _layer(s, f"middle_block.{j}", kind, h, emb, a)
    for i, layers in enumerate(outputs):
        h = torch.cat([h, hs.pop()], dim=1)
        for j, (kind, _, _) in enumerate(layers):
            h = _layer(s, f"output_blocks.{i}.{j}", kind, h, emb, a)
    h = F.silu(_gn(s, "out.0", h))
    return F.conv2d(h, s["out.2.weight"], s["out.2.bias"], padding=1)
