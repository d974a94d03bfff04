"""The U-Net's weights in diffusers' naming (``UNet2DModel``), both ways, module by module.

Our modules map one to one onto diffusers' (:func:`_module_pairs`); the one reshaping is the
attention: our ``qkv`` 1x1 convolution (3C output channels: q, k, v, each head-major) is diffusers'
``to_q``, ``to_k``, ``to_v`` linear layers, and ``proj_out`` is ``to_out.0``. Older diffusers
versions name the attention ``query``, ``key``, ``value``, ``proj_attn``; both are read.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..models import Unet, UnetConfig

__all__ = ["level_resolutions", "expected_shapes", "state_dict_to_diffusers", "state_dict_from_diffusers"]


def level_resolutions(m: UnetConfig) -> list[int]:
    """Feature-map size (shorter side) at each level, as :class:`~ddpm.models.Unet` places attention."""
    return [min(m.image_size) // 2 ** i for i in range(len(m.dim_mults))]


def _module_pairs(m: UnetConfig) -> list[tuple[str, str, str]]:
    """(our module, diffusers module, kind) for every module with weights, kind in plain|res|attn."""
    attn = [r in m.attention_resolutions for r in level_resolutions(m)]
    pairs = [("time_mlp.0", "time_embedding.linear_1", "plain"), ("time_mlp.2", "time_embedding.linear_2", "plain"),
             ("conv_in", "conv_in", "plain")]
    k, last = 0, len(m.dim_mults) - 1
    for level in range(len(m.dim_mults)):
        for j in range(m.num_res_blocks):
            pairs.append((f"down.{k}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if attn[level]:
                pairs.append((f"down.{k}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            k += 1
        if level != last:
            pairs.append((f"down.{k}.0.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            k += 1
    pairs += [("mid.0", "mid_block.resnets.0", "res"), ("mid.1", "mid_block.attentions.0", "attn"),
              ("mid.2", "mid_block.resnets.1", "res")]
    k = 0
    for i, level in enumerate(reversed(range(len(m.dim_mults)))):
        for j in range(m.num_res_blocks + 1):
            pairs.append((f"up.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            if attn[level]:
                pairs.append((f"up.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
            k += 1
        if level != 0:
            pairs.append((f"up.{k}.0.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
            k += 1
    pairs += [("norm_out", "conv_norm_out", "plain"), ("conv_out", "conv_out", "plain")]
    return pairs


_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
              "shortcut": "conv_shortcut"}
# Names older diffusers versions gave the attention layers (diffusers still reads them).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _tensor_pairs(m: UnetConfig) -> list[tuple[str, str]]:
    """(our tensor name, diffusers tensor name) for every tensor that maps one to one (all but ``qkv``)."""
    out = []
    for ours, theirs, kind in _module_pairs(m):
        subs = {"plain": {"": ""}, "res": {f"{a}.": f"{b}." for a, b in _RES_NAMES.items()},
                "attn": {"norm.": "group_norm.", "proj_out.": "to_out.0."}}[kind]
        for a, b in subs.items():
            for p in ("weight", "bias"):
                out.append((f"{ours}.{a}{p}" if a else f"{ours}.{p}", f"{theirs}.{b}{p}" if b else f"{theirs}.{p}"))
    return out


def expected_shapes(m: UnetConfig) -> dict[str, torch.Size]:
    """The shape of each of our U-Net's tensors (built on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Unet(m).state_dict().items()}


def state_dict_to_diffusers(state: dict[str, torch.Tensor], m: UnetConfig) -> dict[str, torch.Tensor]:
    """Our U-Net's weights renamed (and the attention's ``qkv`` split) for ``UNet2DModel``."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ours, theirs in _tensor_pairs(m):
        if ours in state:                    # the 1x1 shortcut exists only where the width changes
            t = state[ours]
            out[theirs] = (t[:, :, 0, 0] if theirs.endswith(".to_out.0.weight") else t).clone()
            used.add(ours)
    for ours, theirs, kind in _module_pairs(m):
        if kind == "attn":
            for p in ("weight", "bias"):
                qkv = state[f"{ours}.qkv.{p}"]
                for name, part in zip(("to_q", "to_k", "to_v"), qkv.chunk(3, dim=0)):
                    out[f"{theirs}.{name}.{p}"] = (part[:, :, 0, 0] if p == "weight" else part).clone()
                used.add(f"{ours}.qkv.{p}")
    left = sorted(set(state) - used)
    if left:
        raise AssertionError(f"weights without a diffusers name: {left[:5]}")
    return out


def state_dict_from_diffusers(tensors: dict[str, torch.Tensor], m: UnetConfig, source: str) -> dict[str, torch.Tensor]:
    """``UNet2DModel`` weights as our U-Net's (float32), checked name by name and shape by shape.

    Raises :class:`CheckpointError` naming ``source`` for missing, unexpected or misshapen tensors.
    """
    theirs = {}
    for name, t in tensors.items():
        head, _, leaf = name.rpartition(".")
        module, _, last = head.rpartition(".")
        if ".attentions." in name and last in _LEGACY_ATTENTION:
            name = f"{module}.{_LEGACY_ATTENTION[last]}.{leaf}"
        theirs[name] = t.float()
    shapes = expected_shapes(m)
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in theirs:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        used.add(name)
        return theirs[name]

    for ours, their_name in _tensor_pairs(m):
        if ours not in shapes:
            continue
        t = take(their_name)
        out[ours] = t[:, :, None, None] if their_name.endswith(".to_out.0.weight") else t
    for ours, their_module, kind in _module_pairs(m):
        if kind == "attn":
            for p in ("weight", "bias"):
                parts = [take(f"{their_module}.{n}.{p}") for n in ("to_q", "to_k", "to_v")]
                qkv = torch.cat(parts, dim=0)
                out[f"{ours}.qkv.{p}"] = qkv[:, :, None, None] if p == "weight" else qkv
    extra = sorted(set(theirs) - used)
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(extra[:3])}"
                              f"{' ...' if len(extra) > 3 else ''} for this configuration")
    for name, shape in shapes.items():
        if name not in out:
            raise CheckpointError(f"{source}: no weights for {name}")
        if out[name].shape != shape:
            raise CheckpointError(f"{source}: a tensor for {name} has shape {list(out[name].shape)}, "
                                  f"expected {list(shape)}")
    return {k: v.contiguous() for k, v in out.items()}
