"""lucidrains' ``ElucidatedDiffusion`` README example with only the import changed, on ``ddpm.edm`` and
the Heun sampler: the loss is EDM's on the same draws, and sampling is Algorithm 2 with their options."""

from __future__ import annotations

import torch

from ddpm import samplers
from ddpm.compat.lucidrains import ElucidatedDiffusion, Unet     # first: it loads lucidrains_variants
from ddpm.compat import lucidrains_variants  # noqa: E402  (isort: skip)
from ddpm.edm import EDMLoss
from ddpm.sigmas import karras_sigmas


def readme_diffusion():
    model = Unet(dim=8, dim_mults=(1, 2))
    return ElucidatedDiffusion(
        model,
        image_size=8,
        channels=3,
        num_sample_steps=4,
        sigma_min=0.002,
        sigma_max=80,
        sigma_data=0.5,
        rho=7,
        P_mean=-1.2,
        P_std=1.2,
        S_churn=80,
        S_tmin=0.05,
        S_tmax=50,
        S_noise=1.003,
    )


def test_the_readme_example_runs_and_the_loss_is_edms():
    torch.manual_seed(0)
    diffusion = readme_diffusion()
    training_images = torch.rand(4, 3, 8, 8)
    torch.manual_seed(1)
    loss = diffusion(training_images)
    loss.backward()
    assert all(p.grad is not None for p in diffusion.net.parameters() if p.requires_grad)
    torch.manual_seed(1)                          # the same draws: sigma then the noise, from one generator
    g = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,))))
    edm = EDMLoss(sigma_data=0.5, p_mean=-1.2, p_std=1.2)
    sigma, _ = edm.draw_timesteps(4, g, "cpu")
    noise = torch.randn(training_images.shape, generator=g)
    expected = edm.losses(diffusion.net, training_images * 2 - 1, sigma, noise).mean()
    torch.testing.assert_close(loss.detach(), expected.detach())


def test_sample_is_heun_with_their_churn_over_karras_levels(monkeypatch):
    calls = []
    real = samplers.sample_heun
    monkeypatch.setattr(lucidrains_variants, "sample_heun", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    diffusion = readme_diffusion()
    sampled_images = diffusion.sample(batch_size=2)
    assert sampled_images.shape == (2, 3, 8, 8) and 0 <= sampled_images.min() and sampled_images.max() <= 1
    (args, kwargs), = calls
    assert args[3] == karras_sigmas(4, 0.002, 80, 7)
    assert {k: kwargs[k] for k in ("churn", "s_tmin", "s_tmax", "s_noise")} == {
        "churn": 80, "s_tmin": 0.05, "s_tmax": 50, "s_noise": 1.003}
