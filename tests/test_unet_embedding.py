"""The U-Net's timestep-embedding options (diffusers' ``flip_sin_to_cos`` and ``freq_shift``) and its
fixed attention-head width, against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.errors import ConfigError
from ddpm.models import Unet, UnetConfig, timestep_embedding


@pytest.mark.parametrize("flip, shift", [(False, 1.0), (True, 0.0), (True, 1.0), (False, 0.0)])
def test_timestep_embedding_options_follow_the_formula(flip, shift):
    t, dim = torch.tensor([0, 3, 250, 999]), 16
    emb = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
    half = dim // 2
    expected = torch.empty(len(t), dim, dtype=torch.float64)
    for row, step in enumerate(t.tolist()):
        for i in range(half):
            arg = step * math.exp(-math.log(10000.0) * i / (half - shift))
            first, second = (math.cos(arg), math.sin(arg)) if flip else (math.sin(arg), math.cos(arg))
            expected[row, i], expected[row, half + i] = first, second
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=2e-4)


def test_head_width_gives_wider_levels_more_heads():
    config = UnetConfig(image_size=8, channels=1, dim=16, dim_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(8, 4), norm_groups=8, attention_head_dim=8)
    heads = {b.qkv.in_channels: b.heads for b in Unet(config).modules() if hasattr(b, "qkv")}
    assert heads == {16: 2, 32: 4}
    assert config.heads(32) == 4 and UnetConfig().heads(256) == 1


@pytest.mark.parametrize("options, phrase", [
    (dict(attention_head_dim=8, attention_heads=2), "not both"),
    (dict(attention_head_dim=12), "attention_head_dim=12"),
    (dict(freq_shift=64), "freq_shift"),
    (dict(flip_sin_to_cos="yes"), "flip_sin_to_cos"),
])
def test_bad_embedding_and_head_options_are_refused(options, phrase):
    with pytest.raises(ConfigError, match=phrase):
        UnetConfig(**options)


def test_configs_written_before_the_options_read_as_the_papers_embedding():
    old = UnetConfig().to_dict()
    for key in ("flip_sin_to_cos", "freq_shift", "attention_head_dim"):
        del old[key]
    restored = UnetConfig.from_dict(old)
    assert (restored.flip_sin_to_cos, restored.freq_shift, restored.attention_head_dim) == (False, 1.0, None)
