"""The code of DDPM tutorials and of labml's annotated DDPM runs on ddpm with only its import changed
(ddpm.compat.tutorial, ddpm.compat.labml), computing the paper's quantities, or is refused before any work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ddpm
from ddpm.compat.labml import DenoiseDiffusion
from ddpm.compat.tutorial import DDPM, EMA, NoiseSchedule, ResBlock, UNet, autocast
from ddpm.errors import ConfigError


def small_unet(channels: int = 3) -> ddpm.Unet:
    torch.manual_seed(0)
    net = ddpm.Unet(image_size=8, channels=channels, dim=16, dim_mults=(1, 2), norm_groups=8, dropout=0.0)
    with torch.no_grad():
        net.conv_out.weight.normal_(std=0.1)            # an output that is not zero
    return net


class CountingNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t):
        self.calls += 1
        return self.net(x, t)


def test_the_tutorial_schedule_takes_its_end_points_and_kinds():
    schedule = NoiseSchedule(timesteps=200, beta_start=2e-4, beta_end=0.03)
    torch.testing.assert_close(schedule.betas, torch.linspace(2e-4, 0.03, 200, dtype=torch.float64))
    torch.testing.assert_close(schedule.sqrt_recip_alphas, 1 / schedule.alphas.sqrt())
    cosine = NoiseSchedule(timesteps=100, schedule_type="cosine")
    torch.testing.assert_close(cosine.betas, ddpm.NoiseSchedule("cosine", 100).betas)
    x = torch.zeros(2, 3, 4, 4)
    assert NoiseSchedule.get(schedule.betas, torch.tensor([0, 199]), x.shape).flatten().tolist() == \
        [schedule.betas[0].item(), schedule.betas[199].item()]


def test_the_tutorial_ddpm_computes_the_papers_loss_and_reverse_step():
    net = small_unet()
    model = DDPM(model=net, timesteps=50)
    s = model.schedule
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    torch.manual_seed(1)
    loss = model.training_loss(x0)
    torch.manual_seed(1)                                # the same draws: t, then the noise
    t = torch.randint(0, 50, (3,))
    noise = torch.randn_like(x0)
    ab = s.alphas_cumprod.float()[t].reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise     # Eq. 4
    torch.testing.assert_close(loss, F.mse_loss(net(x_t, t), noise))           # Eq. 14

    # At t = 0 the step is the posterior mean (Eq. 7) at the clipped x0 estimate, with no noise.
    t0 = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        eps = net(x_t, t0)
        ab0, beta0 = s.alphas_cumprod[0].item(), s.betas[0].item()
        x0_hat = ((x_t - (1 - ab0) ** 0.5 * eps) / ab0 ** 0.5).clamp(-1, 1)
        mean = beta0 / (1 - ab0) * x0_hat + 0.0 * x_t    # alpha_bar_prev = 1: the x_t coefficient is 0
        torch.testing.assert_close(model.p_sample(x_t, t0), mean, atol=1e-5, rtol=1e-5)


def test_the_tutorial_sample_call_runs_and_bad_calls_are_refused_before_any_step(capsys):
    net = CountingNet(small_unet())
    model = DDPM(model=net, timesteps=30)
    samples = model.sample(batch_size=2, image_size=8, channels=3, device="cpu", show_progress=False)
    assert samples.shape == (2, 3, 8, 8) and net.calls == 30
    net.calls = 0
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available here; pass device='cpu'"):
            model.sample(batch_size=2, image_size=8)          # the tutorial's default device="cuda"
    # The project's facade, given the tutorial's call, says which call to make, before any step.
    diffusion = ddpm.GaussianDiffusion(net, image_size=8, channels=3, timesteps=1000)
    with pytest.raises(ConfigError, match=r"GaussianDiffusion\(model, image_size=\.\.\., channels=\.\.\.\)"
                                          r"\.to\(device\)\.sample\(batch_size\)"):
        diffusion.sample(2, image_size=8, channels=3, device="cpu")
    with pytest.raises(ConfigError, match="unexpected argument 'etaa'"):
        diffusion.sample(2, sampler="ddim", etaa=0.5)
    assert net.calls == 0 and "sampling" not in capsys.readouterr().err.lower()


def test_the_tutorial_unet_places_attention_by_feature_map_size():
    net = UNet(image_size=16, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
               attention_resolutions=(8, 4), groups=8)
    assert isinstance(net, ddpm.Unet) and net.config.attention_levels == (1, 2)
    assert net.config.dim == 16 and net.config.dim_mults == (1, 2, 2)


def test_the_tutorial_building_blocks():
    block = ResBlock(16, 32, 64)
    norms = [m for m in block.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [n.num_groups for n in norms] == [8, 8] and block.emb_proj.in_features == 64
    assert isinstance(block.shortcut, torch.nn.Conv2d)
    # The EMA is the hand-written update ema <- decay ema + (1 - decay) param.
    ema = EMA(block, decay=0.9, warmup=False)
    start = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in block.parameters():
            p.add_(1.0)
    ema.update(block)
    for name, p in block.named_parameters():
        torch.testing.assert_close(ema.model.state_dict()[name], 0.9 * start[name] + 0.1 * p.detach())
    # Under autocast the network runs in the reduced precision.
    with autocast(torch.device("cpu"), "bf16"):
        out = block(torch.randn(2, 16, 8, 8), torch.randn(2, 64))
    assert out.dtype == torch.bfloat16


def test_the_unet_takes_one_integer_timestep_for_the_whole_batch():
    net, x = small_unet(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, 7), net(x, torch.tensor([7, 7])))
        torch.testing.assert_close(net(x, torch.tensor(7)), net(x, torch.tensor([7, 7])))


def test_labml_denoise_diffusion_computes_labmls_quantities():
    net = small_unet(channels=1)
    diffusion = DenoiseDiffusion(eps_model=net, n_steps=1000, device=torch.device("cpu"))
    torch.testing.assert_close(diffusion.beta, torch.linspace(1e-4, 0.02, 1000))
    x0, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([0, 700])
    ab, alpha, beta = (v[t].reshape(-1, 1, 1, 1) for v in (diffusion.alpha_bar, diffusion.alpha, diffusion.beta))
    mean, var = diffusion.q_xt_x0(x0, t)
    torch.testing.assert_close(mean, ab.sqrt() * x0)
    torch.testing.assert_close(var, 1 - ab)
    xt = diffusion.q_sample(x0, t, eps=torch.ones_like(x0))
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt())
    # p_sample: mu = (x_t - (1 - alpha) / sqrt(1 - alpha_bar) eps) / sqrt(alpha), plus sqrt(beta) z at every t.
    with torch.no_grad():
        torch.manual_seed(3)
        stepped = diffusion.p_sample(xt, t)
        torch.manual_seed(3)
        z = torch.randn(xt.shape)
        expected = (xt - (1 - alpha) / (1 - ab).sqrt() * net(xt, t)) / alpha.sqrt() + beta.sqrt() * z
    torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(4)
    loss = diffusion.loss(x0)
    torch.manual_seed(4)
    t = torch.randint(0, 1000, (2,))
    noise = torch.randn_like(x0)
    torch.testing.assert_close(loss, F.mse_loss(noise, net(diffusion.q_sample(x0, t, eps=noise), t)))
