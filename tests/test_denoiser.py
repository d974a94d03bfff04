"""The one output adapter, the one DDIM update, the loss interface the loop calls, and the facade
built from a DiffusionConfig that reaches every sampler.

Reference values come from the closed forms (Eq. 4 solved for x0 and eps; Song et al. 2021, Eq. 12)
or from the same computation done one sample at a time, never from the function under test alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ddpm
from ddpm import denoiser as Dn
from ddpm import diffusion as D
from ddpm import pixels as P
from ddpm import losses as L
from ddpm import samplers as S
from ddpm.config import DiffusionConfig, RunConfig, TrainConfig
from ddpm.checkpoint import load_checkpoint
from ddpm.data import ImageData
from ddpm.errors import ConfigError
from ddpm.models import Unet, preset_config
from ddpm.schedules import NoiseSchedule
from ddpm.timestep_sampling import ImportanceSampler
from ddpm.train import train
from test_diffusion import tiny_unet


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed 'network' whose output depends on each sample's own timestep."""
    return 0.4 * torch.tanh(x) + 0.002 * t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule("cosine", 100)


# ----------------------------------------------------------------------------- the denoiser

@pytest.mark.parametrize("objective", D.OBJECTIVES)
def test_denoise_gives_eq4_pairs_for_every_objective(schedule, objective):
    x_t = torch.randn(4, 1, 3, 3, generator=gen(0))
    t = torch.tensor([0, 17, 50, 99])
    out = smooth_net(x_t, t)
    pred = Dn.Denoiser(smooth_net, schedule, objective=objective).predict(x_t, t)
    abar = schedule.alphas_cumprod[t].double().reshape(-1, 1, 1, 1)
    a, s, x = abar.sqrt(), (1 - abar).sqrt(), x_t.double()
    eps, x0 = {"eps": (out, (x - s * out) / a),                         # Eq. 4 solved for x0
               "x0": ((x - a * out) / s, out),                          # ... and for eps
               "v": (s * x + a * out, a * x - s * out)}[objective]
    torch.testing.assert_close(pred[0].double(), eps.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred[1].double(), x0.double(), rtol=1e-4, atol=1e-5)
    assert torch.equal(pred.output, out) and pred.var_values is None


def test_per_sample_timesteps_equal_one_int_timestep_at_a_time(schedule):
    x_t = torch.randn(3, 1, 2, 2, generator=gen(1))
    t = torch.tensor([5, 60, 99])
    v_net = Dn.Denoiser(smooth_net, schedule, objective="v", clip=True)
    together = v_net.predict(x_t, t)
    for k in range(3):
        alone = v_net.predict(x_t[k:k + 1], int(t[k]))
        torch.testing.assert_close(together[0][k:k + 1], alone[0])
        torch.testing.assert_close(together[1][k:k + 1], alone[1])
    with pytest.raises(ConfigError, match="timesteps for a batch"):
        Dn.Denoiser(smooth_net, schedule).predict(x_t, torch.tensor([1, 2]))


def test_clipping_rederives_eps_from_the_clipped_x0(schedule):
    x_t = 3 * torch.randn(6, 1, 2, 2, generator=gen(2))
    t = torch.full((6,), 3)
    pred = Dn.Denoiser(lambda x, t_in: -x, schedule, clip=True).predict(x_t, t)
    assert float(pred[1].abs().max()) <= 1.0
    assert float(Dn.Denoiser(lambda x, t_in: -x, schedule).predict(x_t, t)[1].abs().max()) > 1.0     # it had to clip
    torch.testing.assert_close(pred[0], D.predict_eps_from_x0(schedule, x_t, t, pred[1]))


# ----------------------------------------------------------------------------- the DDIM update

def test_ddim_step_with_per_sample_levels_is_the_float_step_sample_by_sample(schedule):
    x_t = torch.randn(3, 1, 2, 2, generator=gen(3))
    eps, x0 = torch.randn(3, 1, 2, 2, generator=gen(4)), torch.randn(3, 1, 2, 2, generator=gen(5))
    abar_t, abar_prev = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.3, 0.8, 1.0])
    together = S.ddim_step(x_t, eps, x0, abar_t, abar_prev)
    for k in range(3):
        alone = S.ddim_step(x_t[k:k + 1], eps[k:k + 1], x0[k:k + 1], float(abar_t[k]), float(abar_prev[k]))
        want = math.sqrt(float(abar_prev[k])) * x0[k] + math.sqrt(1 - float(abar_prev[k])) * eps[k]   # Eq. 12
        torch.testing.assert_close(together[k:k + 1], alone, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(together[k], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(together[2], x0[2])                                # alpha-bar 1: the data


def test_ddim_inversion_runs_the_same_update_upwards(schedule):
    """One inversion step from the data to level t is Eq. 12 with alpha-bar_prev = alpha-bar_t."""
    denoiser = Dn.make_denoiser(smooth_net, schedule)
    x0 = torch.randn(2, 1, 2, 2, generator=gen(6))
    up = S.ddim_invert(denoiser, x0, schedule, [40])
    eps, _ = denoiser(x0, 40)
    abar = float(schedule.alphas_cumprod[40])
    torch.testing.assert_close(up, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the facade

def test_facade_is_built_from_a_diffusion_config_and_validates_it_like_the_cli():
    model = tiny_unet()
    a = ddpm.GaussianDiffusion(model, timesteps=25, objective="v")
    b = ddpm.GaussianDiffusion(model, config=DiffusionConfig(timesteps=25, objective="v"))
    assert a.config == b.config and a.objective == "v" and a.timesteps == 25
    with pytest.raises(ConfigError, match="not both"):
        ddpm.GaussianDiffusion(model, config=DiffusionConfig(timesteps=25), timesteps=25)
    with pytest.raises(ConfigError, match="unknown diffusion option"):
        ddpm.GaussianDiffusion(model, timesteps=25, objectiv="v")
    with pytest.raises(ConfigError, match="L_vlb term"):                 # as ddpm train refuses it
        ddpm.GaussianDiffusion(model, timesteps=25, variance="learned-range")


def test_facade_holds_no_state_set_from_outside():
    diffusion = ddpm.GaussianDiffusion(tiny_unet(), timesteps=25, precision="bf16")
    assert diffusion.precision == "bf16" and diffusion.default_sampling is None
    for name in ("precision", "default_sampling", "objective", "timesteps"):
        with pytest.raises(AttributeError):
            setattr(diffusion, name, None)


@pytest.mark.parametrize("sampler, options", [("ddim", {"eta": 0.0}), ("dpm-solver++", {}), ("ddpm", {})])
def test_facade_sample_runs_the_registry_sampler(sampler, options):
    diffusion = ddpm.GaussianDiffusion(tiny_unet(), timesteps=25)
    x_T = torch.randn(2, 1, 8, 8, generator=gen(7))
    got = diffusion.sample(2, sampler=sampler, steps=5, noise=x_T, generator=gen(8), progress=False, **options)
    g = gen(8)
    denoiser = Dn.make_denoiser(diffusion.model, diffusion.schedule, clip=True)
    options = {"variance": "posterior"} if sampler == "ddpm" else options
    want = S.SAMPLERS[sampler](denoiser, x_T, diffusion.schedule, S.spaced_timesteps(25, 5),
                               noise=lambda: D.randn(x_T.shape, generator=g), **options)
    assert torch.equal(got, P.from_model_range(want))
    default = diffusion.sample(2, noise=x_T, generator=gen(8), progress=False, return_intermediates=True)
    assert default.timesteps == list(range(24, -1, -1))                  # the paper's sampler: all T steps


# ----------------------------------------------------------------------------- the loss interface

class SpyLoss(L.SimpleLoss):
    """L_simple that records what the loop hands it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nets, self.draws, self.observed = [], [], []

    def draw_timesteps(self, batch_size, generator, device):
        t, w = super().draw_timesteps(batch_size, generator, device)
        self.draws.append(t.clone())
        return t, w

    def losses(self, net, x0, t, noise, **kwargs):
        self.nets.append(net)
        return super().losses(net, x0, t, noise, **kwargs)

    def observe(self, t, losses):
        self.observed.append(t.clone())


def test_the_loop_draws_through_the_loss_and_hands_it_the_unet(tmp_path):
    config = RunConfig(preset="digits", model=preset_config("digits"), diffusion=DiffusionConfig(timesteps=50),
                       train=TrainConfig(steps=2, batch_size=4, grad_accum=2, num_samples=2, log_every=1,
                                         checkpoint_every=0))
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    loss = SpyLoss(NoiseSchedule("linear", 50))
    loss.timestep_sampler = ImportanceSampler(50)               # state the loop saves and shows each step
    train(config, tmp_path / "run", data=ImageData(images, None, "tiny"), progress=False, loss=loss)
    assert len(loss.draws) == 2 and all(t.shape == (8,) for t in loss.draws)      # the whole global batch
    assert len(loss.nets) == 4 and all(type(net) is Unet for net in loss.nets)    # 2 steps x 2 micro-batches
    assert [t.tolist() for t in loss.observed] == [t.tolist() for t in loss.draws]   # after each update
    saved = load_checkpoint(tmp_path / "run")[0]
    assert int(saved["timestep_sampler.counts"].sum()) == 0      # observe() was the spy's: nothing recorded


def test_facade_loss_draws_as_the_loop_does_and_repeats_under_manual_seed():
    diffusion = ddpm.GaussianDiffusion(tiny_unet(), timesteps=25)
    images = torch.rand(4, 1, 8, 8, generator=gen(9))
    torch.manual_seed(3)
    a = diffusion(images)
    torch.manual_seed(3)
    assert torch.equal(diffusion(images), a)
    g = gen(5)                                                   # the loss interface's order: t, then eps
    t = torch.randint(0, 25, (4,), generator=g)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    want = L.SimpleLoss(diffusion.schedule).losses(diffusion.model, images * 2 - 1, t, noise).mean()
    assert torch.equal(diffusion(images, generator=gen(5)), want)
