"""Noise schedules: every table checked against its definition, computed independently here.

Indexing convention (docs/notation.md): table index i holds the value at paper timestep i + 1,
so ``alphas_cumprod[i]`` is alpha_bar at u = (i + 1) / T for the continuous schedules.
"""

from __future__ import annotations

import math

import pytest
import torch

import ddpm
from ddpm.schedules import NoiseSchedule, extract

KINDS = ("linear", "cosine", "sigmoid")
CASES = [(kind, T) for kind in KINDS for T in (1000, 50)]


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-12, atol: float = 1e-15) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), rtol=rtol, atol=atol)


@pytest.fixture(params=CASES, ids=[f"{k}-T{T}" for k, T in CASES])
def schedule(request) -> NoiseSchedule:
    kind, T = request.param
    return NoiseSchedule(kind, T)


# ----------------------------------------------------------------------------- tables common to every kind

def test_tables_are_float64_of_length_T(schedule):
    for name in NoiseSchedule.TABLES:
        table = getattr(schedule, name)
        assert table.dtype == torch.float64, name
        assert table.shape == (schedule.timesteps,), name
        assert bool(torch.isfinite(table).all()), name
    assert len(schedule) == schedule.timesteps


def test_betas_in_open_zero_to_0999(schedule):
    assert bool((schedule.betas > 0).all())
    assert bool((schedule.betas <= 0.999).all())
    assert close(schedule.alphas, 1.0 - schedule.betas)


def test_alphas_cumprod_is_running_product_of_alphas(schedule):
    running, expected = 1.0, []
    for beta in schedule.betas.tolist():
        running *= 1.0 - beta
        expected.append(running)
    assert close(schedule.alphas_cumprod, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-300)
    assert bool((schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all())   # strictly decreasing


def test_alphas_cumprod_prev_is_shifted_with_one_in_front(schedule):
    assert schedule.alphas_cumprod_prev[0].item() == 1.0
    assert torch.equal(schedule.alphas_cumprod_prev[1:], schedule.alphas_cumprod[:-1])


def test_sqrt_tables_are_consistent(schedule):
    abar = schedule.alphas_cumprod
    assert close(schedule.sqrt_alphas_cumprod ** 2, abar)
    assert close(schedule.sqrt_one_minus_alphas_cumprod ** 2, 1.0 - abar)
    assert close(schedule.sqrt_recip_alphas_cumprod * schedule.sqrt_alphas_cumprod, torch.ones_like(abar))
    assert close(schedule.sqrt_recipm1_alphas_cumprod ** 2, 1.0 / abar - 1.0, rtol=1e-10)
    assert close(schedule.snr, abar / (1.0 - abar))


def test_posterior_variance_and_its_clipped_log(schedule):
    beta, abar = schedule.betas, schedule.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    expected = (1.0 - abar_prev) / (1.0 - abar) * beta                      # Eq. 7, beta-tilde
    assert close(schedule.posterior_variance, expected)
    assert schedule.posterior_variance[0].item() == 0.0
    # log(0) at t = 0 is replaced by the next value; elsewhere it is the plain log.
    assert schedule.posterior_log_variance_clipped[0].item() == math.log(schedule.posterior_variance[1].item())
    assert close(schedule.posterior_log_variance_clipped[1:], torch.log(expected[1:]))


# ----------------------------------------------------------------------------- each kind's own formula

@pytest.mark.parametrize("T", [1000, 50, 200])
def test_linear_end_points_scale_with_1000_over_T(T):
    """Ho et al. 2020: 1e-4 .. 0.02 at T = 1000; both ends times 1000 / T otherwise."""
    betas = NoiseSchedule("linear", T).betas
    scale = 1000.0 / T
    assert betas[0].item() == pytest.approx(1e-4 * scale, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02 * scale, rel=1e-12)
    steps = betas[1:] - betas[:-1]                                           # evenly spaced
    assert close(steps, torch.full_like(steps, (0.02 - 1e-4) * scale / (T - 1)), rtol=1e-9, atol=1e-15)


def test_linear_needs_more_than_20_steps():
    """0.02 * 1000 / T reaches 1 at T = 20: that is refused, not silently clipped."""
    with pytest.raises(ddpm.ConfigError):
        NoiseSchedule("linear", 20)
    assert NoiseSchedule("linear", 21).betas[-1].item() == pytest.approx(20 / 21, rel=1e-12)


def _check_against_alpha_bar(schedule: NoiseSchedule, alpha_bar) -> None:
    """alphas_cumprod[i] == alpha_bar((i + 1) / T) wherever no beta up to i was clipped; last beta clipped."""
    T = schedule.timesteps
    clipped = (schedule.betas >= 0.999).nonzero().flatten().tolist()
    assert clipped == [T - 1]                                       # alpha_bar(1) = 0, so beta_T = 1 -> 0.999
    assert schedule.betas[-1].item() == pytest.approx(0.999, abs=1e-15)
    expected = torch.tensor([alpha_bar((i + 1) / T) for i in range(T - 1)], dtype=torch.float64)
    assert close(schedule.alphas_cumprod[:-1], expected, rtol=1e-9, atol=1e-15)
    # The clipped step: alpha_bar_T = (1 - 0.999) alpha_bar_{T-1}.
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(1e-3 * expected[-1].item(), rel=1e-9)


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_matches_nichol_dhariwal(T):
    s = 0.008

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    _check_against_alpha_bar(NoiseSchedule("cosine", T), lambda u: f(u) / f(0.0))


@pytest.mark.parametrize("T", [1000, 50])
def test_sigmoid_matches_jabri_et_al(T):
    start, end, tau = -3.0, 3.0, 1.0

    def sigmoid(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    def alpha_bar(u: float) -> float:
        return (sigmoid(end / tau) - sigmoid((u * (end - start) + start) / tau)) / (sigmoid(end / tau) - sigmoid(start / tau))

    assert alpha_bar(0.0) == pytest.approx(1.0) and alpha_bar(1.0) == pytest.approx(0.0, abs=1e-15)
    _check_against_alpha_bar(NoiseSchedule("sigmoid", T), alpha_bar)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kind, T", [("quadratic", 1000), ("", 1000), ("linear", 1), ("linear", 0),
                                     ("cosine", -5), ("linear", 10.0)])
def test_bad_schedule_raises_config_error(kind, T):
    with pytest.raises(ddpm.ConfigError):
        NoiseSchedule(kind, T)


@pytest.mark.parametrize("betas", [[0.1], [0.0, 0.1], [0.1, 1.0], [[0.1, 0.2]]])
def test_bad_explicit_betas_raise_config_error(betas):
    with pytest.raises(ddpm.ConfigError):
        NoiseSchedule(betas=torch.tensor(betas, dtype=torch.float64))


def test_explicit_betas_build_the_same_tables():
    ref = NoiseSchedule("cosine", 100)
    again = NoiseSchedule(betas=ref.betas.clone())
    for name in NoiseSchedule.TABLES:
        assert torch.equal(getattr(again, name), getattr(ref, name)), name


# ----------------------------------------------------------------------------- device copies and extract

def test_to_cpu_keeps_every_table():
    ref = NoiseSchedule("sigmoid", 64)
    moved = ref.to("cpu")
    assert moved is not ref
    assert (moved.kind, moved.timesteps, moved.device) == (ref.kind, ref.timesteps, torch.device("cpu"))
    for name in NoiseSchedule.TABLES:
        assert getattr(moved, name).dtype == torch.float64, name
        assert torch.equal(getattr(moved, name), getattr(ref, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extract_gathers_and_broadcasts_in_x_dtype(dtype):
    table = torch.arange(10, dtype=torch.float64) / 7.0
    t = torch.tensor([3, 0, 9])
    x = torch.ones(3, 2, 4, 5, dtype=dtype)
    out = extract(table, t, x)
    assert out.dtype == dtype
    assert out.shape == (3, 1, 1, 1)
    assert torch.equal(out.flatten(), (torch.tensor([3.0, 0.0, 9.0], dtype=torch.float64) / 7.0).to(dtype))
    scaled = out * x
    assert scaled.shape == x.shape
    assert torch.equal(scaled[1], torch.zeros(2, 4, 5, dtype=dtype))       # per-sample values, not mixed
    assert torch.equal(scaled[2], torch.full((2, 4, 5), 9.0 / 7.0, dtype=torch.float64).to(dtype))


def test_extract_works_for_any_rank():
    table = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    t = torch.tensor([4, 1])
    assert extract(table, t, torch.zeros(2, 3)).shape == (2, 1)
    assert extract(table, t, torch.zeros(2)).shape == (2,)
