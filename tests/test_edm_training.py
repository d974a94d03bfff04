"""``ddpm train --formulation edm`` end to end on tiny models: EDM's loss reaches the network through
c_noise = ln(sigma) / 4, the options without meaning there are refused one by one, the checkpoint is
sampled with EDM's denoiser and a sigma sampler, resume is bit for bit, and what cannot take an EDM
model says so in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddpm import samplers
from ddpm.checkpoint import load_checkpoint
from ddpm.cli import main
from ddpm.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from ddpm.data import load_dataset
from ddpm.edm import EDMLoss, EDMDenoiser
from ddpm.errors import ConfigError
from ddpm.gaussian_diffusion import GaussianDiffusion
from ddpm.losses import SimpleLoss, make_loss
from ddpm.models import Unet, preset_config
from ddpm.resolve import merge_over_recipe
from ddpm.train import train
from test_cli_sigma_samplers import one_line_error

TINY = ["--dim", "8", "--num-res-blocks", "1"]
EDM = ["--formulation", "edm", "--sigma-data", "0.4", "--p-mean", "-1.0", "--p-std", "1.1", "--sigma-max", "40"]


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("edm") / "run"
    assert main(["train", *EDM, "--steps", "2", "--batch-size", "4", "--num-images", "1", "--quiet", *TINY,
                 "--out", str(run)]) == 0
    return run


def test_the_config_is_saved_and_read_back(edm_run):
    saved = json.loads((edm_run / "config.json").read_text())["diffusion"]
    assert {k: saved[k] for k in ("formulation", "sigma_data", "p_mean", "p_std", "sigma_min", "sigma_max")} == {
        "formulation": "edm", "sigma_data": 0.4, "p_mean": -1.0, "p_std": 1.1, "sigma_min": 0.002, "sigma_max": 40.0}
    _, meta = load_checkpoint(edm_run)
    config = RunConfig.from_dict(meta["config"])
    assert (config.diffusion.formulation, config.diffusion.sigma_data, config.diffusion.sigma_max) == ("edm", 0.4, 40.0)
    assert "formulation" not in RunConfig.for_preset("digits").to_dict()["diffusion"]   # ddpm files as before


def test_the_loss_is_edms_and_the_network_sees_c_noise():
    config = DiffusionConfig(formulation="edm", sigma_data=0.4)
    loss = make_loss(config, None)
    assert isinstance(loss, EDMLoss) and loss.sigma_data == 0.4
    assert isinstance(make_loss(DiffusionConfig(timesteps=50), GaussianDiffusion(
        Unet.from_preset("digits"), image_size=8, channels=1, timesteps=50).schedule), SimpleLoss)
    torch.manual_seed(0)
    model = Unet.from_preset("digits")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    diffusion = GaussianDiffusion(model, image_size=8, channels=1, config=config)
    sigma = torch.tensor([0.1, 2.0])
    x0, noise = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    got = diffusion(x0, t=sigma, noise=noise, reduction="none")
    torch.testing.assert_close(seen[0], sigma.log() / 4)                           # c_noise, EDM Table 1
    expected = loss.losses(model, x0 * 2 - 1, sigma, noise)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("flags, word", [
    (["--timesteps", "100"], "--timesteps"), (["--schedule", "cosine"], "--schedule"),
    (["--variance", "learned-range", "--loss", "hybrid"], "--variance"), (["--loss", "vlb"], "--loss"),
    (["--objective", "v"], "--objective"), (["--loss-weighting", "min-snr"], "--loss-weighting"),
    (["--timestep-sampling", "importance", "--loss", "vlb"], "--loss"), (["--self-condition"], "--self-condition"),
    (["--offset-noise", "0.1"], "--offset-noise")])
def test_options_without_meaning_are_refused(flags, word, tmp_path, capsys):
    message = one_line_error(capsys, ["train", "--formulation", "edm", *flags, "--steps", "1", "--quiet",
                                      "--out", str(tmp_path / "r")])
    assert word in message and "edm" in message
    assert not (tmp_path / "r").exists()


def test_edm_options_need_edm_and_the_recipe_gives_way(capsys, tmp_path):
    assert "--sigma-data applies to --formulation edm" in one_line_error(
        capsys, ["train", "--sigma-data", "0.3", "--steps", "1", "--out", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match="sigma_min"):
        DiffusionConfig(formulation="edm", sigma_min=5.0, sigma_max=1.0)
    merged = merge_over_recipe("mnist", {"diffusion": {"formulation": "edm"}})
    assert merged["diffusion"] == {"formulation": "edm"} and merged["train"]["lr"] == 1e-3   # no min-snr
    toml = tmp_path / "edm.toml"
    toml.write_text('[diffusion]\nformulation = "edm"\np_std = 1.5\n')
    from ddpm.resolve import load_toml
    assert load_toml(str(toml))["diffusion"] == {"formulation": "edm", "p_std": 1.5}


def test_sample_uses_edms_denoiser_over_karras_levels(edm_run, tmp_path, monkeypatch):
    calls = []
    heun = samplers.SAMPLERS["heun"]
    monkeypatch.setitem(samplers.SAMPLERS, "heun", lambda *a, **k: calls.append(a) or heun(*a, **k))
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(edm_run), "--num-images", "2", "--steps", "3", "--quiet",
                 "--out", str(out)]) == 0
    (denoiser, _, _, levels), = calls
    denoiser = denoiser.wrapped                  # the driver's stop check around EDM's denoiser
    assert isinstance(denoiser, EDMDenoiser) and denoiser.sigma_data == 0.4
    assert levels == samplers.karras_sigmas(3, 0.002, 40.0)
    record = json.loads((out / "record.json").read_text())
    assert (record["sampler"], record["spacing"], record["steps"], record["timesteps"]) == ("heun", "karras", 3, None)
    assert main(["sample", "--checkpoint", str(edm_run), "--num-images", "1", "--sampler", "euler", "--steps", "2",
                 "--quiet", "--out", str(tmp_path / "e")]) == 0               # a sigma sampler named alone: karras
    assert json.loads((tmp_path / "e" / "record.json").read_text())["spacing"] == "karras"


def test_what_cannot_take_an_edm_model_says_so(edm_run, tmp_path, capsys):
    sample = ["sample", "--checkpoint", str(edm_run), "--quiet", "--out", str(tmp_path / "s")]
    assert "sigma sampler" in one_line_error(capsys, [*sample, "--sampler", "ddim"])
    assert "karras" in one_line_error(capsys, [*sample, "--sampler", "euler", "--spacing", "trailing"])
    assert "EDM" in one_line_error(capsys, ["edit", "--checkpoint", str(edm_run), "--image", "digits:3",
                                            "--strength", "0.5", "--out", str(tmp_path / "e")])
    assert "EDM" in one_line_error(capsys, ["export", "--checkpoint", str(edm_run), "--out", str(tmp_path / "x")])
    assert "EDM" in one_line_error(capsys, ["distill", "--checkpoint", str(edm_run), "--rounds", "1",
                                            "--out", str(tmp_path / "d")])
    assert "bpd-ode" in one_line_error(capsys, ["eval", "--checkpoint", str(edm_run), "--metric", "bpd",
                                                "--data", "digits", "--num-images", "2"])
    assert not any((tmp_path / name).exists() for name in ("s", "e", "x", "d"))


def test_resume_is_bit_for_bit(tmp_path):
    digits = load_dataset("digits")

    def config(steps):
        return RunConfig(preset="digits", model=preset_config("digits", dim=8, num_res_blocks=1, dropout=0.1),
                         diffusion=DiffusionConfig(formulation="edm"), data=DataConfig(hflip=True),
                         train=TrainConfig(steps=steps, batch_size=4, num_samples=1, log_every=1, checkpoint_every=2,
                                           sample_every=0, keep_last=0))
    train(config(4), tmp_path / "straight", data=digits, progress=False)
    train(config(2), tmp_path / "resumed", data=digits, progress=False)
    train(config(4), tmp_path / "resumed", data=digits, resume=True, progress=False)
    a, b = load_checkpoint(tmp_path / "straight")[0], load_checkpoint(tmp_path / "resumed")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], load_checkpoint(tmp_path / "resumed" / "checkpoints" /
                                                     "step-0000002.safetensors")[0][k]) for k in a)
