"""Bugs that would give plausible numbers rather than an error, each pinned to an independent reference:
DDIM with 0 < eta < 1 against diffusers' DDIMScheduler step by step (Eq. 16's sigma scales with eta),
min-SNR weighting with a gamma other than the default (what reaches the loss is min(SNR, gamma) / SNR),
and KID's estimate of MMD^2 is unbiased (zero on average for two samples of one distribution)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_samplers import GaussianOracle, gaussian_data

from ddpm import denoiser as Dn
from ddpm import samplers as S
from ddpm.evaluation.metrics import kid
from ddpm.schedules import NoiseSchedule


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_ddim_with_eta_between_0_and_1_equals_diffusers_step_by_step(eta):
    """Same x_T, same noise z at every step: every intermediate x_t equals DDIMScheduler.step(eta=eta)'s."""
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    schedule = NoiseSchedule("linear", 1000)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", prediction_type="epsilon",
                                        timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
                                        clip_sample=False)
    steps = 10
    scheduler.set_timesteps(steps)
    timesteps = S.spaced_timesteps(1000, steps, "trailing")
    assert [int(t) for t in scheduler.timesteps] == timesteps
    mu, sigma = gaussian_data()
    model = GaussianOracle(schedule, mu, sigma)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    noises = [torch.randn(8, 1, 2, 2, generator=g) for _ in timesteps]
    ours: list[torch.Tensor] = []
    draws = iter(noises)
    S.sample_ddim(Dn.make_denoiser(model, schedule), x_T, schedule, timesteps, eta=eta, noise=lambda: next(draws),
                  callback=lambda s: ours.append(s["x"]))
    x, theirs = x_T, []
    for t, z in zip(scheduler.timesteps, noises):
        x = scheduler.step(model(x, torch.full((8,), int(t))), t, x, eta=eta, variance_noise=z).prev_sample
        theirs.append(x)
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {i}")
    deterministic: list[torch.Tensor] = []
    S.sample_ddim(Dn.make_denoiser(model, schedule), x_T, schedule, timesteps, eta=0.0,
                  callback=lambda s: deterministic.append(s["x"]))
    assert (ours[0] - deterministic[0]).abs().max() > 1e-3          # the noise reaches the sample


def test_min_snr_weights_with_a_non_default_gamma_reach_the_loss(tmp_path):
    """gamma = 0.5 (not the default 5): the weight each sample's loss gets in training, read from the gradient
    at the network's output (see test_training_effects), is min(SNR_t, 0.5) / SNR_t, and differs from gamma 5's."""
    from test_training_effects import SCHEDULE, config, loss_weights, run, training_calls

    gamma = 0.5
    (call,) = training_calls(run(config({"loss_weighting": "min-snr", "min_snr_gamma": gamma}, seed=3),
                                 tmp_path / "run")[1])
    snr = SCHEDULE.snr.double()[call.t]
    expected = snr.clamp(max=gamma) / snr                     # Hang et al. 2023, in eps space
    default = snr.clamp(max=5.0) / snr
    assert float((expected - default).abs().max()) > 0.3, snr           # some drawn t have 0.5 < SNR_t < 5
    torch.testing.assert_close(loss_weights(call), expected, rtol=1e-4, atol=0)


def test_kid_is_unbiased_for_two_samples_of_one_distribution():
    """MMD^2 = 0 between a distribution and itself; the unbiased estimator's mean over many subsets is
    within a few standard errors of 0, where the biased one (with the kernel's diagonal) is far above."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16))
    y = rng.standard_normal((2000, 16))
    subsets = 400
    mean, std = kid(x, y, num_subsets=subsets, subset_size=50, seed=1)
    standard_error = std / np.sqrt(subsets)
    assert abs(mean) < 4 * standard_error, (mean, standard_error)
    diagonal = ((x[:50] ** 2).sum(1) / 16 + 1.0) ** 3          # a biased estimate adds about 2 k(a, a) / m
    assert 2 * diagonal.mean() / 50 > 20 * standard_error                 # so a biased estimate fails the test above
    other, _ = kid(x, y + 0.5, num_subsets=50, subset_size=50, seed=1)
    assert other > 10 * standard_error                                    # a different distribution is seen
