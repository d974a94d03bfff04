"""The lucidrains-compatible API (``ddpm.compat.lucidrains``): its names, on this project's machinery."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import ddpm
from ddpm.checkpoint import load_checkpoint
from ddpm.cli import main
from ddpm.compat.lucidrains import ArgumentError, GaussianDiffusion, Trainer, Unet
from ddpm.sampling import sample_images
from ddpm.samplers import SamplingOptions

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from photos import make_photo_folder  # noqa: E402


def _seeded(make, seed: int = 0):
    torch.manual_seed(seed)
    model = make()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                  # give the zero-initialised layers weights, so every path counts
        for m in model.modules():
            if getattr(m, "zero_init", False):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
    return model.eval()


def _readme_demo(image_size: int) -> None:
    """lucidrains' README example as written there, with few sampling steps to keep it cheap."""
    model = Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)
    diffusion = GaussianDiffusion(model, image_size=image_size, timesteps=1000, sampling_timesteps=2)
    training_images = torch.rand(8, 3, image_size, image_size)
    loss = diffusion(training_images)
    loss.backward()
    sampled_images = diffusion.sample(batch_size=4)
    assert sampled_images.shape == (4, 3, image_size, image_size)
    assert torch.isfinite(loss) and model.conv_out.weight.grad.abs().sum() > 0
    assert model.image_size is None and model.config.attention_levels == (3,)   # full attention innermost


def test_the_readme_demo_runs_as_written_at_32():
    _readme_demo(32)


@pytest.mark.slow
def test_the_readme_demo_runs_as_written_at_128():
    _readme_demo(128)


@pytest.mark.parametrize("size, channels", [((16, 16), 3), ((8, 24), 1), ((32, 16), 4)])
def test_the_unet_runs_at_any_multiple_of_its_downsample_factor(size, channels):
    model = _seeded(lambda: Unet(dim=16, dim_mults=(1, 2, 4), channels=channels))
    x = torch.randn(2, channels, *size)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 9])).shape == x.shape


def test_lucidrains_names_build_the_projects_own_network():
    """Same weights and same output as ddpm.Unet under the project's names."""
    ours = _seeded(lambda: ddpm.Unet(image_size=None, channels=1, dim=16, dim_mults=(1, 2), num_res_blocks=2,
                                     attention_levels=(1,), attention_heads=2, norm_groups=16, dropout=0.1))
    theirs = _seeded(lambda: Unet(dim=16, dim_mults=(1, 2), channels=1, full_attn=(False, True), attn_heads=2,
                                  dropout=0.1))
    assert theirs.config == ours.config
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([4, 700])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t), ours(x, t), rtol=0, atol=0)


def test_self_condition_and_learned_variance_shape_the_network_and_are_kept_for_the_diffusion():
    model = Unet(dim=16, dim_mults=(1, 2), channels=3, self_condition=True, learned_variance=True)
    assert (model.in_channels, model.out_dim, model.config.out_channels) == (6, 6, 6)
    assert model.self_condition and model.learned_variance
    assert model(torch.randn(1, 6, 8, 8), torch.tensor([1])).shape == (1, 6, 8, 8)
    plain = Unet(dim=16, dim_mults=(1, 2), channels=3)
    assert (plain.in_channels, plain.out_dim) == (3, 3) and not plain.self_condition


def test_flash_attn_and_the_projects_own_options_are_accepted():
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([2])
    with torch.no_grad():
        flash = _seeded(lambda: Unet(dim=16, dim_mults=(1, 2), flash_attn=True))(x, t)
        plain = _seeded(lambda: Unet(dim=16, dim_mults=(1, 2), flash_attn=False))(x, t)
    torch.testing.assert_close(flash, plain, rtol=0, atol=0)      # one attention kernel either way
    model = Unet(dim=16, dim_mults=(1, 2), num_res_blocks=1, attention_levels=(0, 1), norm_groups=8,
                 learned_sinusoidal_cond=False, sinusoidal_pos_emb_theta=10000, init_dim=16, out_dim=3)
    assert (model.config.num_res_blocks, model.config.attention_levels, model.config.norm_groups) == (1, (0, 1), 8)
    assert Unet(dim=24, dim_mults=(1, 2)).config.norm_groups == 8  # the largest power of two <= 32 dividing dim
    assert Unet(dim=16, dim_mults=(1, 2, 4), full_attn=True).config.attention_levels == (0, 1, 2)


@pytest.mark.parametrize("options, phrase", [
    (dict(dim_mult=(1, 2)), "did you mean 'dim_mults'"),
    (dict(self_conditioning=True), "did you mean 'self_condition'"),
    (dict(attn_dim_head=32), "nearest: attn_heads"),
    (dict(learned_sinusoidal_cond=True), "fixed sinusoid"),
    (dict(random_fourier_features=True), "fixed sinusoid"),
    (dict(sinusoidal_pos_emb_theta=500), "10000"),
    (dict(init_dim=32), "nearest: dim"),
    (dict(out_dim=6), "nearest: learned_variance"),
    (dict(full_attn=(True,)), "one per level"),
    (dict(attn_heads=(1, 2)), "same number of heads"),
    (dict(full_attn=(False, True), attention_levels=(1,)), "give one of them"),
    (dict(image_size=32), "GaussianDiffusion"),
    (dict(attention_resolutions=(4,)), "attention_levels"),
    (dict(flash_attn="yes"), "True or False"),
])
def test_arguments_without_an_equivalent_are_errors_naming_the_nearest(options, phrase):
    with pytest.raises(ArgumentError, match=phrase) as caught:
        Unet(dim=16, dim_mults=(1, 2), **options)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, ddpm.ConfigError)


# ----------------------------------------------------------------------------- GaussianDiffusion

def _small(**options):
    return _seeded(lambda: Unet(dim=16, dim_mults=(1, 2), channels=1, **options)).train()


def _loss(diffusion, images) -> float:
    return diffusion(images, generator=torch.Generator().manual_seed(5)).item()


IMAGES = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("theirs, ours", [
    (dict(objective="pred_noise", beta_schedule="linear"), dict(objective="eps", schedule="linear")),
    (dict(objective="pred_x0", beta_schedule="cosine"), dict(objective="x0", schedule="cosine")),
    (dict(objective="pred_v", beta_schedule="sigmoid"), dict(objective="v", schedule="sigmoid")),
    (dict(), dict(objective="v", schedule="sigmoid")),                        # their defaults
    (dict(offset_noise_strength=0.3), dict(objective="v", schedule="sigmoid", offset_noise=0.3)),
    (dict(min_snr_loss_weight=True, min_snr_gamma=2), dict(objective="v", schedule="sigmoid",
                                                          loss_weighting="min-snr", min_snr_gamma=2)),
])
def test_each_alias_gives_the_loss_of_the_projects_own_name(theirs, ours):
    model = _small()
    compat = _loss(GaussianDiffusion(model, image_size=8, timesteps=100, **theirs), IMAGES)
    assert compat == _loss(ddpm.GaussianDiffusion(model, image_size=8, timesteps=100, **ours), IMAGES)


def test_the_aliases_change_the_loss():
    """The comparison above can fail: each alias moves the loss away from the defaults'."""
    model = _small()
    base = _loss(GaussianDiffusion(model, image_size=8, timesteps=100), IMAGES)
    for options in (dict(objective="pred_noise"), dict(beta_schedule="linear"), dict(offset_noise_strength=0.3),
                    dict(min_snr_loss_weight=True)):
        assert _loss(GaussianDiffusion(model, image_size=8, timesteps=100, **options), IMAGES) != base


def test_auto_normalize_false_takes_images_in_minus_one_to_one():
    model = _small()
    compat = GaussianDiffusion(model, image_size=8, timesteps=100, auto_normalize=False)
    ours = ddpm.GaussianDiffusion(model, image_size=8, timesteps=100, objective="v", schedule="sigmoid")
    assert _loss(compat, IMAGES * 2 - 1) == pytest.approx(_loss(ours, IMAGES), rel=1e-6)


def test_self_condition_and_learned_variance_are_read_from_the_model():
    model = _small(self_condition=True, learned_variance=True)
    compat = GaussianDiffusion(model, image_size=8, timesteps=100, objective="pred_noise", beta_schedule="linear")
    assert compat.self_condition and compat.variance == "learned-range" and compat.config.loss == "hybrid"
    ours = ddpm.GaussianDiffusion(model, image_size=8, timesteps=100, self_condition=True,
                                  variance="learned-range", loss="hybrid")
    assert _loss(compat, IMAGES) == _loss(ours, IMAGES)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sampling_timesteps_below_t_is_ddim_with_their_eta(eta):
    model = _small().eval()
    compat = GaussianDiffusion(model, image_size=8, timesteps=100, sampling_timesteps=4, ddim_sampling_eta=eta)
    assert compat.is_ddim_sampling and compat.num_timesteps == 100
    torch.manual_seed(7)
    seed = int(torch.randint(2 ** 62, (1,)))                     # the draw compat.sample makes
    torch.manual_seed(7)
    got = compat.sample(batch_size=2, progress=False)
    ddim = SamplingOptions(sampler="ddim", steps=4, eta=eta)
    torch.testing.assert_close(got, sample_images(compat, [0, 1], seed=seed, sampling=ddim), rtol=0, atol=0)
    full = GaussianDiffusion(model, image_size=8, timesteps=100)
    assert not full.is_ddim_sampling and full.sampling_options().sampler == "ddpm"


@pytest.mark.parametrize("options, phrase", [
    (dict(objective="eps"), "pred_noise, pred_x0, pred_v"),
    (dict(beta_schedul="linear"), "did you mean 'beta_schedule'"),
    (dict(immiscible=True), "no equivalent"),
    (dict(schedule_fn_kwargs=dict(tau=2)), "nearest: beta_schedule"),
    (dict(sampling_timesteps=101), "between 1 and timesteps"),
])
def test_diffusion_arguments_without_an_equivalent_are_errors(options, phrase):
    with pytest.raises(ddpm.ConfigError, match=phrase):
        GaussianDiffusion(_small(), image_size=8, timesteps=100, **options)


# ----------------------------------------------------------------------------- Trainer

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("trainer") / "photos", crops_per_photo=6)


def _trainer(folder: Path, results: Path, steps: int, **options) -> Trainer:
    torch.manual_seed(0)                              # the Unet's initial weights, which training starts from
    model = Unet(dim=16, dim_mults=(1, 2))
    diffusion = GaussianDiffusion(model, image_size=16, timesteps=100, sampling_timesteps=3)
    options.setdefault("calculate_fid", False)        # an installed Inception would score 50,000 samples a save
    return Trainer(diffusion, str(folder), train_batch_size=4, train_num_steps=steps, save_and_sample_every=2,
                   num_samples=4, results_folder=results, **options)


def test_the_trainer_runs_the_projects_loop_and_its_run_samples_from_the_cli(folder, tmp_path, capsys, monkeypatch):
    import ddpm.evaluation

    monkeypatch.setattr(ddpm.evaluation, "find_inception", lambda *a, **k: None)   # the no-Inception path
    trainer = _trainer(folder, tmp_path / "results", 4, train_lr=3e-4, ema_decay=0.99, ema_update_every=5,
                       gradient_accumulate_every=2, max_grad_norm=0.5, augment_horizontal_flip=False,
                       calculate_fid=True)
    trainer.train()
    assert "calculate_fid" in capsys.readouterr().err                # no Inception here: one warning
    saved = json.loads((tmp_path / "results" / "config.json").read_text())
    assert saved["data"]["name"] == str(folder) and saved["data"]["hflip"] is False
    train = saved["train"]
    assert (train["steps"], train["batch_size"], train["grad_accum"], train["lr"], train["grad_clip"]) == \
        (4, 4, 2, 3e-4, 0.5)
    assert train["ema_decay"] == pytest.approx(0.99 ** (1 / 5))      # every step, the same horizon
    assert (train["checkpoint_every"], train["sample_every"], train["milestone_every"]) == (2, 2, 2)
    assert saved["sampling"] == {"sampler": "ddim", "steps": 3, "spacing": "trailing", "eta": 0.0, "clip": None}
    assert saved["diffusion"]["objective"] == "v" and saved["diffusion"]["schedule"] == "sigmoid"
    tensors, meta = load_checkpoint(tmp_path / "results")
    assert meta["step"] == 4 and trainer.step == 4
    # The trained weights are in the diffusion (raw) and in trainer.ema.ema_model (EMA), as there.
    torch.testing.assert_close(trainer.model.model.conv_out.weight, tensors["model.conv_out.weight"])
    torch.testing.assert_close(trainer.ema.ema_model.model.conv_out.weight, tensors["ema.conv_out.weight"])
    assert trainer.ema.ema_model.sample(batch_size=2, progress=False).shape == (2, 3, 16, 16)
    trainer.load(1)                                                  # milestone 1 = step 1 x save_and_sample_every
    assert trainer.step == 2
    assert main(["sample", "--checkpoint", str(tmp_path / "results"), "--num-images", "2", "--out", str(tmp_path / "s"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "s" / "record.json").read_text())["sampler"] == "ddim"


def test_adam_betas_reach_the_optimizer(folder, tmp_path, monkeypatch):
    seen = []
    real = torch.optim.Adam

    def spy(params, **options):
        seen.append(options["betas"])
        return real(params, **options)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    _trainer(folder, tmp_path / "r", 1, calculate_fid=False, adam_betas=(0.8, 0.95)).train()
    assert seen == [(0.8, 0.95)]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["adam_betas"] == [0.8, 0.95]


def test_the_trainer_resumes_bit_exactly(folder, tmp_path):
    straight = _trainer(folder, tmp_path / "straight", 4, calculate_fid=False)
    straight.train()
    _trainer(folder, tmp_path / "halves", 2, calculate_fid=False).train()
    second = _trainer(folder, tmp_path / "halves", 4, calculate_fid=False)
    second.train()                                                   # continues the step-2 checkpoint
    a, _ = load_checkpoint(tmp_path / "straight")
    b, _ = load_checkpoint(tmp_path / "halves")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("options, phrase", [
    (dict(train_batch_sze=4), "did you mean 'train_batch_size'"),
    (dict(save_best_and_latest_only=True), "no equivalent"),
    (dict(convert_image_to="L"), "3 channel"),
    (dict(mixed_precision_type="fp8", amp=True), "fp16, bf16, no"),
    (dict(inception_block_idx=768), "2048"),
])
def test_trainer_arguments_without_an_equivalent_are_errors(folder, tmp_path, options, phrase):
    with pytest.raises(ddpm.ConfigError, match=phrase):
        _trainer(folder, tmp_path / "r", 2, **options)


def test_amp_is_the_devices_mixed_precision(folder, tmp_path):
    expected = "fp16" if torch.cuda.is_available() else "bf16"
    assert _trainer(folder, tmp_path / "r", 2, amp=True).config.train.precision == expected
    assert _trainer(folder, tmp_path / "r", 2, amp=True, mixed_precision_type="no").config.train.precision == "fp32"
    assert _trainer(folder, tmp_path / "r", 2).config.train.precision == "fp32"
