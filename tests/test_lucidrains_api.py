"""The lucidrains-compatible API (``ddpm.compat.lucidrains``): its names, on this project's machinery."""

from __future__ import annotations

import pytest
import torch

import ddpm
from ddpm.compat.lucidrains import ArgumentError, Unet


def _seeded(make, seed: int = 0):
    torch.manual_seed(seed)
    model = make()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                  # give the zero-initialised layers weights, so every path counts
        for m in model.modules():
            if getattr(m, "zero_init", False):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
    return model.eval()


def test_the_readme_unet_needs_no_image_size_and_trains_at_32():
    """lucidrains' README network as written; the image size comes from GaussianDiffusion."""
    model = Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)
    assert model.image_size is None and model.downsample_factor == 8
    assert model.config.attention_levels == (3,)                   # full attention at the innermost level
    diffusion = ddpm.GaussianDiffusion(model, image_size=32, timesteps=1000)
    loss = diffusion(torch.rand(2, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss) and model.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size, channels", [((16, 16), 3), ((8, 24), 1), ((32, 16), 4)])
def test_the_unet_runs_at_any_multiple_of_its_downsample_factor(size, channels):
    model = _seeded(lambda: Unet(dim=16, dim_mults=(1, 2, 4), channels=channels))
    x = torch.randn(2, channels, *size)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 9])).shape == x.shape


def test_lucidrains_names_build_the_projects_own_network():
    """Same weights and same output as ddpm.Unet under the project's names."""
    ours = _seeded(lambda: ddpm.Unet(image_size=None, channels=1, dim=16, dim_mults=(1, 2), num_res_blocks=2,
                                     attention_levels=(1,), attention_heads=2, norm_groups=16, dropout=0.1))
    theirs = _seeded(lambda: Unet(dim=16, dim_mults=(1, 2), channels=1, full_attn=(False, True), attn_heads=2,
                                  dropout=0.1))
    assert theirs.config == ours.config
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([4, 700])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t), ours(x, t), rtol=0, atol=0)


def test_self_condition_and_learned_variance_shape_the_network_and_are_kept_for_the_diffusion():
    model = Unet(dim=16, dim_mults=(1, 2), channels=3, self_condition=True, learned_variance=True)
    assert (model.in_channels, model.out_dim, model.config.out_channels) == (6, 6, 6)
    assert model.self_condition and model.learned_variance
    assert model(torch.randn(1, 6, 8, 8), torch.tensor([1])).shape == (1, 6, 8, 8)
    plain = Unet(dim=16, dim_mults=(1, 2), channels=3)
    assert (plain.in_channels, plain.out_dim) == (3, 3) and not plain.self_condition


def test_flash_attn_and_the_projects_own_options_are_accepted():
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([2])
    with torch.no_grad():
        flash = _seeded(lambda: Unet(dim=16, dim_mults=(1, 2), flash_attn=True))(x, t)
        plain = _seeded(lambda: Unet(dim=16, dim_mults=(1, 2), flash_attn=False))(x, t)
    torch.testing.assert_close(flash, plain, rtol=0, atol=0)      # one attention kernel either way
    model = Unet(dim=16, dim_mults=(1, 2), num_res_blocks=1, attention_levels=(0, 1), norm_groups=8,
                 learned_sinusoidal_cond=False, sinusoidal_pos_emb_theta=10000, init_dim=16, out_dim=3)
    assert (model.config.num_res_blocks, model.config.attention_levels, model.config.norm_groups) == (1, (0, 1), 8)
    assert Unet(dim=24, dim_mults=(1, 2)).config.norm_groups == 8  # the largest power of two <= 32 dividing dim
    assert Unet(dim=16, dim_mults=(1, 2, 4), full_attn=True).config.attention_levels == (0, 1, 2)


@pytest.mark.parametrize("options, phrase", [
    (dict(dim_mult=(1, 2)), "did you mean 'dim_mults'"),
    (dict(self_conditioning=True), "did you mean 'self_condition'"),
    (dict(attn_dim_head=32), "nearest: attn_heads"),
    (dict(learned_sinusoidal_cond=True), "fixed sinusoid"),
    (dict(random_fourier_features=True), "fixed sinusoid"),
    (dict(sinusoidal_pos_emb_theta=500), "10000"),
    (dict(init_dim=32), "nearest: dim"),
    (dict(out_dim=6), "nearest: learned_variance"),
    (dict(full_attn=(True,)), "one per level"),
    (dict(attn_heads=(1, 2)), "same number of heads"),
    (dict(full_attn=(False, True), attention_levels=(1,)), "give one of them"),
    (dict(image_size=32), "GaussianDiffusion"),
    (dict(attention_resolutions=(4,)), "attention_levels"),
    (dict(flash_attn="yes"), "True or False"),
])
def test_arguments_without_an_equivalent_are_errors_naming_the_nearest(options, phrase):
    with pytest.raises(ArgumentError, match=phrase) as caught:
        Unet(dim=16, dim_mults=(1, 2), **options)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, ddpm.ConfigError)
