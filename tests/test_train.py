"""Behaviour of ddpm.train and ddpm.config: EMA, seeds, data order, determinism, checkpoints, run
directories, validation, and the Python API, all on tiny CPU inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ddpm
from ddpm.checkpoint import load_checkpoint, split_prefix
from ddpm.build import build_model
from ddpm.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from ddpm.data import ImageData
from ddpm.pixels import to_tensor, uint8_to_unit
from ddpm.losses import SimpleLoss
from ddpm.errors import ConfigError, DataError
from ddpm.device import select_device
from ddpm.models import preset_config
from ddpm.models.unet import Unet
from ddpm.run_dir import new_run_dir, prepare_run_dir
from ddpm.seeding import derive_seed
from ddpm.train import train
from ddpm.training_data import EpochOrder, check_training_data
from ddpm.training_state import EMA


def tiny_config(**train_overrides) -> RunConfig:
    """The digits preset, T = 50, three steps of eight images; no intermediate checkpoints."""
    train_options = dict(steps=3, batch_size=8, num_samples=2, log_every=1, checkpoint_every=0)
    return RunConfig(preset="digits", model=preset_config("digits"), diffusion=DiffusionConfig(timesteps=50),
                     train=TrainConfig(**{**train_options, **train_overrides}))


def tiny_data(num_images: int = 16, size: tuple[int, int] = (8, 8), channels: int = 1, seed: int = 0) -> ImageData:
    rng = np.random.default_rng(seed)
    return ImageData(rng.integers(0, 256, (num_images, *size, channels), dtype=np.uint8), None, "tiny")


class WithBuffer(nn.Module):
    """A linear layer followed by BatchNorm, whose running statistics are buffers."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.linear(x))


def perturb_(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- EMA

def test_ema_with_decay_zero_copies_the_parameters():
    model = WithBuffer()
    ema = EMA(model, decay=0.0, warmup=False)
    perturb_(model, seed=1)
    ema.update(model)
    for p_ema, p in zip(ema.model.parameters(), model.parameters()):
        assert torch.equal(p_ema, p)


def test_ema_with_decay_one_freezes_the_parameters():
    model = WithBuffer()
    before = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=1.0, warmup=False)
    for seed in range(3):
        perturb_(model, seed)
        ema.update(model)
    assert ema.num_updates == 3
    for p_ema, p0, p in zip(ema.model.parameters(), before, model.parameters()):
        assert torch.equal(p_ema, p0)
        assert not torch.equal(p_ema, p)


def test_ema_copies_buffers_instead_of_averaging_them():
    model = WithBuffer()
    ema = EMA(model, decay=1.0, warmup=False)
    weight_before = model.linear.weight.detach().clone()
    perturb_(model, seed=0)
    model.train()
    model(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) + 5.0)   # moves the running stats
    assert not torch.equal(model.norm.running_mean, ema.model.norm.running_mean)
    ema.update(model)
    assert torch.equal(ema.model.norm.running_mean, model.norm.running_mean)
    assert torch.equal(ema.model.norm.running_var, model.norm.running_var)
    assert torch.equal(ema.model.norm.num_batches_tracked, model.norm.num_batches_tracked)
    assert ema.model.norm.running_mean is not model.norm.running_mean
    # ...while the parameters stay frozen at decay 1.
    assert torch.equal(ema.model.linear.weight, weight_before)


@pytest.mark.parametrize("decay", [0.999, 0.15])
def test_ema_warmup_decay_and_update_follow_the_formula(decay):
    model = WithBuffer()
    ema = EMA(model, decay=decay, warmup=True)
    for n in range(5):
        expected_decay = min(decay, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(expected_decay, rel=1e-12)
        shadow = ema.model.linear.weight.detach().clone()
        perturb_(model, seed=n)
        param = model.linear.weight.detach().clone()
        ema.update(model)
        # shadow <- decay_n * shadow + (1 - decay_n) * param
        torch.testing.assert_close(ema.model.linear.weight, expected_decay * shadow + (1 - expected_decay) * param)
    assert ema.num_updates == 5


def test_ema_without_warmup_uses_the_fixed_decay():
    ema = EMA(WithBuffer(), decay=0.9, warmup=False)
    assert ema.current_decay() == 0.9
    ema.update(WithBuffer())
    assert ema.current_decay() == 0.9


def test_ema_refuses_a_model_with_other_parameters():
    ema = EMA(WithBuffer(), decay=0.5)
    with pytest.raises(ValueError, match="parameter"):
        ema.update(nn.Linear(3, 4))


# ----------------------------------------------------------------------------- seeds and data order

def test_derive_seed_is_deterministic_and_differs_across_seeds_and_steps():
    assert derive_seed(0, 5) == derive_seed(0, 5)
    seeds = {derive_seed(seed, step) for seed in range(3) for step in range(50)}
    assert len(seeds) == 150
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_epoch_order_batches_of_one_epoch_are_disjoint_and_cover_the_epoch():
    order = EpochOrder(num_images=50, batch_size=8, seed=3)
    assert order.steps_per_epoch == 6
    batches = [order.batch(step) for step in range(order.steps_per_epoch)]
    assert all(b.shape == (8,) for b in batches)
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == 6 * 8            # disjoint: no index twice
    assert 0 <= int(seen.min()) and int(seen.max()) < 50


def test_epoch_order_next_epoch_has_another_permutation():
    order = EpochOrder(num_images=50, batch_size=8, seed=3)
    epoch0 = torch.cat([order.batch(step) for step in range(6)])
    epoch1 = torch.cat([order.batch(step) for step in range(6, 12)])
    assert len(set(epoch1.tolist())) == 48
    assert not torch.equal(epoch0, epoch1)


def test_epoch_order_batch_depends_only_on_seed_and_step():
    """What resume relies on: a fresh object gives the same batch for the same (seed, step)."""
    order = EpochOrder(num_images=50, batch_size=8, seed=3)
    walked = {step: order.batch(step).clone() for step in range(20)}
    for step in (13, 0, 19, 6):
        assert torch.equal(EpochOrder(50, 8, seed=3).batch(step), walked[step])
    assert not torch.equal(EpochOrder(50, 8, seed=4).batch(13), walked[13])


def test_the_loops_uint8_to_unit_matches_the_data_module():
    images = tiny_data(3, size=(4, 6), channels=3).images
    torch.testing.assert_close(uint8_to_unit(torch.from_numpy(images)), to_tensor(images), rtol=0, atol=0)


def test_the_network_is_fed_rgb_batches_laid_out_as_b_c_h_w(tmp_path, monkeypatch):
    """The images are stored [B, H, W, C]; a permuted view of them has channels-last strides, which the U-Net
    carries through every layer (a bf16 training step about a fifth slower on the CPU than the estimate's)."""
    seen = []
    original = Unet.forward

    def spy(self, x, t, y=None, **kwargs):
        if self.training:
            seen.append(x.is_contiguous())
        return original(self, x, t, y=y, **kwargs)

    monkeypatch.setattr(Unet, "forward", spy)
    config = tiny_config(steps=2)
    config = replace(config, model=replace(config.model, channels=3))
    train(config, tmp_path / "run", data=tiny_data(channels=3), progress=False)
    assert seen == [True, True]


# ----------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[RunConfig, Path]:
    config = tiny_config()
    run_dir = tmp_path_factory.mktemp("train") / "run"
    run_dir.mkdir()
    train(config, run_dir, data=tiny_data(), progress=False)
    return config, run_dir


def test_same_config_gives_bit_identical_checkpoints(base_run, tmp_path):
    config, run_dir = base_run
    train(config, tmp_path, data=tiny_data(), progress=False)
    a, _ = load_checkpoint(run_dir)
    b, _ = load_checkpoint(tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_another_seed_gives_other_weights(base_run, tmp_path):
    _, run_dir = base_run
    train(tiny_config(seed=1), tmp_path, data=tiny_data(), progress=False)
    a, _ = load_checkpoint(run_dir)
    b, _ = load_checkpoint(tmp_path)
    assert not torch.equal(a["model.conv_in.weight"], b["model.conv_in.weight"])
    assert not torch.equal(a["ema.conv_out.weight"], b["ema.conv_out.weight"])


def test_checkpoint_holds_weights_ema_optimizer_and_the_full_config(base_run):
    config, run_dir = base_run
    tensors, meta = load_checkpoint(run_dir)
    assert {name.split(".", 1)[0] for name in tensors} == {"model", "ema", "optim"}
    model_keys = set(build_model(config).state_dict())
    assert set(split_prefix(tensors, "model")) == model_keys
    assert set(split_prefix(tensors, "ema")) == model_keys
    # Adam keeps exp_avg and exp_avg_sq for every parameter.
    num_params = len(list(build_model(config).parameters()))
    optim = split_prefix(tensors, "optim")
    assert {k.split(".", 1)[1] for k in optim} >= {"exp_avg", "exp_avg_sq"}
    assert len({k.split(".", 1)[0] for k in optim}) == num_params
    # Three updates with warm-up (decay 0.1, 0.18, 0.25) leave the average behind the raw weights.
    assert not torch.equal(tensors["model.conv_out.weight"], tensors["ema.conv_out.weight"])
    assert meta["step"] == 3 and meta["ema_updates"] == 3 and meta["num_images"] == 16
    # The run records the precision "auto" resolved to (fp32: the suite sets DDPM_PRECISION=fp32).
    recorded = config.to_dict()
    recorded["train"]["precision"] = "fp32" if config.train.precision == "auto" else config.train.precision
    assert RunConfig.from_dict(meta["config"]).to_dict() == recorded
    assert json.loads((run_dir / "config.json").read_text()) == recorded
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert (run_dir / "samples.png").read_bytes() == (run_dir / "samples" / "step-0000003.png").read_bytes()


_ORIGINAL_LOSSES = SimpleLoss.losses


def _record_training_images(monkeypatch, config: RunConfig, data: ImageData, run_dir: Path) -> torch.Tensor:
    """Train and return every batch of images the diffusion loss received (mapped back to [0, 1])."""
    seen = []

    def spy(self, net, x0, *args, **kwargs):
        seen.append((x0.detach().clone() + 1) / 2)
        return _ORIGINAL_LOSSES(self, net, x0, *args, **kwargs)

    monkeypatch.setattr(SimpleLoss, "losses", spy)
    train(config, run_dir, data=data, progress=False)
    return torch.cat(seen)


def test_hflip_feeds_both_orientations(monkeypatch, tmp_path):
    image = np.zeros((8, 8, 1), np.uint8)
    image[:, :3] = 255                                   # bright left edge: not mirror-symmetric
    data = ImageData(np.repeat(image[None], 8, axis=0), None, "asymmetric")
    original = to_tensor(image[None])[0]
    flipped = original.flip(-1)

    config = tiny_config(steps=2)
    config.data = DataConfig(hflip=True)
    seen = _record_training_images(monkeypatch, config, data, tmp_path / "flip")
    is_original = torch.tensor([torch.equal(x, original) for x in seen])
    is_flipped = torch.tensor([torch.equal(x, flipped) for x in seen])
    assert len(seen) == 16
    assert bool((is_original | is_flipped).all())            # nothing but the two orientations
    assert bool(is_original.any()) and bool(is_flipped.any())
    assert json.loads((tmp_path / "flip" / "config.json").read_text())["data"]["hflip"] is True

    seen = _record_training_images(monkeypatch, tiny_config(steps=2), data, tmp_path / "plain")
    assert all(torch.equal(x, original) for x in seen)


# ----------------------------------------------------------------------------- run directories

def test_new_run_dir_numbers_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert new_run_dir() == Path("runs/001")
    assert prepare_run_dir(None) == Path("runs/001") and Path("runs/001").is_dir()
    assert new_run_dir() == Path("runs/002")
    (tmp_path / "runs" / "007").mkdir()
    (tmp_path / "runs" / "notes").mkdir()
    assert new_run_dir() == Path("runs/008")
    assert new_run_dir(tmp_path / "elsewhere") == tmp_path / "elsewhere" / "001"


def test_prepare_run_dir_refuses_a_non_empty_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_run_dir(run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_run_dir(run_dir / "keep.txt")


def test_prepare_run_dir_accepts_an_empty_or_missing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty") == tmp_path / "empty"
    assert prepare_run_dir(tmp_path / "a" / "b").is_dir()


# ----------------------------------------------------------------------------- data checks

@pytest.mark.parametrize("size, channels", [((8, 8), 3), ((16, 16), 1), ((8, 16), 1)])
def test_check_training_data_refuses_images_the_model_does_not_take(size, channels):
    with pytest.raises(DataError, match="--image-size"):
        check_training_data(tiny_config(), tiny_data(16, size=size, channels=channels))


def test_check_training_data_refuses_fewer_images_than_a_batch():
    with pytest.raises(DataError, match="batch size"):
        check_training_data(tiny_config(batch_size=8), tiny_data(7))
    check_training_data(tiny_config(batch_size=8), tiny_data(8))      # exactly one batch is enough


def test_train_checks_the_data_before_writing_anything(tmp_path):
    with pytest.raises(DataError):
        train(tiny_config(), tmp_path, data=tiny_data(16, channels=3), progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("cls, option, value, phrase", [
    (TrainConfig, "steps", 0, "steps"),
    (TrainConfig, "batch_size", 0, "batch size"),
    (TrainConfig, "num_samples", -1, "num samples"),
    (TrainConfig, "log_every", 0, "log every"),
    (TrainConfig, "checkpoint_every", -1, "checkpoint every"),
    (TrainConfig, "sample_every", -2, "sample every"),
    (TrainConfig, "lr", -1, "learning rate"),
    (TrainConfig, "lr", 0.0, "learning rate"),
    (TrainConfig, "lr", float("nan"), "learning rate"),
    (TrainConfig, "grad_clip", -1.0, "gradient clipping"),
    (TrainConfig, "ema_decay", 1.5, "EMA decay"),
    (TrainConfig, "ema_decay", -0.1, "EMA decay"),
    (TrainConfig, "device", "tpu", "device"),
    (DiffusionConfig, "timesteps", 1, "timesteps"),
    (DiffusionConfig, "timesteps", 10.5, "timesteps"),
    (DiffusionConfig, "schedule", "quadratic", "schedule"),
    (DiffusionConfig, "objective", "score", "objective"),
    (DiffusionConfig, "loss_weighting", "snr", "loss weighting"),
    (DiffusionConfig, "variance", "learned", "variance"),
    (DiffusionConfig, "min_snr_gamma", 0.0, "min_snr_gamma"),
    (DataConfig, "split", "val", "split"),
    (DataConfig, "channels", 2, "channels"),
    (DataConfig, "image_size", (0, 8), "image size"),
    (DataConfig, "image_size", (8, 8, 8), "image size"),
])
def test_invalid_config_value_names_the_option(cls, option, value, phrase):
    with pytest.raises(ConfigError) as info:
        cls(**{option: value})
    message = str(info.value)
    assert phrase in message and repr(value) in message, message


def test_valid_config_values_are_accepted():
    TrainConfig(ema_decay=0.0, grad_clip=0.0, sample_every=0, checkpoint_every=0, device="cuda:1")
    DiffusionConfig(timesteps=2, schedule="cosine", objective="v", loss_weighting="min-snr", variance="beta")
    assert DataConfig(image_size=12).image_size == (12, 12)
    assert DataConfig(image_size=[8, 16], channels=4, split="test").image_size == (8, 16)


def test_run_config_round_trips_through_a_dict():
    config = RunConfig(preset="digits", model=preset_config("digits", image_size=(8, 16), channels=3),
                       diffusion=DiffusionConfig(timesteps=7, schedule="cosine", objective="x0"),
                       data=DataConfig(name="x.npz", image_size=(8, 16), channels=3, hflip=True),
                       train=TrainConfig(steps=5, lr=3e-4, seed=9, device="cpu"))
    d = json.loads(json.dumps(config.to_dict()))          # as it is stored: through JSON
    again = RunConfig.from_dict(d)
    assert again.to_dict() == config.to_dict()
    assert again.model.image_size == (8, 16) and again.data.image_size == (8, 16)


@pytest.mark.parametrize("change, phrase", [
    (lambda d: d.update(optimizer={}), "optimizer"),
    (lambda d: d["train"].update(stpes=3), "stpes"),
    (lambda d: d["diffusion"].update(beta_max=0.02), "beta_max"),
    (lambda d: d["data"].update(shuffle=True), "shuffle"),
    (lambda d: d["model"].update(width=3), "width"),
    (lambda d: d.pop("model"), "model"),
    (lambda d: d.update(train=3), "train"),
    (lambda d: d["train"].update(lr="fast"), "learning rate"),
])
def test_run_config_from_dict_rejects_unknown_or_malformed_entries(change, phrase):
    d = tiny_config().to_dict()
    change(d)
    with pytest.raises(ConfigError, match=phrase):
        RunConfig.from_dict(d)


# ----------------------------------------------------------------------------- devices

def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert select_device("auto") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            select_device("cuda")
        with pytest.raises(ConfigError, match="CUDA"):
            select_device("cuda:7")
    for name in ("tpu", "cuda:abc"):
        with pytest.raises(ConfigError, match="device"):
            select_device(name)


# ----------------------------------------------------------------------------- the Python API

def tiny_unet(image_size) -> ddpm.Unet:
    return ddpm.Unet(image_size=image_size, channels=1, dim=32, dim_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), dropout=0.0, norm_groups=8)


@pytest.mark.parametrize("image_size", [8, (8, 16)])
def test_python_api_loss_gradient_and_sample(image_size):
    torch.manual_seed(0)
    model = tiny_unet(image_size)
    diffusion = ddpm.GaussianDiffusion(model, image_size=image_size, channels=1, timesteps=50)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = torch.rand(4, 1, h, w, generator=torch.Generator().manual_seed(1))

    loss = diffusion(images)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.conv_out.weight.grad.abs().sum() > 0
    # The output layer starts at zero; after one step the gradient reaches the input layer too.
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    diffusion(images).backward()
    assert model.conv_in.weight.grad.abs().sum() > 0

    samples = diffusion.sample(batch_size=4, progress=False)
    assert samples.shape == (4, 1, h, w)
    assert float(((samples > 0) & (samples < 1)).float().mean()) > 0.5     # the output is clamped: not saturated


def test_python_api_refuses_images_of_the_wrong_shape():
    diffusion = ddpm.GaussianDiffusion(tiny_unet(8), image_size=8, channels=1, timesteps=50)
    with pytest.raises(ConfigError, match="shape"):
        diffusion(torch.rand(2, 1, 8, 16))
