"""The sampling front-end (ddpm.generate and ddpm sample): which weights are loaded, interpolation's
end points, the rows of a progressive grid, and classifier-free guidance at w = 0.

Each check compares with an independent way of getting the same thing (the network built by hand,
image a denoised alone, the sampler's own steps, the model called with the null label), so a mix-up
of a and b, of EMA and raw weights or of x_t and x0 rows fails. No diffusers needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm
from ddpm.checkpoint import save_checkpoint
from ddpm.cli import main
from ddpm.build import build_model
from ddpm.config import DiffusionConfig, RunConfig, TrainConfig
from ddpm.generate import generate, interpolate, load_diffusion, progressive_frames, sampling_options
from ddpm.pixels import from_model_range, to_uint8
from ddpm.models import preset_config
from ddpm.seeding import derive_seed
from ddpm.viz import progressive_grid

T = 25


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights perturbed by ``seed``, zero-initialised output layers made random, so outputs depend on them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if getattr(m, "zero_init", False):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
    return model.eval()


def tiny_run_config(**model) -> RunConfig:
    return RunConfig(preset="digits", model=preset_config("digits", dim=8, **model),
                     diffusion=DiffusionConfig(timesteps=T), train=TrainConfig(device="cpu"))


@pytest.fixture(scope="module")
def two_weight_checkpoint(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A checkpoint whose model.* and ema.* weights differ: (path, raw state, EMA state)."""
    config = tiny_run_config()
    raw, ema = (randomized(build_model(config), seed).state_dict() for seed in (1, 2))
    path = tmp_path_factory.mktemp("weights") / "two.safetensors"
    save_checkpoint(path, {**{f"model.{k}": v for k, v in raw.items()}, **{f"ema.{k}": v for k, v in ema.items()}},
                    {"step": 1, "config": config.to_dict()})
    return path, raw, ema


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_load_diffusion_loads_the_weights_asked_for(two_weight_checkpoint, weights):
    path, raw, ema = two_weight_checkpoint
    expected, other = (ema, raw) if weights == "ema" else (raw, ema)
    loaded = load_diffusion(path, weights=weights)[0].model.state_dict()
    assert loaded.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(loaded[name], expected[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(loaded[name], other[name]) for name in other)


def test_sample_cli_draws_from_the_ema_weights_by_default_and_raw_on_request(two_weight_checkpoint, tmp_path):
    path, raw, ema = two_weight_checkpoint
    config = tiny_run_config()
    by_hand = {}
    for name, state in (("ema", ema), ("raw", raw)):
        model = build_model(config)
        model.load_state_dict(state)
        diffusion = ddpm.GaussianDiffusion(model.eval(), timesteps=T)
        by_hand[name] = generate(diffusion, 2, seed=0, sampler="ddim", steps=5, progress=False)
    assert not np.array_equal(by_hand["ema"], by_hand["raw"])
    for name, flags in (("ema", []), ("raw", ["--weights", "raw"])):
        out = tmp_path / name
        assert main(["sample", "--checkpoint", str(path), "--out", str(out), "--num-images", "2", "--sampler", "ddim",
                     "--steps", "5", "--quiet", *flags]) == 0
        with np.load(out / "samples.npz") as f:
            np.testing.assert_array_equal(f["images"], by_hand[name])


# ----------------------------------------------------------------------------- interpolation

def tiny_diffusion(**model) -> ddpm.GaussianDiffusion:
    return ddpm.GaussianDiffusion(randomized(build_model(tiny_run_config(**model)), 3), timesteps=T)


def two_images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    a = torch.zeros(1, 8, 8)
    a[:, :, :4] = 1.0                                   # bright left half
    return a, torch.rand(1, 8, 8, generator=g)


@pytest.mark.parametrize("sampling", [sampling_options("ddim", 6), sampling_options("ddpm")],
                         ids=["ddim", "ancestral"])
def test_interpolation_starts_at_a_and_ends_at_b(sampling):
    diffusion = tiny_diffusion()
    a, b = two_images()
    row = interpolate(diffusion, a, b, t=12, n_interp=4, seed=5, sampling=sampling)
    alone_a = interpolate(diffusion, a, a, t=12, n_interp=4, seed=5, sampling=sampling)   # a denoised alone
    alone_b = interpolate(diffusion, b, b, t=12, n_interp=4, seed=5, sampling=sampling)
    for k in range(4):                                   # the same noise for every interpolant
        np.testing.assert_allclose(alone_a[k].astype(int), alone_a[0].astype(int), atol=1)
    np.testing.assert_allclose(row[0].astype(int), alone_a[0].astype(int), atol=1)      # lambda = 0: image a
    np.testing.assert_allclose(row[-1].astype(int), alone_b[0].astype(int), atol=1)     # lambda = 1: image b
    assert np.abs(alone_a[0].astype(int) - alone_b[0].astype(int)).mean() > 3


# ----------------------------------------------------------------------------- progressive generation

def test_progressive_frames_are_the_samplers_own_x_t_and_x0_estimates():
    diffusion = tiny_diffusion()
    sampling = sampling_options("ddim", 7)
    steps = []
    generate(diffusion, 2, sampling=sampling, seed=4, progress=False, callback=lambda idx, info: steps.append(info))
    images, x_t, x0 = progressive_frames(diffusion, 2, frames=3, sampling=sampling, seed=4, progress=False)
    assert x_t.shape == x0.shape == (3, 2, 8, 8, 1)
    for frame, i in enumerate([0, 3, 6]):                # the first, middle and last of 7 steps
        np.testing.assert_array_equal(x_t[frame], to_uint8(from_model_range(steps[i]["x_t"])))
        np.testing.assert_array_equal(x0[frame], to_uint8(from_model_range(steps[i]["x0_pred"])))
    x_T = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(derive_seed(4, k)))
                       for k in range(2)])               # image k's first draw is its x_T
    np.testing.assert_array_equal(x_t[0], to_uint8(from_model_range(x_T)))
    np.testing.assert_array_equal(x0[-1], images)        # DDIM's last step returns its x0 estimate
    assert not np.array_equal(x_t[0], x0[0])


def tiles(grid: np.ndarray, rows: int, cols: int, cell: int) -> np.ndarray:
    """Undo make_grid (padding 2, 8x8 images shown 8x larger): [rows, cols, 8, 8, C]."""
    out = np.empty((rows, cols, 8, 8, grid.shape[2]), np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = 2 + r * cell, 2 + c * cell
            out[r, c] = grid[y:y + cell - 2:8, x:x + cell - 2:8]
    return out


def test_progressive_grid_puts_each_images_x_t_row_above_its_x0_row():
    rng = np.random.default_rng(0)
    x_t, x0 = (rng.integers(0, 256, (3, 2, 8, 8, 1), dtype=np.uint8) for _ in range(2))   # [F, N, ...]
    grid = tiles(progressive_grid(x_t, x0), rows=4, cols=3, cell=66)
    for n in range(2):
        for f in range(3):
            np.testing.assert_array_equal(grid[2 * n, f], x_t[f, n])
            np.testing.assert_array_equal(grid[2 * n + 1, f], x0[f, n])


# ----------------------------------------------------------------------------- guidance

class NullLabel(torch.nn.Module):
    """The conditional network always given the null label: the unconditional model."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.num_classes = model, model.config, model.num_classes
        self.image_size, self.channels = model.image_size, model.channels

    def forward(self, x, t, y=None):
        return self.inner(x, t, y=torch.full((x.shape[0],), self.num_classes, dtype=torch.long))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_scale_zero_is_the_unconditional_model(sampler):
    conditional = tiny_diffusion(num_classes=3)
    unconditional = ddpm.GaussianDiffusion(NullLabel(conditional.model), timesteps=T)
    labels = [0, 1, 2]
    kwargs = dict(seed=1, sampler=sampler, steps=5, progress=False, labels=labels)
    guided = generate(conditional, 3, guidance_scale=0.0, **kwargs)
    np.testing.assert_allclose(guided.astype(int), generate(unconditional, 3, **kwargs).astype(int), atol=1)
    assert np.abs(generate(conditional, 3, **kwargs).astype(int) - guided.astype(int)).mean() > 5
