"""Editing maths on the exactly optimal model for Gaussian data: RePaint, replacement, SDEdit, DDIM inversion.

The data are 4-vectors x0 ~ N(mu, Sigma), shown as [1, 2, 2] images. For them the optimal noise
predictor has a closed form (``GaussianOracle``), so what an editing method should return is known:
the Gaussian conditioning formula for inpainting, the posterior q(x0 | x_t0) for SDEdit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm import editing as E
from ddpm.errors import ConfigError
from ddpm.denoiser import make_denoiser
from ddpm.samplers import SAMPLERS, ddim_invert, sample_ddim, spaced_timesteps
from ddpm.schedules import NoiseSchedule

F64 = torch.float64
N = 10_000
KEEP = torch.tensor([[True, True], [False, False]])          # the top row is known, the bottom row filled


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise_source(shape, seed: int):
    g = gen(seed)
    return lambda: torch.randn(shape, generator=g)


class GaussianOracle:
    """The optimal eps network for data N(mu, Sigma): x_t ~ N(sqrt(abar_t) mu, C_t), C_t = abar_t Sigma
    + (1 - abar_t) I, and E[eps | x_t] = sqrt(1 - abar_t) C_t^{-1} (x_t - sqrt(abar_t) mu)."""

    def __init__(self, schedule: NoiseSchedule, mu: torch.Tensor, sigma: torch.Tensor):
        abar = schedule.alphas_cumprod.double()
        cov = abar[:, None, None] * sigma + (1.0 - abar[:, None, None]) * torch.eye(len(mu), dtype=F64)
        self.gain = ((1.0 - abar)[:, None, None].sqrt() * torch.linalg.inv(cov)).float()
        self.centre = (abar[:, None].sqrt() * mu).float()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = int(t[0])
        eps = (x_t.reshape(len(x_t), -1) - self.centre[step]) @ self.gain[step].T
        return eps.reshape(x_t.shape)


def gaussian_data(rho: float = 0.5):
    """mu and Sigma = 0.25 R, R the correlations rho between neighbours of the 2x2 image, rho^2 across."""
    r = torch.tensor([[1, rho, rho, rho ** 2], [rho, 1, rho ** 2, rho], [rho, rho ** 2, 1, rho],
                      [rho ** 2, rho, rho, 1]], dtype=F64)
    return torch.tensor([0.2, -0.1, 0.3, 0.0], dtype=F64), 0.25 * r


@pytest.fixture(scope="module")
def linear() -> NoiseSchedule:
    return NoiseSchedule("linear", 1000)


@pytest.fixture(scope="module")
def oracle(linear):
    mu, sigma = gaussian_data()
    return make_denoiser(GaussianOracle(linear, mu, sigma), linear)


def data_samples(n: int, seed: int) -> torch.Tensor:
    mu, sigma = gaussian_data()
    z = torch.randn(n, 4, generator=gen(seed), dtype=F64)
    return (z @ torch.linalg.cholesky(sigma).T + mu).float().reshape(n, 1, 2, 2)


def conditional(known: np.ndarray):
    """Mean and standard deviations of the missing pixels given the known ones (Gaussian conditioning)."""
    mu, sigma = (a.numpy() for a in gaussian_data())
    k = KEEP.flatten().numpy()
    u = ~k
    gain = sigma[np.ix_(u, k)] @ np.linalg.inv(sigma[np.ix_(k, k)])
    mean = mu[u] + gain @ (known - mu[k])
    cov = sigma[np.ix_(u, u)] - gain @ sigma[np.ix_(k, u)]
    return mean, np.sqrt(np.diag(cov))


# ----------------------------------------------------------------------------- RePaint

def test_repaint_reproduces_the_gaussian_conditional_and_resampling_helps(linear, oracle):
    """Measured (seed 0, 250 of T = 1000 steps, jump length 10): mean error 0.016 with 10
    resamplings against 0.100 with 1 (plain replacement), standard deviation off by 4.8% and 2.6%."""
    known = np.array([0.6, -0.4])
    x0 = torch.zeros(N, 1, 2, 2)
    x0[:, 0, 0] = torch.tensor(known, dtype=torch.float32)
    mean, std = conditional(known)
    timesteps = spaced_timesteps(1000, 250)
    errors = {}
    for resample in (1, 10):
        out = E.repaint(oracle, x0, KEEP, linear, timesteps, noise=noise_source(x0.shape, 0),
                        jump_length=10, resample=resample)
        assert torch.equal(out[:, 0, 0], x0[:, 0, 0])                   # the known pixels are the input's
        missing = out[:, 0, 1].double().numpy()
        errors[resample] = (np.abs(missing.mean(0) - mean).max(), np.abs(missing.std(0) / std - 1).max())
    mean_error, std_error = errors[10]
    assert mean_error < 0.03 and std_error < 0.10, errors
    assert errors[10][0] <= errors[1][0], errors                          # 10 resamplings at least as close


def test_repaint_schedule_is_algorithm_1_and_the_jumps_of_section_4_2():
    assert E.repaint_schedule(3, jump_length=1, resample=1) == [0, 1, 2, 3]
    # Algorithm 1 with U = 2: each step among the noisy levels twice, the last one (to the data) once.
    assert E.repaint_schedule(3, jump_length=1, resample=2) == [0, 1, 0, 1, 2, 1, 2, 3]
    levels = E.repaint_schedule(50, jump_length=10, resample=10)
    reverse = sum(b > a for a, b in zip(levels, levels[1:]))
    assert reverse == 1 + 10 * 49                                          # evaluations: every step 10 times, but the last
    jumps = [(a, b) for a, b in zip(levels, levels[1:]) if b < a]
    assert len(jumps) == 9 * 5 and {a - b for a, b in jumps} == {9, 10}   # blocks of 10 from the data end; the top 9
    assert all(b == a + 1 for a, b in zip(levels, levels[1:]) if b > a) and levels[-1] == 50
    with pytest.raises(ConfigError):
        E.repaint_schedule(10, jump_length=0)


def test_repaint_evaluates_the_network_once_per_reverse_move(linear, oracle):
    seen = []

    def spy(x_t, t):
        seen.append(int(t))
        return oracle(x_t, t)

    timesteps = spaced_timesteps(1000, 6)
    E.repaint(spy, torch.zeros(2, 1, 2, 2), KEEP, linear, timesteps, noise=noise_source((2, 1, 2, 2), 1),
              jump_length=2, resample=3)
    levels = E.repaint_schedule(6, jump_length=2, resample=3)
    assert seen == [timesteps[a] for a, b in zip(levels, levels[1:]) if b > a] and len(seen) == 1 + 3 * 5


def test_repaint_without_known_pixels_samples_the_data_and_with_all_returns_the_input(linear, oracle):
    """With nothing known the jumps keep the data distribution: measured mean error 0.007 and
    covariance error 0.014 over 250 steps (the respaced ancestral sampler's own error, larger with
    fewer steps: 0.05 at 50); 4000 samples, so the mean's standard error is at most 0.008."""
    mu, sigma = gaussian_data()
    x0 = data_samples(4000, 3)
    free = E.repaint(oracle, x0, torch.zeros(2, 2, dtype=torch.bool), linear, spaced_timesteps(1000, 250),
                     noise=noise_source(x0.shape, 4), jump_length=10, resample=3)
    flat = free.reshape(-1, 4).double()
    assert (flat.mean(0) - mu).abs().max() < 0.03
    assert (torch.cov(flat.T) - sigma).abs().max() < 0.03
    full = E.repaint(oracle, x0, torch.ones(2, 2, dtype=torch.bool), linear, spaced_timesteps(1000, 20),
                     noise=noise_source(x0.shape, 5), resample=2)
    assert torch.equal(full, x0)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_replacement_inpaints_with_every_sampler(linear, oracle, sampler):
    """Replacement conditions the missing pixels (partly: it is RePaint without resampling)."""
    known = np.array([0.6, -0.4])
    x0 = torch.zeros(2000, 1, 2, 2)
    x0[:, 0, 0] = torch.tensor(known, dtype=torch.float32)
    mean, _ = conditional(known)
    mu = gaussian_data()[0].numpy()[2:]
    out = E.inpaint_by_replacement(SAMPLERS[sampler], oracle, x0, KEEP, linear, spaced_timesteps(1000, 50),
                                   noise=noise_source(x0.shape, 6))
    assert torch.equal(out[:, 0, 0], x0[:, 0, 0])
    moved = out[:, 0, 1].double().mean(0).numpy()
    assert np.all(np.abs(moved - mean) < 0.7 * np.abs(mu - mean)), (moved, mean, mu)   # towards the conditional


# ----------------------------------------------------------------------------- SDEdit

def posterior_change(schedule: NoiseSchedule, t0: int) -> float:
    """E|x0' - x0| when x0' is drawn from q(x0 | x_t0) given x_t0 ~ q(x_t0 | x0): x0' - x0 is
    N(0, 2 Cov(x0 | x_t0)), Cov(x0 | x_t0) = Sigma - a Sigma (a Sigma + (1 - a) I)^{-1} Sigma, a = abar_t0."""
    _, sigma = gaussian_data()
    a = float(schedule.alphas_cumprod[t0])
    post = sigma - a * sigma @ torch.linalg.inv(a * sigma + (1 - a) * torch.eye(4, dtype=F64)) @ sigma
    return float((math.sqrt(2 / math.pi) * (2 * torch.diag(post)).sqrt()).mean())


def test_sdedit_start_and_its_range():
    assert E.sdedit_start(0.0, 1000) is None
    assert E.sdedit_start(0.1, 1000) == 100 and E.sdedit_start(1.0, 1000) == 999 and E.sdedit_start(0.5, 50) == 24
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="strength"):
            E.sdedit_start(bad, 1000)


def test_sdedit_changes_an_image_as_much_as_the_posterior_says(linear, oracle):
    """At S = 0.1 (t0 = 100) the mean absolute change is 0.294, the closed form 0.300: about half
    of S = 1's 0.567 (closed form 0.564, a new sample); the bound tested is 5% of the closed form."""
    x0 = data_samples(N, 7)
    change = {}
    for strength in (0.1, 1.0):
        t0 = E.sdedit_start(strength, 1000)
        out = E.sdedit(SAMPLERS["ddpm"], oracle, x0, linear, spaced_timesteps(t0 + 1, t0 + 1),
                       noise=noise_source(x0.shape, 8))
        change[strength] = float((out - x0).abs().mean())
        assert change[strength] == pytest.approx(posterior_change(linear, t0), rel=0.05), strength
    assert change[0.1] < 0.6 * change[1.0]


# ----------------------------------------------------------------------------- DDIM inversion

def test_ddim_inversion_error_falls_with_the_step_count(linear, oracle):
    """Mean absolute reconstruction error, measured: 0.113 at 10 steps, 0.035 at 50, 0.0085 at 250."""
    x0 = data_samples(1000, 9)
    errors = []
    for steps in (10, 50, 250):
        timesteps = spaced_timesteps(1000, steps)
        back = sample_ddim(oracle, ddim_invert(oracle, x0, linear, timesteps), linear, timesteps)
        errors.append(float((back - x0).abs().mean()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.012, errors


# ----------------------------------------------------------------------------- masks

def test_named_masks_fill_the_named_region():
    lower = E.named_mask("lower-half", (4, 3))
    assert lower.tolist() == [[True] * 3, [True] * 3, [False] * 3, [False] * 3]
    assert E.named_mask("left-half", (2, 5)).tolist() == [[False, False, True, True, True]] * 2
    center = E.named_mask("center", (4, 4))
    assert (~center).nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    random = E.named_mask("random:0.25", (8, 8), seed=3)
    assert int((~random).sum()) == 16 and torch.equal(random, E.named_mask("random:0.25", (8, 8), seed=3))
    assert not torch.equal(random, E.named_mask("random:0.25", (8, 8), seed=4))
    for bad in ("upper-half", "random:2", "random:x"):
        with pytest.raises(ConfigError):
            E.named_mask(bad, (8, 8))


def test_png_masks_are_fitted_with_nearest_and_checked(tmp_path):
    from PIL import Image

    from ddpm.errors import DataError

    big = np.zeros((16, 16), np.uint8)
    big[:, 8:] = 200                                                       # right half white: keep it
    Image.fromarray(big).save(tmp_path / "m.png")
    keep = E.load_mask(str(tmp_path / "m.png"), (8, 8))
    assert keep.tolist() == [[False] * 4 + [True] * 4] * 8
    Image.fromarray(big[:, :12]).save(tmp_path / "wide.png")
    with pytest.raises(DataError, match="aspect ratio"):
        E.load_mask(str(tmp_path / "wide.png"), (8, 8))
    assert E.load_mask(str(tmp_path / "wide.png"), (8, 8), source_sizes=[(32, 24)]).shape == (8, 8)
    Image.fromarray(np.stack([big] * 3, -1)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="greyscale"):
        E.load_mask(str(tmp_path / "rgb.png"), (8, 8))


# ----------------------------------------------------------------------------- on a model: any channels and sizes

def tiny_rgb_diffusion():
    """An untrained 3-channel 8x12 U-Net with T = 30: shapes and the per-image seeds, not quality."""
    import ddpm
    from ddpm.models import Unet

    torch.manual_seed(0)
    model = Unet(image_size=(8, 12), channels=3, dim=8, dim_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
                 dropout=0.0, norm_groups=4)
    return ddpm.GaussianDiffusion(model.eval(), timesteps=30)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_inpaint_and_edit_any_channels_and_size_with_per_image_seeds(sampler):
    from ddpm.generate import sampling_options

    diffusion = tiny_rgb_diffusion()
    images = torch.rand(3, 3, 8, 12, generator=gen(10))
    keep = E.named_mask("center", (8, 12))
    sampling = sampling_options(sampler, 4)
    options = {"jump_length": 2, "resample": 2} if sampler == "ddpm" else {}
    whole = E.inpaint(diffusion, images, keep, sampling=sampling, seed=1, **options)
    assert whole.shape == (3, 8, 12, 3)
    inputs = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(whole[:, keep.numpy()], inputs[:, keep.numpy()])
    tail = E.inpaint(diffusion, images[1:], keep, sampling=sampling, seed=1, start_index=1, batch_size=1, **options)
    np.testing.assert_array_equal(tail, whole[1:])                      # image k: derive_seed(seed, k)
    edited = E.edit(diffusion, images, 0.5, sampling=sampling, seed=1)
    assert edited.shape == (3, 8, 12, 3) and not np.array_equal(edited, inputs)
