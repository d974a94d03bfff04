"""DPM-Solver++(2M) is second order, and DDIM and DPM-Solver++ equal diffusers' schedulers step for step.

Second order: with Gaussian data the probability-flow ODE has an exact solution. In the eigenbasis
of Sigma, x_t - sqrt(alpha_bar_t) mu scales by sqrt(C_u / C_s) from time s to u, where
C_t = alpha_bar_t lambda + 1 - alpha_bar_t for each eigenvalue lambda (the flow keeps
(x_t - m_t) / sqrt(C_t) constant). The solver's state at timestep 0 (before its last jump to the
data) is compared with that solution from the same x_T: doubling the steps must cut the error at
least 3x (a first-order solver, DDIM, only halves it).
"""

from __future__ import annotations

import pytest
import torch
from test_samplers import GaussianOracle, gaussian_data

from ddpm import denoiser as Dn
from ddpm import samplers as S
from ddpm.schedules import NoiseSchedule

F64 = torch.float64


def exact_flow(schedule: NoiseSchedule, x: torch.Tensor, s: int, u: int) -> torch.Tensor:
    """The probability-flow ODE's solution at timestep u from x [N, 4] at timestep s, for N(mu, Sigma) data."""
    mu, sigma = gaussian_data()
    lam, q = torch.linalg.eigh(sigma)
    abar = schedule.alphas_cumprod.double()
    c_s, c_u = abar[s] * lam + 1 - abar[s], abar[u] * lam + 1 - abar[u]
    return abar[u].sqrt() * mu + (((x - abar[s].sqrt() * mu) @ q) * (c_u / c_s).sqrt()) @ q.T


def error_at_timestep_0(sampler, schedule: NoiseSchedule, steps: int) -> float:
    """RMS distance, at timestep 0, between the sampler's state and the exact ODE solution from x_T."""
    mu, sigma = gaussian_data()
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    timesteps = S.spaced_timesteps(schedule.timesteps, steps, "linspace")      # from T - 1 down to 0
    seen = []
    sampler(Dn.make_denoiser(GaussianOracle(schedule, mu, sigma), schedule), x_T.reshape(64, 1, 2, 2), schedule,
            timesteps, callback=seen.append)
    assert seen[-1]["t"] == 0
    state = seen[-1]["x_t"].reshape(64, 4).double()
    return float((state - exact_flow(schedule, x_T, timesteps[0], 0)).pow(2).mean().sqrt())


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpm_solver_pp_2m_is_second_order_on_the_probability_flow_ode(kind):
    schedule = NoiseSchedule(kind, 1000)
    e10, e20 = (error_at_timestep_0(S.sample_dpm_solver_pp_2m, schedule, k) for k in (10, 20))
    assert e20 <= e10 / 3, (e10, e20)
    assert e20 > 1e-5, e20                                 # a discretisation error, not float32 round-off
    d10, d20 = (error_at_timestep_0(S.sample_ddim, schedule, k) for k in (10, 20))
    assert 1.5 < d10 / d20 < 2.5, (d10, d20)               # the first-order reference halves its error


# ----------------------------------------------------------------------------- parity with diffusers

def diffusers_loop(scheduler, model, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    return x, [int(t) for t in scheduler.timesteps]


@pytest.fixture(scope="module")
def dlib():
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++"])
def test_ddim_and_dpm_solver_equal_diffusers_schedulers(dlib, sampler, steps):
    """The settings that equal ours: the paper's linear betas and epsilon prediction, "trailing" steps
    (diffusers' timestep_spacing, our default spacing), no clipping, and
    * DDIMScheduler(set_alpha_to_one=True, steps_offset=0, clip_sample=False): the last step goes to
      alpha_bar = 1, i.e. returns x0_pred, as ours does; eta = 0;
    * DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
      final_sigmas_type="zero", lower_order_final=False): the last step (to sigma = 0) is first order,
      as ours is; diffusers' lower_order_final would also make the step before it first order below
      15 steps, which ours does only for a step into timestep 0 (never the case with trailing steps).
    """
    schedule = NoiseSchedule("linear", 1000)
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon", timestep_spacing="trailing")
    if sampler == "ddim":
        scheduler = dlib.DDIMScheduler(**common, set_alpha_to_one=True, steps_offset=0, clip_sample=False)
    else:
        scheduler = dlib.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                     solver_type="midpoint", final_sigmas_type="zero",
                                                     lower_order_final=False)
    mu, sigma = gaussian_data()
    model = GaussianOracle(schedule, mu, sigma)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    theirs, their_steps = diffusers_loop(scheduler, model, x_T, steps)
    timesteps = S.spaced_timesteps(1000, steps, "trailing")
    assert their_steps == timesteps
    ours = S.SAMPLERS[sampler](Dn.make_denoiser(model, schedule), x_T, schedule, timesteps)
    assert ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
