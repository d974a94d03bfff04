"""Post-hoc EMA (EDM2): the power-function profiles against their closed forms, the analytic inner
products against quadrature, snapshots on disk, and reconstructions against directly tracked averages.

Tolerance of a reconstruction at a length that was not tracked: every stored average weighs the raw
weights theta_1 .. theta_N exactly by :func:`profile_weights`, so the reconstruction is
sum_tau w_rec(tau) theta_tau with known w_rec, and a directly tracked average is sum_tau w(tau) theta_tau.
Both weight vectors sum to 1, so for every parameter and any constant c
|rec - direct| = |sum_tau (w_rec - w)(tau) (theta_tau - c)| <= ||w_rec - w||_1 * max_tau |theta_tau - c|,
which with c the midpoint of the parameter's trajectory is ||w_rec - w||_1 * (range / 2). The tests
check that bound parameter by parameter (plus float32 rounding), and that ||w_rec - w||_1 < 0.01 for
EDM2's two profiles stored every 20 of 400 steps: the reconstruction is within 0.5 % of each
parameter's range over training.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.config import RunConfig
from ddpm.errors import CheckpointError, ConfigError
from ddpm.posthoc_ema import (DEFAULT_GAMMAS, SIGMA_REL_MAX, PowerEMA, gamma_to_sigma_rel, list_snapshots,
                              load_snapshot, plan_reconstruction, power_beta, profile_inner, profile_weights,
                              read_snapshot_meta, reconstruct, reconstruction_checkpoint, save_snapshot,
                              sigma_rel_to_gamma, snapshot_path, solve_coefficients)

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from running_mean import RunningMean  # noqa: E402

CONFIG = RunConfig.for_preset("digits").to_dict()      # a valid configuration (the tensors need not fit it)


def test_sigma_rel_and_gamma_convert_both_ways():
    assert DEFAULT_GAMMAS == pytest.approx((16.97, 6.94), abs=5e-3)          # the paper's two profiles
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma > 0 and gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(SIGMA_REL_MAX, rel=1e-15)
    for bad in (0, 0.0, -0.1, SIGMA_REL_MAX, 0.3, float("nan"), True):
        with pytest.raises(ConfigError) as info:
            sigma_rel_to_gamma(bad)
        assert str(info.value).startswith("sigma_rel must be a number in (0, 0.2887)") and "\n" not in str(info.value)


def test_sigma_rel_is_the_profiles_relative_standard_deviation():
    for gamma in (0.5, *DEFAULT_GAMMAS):
        tau = (np.arange(200_000) + 0.5) / 200_000                       # t = 1, midpoint rule
        p = (gamma + 1) * tau ** gamma
        mean = np.mean(p * tau)
        assert math.sqrt(np.mean(p * tau ** 2) - mean ** 2) == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-6)


def test_inner_products_match_quadrature():
    def p(t, gamma, tau):
        return np.where(tau <= t, (gamma + 1) * tau ** gamma / t ** (gamma + 1), 0.0)
    tau = (np.arange(500_000) + 0.5) * (500 / 500_000)
    for t_a, g_a, t_b, g_b in [(300, 6.94, 500, 16.97), (500, 6.94, 300, 16.97), (400, 3.0, 400, 6.94)]:
        numeric = np.sum(p(t_a, g_a, tau) * p(t_b, g_b, tau)) * (500 / 500_000)
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-6)
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(profile_inner(t_b, g_b, t_a, g_a), rel=1e-15)


def test_profile_weights_are_the_profile_over_unit_intervals():
    for gamma in DEFAULT_GAMMAS:
        w = profile_weights(gamma, 50)
        assert w.sum() == pytest.approx(1.0, abs=1e-14) and bool((w >= 0).all())
        for tau in (1, 17, 50):                     # integral of (gamma + 1) s^gamma / 50^(gamma + 1) over (tau - 1, tau]
            s = tau - 1 + (np.arange(100_000) + 0.5) / 100_000
            assert w[tau - 1] == pytest.approx(np.mean((gamma + 1) * s ** gamma / 50 ** (gamma + 1)), rel=1e-8)


class Scalars(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))


def test_each_tracked_profile_equals_its_closed_form():
    model, steps = Scalars(), 400
    gammas = (*DEFAULT_GAMMAS, 0.5)
    ema = PowerEMA(model, gammas)
    t = np.arange(1, steps + 1, dtype=np.float64)
    theta = np.stack([np.sin(t / 7), t / 50, np.where(t % 2 == 0, 1.0, -1.0)], axis=1)   # known trajectories
    for k in range(steps):
        model.theta.data.copy_(torch.from_numpy(theta[k]))
        ema.update(model, k + 1)
        if k + 1 in (1, 37, steps):
            for gamma, average in zip(gammas, ema.models):
                expected = profile_weights(gamma, k + 1) @ theta[:k + 1]
                assert average.theta.detach().numpy() == pytest.approx(expected, rel=1e-11, abs=1e-13), (gamma, k)
    assert power_beta(6.94, 1) == 0.0
    with pytest.raises(ValueError, match="1-based"):
        ema.update(model, 0)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), RunningMean(3))


def random_walk_run(tmp_path, steps=400, every=20, extra_gammas=()):
    """A float32 model whose parameters random-walk with a drift; snapshots every ``every`` steps; besides
    the stored profiles, power EMAs of ``extra_gammas`` tracked directly; running min and max of each
    parameter."""
    model = tiny_model()
    stored, direct = PowerEMA(model, DEFAULT_GAMMAS), PowerEMA(model, extra_gammas) if extra_gammas else None
    g = torch.Generator().manual_seed(3)
    lo = {n: p.detach().clone() for n, p in model.named_parameters()}
    hi = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(1, steps + 1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g) + 0.01)
                lo[n], hi[n] = torch.minimum(lo[n], p), torch.maximum(hi[n], p)
            model[1].running_mean.fill_(t)                     # a buffer: copied, never averaged
        stored.update(model, t)
        if direct is not None:
            direct.update(model, t)
        if t % every == 0:
            save_snapshot(tmp_path, t, stored)
    return stored, direct, lo, hi


def test_snapshot_files_round_trip(tmp_path):
    stored, _, _, _ = random_walk_run(tmp_path, steps=40, every=20)
    assert [s for s, _ in list_snapshots(tmp_path)] == [20, 40]
    assert snapshot_path(tmp_path, 40).name == "step-0000040.safetensors"
    profiles, info = load_snapshot(snapshot_path(tmp_path, 40))
    assert info["step"] == 40 and info["gammas"] == list(DEFAULT_GAMMAS)
    assert info["sigma_rels"] == pytest.approx([0.05, 0.10], rel=1e-12)
    assert info["buffers"] == ["1.running_mean"]
    for state, average in zip(profiles, stored.models):
        assert state.keys() == average.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in average.state_dict().items())
    path = snapshot_path(tmp_path, 20)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="failed its checksum"):
        load_snapshot(path)
    path.write_bytes(b"not a snapshot")
    with pytest.raises(CheckpointError, match="is not a ddpm EMA snapshot"):
        read_snapshot_meta(path)


def test_reconstruction_at_a_stored_length_reproduces_it(tmp_path):
    random_walk_run(tmp_path)
    for step in (400, 220):
        stored, _ = load_snapshot(snapshot_path(tmp_path, step))
        recs = reconstruct(tmp_path, [gamma_to_sigma_rel(gamma) for gamma in DEFAULT_GAMMAS], step=step)
        for i, rec in enumerate(recs):
            assert rec.rel_error < 1e-6 and max(abs(x) for x in rec.coefficients) == pytest.approx(1.0, abs=1e-6)
            assert rec.state.keys() == stored[i].keys()
            for name, value in stored[i].items():
                assert rec.state[name].dtype == value.dtype
                assert torch.allclose(rec.state[name].double(), value.double(), rtol=1e-6, atol=1e-6), name


def test_reconstruction_at_another_length_matches_a_tracked_one(tmp_path):
    sigma_rels = (0.07, 0.15)
    gammas = tuple(sigma_rel_to_gamma(s) for s in sigma_rels)
    _, direct, lo, hi = random_walk_run(tmp_path, extra_gammas=gammas)
    recs = reconstruct(tmp_path, sigma_rels)
    for rec, gamma, tracked in zip(recs, gammas, direct.models):
        assert rec.step == 400
        l1 = float(np.abs(rec.weights() - profile_weights(gamma, 400)).sum())
        assert l1 < 0.01, (rec.sigma_rel, l1)
        for name, value in tracked.named_parameters():
            bound = l1 * (hi[name] - lo[name]) / 2 + 1e-5 * (1 + value.abs())
            error = (rec.state[name] - value).abs()
            assert bool((error <= bound).all()), (name, float((error - bound).max()))
        assert torch.equal(rec.state["1.running_mean"], torch.full((3,), 400.0))   # the last snapshot's buffer


def test_reconstructed_state_is_the_combination_of_the_stored_averages(tmp_path):
    random_walk_run(tmp_path, steps=100, every=20)
    (rec,) = reconstruct(tmp_path, 0.12, step=80)
    assert [s for s, _ in rec.inputs] == [20, 20, 40, 40, 60, 60, 80, 80]        # none after the step
    assert sum(rec.coefficients) == pytest.approx(1.0, abs=1e-12)
    expected = sum(x * load_snapshot(snapshot_path(tmp_path, s))[0][list(DEFAULT_GAMMAS).index(g)]["0.weight"].double()
                   for (s, g), x in zip(rec.inputs, rec.coefficients))
    assert torch.allclose(rec.state["0.weight"].double(), expected, rtol=0, atol=1e-6)


def test_lengths_and_steps_out_of_reach_are_one_line_errors(tmp_path):
    snapshots = [(s, DEFAULT_GAMMAS) for s in range(50, 1001, 50)]
    for kwargs, words in [(dict(sigma_rel=0.1, step=49), "step 49 is outside the stored EMA snapshots (steps 50 to 1000)"),
                          (dict(sigma_rel=0.1, step=1001), "step 1001 is outside the stored EMA snapshots"),
                          (dict(sigma_rel=0.01), "sigma_rel 0.01 at step 1000 is beyond the reach of the stored "
                                                 "profiles (sigma_rel 0.050, 0.100, 20 snapshot(s)): the best "
                                                 "combination misses it by 30.0% (limit 10%)"),
                          (dict(sigma_rel=0.3), "sigma_rel must be a number in (0, 0.2887)")]:
        with pytest.raises(ConfigError) as info:
            plan_reconstruction(snapshots, **kwargs)
        assert words in str(info.value) and "\n" not in str(info.value)
    assert plan_reconstruction(snapshots, 0.03).rel_error < 0.1            # nearer lengths are within reach
    with pytest.raises(ConfigError, match="no EMA snapshots to reconstruct from"):
        reconstruct(tmp_path, 0.1)


def test_solve_coefficients_recovers_an_exact_member():
    x, err = solve_coefficients([100, 100, 200, 200], [16.97, 6.94, 16.97, 6.94], 200, 6.94)
    assert x == pytest.approx([0, 0, 0, 1], abs=1e-9) and err < 1e-7


def test_reconstruction_checkpoint_loads_like_any_checkpoint(tmp_path):
    stored, _, _, _ = random_walk_run(tmp_path, steps=40, every=20)
    raw = {f"model.{k}": v + 1 for k, v in stored.models[0].state_dict().items()}
    ema = {f"ema.{k}": v + 2 for k, v in stored.models[0].state_dict().items()}
    save_checkpoint(tmp_path / "checkpoints" / "step-0000040.safetensors", {**raw, **ema}, {"step": 40, "config": CONFIG})
    (rec,) = reconstruct(tmp_path, 0.08)
    tensors, meta = reconstruction_checkpoint(tmp_path, rec)
    path = save_checkpoint(tmp_path / "out.safetensors", tensors, meta)
    loaded, meta = load_checkpoint(path)
    assert meta["config"] == CONFIG and meta["step"] == 40 and meta["posthoc_ema"]["sigma_rel"] == 0.08
    assert all(torch.equal(loaded[f"ema.{k}"], v) for k, v in rec.state.items())
    assert all(torch.equal(loaded[k], v) for k, v in raw.items())


def test_a_resumed_power_ema_continues_exactly():
    def run(model, ema, ts, g):
        for t in ts:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g))
            ema.update(model, t)

    model, g = tiny_model(), torch.Generator().manual_seed(4)
    whole = PowerEMA(model, DEFAULT_GAMMAS)
    run(model, whole, range(1, 61), g)
    model, g = tiny_model(), torch.Generator().manual_seed(4)
    first = PowerEMA(model, DEFAULT_GAMMAS)
    run(model, first, range(1, 31), g)
    resumed = PowerEMA(tiny_model(), DEFAULT_GAMMAS)
    resumed.load_state_tensors(first.state_tensors(), "c")
    run(model, resumed, range(31, 61), g)
    for a, b in zip(whole.models, resumed.models):
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(CheckpointError, match=r"^c holds 2 power EMA profile\(s\); this run keeps 3$"):
        PowerEMA(tiny_model(), (*DEFAULT_GAMMAS, 3.0)).load_state_tensors(first.state_tensors(), "c")
    with pytest.raises(ConfigError, match="gamma must be a finite number > 0"):
        PowerEMA(tiny_model(), (6.94, 0.0))


def test_snapshots_of_different_models_are_refused(tmp_path):
    save_snapshot(tmp_path, 10, PowerEMA(tiny_model()))
    save_snapshot(tmp_path, 20, PowerEMA(nn.Sequential(nn.Linear(4, 5))))
    with pytest.raises(CheckpointError, match="step-0000020.safetensors holds other weights than .*step-0000010"):
        reconstruct(tmp_path, 0.07)


def test_a_reconstructed_checkpoint_samples_with_the_reconstruction(tmp_path):
    from ddpm.config import DiffusionConfig, RunConfig
    from ddpm.generate import load_diffusion
    from ddpm.models import Unet, UnetConfig

    config = RunConfig(preset="custom", model=UnetConfig(image_size=8, channels=1, dim=8, dim_mults=(1,),
                       num_res_blocks=1, attention_resolutions=(), dropout=0.0, norm_groups=4),
                       diffusion=DiffusionConfig(timesteps=25))
    unet, g = Unet(config.model), torch.Generator().manual_seed(0)
    ema = PowerEMA(unet)
    for t in range(1, 31):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        ema.update(unet, t)
        if t % 10 == 0:
            save_snapshot(tmp_path, t, ema)
    save_checkpoint(tmp_path / "checkpoints" / "step-0000030.safetensors",
                    {f"{p}.{k}": v.clone() for p in ("model", "ema") for k, v in unet.state_dict().items()},
                    {"step": 30, "config": config.to_dict()})
    (rec,) = reconstruct(tmp_path, 0.08)
    out = save_checkpoint(tmp_path / "phema.safetensors", *reconstruction_checkpoint(tmp_path, rec))
    diffusion, meta = load_diffusion(out, channels_last=False)
    assert meta["posthoc_ema"]["sigma_rel"] == 0.08
    assert all(torch.equal(v, rec.state[k]) for k, v in diffusion.model.state_dict().items())
    raw, _ = load_diffusion(out, weights="raw", channels_last=False)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in raw.model.state_dict().items())
