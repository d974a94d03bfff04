"""Every training-loop option checked for its effect, through spies on the network and the optimizer.

The data are one image repeated, so x0 is known: from the x_t the network receives, eps follows
from Eq. 4, and the gradient that reaches the network's output then tells the per-sample weight
the loss gave that sample (for the eps objective, d/d eps_pred of (w / B) mean_pixels (eps_pred - eps)^2
is 2 w (eps_pred - eps) / (B P)). The optimizer spy sees the gradients and the learning rate each
step uses. A test here fails when its option is silently skipped (see docs/testing.md). Label
dropout is checked the same way, through a spy on the network, in test_conditional.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.spies import no_sample_grids, spy_network, spy_optimizer

from ddpm import diffusion as D
from ddpm import pixels as P
from ddpm.checkpoint import load_checkpoint, save_checkpoint, split_prefix
from ddpm.build import build_model
from ddpm.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from ddpm.data import ImageData
from ddpm.models import preset_config
from ddpm.schedules import NoiseSchedule
from ddpm.timestep_sampling import HISTORY, ImportanceSampler
from ddpm.train import train

T = 50
SCHEDULE = NoiseSchedule("linear", T)
IMAGE = np.zeros((8, 8, 1), np.uint8)
IMAGE[:, :3] = 255                                   # a bright left edge: not mirror-symmetric
X0 = P.to_model_range(torch.from_numpy(IMAGE).permute(2, 0, 1).float() / 255.0).double()   # [1, 8, 8] in [-1, 1]


def config(diffusion: dict | None = None, **train_options) -> RunConfig:
    """The digits preset (no dropout), T = 50, one step of eight images on the CPU."""
    options = dict(steps=1, batch_size=8, num_samples=2, log_every=1, checkpoint_every=0, device="cpu")
    return RunConfig(preset="digits", model=preset_config("digits"),
                     diffusion=DiffusionConfig(timesteps=T, **(diffusion or {})),
                     train=TrainConfig(**{**options, **train_options}))


def one_image_data(n: int = 16) -> ImageData:
    return ImageData(np.repeat(IMAGE[None], n, axis=0), None, "one-image")


def run(cfg: RunConfig, run_dir, *, resume: bool = False):
    """Train ``cfg`` on the one-image data: (result, network calls, optimizer steps)."""
    with no_sample_grids(), spy_network() as calls, spy_optimizer() as steps:
        result = train(cfg, run_dir, data=one_image_data(), progress=False, resume=resume)
    return result, calls, steps


def eps_from_input(call, x0: torch.Tensor = X0) -> torch.Tensor:
    """eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)  (Eq. 4 solved for eps)."""
    abar = SCHEDULE.alphas_cumprod.double()[call.t].view(-1, 1, 1, 1)
    return (call.x[:, :1].double() - abar.sqrt() * x0) / (1.0 - abar).sqrt()


def loss_weights(call, x0: torch.Tensor = X0) -> torch.Tensor:
    """The weight w_b the loss gave each sample of one forward pass (eps objective, C = 1).

    Least squares of grad = 2 w (eps_pred - eps) / (B P) over the pixels; the fit must be exact.
    """
    residual = call.output[:, :1].double() - eps_from_input(call, x0)
    grad = call.grad_output[:, :1].double()
    b, p = residual.shape[0], residual[0].numel()
    w = (grad * residual).flatten(1).sum(1) / residual.pow(2).flatten(1).sum(1) * b * p / 2.0
    torch.testing.assert_close(grad, 2.0 * w.view(-1, 1, 1, 1) * residual / (b * p), rtol=1e-4, atol=1e-9)
    return w


def training_calls(calls):
    return [c for c in calls if c.grad_enabled]


# ----------------------------------------------------------------------------- gradient clipping

def test_gradient_clipping_hands_the_optimizer_the_hand_clipped_gradient(tmp_path):
    clip = 0.5
    _, _, (raw,) = run(config(grad_clip=0.0), tmp_path / "raw")
    norm = raw.grad_norm()
    assert norm > 2 * clip, norm                          # the clip must bite for the test to mean anything
    result, _, (clipped,) = run(config(grad_clip=clip), tmp_path / "clipped")
    for g, g_raw in zip(clipped.grads, raw.grads):
        torch.testing.assert_close(g, g_raw * (clip / norm), rtol=1e-4, atol=1e-9)   # g min(1, c / |g|)
    assert clipped.grad_norm() == pytest.approx(clip, rel=1e-4)
    # ...and that is the gradient Adam took in: its first moment is (1 - beta1) g.
    optim = split_prefix(load_checkpoint(result.checkpoint)[0], "optim")
    first_moments = [v for k, v in sorted(optim.items()) if k.endswith("exp_avg")]
    assert first_moments, sorted(optim)
    total = float(torch.sqrt(sum(m.double().pow(2).sum() for m in first_moments)))
    assert total == pytest.approx(0.1 * clip, rel=1e-4)


# ----------------------------------------------------------------------------- learning-rate warm-up

def test_the_optimizer_steps_with_the_warmed_up_learning_rate(tmp_path):
    _, _, steps = run(config(steps=4, warmup_steps=3, lr=1e-3), tmp_path / "run")
    assert [s.lr for s in steps] == [[pytest.approx(lr, rel=1e-12)] for lr in (1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3)]


# ----------------------------------------------------------------------------- EMA and its warm-up

@pytest.mark.parametrize("warmup", [True, False])
def test_ema_is_the_moving_average_of_the_weights_after_each_step(tmp_path, warmup):
    decay = 0.9
    result, _, steps = run(config(steps=3, ema_decay=decay, ema_warmup=warmup), tmp_path / "run")
    names = [name for name, _ in build_model(config()).named_parameters()]
    ema = [p.double() for p in steps[0].params_before]                # the EMA starts from the initial weights
    for n, step in enumerate(steps):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay        # decay_n: 0.1, 2/11, 3/12 with warm-up
        ema = [d * e + (1 - d) * p.double() for e, p in zip(ema, step.params_after)]
    saved = split_prefix(load_checkpoint(result.checkpoint)[0], "ema")
    for name, expected in zip(names, ema):
        torch.testing.assert_close(saved[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert max(float((saved[n] - p).abs().max()) for n, p in zip(names, steps[-1].params_after)) > 1e-4


# ----------------------------------------------------------------------------- horizontal flips

def orientations_seen(calls) -> list[str]:
    """For each training sample, which x0 (the image or its mirror) the network's input and its loss
    target came from: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eps the target (w = 1)."""
    seen = []
    for call in training_calls(calls):
        b, p = call.x.shape[0], call.x[0].numel()
        eps = call.output.double() - call.grad_output.double() * b * p / 2.0
        abar = SCHEDULE.alphas_cumprod.double()[call.t].view(-1, 1, 1, 1)
        x0 = (call.x.double() - (1.0 - abar).sqrt() * eps) / abar.sqrt()
        for x in x0:
            error = {name: float((x - image).abs().max()) for name, image in (("original", X0), ("flipped", X0.flip(-1)))}
            assert min(error.values()) < 0.05 and max(error.values()) > 1.0, error
            seen.append(min(error, key=error.get))
    return seen


def test_hflip_trains_on_both_orientations_and_only_when_asked(tmp_path):
    flipping = config(steps=2)
    flipping.data = DataConfig(hflip=True)
    seen = orientations_seen(run(flipping, tmp_path / "flip")[1])
    assert len(seen) == 16 and 3 <= seen.count("flipped") <= 13, seen
    assert set(orientations_seen(run(config(steps=2), tmp_path / "plain")[1])) == {"original"}


# ----------------------------------------------------------------------------- loss weights

def test_uniform_weighting_gives_every_sample_weight_one(tmp_path):
    (call,) = training_calls(run(config(), tmp_path / "run")[1])
    torch.testing.assert_close(loss_weights(call), torch.ones(8, dtype=torch.float64), rtol=1e-4, atol=0)


def test_min_snr_weighting_reaches_the_loss(tmp_path):
    (call,) = training_calls(run(config({"loss_weighting": "min-snr", "min_snr_gamma": 5.0}), tmp_path / "run")[1])
    snr = SCHEDULE.snr.double()[call.t]
    expected = snr.clamp(max=5.0) / snr                       # Hang et al. 2023, in eps space
    assert float(expected.min()) < 0.5, expected              # some drawn t have SNR > gamma
    torch.testing.assert_close(loss_weights(call), expected, rtol=1e-4, atol=0)


def test_gradient_accumulation_scales_each_micro_batch_and_sums_to_the_full_batch_gradient(tmp_path):
    _, calls_full, (full,) = run(config(batch_size=8, grad_accum=1, grad_clip=0.0), tmp_path / "full")
    _, calls_accum, (accum,) = run(config(batch_size=4, grad_accum=2, grad_clip=0.0), tmp_path / "accum")
    micro = training_calls(calls_accum)
    assert [c.x.shape[0] for c in micro] == [4, 4]
    for call in micro:                                        # each micro-batch's loss is divided by grad_accum
        torch.testing.assert_close(loss_weights(call), torch.full((4,), 0.5, dtype=torch.float64), rtol=1e-4, atol=0)
    (whole,) = training_calls(calls_full)
    torch.testing.assert_close(torch.cat([c.t for c in micro]), whole.t)
    for g_accum, g_full in zip(accum.grads, full.grads):
        torch.testing.assert_close(g_accum, g_full, rtol=1e-4, atol=1e-7)


def warm_importance_state(checkpoint) -> dict[str, torch.Tensor]:
    """Give a checkpoint's timestep sampler full, t-dependent loss histories (RMS loss at t: t + 1)."""
    tensors, meta = load_checkpoint(checkpoint)
    tensors["timestep_sampler.losses"] = torch.arange(1, T + 1, dtype=torch.float64)[:, None].repeat(1, HISTORY)
    tensors["timestep_sampler.counts"] = torch.full((T,), HISTORY, dtype=torch.int64)
    meta.pop("path")
    save_checkpoint(checkpoint, tensors, meta)
    return tensors


def test_importance_sampling_weights_each_loss_by_one_over_T_p_t(tmp_path):
    diffusion = {"variance": "learned-range", "loss": "hybrid", "timestep_sampling": "importance"}
    first = run(config(diffusion), tmp_path / "run")[0]
    sampler = ImportanceSampler(T)
    sampler.load_state_tensors(warm_importance_state(first.checkpoint))
    assert sampler.warmed_up
    (call,) = training_calls(run(config(diffusion, steps=2), tmp_path / "run", resume=True)[1])
    expected = sampler.weights(call.t).double()                # 1 / (T p_t), p_t ~ t + 1 (Nichol & Dhariwal, Eq. 17)
    assert float(expected.max() / expected.min()) > 2, expected
    torch.testing.assert_close(loss_weights(call), expected, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------- offset noise

def test_offset_noise_shifts_eps_by_a_constant_per_sample_and_channel_in_input_and_target(tmp_path):
    strength = 0.5
    (plain,) = training_calls(run(config(), tmp_path / "plain")[1])
    (shifted,) = training_calls(run(config({"offset_noise": strength}), tmp_path / "offset")[1])
    torch.testing.assert_close(shifted.t, plain.t)
    torch.testing.assert_close(loss_weights(shifted), torch.ones(8, dtype=torch.float64), rtol=1e-4, atol=0)
    offset = eps_from_input(shifted) - eps_from_input(plain)     # the loss's target is this same eps
    per_channel = offset.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(offset, per_channel.expand_as(offset), rtol=0, atol=1e-3)   # constant over pixels
    assert 0.2 * strength < float(per_channel.std()) < 3 * strength, per_channel.flatten()


# ----------------------------------------------------------------------------- self-conditioning

def test_self_conditioning_feeds_the_first_passs_clamped_x0_to_the_samples_whose_coin_is_set(tmp_path):
    calls = run(config({"self_condition": True}, steps=2), tmp_path / "run")[1]
    by_step = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    assert len(calls) == 4, [c.grad_enabled for c in calls]   # two steps: a no-grad pass, then the trained one
    chosen = 0
    for first, second in by_step:
        assert not first.grad_enabled and second.grad_enabled and second.x.shape[1] == 2
        x_t, x0_prev = second.x[:, :1], second.x[:, 1:]
        coin = x0_prev.flatten(1).abs().amax(1) > 0
        chosen += int(coin.sum())
        torch.testing.assert_close(first.x[:, :1], x_t[coin])
        assert torch.equal(first.x[:, 1:], torch.zeros_like(first.x[:, 1:]))    # the first pass has x0_prev = 0
        x0_pred = D.predict_x0_from_eps(SCHEDULE, first.x[:, :1], first.t, first.output[:, :1]).clamp(-1, 1)
        torch.testing.assert_close(x0_prev[coin], x0_pred, rtol=1e-4, atol=1e-5)
        assert torch.equal(x0_prev[~coin], torch.zeros_like(x0_prev[~coin]))
    assert 0 < chosen < 16, chosen


def test_the_mnist_recipe_trains_with_min_snr_weighting_through_the_cli(tmp_path):
    """``ddpm train --preset mnist`` with no loss option: the weights that reach the loss are min-SNR-5's."""
    from ddpm.cli import main

    data = tmp_path / "one.npz"
    np.savez(data, images=np.repeat(IMAGE[None], 16, axis=0))
    argv = ["train", "--preset", "mnist", "--data", str(data), "--timesteps", str(T), "--steps", "1",
            "--batch-size", "8", "--warmup-steps", "0", "--num-images", "2", "--checkpoint-every", "0",
            "--device", "cpu", "--precision", "fp32", "--quiet", "--out", str(tmp_path / "run")]
    with no_sample_grids(), spy_network() as calls:
        assert main(argv) == 0
    (call,) = training_calls(calls)
    snr = SCHEDULE.snr.double()[call.t]
    assert float(snr.max()) > 5.0, snr                        # the clip must bite for the test to mean anything
    torch.testing.assert_close(loss_weights(call), snr.clamp(max=5.0) / snr, rtol=1e-4, atol=0)
