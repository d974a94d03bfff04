"""The EDM formulation: preconditioning, log-normal training levels, the loss weight, and the denoiser
serving the sigma samplers (Karras et al. 2022, Table 1)."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm import edm
from ddpm import samplers as S
from ddpm import sigmas as Sg
from ddpm.errors import ConfigError
from ddpm.models import Unet


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SpyNet(torch.nn.Module):
    """F(x_in; c_noise) = scale * x_in, recording what it receives."""

    def __init__(self, scale: float = 0.0):
        super().__init__()
        self.scale, self.calls = scale, []

    def forward(self, x, c_noise, **kwargs):
        self.calls.append((x.detach().clone(), c_noise.detach().clone(), kwargs))
        return self.scale * x


def test_preconditioning_closed_form():
    sd = 0.5
    for sigma in (0.002, 0.3, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma, sd)
        assert c_skip == pytest.approx(sd ** 2 / (sigma ** 2 + sd ** 2))
        assert c_out == pytest.approx(sigma * sd / math.sqrt(sigma ** 2 + sd ** 2))
        assert c_in == pytest.approx(1 / math.sqrt(sigma ** 2 + sd ** 2))
        assert c_noise == pytest.approx(math.log(sigma) / 4)
        assert edm.loss_weight(sigma, sd) * c_out ** 2 == pytest.approx(1.0)          # lambda = 1 / c_out^2
        # unit variance of the network's input and of its training target (EDM App. B.6)
        assert c_in ** 2 * (sd ** 2 + sigma ** 2) == pytest.approx(1.0)
    tensor = edm.preconditioning(torch.tensor([0.3, 2.0]), sd)
    for value, ref in zip(tensor, edm.preconditioning(2.0, sd)):
        assert float(value[1]) == pytest.approx(ref, rel=1e-6)


def test_denoiser_returns_its_input_as_sigma_goes_to_zero():
    torch.manual_seed(0)
    net = Unet(image_size=8, channels=1, dim=8, dim_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
               dropout=0.0, norm_groups=4).eval()
    with torch.no_grad():
        for m in net.modules():                     # a non-zero output layer, so F is not 0
            if getattr(m, "zero_init", False):
                m.weight.normal_(0.0, 0.05)
    D = edm.EDMDenoiser(net)
    x = torch.randn(2, 1, 8, 8, generator=gen(0))
    with torch.no_grad():
        far = (D(x, 1.0) - x).abs().max().item()
        near = (D(x, 1e-6) - x).abs().max().item()
    assert far > 1e-2 and near < 1e-5, (far, near)


def test_the_network_sees_c_in_x_and_c_noise_as_its_timestep():
    net = SpyNet(scale=2.0)
    x = torch.randn(3, 1, 2, 2, generator=gen(1))
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = edm.edm_denoise(net, x, sigma, model_kwargs={"y": torch.tensor([0, 1, 2])})
    x_in, c_noise, kwargs = net.calls[-1]
    c_skip, c_out, c_in, ref_noise = edm.preconditioning(sigma, 0.5)
    torch.testing.assert_close(x_in, x * c_in.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(c_noise, ref_noise)
    assert kwargs["y"].tolist() == [0, 1, 2]
    torch.testing.assert_close(out, (c_skip + c_out * c_in * 2.0).reshape(-1, 1, 1, 1) * x)   # Eq. 7


def test_training_sigmas_are_log_normal_with_the_stated_moments():
    loss = edm.EDMLoss()
    sigma, weights = loss.draw_timesteps(40000, gen(2), "cpu")
    assert weights is None and sigma.dtype == torch.float32 and bool((sigma > 0).all())
    log_sigma = sigma.log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=4 * 1.2 / math.sqrt(40000))
    assert log_sigma.std().item() == pytest.approx(1.2, rel=0.02)
    third = ((log_sigma - log_sigma.mean()) ** 3).mean() / log_sigma.std() ** 3
    assert abs(third.item()) < 0.05                                    # symmetric in log sigma: log-normal
    other = edm.EDMLoss(p_mean=0.5, p_std=0.3).draw_timesteps(40000, gen(2), "cpu")[0].log()
    assert other.mean().item() == pytest.approx(0.5, abs=0.01) and other.std().item() == pytest.approx(0.3, rel=0.02)


def test_the_weight_reaches_the_loss():
    net = SpyNet(scale=0.0)                      # F = 0: D = c_skip x, so the loss has a closed form
    loss = edm.EDMLoss()
    x0 = torch.rand(4, 1, 2, 2, generator=gen(3)) * 2 - 1
    noise = torch.randn(4, 1, 2, 2, generator=gen(4))
    sigma = torch.tensor([0.01, 0.5, 2.0, 50.0])
    losses = loss.losses(net, x0, sigma, noise)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    c_skip, _, c_in, _ = edm.preconditioning(sigma, 0.5)
    mse = ((c_skip.reshape(-1, 1, 1, 1) * x - x0) ** 2).mean(dim=(1, 2, 3))
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(losses, lam * mse)
    torch.testing.assert_close(net.calls[-1][0], x * c_in.reshape(-1, 1, 1, 1))      # the noised input it saw
    assert losses.shape == (4,) and not torch.allclose(losses, mse)


def test_loss_trains_a_unet_through_the_loop_interface():
    torch.manual_seed(0)
    net = Unet(image_size=8, channels=1, dim=8, dim_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
               dropout=0.0, norm_groups=4)
    loss, g = edm.EDMLoss(), gen(5)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    sigma, _ = loss.draw_timesteps(4, g, "cpu")
    noise, extras = loss.draw_extras(torch.randn(4, 1, 8, 8, generator=g), g)
    per_sample = loss.losses(net, x0[:2], sigma[:2], noise[:2], **extras)           # a micro-batch, as the loop cuts it
    per_sample.mean().backward()
    assert per_sample.shape == (2,) and torch.isfinite(per_sample).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    loss.observe(sigma[:2], per_sample.detach())


class OptimalF(torch.nn.Module):
    """The network F whose preconditioned denoiser is the optimal D for data N(mu, s^2)."""

    def __init__(self, mu=0.3, sd=0.6, sigma_data=0.5):
        super().__init__()
        self.mu, self.sd, self.sigma_data = mu, sd, sigma_data

    def forward(self, x_in, c_noise):
        sigma = (4 * c_noise).exp().reshape(-1, *((1,) * (x_in.ndim - 1)))
        c_skip, c_out, c_in, _ = edm.preconditioning(sigma, self.sigma_data)
        x = x_in / c_in
        D = self.mu + self.sd ** 2 / (self.sd ** 2 + sigma ** 2) * (x - self.mu)
        return (D - c_skip * x) / c_out


@pytest.mark.parametrize("name", ["euler", "heun", "euler-ancestral", "dpm-solver++-sde"])
def test_edm_denoiser_serves_the_sigma_samplers(name):
    D = edm.EDMDenoiser(OptimalF())
    assert isinstance(D, Sg.SigmaDenoiser)
    options = S.SamplingOptions(sampler=name, steps=128, spacing="karras")
    shape = (20000, 1, 2, 2)
    x_T = torch.randn(shape, generator=gen(6))
    out = S.SAMPLERS[name](D, x_T, None, options.sigmas(D.sigma_min, D.sigma_max),
                           noise=lambda g=gen(7): torch.randn(shape, generator=g), **options.sampler_options())
    assert abs(out.mean().item() - 0.3) < 5 * 0.6 / math.sqrt(out.numel())
    assert out.std().item() == pytest.approx(0.6, rel=0.05)


def test_guidance_and_refusals():
    net = SpyNet(scale=1.0)
    D = edm.EDMDenoiser(net, model_kwargs={"y": torch.tensor([1])}, guidance_scale=3.0,
                        uncond_kwargs={"y": torch.tensor([9])})
    x = torch.randn(1, 1, 2, 2, generator=gen(8))
    D(x, 1.0)
    assert [c[2]["y"].item() for c in net.calls] == [1, 9]
    with pytest.raises(ConfigError):
        edm.EDMDenoiser(net, guidance_scale=2.0)
    with pytest.raises(ConfigError):
        edm.edm_denoise(net, x, 0.0)
    with pytest.raises(ConfigError):
        edm.edm_denoise(lambda x, c: torch.cat([x, x], 1), x, 1.0)
    with pytest.raises(ConfigError):
        S.SamplingOptions(sampler="ddim", spacing="karras").sigmas(0.002, 80.0)


def test_gaussian_diffusion_samples_an_edm_model_with_edm_heun_by_default():
    """``sample()`` with no sampler: the paper's sampler for a DDPM model, EDM's Heun over 18 karras levels
    (35 evaluations) for an EDM one; a sigma sampler named alone takes the karras spacing."""
    from ddpm import GaussianDiffusion

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet(dim=32, dim_mults=(1,), channels=1, image_size=8), formulation="edm")
    calls = []
    diffusion.model.register_forward_pre_hook(lambda *_: calls.append(1))
    assert diffusion.sample(2, progress=False).shape == (2, 1, 8, 8)
    assert len(calls) == 2 * 18 - 1
    calls.clear()
    diffusion.sample(2, sampler="euler", steps=5, progress=False)
    assert len(calls) == 5
