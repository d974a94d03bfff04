"""bpd-ode: the exact likelihood through the probability-flow ODE against the closed form of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm import sigmas as Sg
from ddpm.denoiser import make_denoiser
from ddpm.errors import DataError
from ddpm.evaluation import ode_likelihood as L
from ddpm.models import Unet
from ddpm.schedules import NoiseSchedule
from test_continuous_samplers import GaussianDenoiser, gen   # the optimal denoiser of Gaussian data

MU, SD = 0.1, 0.4


def gaussian_log_density(x: torch.Tensor, var: float) -> torch.Tensor:
    flat = x.flatten(1).double()
    return -0.5 * (((flat - MU) ** 2).sum(1) / var + flat.shape[1] * math.log(2 * math.pi * var))


def ode_closed_form(x0: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """What the flow computes exactly for N(mu, s^2) data: x0 carried to sigma_max in closed form, the
    prior N(0, 1 + sigma_max^2) there, plus the integral of div f,
    (1/2) D ln((s^2 + sigma_max^2) / (s^2 + sigma_min^2))."""
    var_min, var_max = SD ** 2 + sigma_min ** 2, SD ** 2 + sigma_max ** 2
    x_max = (MU + (x0.double() - MU) * math.sqrt(var_max / var_min)).flatten(1)
    var_prior = 1 + sigma_max ** 2
    prior = -0.5 * (x_max.pow(2).sum(1) / var_prior + x_max.shape[1] * math.log(2 * math.pi * var_prior))
    return prior + 0.5 * x_max.shape[1] * math.log(var_max / var_min)


def test_hutchinson_trace_is_unbiased():
    A = 0.2 * torch.randn(6, 6, generator=gen(0))
    D = lambda x, sigma: x.flatten(1) @ A.T                                    # noqa: E731  dD/dx = A
    x = torch.randn(2, 6, generator=gen(1))
    probes = torch.randint(0, 2, (400, 2, 6), generator=gen(2)).float() * 2 - 1
    f, div = L.hutchinson_divergence(D, x, 1.0, probes)
    assert div.tolist() == pytest.approx([6 - A.trace().item()] * 2, abs=0.4)
    torch.testing.assert_close(f, x - x @ A.T)


@pytest.mark.parametrize("solver", ["rk45", "rk4"])
def test_log_likelihood_of_gaussian_data_equals_the_closed_form(solver):
    D = GaussianDenoiser(MU, SD)
    x0 = MU + SD * torch.randn(16, 1, 2, 2, generator=gen(3))
    log_p, nfe = L.log_likelihood_ode(D, x0, generator=gen(4), solver=solver, steps=100)
    torch.testing.assert_close(log_p, ode_closed_form(x0, D.sigma_min, D.sigma_max), rtol=0, atol=5e-4)
    # and the data's own density N(mu, s^2 + sigma_min^2), up to the prior's mismatch (~ mu x / sigma_max^2)
    torch.testing.assert_close(log_p, gaussian_log_density(x0, SD ** 2 + D.sigma_min ** 2), rtol=0, atol=1e-2)
    assert nfe > 0 and not torch.allclose(log_p, gaussian_log_density(x0, 1.0), atol=0.1)


def test_bpd_ode_is_the_dequantised_density_plus_seven_bits():
    D = GaussianDenoiser(MU, SD)
    k = (127.5 * (1 + MU + SD * torch.randn(12, 1, 2, 2, generator=gen(5)))).round().clamp(0, 255)
    x0 = 2 * k / 255 - 1                                                       # 8-bit data
    result = L.bpd_ode(D, x0, generator=gen(6), solver="rk4", steps=100, batch_size=12)
    x = L.dequantize(x0, gen(6))                                               # the same draws, in the same order
    assert bool(((x + 1) * 128 - k).min() >= 0) and bool(((x + 1) * 128 - k).max() < 1)
    exact = -ode_closed_form(x, D.sigma_min, D.sigma_max) / (4 * math.log(2)) + 7
    assert result.per_image.tolist() == pytest.approx(exact.tolist(), abs=1e-3)
    assert result.bpd == pytest.approx(exact.mean().item(), abs=max(result.stderr, 1e-3))
    assert result.stderr == pytest.approx(exact.std().item() / math.sqrt(12), rel=0.01)
    with pytest.raises(DataError):
        L.bpd_ode(D, x0 + 0.001, generator=gen(6))


def test_bpd_ode_of_an_untrained_network_is_finite_and_above_the_closed_form():
    torch.manual_seed(0)
    net = Unet(image_size=8, channels=1, dim=8, dim_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
               dropout=0.0, norm_groups=4).eval()
    schedule = NoiseSchedule("linear", 30)
    D = Sg.as_sigma_denoiser(make_denoiser(net, schedule), schedule)
    k = (127.5 * (1 + MU + SD * torch.randn(4, 1, 8, 8, generator=gen(7)))).round().clamp(0, 255)
    x0 = 2 * k / 255 - 1
    result = L.bpd_ode(D, x0, generator=gen(8), solver="heun", steps=6, probes=2)
    true_bpd = -gaussian_log_density(x0, SD ** 2).mean().item() / (64 * math.log(2)) + 7   # the data's own density
    assert math.isfinite(result.bpd) and math.isfinite(result.stderr)
    assert result.bpd > true_bpd + 0.5, (result.bpd, true_bpd)
    assert result.nfe == 2 * 6


def test_an_edm_denoiser_serves_the_likelihood_too():
    from ddpm import edm

    class OptimalF(torch.nn.Module):            # F whose preconditioned D is the optimum for N(MU, SD^2)
        def forward(self, x_in, c_noise):
            sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
            c_skip, c_out, c_in, _ = edm.preconditioning(sigma)
            x = x_in / c_in
            return (MU + SD ** 2 / (SD ** 2 + sigma ** 2) * (x - MU) - c_skip * x) / c_out

    D = edm.EDMDenoiser(OptimalF())
    x0 = MU + SD * torch.randn(8, 1, 2, 2, generator=gen(9))
    log_p, _ = L.log_likelihood_ode(D, x0, generator=gen(10), solver="rk4", steps=100)
    torch.testing.assert_close(log_p, ode_closed_form(x0, D.sigma_min, D.sigma_max), rtol=0, atol=5e-4)
