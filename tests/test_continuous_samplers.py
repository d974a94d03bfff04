"""The sigma view of ddpm models and the sigma samplers (euler, heun, euler-ancestral, dpm-solver++-sde).

Against closed forms: for data N(mu, s^2) the optimal denoiser is D(x; sigma) = mu + s^2 / (s^2 + sigma^2)
(x - mu), and the probability-flow ODE from sigma_a to sigma_b maps x to mu + (x - mu) sqrt((s^2 +
sigma_b^2) / (s^2 + sigma_a^2)). Over a ddpm model's own timesteps Euler is DDIM (eta = 0) and ancestral
Euler is DDIM (eta = 1), step for step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm import samplers as S
from ddpm import sigmas as Sg
from ddpm.denoiser import Prediction, make_denoiser
from ddpm.schedules import SCHEDULES, NoiseSchedule

MU, SD = 0.3, 0.6
NEW = ("euler", "heun", "euler-ancestral", "dpm-solver++-sde")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class GaussianDenoiser(Sg.SigmaDenoiser):
    """The exactly optimal D(x; sigma) for data N(mu, s^2) in every coordinate."""

    def __init__(self, mu=MU, sd=SD, sigma_min=0.002, sigma_max=80.0):
        self.mu, self.sd, self.sigma_min, self.sigma_max = mu, sd, sigma_min, sigma_max

    def __call__(self, x, sigma):
        s = Sg._column(sigma, x)
        return self.mu + self.sd ** 2 / (self.sd ** 2 + s * s) * (x - self.mu)


def gaussian_ddpm_denoiser(schedule: NoiseSchedule):
    """The same optimum as a ddpm denoiser(x_t, t) -> Prediction(eps_pred, x0_pred) on ``schedule``."""
    abar = schedule.alphas_cumprod.tolist()

    def denoiser(x_t, t):
        a = abar[int(t)]
        x0 = GaussianDenoiser()(x_t / math.sqrt(a), math.sqrt((1 - a) / a))
        return Prediction((x_t - math.sqrt(a) * x0) / math.sqrt(1 - a), x0)
    return denoiser


def noise_from(g: torch.Generator, shape):
    return lambda: torch.randn(shape, generator=g)


# ----------------------------------------------------------------------------- sigma <-> timestep

@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_sigma_timestep_round_trip(kind):
    schedule = NoiseSchedule(kind, 1000)
    abar = schedule.alphas_cumprod
    sigmas = Sg.schedule_sigmas(schedule)
    torch.testing.assert_close(sigmas, ((1 - abar) / abar).sqrt(), rtol=1e-12, atol=0)
    t = torch.linspace(0, 999, 4001, dtype=torch.float64)
    torch.testing.assert_close(Sg.sigma_to_timestep(schedule, Sg.timestep_to_sigma(schedule, t)), t,
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(Sg.timestep_to_sigma(schedule, torch.arange(1000.0)), sigmas, rtol=1e-12, atol=0)
    assert Sg.nearest_timestep(schedule, sigmas).tolist() == list(range(1000))
    # a sigma a little off a trained one still rounds to it; halfway in log sigma is the boundary
    wobble = (sigmas[1:-1].log() + 0.3 * (sigmas[2:].log() - sigmas[1:-1].log())).exp()
    assert Sg.nearest_timestep(schedule, wobble).tolist() == list(range(1, 999))
    past_half = (sigmas[1:-1].log() + 0.7 * (sigmas[2:].log() - sigmas[1:-1].log())).exp()
    assert Sg.nearest_timestep(schedule, past_half).tolist() == list(range(2, 1000))
    s = torch.logspace(math.log10(sigmas[0]), math.log10(sigmas[-1]), 500, dtype=torch.float64)
    torch.testing.assert_close(Sg.timestep_to_sigma(schedule, Sg.sigma_to_timestep(schedule, s)), s,
                               rtol=1e-9, atol=0)


def test_discrete_view_feeds_the_denoiser_the_vp_state_at_the_nearest_timestep():
    schedule = NoiseSchedule("cosine", 50)
    seen = []

    def net(x_t, t):                     # an x0-predicting "network" that records its inputs
        seen.append((x_t.clone(), t.clone()))
        return 0.5 * x_t

    D = Sg.as_sigma_denoiser(make_denoiser(net, schedule, objective="x0"), schedule)
    x = torch.randn(3, 1, 2, 2, generator=gen(0))
    sigma_t = float(Sg.schedule_sigmas(schedule)[17])
    out = D(x, sigma_t * 1.01)
    x_t, t = seen[-1]
    assert t.tolist() == [17] * 3
    torch.testing.assert_close(x_t, x / math.sqrt(1 + (sigma_t * 1.01) ** 2))
    out_exact = D(x, sigma_t)                          # at a trained sigma, D is the denoiser's x0_pred
    torch.testing.assert_close(out_exact, 0.5 * x / math.sqrt(1 + sigma_t ** 2), rtol=1e-5, atol=1e-5)
    assert out.shape == x.shape
    per_sample = D(x, torch.tensor([sigma_t, 1e-9, 1e9]))   # per-sample levels, clamped to the trained range
    assert seen[-1][1].tolist() == [17, 0, 49]
    torch.testing.assert_close(per_sample[0], out_exact[0])


# ----------------------------------------------------------------------------- spacing

def test_karras_sigmas_closed_form_and_order():
    sig = Sg.karras_sigmas(10, 0.002, 80.0, rho=7.0).values
    assert sig[0] == pytest.approx(80.0) and sig[-2] == pytest.approx(0.002) and sig[-1] == 0.0
    assert all(a > b for a, b in zip(sig, sig[1:]))
    i = np.arange(10)
    ref = (80.0 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7                 # EDM Eq. 5
    np.testing.assert_allclose(sig[:-1], ref, rtol=1e-12)
    rho3 = Sg.karras_sigmas(10, 0.002, 80.0, rho=3.0).values
    assert rho3[5] != pytest.approx(sig[5])


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_karras_timesteps_for_discrete_samplers(kind):
    schedule = NoiseSchedule(kind, 1000)
    for steps in (1, 5, 20, 200, 1000):
        kept = S.spaced_timesteps(1000, steps, "karras", schedule=schedule)
        assert len(kept) == steps and kept == sorted(set(kept), reverse=True) and kept[0] == 999
        assert 0 <= kept[-1]
    kept = S.spaced_timesteps(1000, 10, "karras", schedule=schedule)
    wanted = Sg.nearest_timestep(schedule, torch.tensor(Sg.karras_sigmas(
        10, *Sg.schedule_sigmas(schedule)[[0, -1]].tolist()).values[:-1])).tolist()
    if len(set(wanted)) == len(wanted):                # no collisions (linear): each the nearest timestep
        assert kept == wanted
    else:                                              # collisions at the top (cosine, sigmoid) moved down
        assert kept[0] == wanted[0] and all(k <= w for k, w in zip(kept, wanted))
    options = S.SamplingOptions(sampler="ddim", steps=10, spacing="karras")
    assert options.timesteps(1000, schedule) == kept
    levels = S.SamplingOptions(sampler="heun", steps=10, spacing="karras", rho=5.0).timesteps(1000, schedule)
    assert isinstance(levels, Sg.Sigmas) and len(levels) == 10
    ends = Sg.schedule_sigmas(schedule)[[0, -1]].tolist()
    assert levels.values[0] == pytest.approx(ends[1])
    assert levels == Sg.karras_sigmas(10, *ends, rho=5.0)                     # rho reaches the spacing
    assert S.SamplingOptions(sampler="ddpm", steps=10, spacing="karras", rho=2.0).timesteps(1000, schedule) == \
        Sg.karras_timesteps(schedule, 10, rho=2.0) != kept


def test_existing_spacings_and_options_unchanged():
    for T, K in ((1000, 50), (1000, 7), (25, 25), (100, 33)):
        assert S.spaced_timesteps(T, K, "leading") == [k * (T // K) for k in range(K)][::-1]
        assert S.spaced_timesteps(T, K, "trailing") == [int(np.round(T - k * T / K)) - 1 for k in range(K)]
        assert S.spaced_timesteps(T, K) == S.spaced_timesteps(T, K, "trailing", schedule=NoiseSchedule("linear", T))
    assert set(S.DEFAULT_SAMPLING.to_dict()) == {"sampler", "steps", "spacing", "eta", "clip", "steps_at_most"}
    assert S.SamplingOptions(sampler="heun", churn=40.0).to_dict()["churn"] == 40.0


@pytest.mark.parametrize("bad", [dict(sampler="ddim", churn=1.0), dict(sampler="euler-ancestral", s_tmin=0.1),
                                 dict(sampler="ddpm", s_noise=1.0), dict(sampler="heun", rho=7.0),
                                 dict(sampler="heun", churn=-1.0), dict(sampler="euler", s_tmin=2.0, s_tmax=1.0),
                                 dict(sampler="heun", spacing="karras", rho=0.0), dict(spacing="karras-ish")])
def test_sigma_options_refused_where_they_do_not_apply(bad):
    with pytest.raises(S.ConfigError):
        S.SamplingOptions(**bad)


def test_karras_needs_the_schedule():
    with pytest.raises(S.ConfigError, match="schedule"):
        S.SamplingOptions(sampler="ddpm", steps=5, spacing="karras").timesteps(1000)


# ----------------------------------------------------------------------------- the samplers on the optimal denoiser

@pytest.mark.parametrize("name", NEW)
def test_new_samplers_reproduce_the_gaussian(name):
    D = GaussianDenoiser()
    shape = (20000, 4)
    x_T = torch.randn(shape, generator=gen(1))
    options = {"churn": 30.0, "s_tmin": 0.05, "s_tmax": 50.0} if name == "heun" else {}
    second_order = name in ("heun", "dpm-solver++-sde")          # the first-order ones need 256 steps
    steps = {"heun": 128, "dpm-solver++-sde": 64}.get(name, 256)   # (heun with churn, a first-order SDE part)
    out = S.SAMPLERS[name](D, x_T, None, Sg.karras_sigmas(steps, 0.002, 80.0),
                           noise=noise_from(gen(2), shape), **options)
    se = SD / math.sqrt(out.numel())
    assert abs(out.mean().item() - MU) < 5 * se
    assert out.std().item() == pytest.approx(SD, rel=0.02 if second_order else 0.03)


def closed_form_error(name: str, steps: int) -> float:
    """Max error of the sampler's state at sigma = 0.05 against the exact ODE solution from sigma = 10."""
    D = GaussianDenoiser()
    x_T = torch.randn(200, 4, generator=gen(3))
    levels = Sg.Sigmas(Sg.karras_sigmas(steps, 0.05, 10.0).values[:-1])       # stop at sigma = 0.05
    out = S.SAMPLERS[name](D, x_T, None, levels)
    x_start = x_T * math.sqrt(1 + 10.0 ** 2)
    exact = MU + (x_start - MU) * math.sqrt((SD ** 2 + 0.05 ** 2) / (SD ** 2 + 10.0 ** 2))
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("name, ratio", [("euler", 2.0), ("heun", 4.0)])
def test_convergence_order(name, ratio):
    errors = [closed_form_error(name, steps) for steps in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine == pytest.approx(ratio, rel=0.2), errors


def test_euler_is_ddim_and_euler_ancestral_is_ddim_eta_1_on_a_ddpm_model():
    schedule = NoiseSchedule("linear", 1000)
    denoiser = gaussian_ddpm_denoiser(schedule)
    timesteps = list(range(600, -1, -30))             # from sigma_600 ~ 6: the start's scale sqrt(1 + sigma^2) shows
    x_T = torch.randn(64, 1, 2, 2, generator=gen(4))
    ddim = S.sample_ddim(denoiser, x_T, schedule, timesteps, eta=0.0)
    euler = S.sample_euler(denoiser, x_T, schedule, timesteps)
    torch.testing.assert_close(euler, ddim, rtol=1e-4, atol=1e-4)
    ddim1 = S.sample_ddim(denoiser, x_T, schedule, timesteps, eta=1.0, noise=noise_from(gen(5), x_T.shape))
    ancestral = S.sample_euler_ancestral(denoiser, x_T, schedule, timesteps, noise=noise_from(gen(5), x_T.shape))
    torch.testing.assert_close(ancestral, ddim1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NEW)
def test_image_k_is_reproducible_however_the_batch_is_split(name):
    D = GaussianDenoiser()
    seeds = [11, 12, 13, 14]
    shape = (1, 2, 2)
    x_T = torch.stack([torch.randn(shape, generator=gen(100 + s)) for s in seeds])
    options = {"churn": 10.0} if name in ("euler", "heun") else {}
    levels = Sg.karras_sigmas(6, 0.002, 80.0)
    whole = S.SAMPLERS[name](D, x_T, None, levels, noise=S.batch_noise([gen(s) for s in seeds], shape), **options)
    for k, s in enumerate(seeds):
        one = S.SAMPLERS[name](D, x_T[k:k + 1], None, levels, noise=S.batch_noise([gen(s)], shape), **options)
        torch.testing.assert_close(one[0], whole[k], rtol=0, atol=0)
    if name != "euler":                                  # stochastic: other seeds give other images
        other = S.SAMPLERS[name](D, x_T, None, levels, noise=S.batch_noise([gen(s + 50) for s in seeds], shape),
                                 **options)
        assert not torch.equal(other, whole)


@pytest.mark.parametrize("name", NEW + ("ddpm", "ddim", "dpm-solver++"))
def test_every_sampler_runs_on_a_real_network_with_karras_spacing(name):
    torch.manual_seed(0)
    schedule = NoiseSchedule("linear", 30)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    options = S.SamplingOptions(sampler=name, steps=4, spacing="karras")
    steps, seen = options.timesteps(30, schedule), []
    x_T = torch.randn(2, 1, 4, 4, generator=gen(6))
    out = S.SAMPLERS[name](make_denoiser(lambda x, t: net(x), schedule), x_T, schedule, steps,
                           noise=noise_from(gen(7), x_T.shape), callback=seen.append,
                           **options.sampler_options())
    assert torch.isfinite(out).all() and len(seen) == 4 and out.shape == x_T.shape


def test_churn_acts_only_between_s_tmin_and_s_tmax_and_s_noise_scales_it():
    D = GaussianDenoiser()
    x_T = torch.randn(8, 4, generator=gen(20))
    levels = Sg.karras_sigmas(8, 0.002, 80.0)
    plain = S.sample_heun(D, x_T, None, levels)
    outside = S.sample_heun(D, x_T, None, levels, churn=10.0, s_tmin=100.0, s_tmax=200.0)   # no noise source needed
    torch.testing.assert_close(outside, plain, rtol=0, atol=0)
    quiet = [S.sample_heun(D, x_T, None, levels, churn=10.0, s_noise=0.0, noise=noise_from(gen(s), x_T.shape))
             for s in (1, 2)]
    torch.testing.assert_close(quiet[0], quiet[1], rtol=0, atol=0)              # s_noise = 0: the seed is irrelevant
    assert not torch.equal(quiet[0], plain)                                     # but sigma_hat still moved


@pytest.mark.parametrize("options", [{"sampler": "heun", "steps": 3}, {"sampler": "euler-ancestral", "steps": 4},
                                     {"sampler": "dpm-solver++-sde", "steps": 4}])
def test_generate_runs_the_sigma_samplers_with_per_image_seeds(options):
    import ddpm
    from ddpm.generate import generate
    from ddpm.models import Unet

    torch.manual_seed(0)
    model = Unet(image_size=8, channels=1, dim=8, dim_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
                 dropout=0.0, norm_groups=4)
    with torch.no_grad():
        for m in model.modules():                       # a non-zero output layer
            if getattr(m, "zero_init", False):
                m.weight.normal_(0.0, 0.05)
    diffusion = ddpm.GaussianDiffusion(model.eval(), timesteps=25)
    whole = generate(diffusion, 3, batch_size=3, seed=3, progress=False, **options)
    np.testing.assert_array_equal(generate(diffusion, 3, batch_size=1, seed=3, progress=False, **options), whole)
    np.testing.assert_array_equal(generate(diffusion, 1, start_index=2, seed=3, progress=False, **options), whole[2:])
    if options["sampler"] != "heun":
        assert not np.array_equal(generate(diffusion, 3, batch_size=3, seed=4, progress=False, **options), whole)
