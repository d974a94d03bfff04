"""The paper's U-Net: sizes, shapes, initialisation, the time embedding, config validation."""

from __future__ import annotations

import math

import pytest
import torch

import ddpm
from ddpm.models import PRESETS, Unet, UnetConfig, preset_config, timestep_embedding
from ddpm.models.unet import ResBlock

SMALL = dict(dim=16, dim_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, norm_groups=8)


def small_unet(seed: int = 0, **overrides) -> Unet:
    torch.manual_seed(seed)
    return Unet(**{**SMALL, "image_size": 8, "channels": 3, **overrides})


def perturb_zero_init(model: Unet, seed: int = 1, std: float = 0.1) -> Unet:
    """Give the zero-initialised last layers random weights, so that every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "zero_init", False):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
    return model


# ----------------------------------------------------------------------------- presets

def test_cifar10_preset_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = Unet.from_preset("cifar10")
    assert model.num_parameters() == 35_746_307                      # Ho et al. 2020, Appendix B


def test_celebahq256_preset_has_about_114m_parameters():
    with torch.device("meta"):
        model = Unet.from_preset("celebahq256")
    assert 113_500_000 <= model.num_parameters() <= 114_000_000


def test_every_preset_builds_a_valid_config():
    for name in PRESETS:
        config = preset_config(name)
        assert UnetConfig.from_dict(config.to_dict()) == config
    assert preset_config("cifar10", dropout=0.0).dropout == 0.0
    with pytest.raises(ddpm.ConfigError):
        preset_config("imagenet")
    with pytest.raises(ddpm.ConfigError):
        UnetConfig.from_dict({**preset_config("digits").to_dict(), "width": 3})


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("image_size, channels, attention", [
    (8, 1, (4,)), (8, 3, (8, 4)), ((8, 16), 3, (4,)), ((16, 8), 4, (8,)), (12, 1, (6,)), (8, 1, ()),
])
def test_output_shape_equals_input_shape(image_size, channels, attention):
    model = small_unet(image_size=image_size, channels=channels, attention_resolutions=attention)
    model = perturb_zero_init(model).eval()
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = torch.randn(2, channels, h, w)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert bool(torch.isfinite(out).all())


def test_out_channels_override():
    model = small_unet(channels=3, out_channels=6)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, 6, 8, 8)


def test_wrong_input_channels_are_refused():
    with pytest.raises(ValueError):
        small_unet(channels=3)(torch.randn(2, 1, 8, 8), torch.tensor([0, 0]))


# ----------------------------------------------------------------------------- initialisation and the time embedding

def test_fresh_model_outputs_zeros():
    """The last layer starts at zero (the paper's init), so a fresh model predicts eps = 0."""
    model = small_unet()
    out = model(torch.randn(3, 3, 8, 8), torch.tensor([0, 10, 999]))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(model.conv_out.weight, torch.zeros_like(model.conv_out.weight))
    zero_layers = [m for m in model.modules() if getattr(m, "zero_init", False)]
    assert len(zero_layers) > 1                                      # every residual branch, not just the output
    for m in zero_layers:
        assert not m.weight.any() and not m.bias.any()


def test_output_depends_on_the_timestep():
    model = perturb_zero_init(small_unet()).eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)).expand(3, 3, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 0, 500]))
    assert torch.equal(out[0], out[1])                              # same input, same t: same output
    assert (out[0] - out[2]).abs().max().item() > 1e-3               # same input, other t: other output


@pytest.mark.parametrize("dim", [4, 16, 128])
def test_timestep_embedding_formula(dim):
    t = torch.tensor([0, 1, 7, 250, 999])
    emb = timestep_embedding(t, dim)
    half = dim // 2
    expected = torch.empty(len(t), dim, dtype=torch.float64)
    for row, step in enumerate(t.tolist()):
        for i in range(half):
            arg = step * math.exp(-math.log(10000.0) * i / (half - 1))
            expected[row, i] = math.sin(arg)
            expected[row, half + i] = math.cos(arg)
    assert emb.shape == (len(t), dim)
    # float32 arguments up to 999 carry an absolute error of about 1e-4.
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=2e-4)


def test_res_block_adds_the_time_embedding_between_the_convolutions():
    torch.manual_seed(3)
    block = ResBlock(in_ch=8, out_ch=16, emb_dim=32, dropout=0.0, groups=4)
    torch.nn.init.normal_(block.conv2.weight, std=0.1)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 32)

    seen = {}
    block.norm2.register_forward_pre_hook(lambda module, args: seen.update(h=args[0]))
    out = block(x, emb)
    h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
    torch.testing.assert_close(seen["h"], h + block.emb_proj(torch.nn.functional.silu(emb))[:, :, None, None])

    out.square().sum().backward()
    assert block.emb_proj.weight.grad is not None and block.emb_proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- config validation

@pytest.mark.parametrize("overrides", [
    dict(image_size=10, dim_mults=(1, 2, 2)),                       # 10 not divisible by 2^2
    dict(image_size=(8, 12), dim_mults=(1, 2, 2, 2)),               # 12 not divisible by 2^3
    dict(attention_resolutions=(3,)),                               # levels are 8 and 4
    dict(attention_resolutions=(16,)),
    dict(norm_groups=32),                                           # 16 channels, 32 groups
    dict(dim=12, norm_groups=8),                                    # 12 not divisible by 8
    dict(attention_heads=3),
    dict(dim=15, norm_groups=1, attention_heads=1),                 # odd dim: no sinusoidal embedding
    dict(num_res_blocks=0),
    dict(dropout=1.0),
    dict(channels=0),
    dict(dim_mults=()),
    dict(image_size=0),
])
def test_bad_config_raises_config_error(overrides):
    with pytest.raises(ddpm.ConfigError):
        UnetConfig(**{**SMALL, "image_size": 8, "channels": 3, **overrides})


def test_config_and_keywords_are_exclusive():
    with pytest.raises(TypeError):
        Unet(UnetConfig(**SMALL, image_size=8), dim=32)


# ----------------------------------------------------------------------------- train / eval, autograd

def test_forward_and_backward_in_train_and_eval_mode():
    model = perturb_zero_init(small_unet(dropout=0.5))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])

    model.train()
    a, b = model(x, t), model(x, t)
    assert not torch.equal(a, b)                                     # dropout is active in training
    (a.square().mean() + b.square().mean()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())
    assert grads["time_mlp.0.weight"].abs().sum() > 0               # the timestep path is trained too
    assert grads["conv_in.weight"].abs().sum() > 0

    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))                 # and off in evaluation


# ----------------------------------------------------------------------------- GroupNorm epsilon, downsampling padding

def test_norm_eps_reaches_every_group_norm():
    model = small_unet(norm_eps=1e-6)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert all(m.eps == 1e-5 for m in small_unet().modules() if isinstance(m, torch.nn.GroupNorm))


def test_same_padding_is_tensorflows_one_zero_row_and_column_after():
    from ddpm.models.unet import Downsample

    torch.manual_seed(0)
    same, symmetric = Downsample(4, "same"), Downsample(4)
    symmetric.load_state_dict(same.state_dict())
    x = torch.randn(2, 4, 8, 8)
    padded = torch.zeros(2, 4, 9, 9)
    padded[:, :, :8, :8] = x                                         # zeros after, none before
    expected = torch.nn.functional.conv2d(padded, same.conv.weight, same.conv.bias, stride=2)
    torch.testing.assert_close(same(x), expected)
    assert same(x).shape == symmetric(x).shape == (2, 4, 4, 4)
    assert not torch.allclose(same(x), symmetric(x))


@pytest.mark.parametrize("size", [(4, 4), (3, 5)])
def test_upsampling_is_nearest_neighbour_then_a_3x3_convolution_values_and_gradients(size):
    """The folded transposed convolution computes the paper's upsampling exactly (float64)."""
    from ddpm.models.unet import Upsample

    torch.manual_seed(0)
    up = Upsample(3).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = up(x)
    y_ref = up.conv(torch.nn.functional.interpolate(x_ref, scale_factor=2.0, mode="nearest"))
    assert y.shape == (2, 3, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, up.conv.weight, up.conv.bias], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, up.conv.weight, up.conv.bias], g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_configs_saved_before_the_new_fields_keep_the_old_network():
    old = {k: v for k, v in preset_config("digits").to_dict().items() if k not in ("norm_eps", "downsample_padding")}
    config = UnetConfig.from_dict(old)
    assert (config.norm_eps, config.downsample_padding) == (1e-5, "symmetric")
    for bad in (dict(norm_eps=0), dict(norm_eps=True), dict(downsample_padding="valid")):
        with pytest.raises(ddpm.ConfigError):
            UnetConfig.from_dict({**old, **bad})


def test_dropout_keeps_each_element_with_probability_one_minus_p_and_is_unbiased():
    from ddpm.models.unet import Dropout

    layer = Dropout(0.1)
    x = torch.randn(200, 50, 10, 10, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    keep = y != 0
    n, p = x.numel(), round(0.1 * 65536) / 65536
    kept = float(keep.float().mean())
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5            # five standard deviations
    scale = 1 / (1 - p)
    torch.testing.assert_close(y[keep], x[keep] * scale)                   # E[y] = x: (1 - p) * scale = 1
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, keep.float() * scale)
    torch.manual_seed(3)
    assert torch.equal(layer(x), y)                                       # the default generator decides
    layer.eval()
    assert layer(x) is x
    # Masks are independent of the tensor's other elements: neighbouring draws are not correlated.
    torch.manual_seed(4)
    m = (Dropout(0.5)(torch.ones(1_000_000)) != 0).float()
    assert abs(float((m[1:] * m[:-1]).mean()) - 0.25) < 0.005
