"""The training options of issue 3, on tiny CPU runs: failed checkpoint saves, keep-last and
milestones, learning-rate warm-up, gradient accumulation, AdamW and precision, TOML configuration
files and recipes, resume option checks, fine-tuning with --init, gradient checkpointing, the run
directory's files, the loss chart and side-by-side grids, and CIFAR-10 binary batches by name.

(Resume bit-exactness, kill -9, NaN injection and SIGTERM are in test_resume.py.)
"""

from __future__ import annotations

import errno
import inspect
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm.train
import ddpm.train_eval
from ddpm.checkpoint import list_checkpoints, load_checkpoint, split_prefix
from ddpm.cli import main
from ddpm.build import build_model
from ddpm.config import DiffusionConfig, RunConfig, TrainConfig
from ddpm.data import ImageData
from ddpm.data.sources import CIFAR10_RECORD
from ddpm.errors import CheckpointError, ConfigError
from ddpm.images import make_grid, side_by_side
from ddpm.models import Unet, preset_config
from ddpm.plots import line_chart
from ddpm.train import lr_at, train
from ddpm.training_state import init_from

# A tiny but complete CLI run: built-in digits, the digits preset, T = 50, two steps of four images.
TINY = ["--steps", "2", "--batch-size", "4", "--timesteps", "50", "--num-images", "2", "--log-every", "1",
        "--device", "cpu", "--quiet"]
METRIC_KEYS = {"step", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "lr", "images_per_s",
               "bad_steps", "scaler_skips"}


def tiny_config(**train_overrides) -> RunConfig:
    """The digits preset (dropout 0), T = 50, one step of eight images on the CPU."""
    options = dict(steps=1, batch_size=8, num_samples=2, log_every=1, checkpoint_every=0, device="cpu")
    return RunConfig(preset="digits", model=preset_config("digits"), diffusion=DiffusionConfig(timesteps=50),
                     train=TrainConfig(**{**options, **train_overrides}))


def tiny_data(num_images: int = 32, seed: int = 0) -> ImageData:
    rng = np.random.default_rng(seed)
    return ImageData(rng.integers(0, 256, (num_images, 8, 8, 1), dtype=np.uint8), None, "tiny")


def blank_samples(diffusion, n: int, **kwargs) -> np.ndarray:
    """Stands in for ``generate``: the grids are not under test, and sampling is most of a tiny run."""
    return np.zeros((n, *diffusion.image_size, diffusion.channels), np.uint8)


@pytest.fixture
def no_sampling(monkeypatch):
    monkeypatch.setattr(ddpm.train_eval, "generate", blank_samples)


def weights(checkpoint: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    return split_prefix(load_checkpoint(checkpoint)[0], prefix)


def error_line(capsys) -> str:
    """The one line a failed command printed on stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and lines[0].startswith("ddpm: error: "), lines[0]
    return lines[0]


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stale_temporaries(run_dir: Path) -> list[Path]:
    return list(run_dir.rglob(".*.tmp-*"))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A finished two-step CLI run (with real sample grids); tests that change it work on a copy."""
    run_dir = tmp_path_factory.mktemp("options") / "run"
    assert main(["train", *TINY, "--out", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def one_adam_step(tmp_path_factory) -> Path:
    """The checkpoint after one plain Adam step of ``tiny_config()``: the reference for several options."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpm.train_eval, "generate", blank_samples)
        return train(tiny_config(), tmp_path_factory.mktemp("adam") / "run", data=tiny_data(),
                     progress=False).checkpoint


# ----------------------------------------------------------------------------- 1. failed checkpoint saves

@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "No space left on device"),
                                           (errno.EACCES, "Permission denied")])
def test_failed_checkpoint_save_stops_with_a_message_and_keeps_the_previous_one(
        tmp_path, monkeypatch, capsys, no_sampling, code, message):
    real_replace = os.replace
    checkpoint_renames = []

    def replace_failing_on_second_checkpoint(src, dst, *args, **kwargs):
        if str(dst).endswith(".safetensors"):
            checkpoint_renames.append(Path(dst).name)
            if len(checkpoint_renames) == 2:
                raise OSError(code, os.strerror(code))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace_failing_on_second_checkpoint)
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--checkpoint-every", "2", "--out", str(run_dir)]) == 4
    line = error_line(capsys)
    assert message in line and "step-0000004" in line, line
    assert checkpoint_renames == ["step-0000002.safetensors", "step-0000004.safetensors"]
    assert [step for step, _ in list_checkpoints(run_dir)] == [2]
    _, meta = load_checkpoint(run_dir / "checkpoints" / "step-0000002.safetensors")   # checksum verified
    assert meta["step"] == 2
    assert stale_temporaries(run_dir) == []


# ----------------------------------------------------------------------------- 2. keep-last and milestones

def test_keep_last_spares_milestones(tmp_path, no_sampling):
    config = tiny_config(steps=10, batch_size=4, checkpoint_every=1, keep_last=2, milestone_every=4)
    train(config, tmp_path / "run", data=tiny_data(), progress=False)
    # The newest two (9, 10) and the multiples of 4 (4, 8); 1-3 and 5-7 were pruned on the way.
    assert {step for step, _ in list_checkpoints(tmp_path / "run")} == {4, 8, 9, 10}


def test_keep_last_zero_keeps_every_checkpoint(tmp_path, no_sampling):
    train(tiny_config(steps=3, batch_size=4, checkpoint_every=1, keep_last=0), tmp_path / "run",
          data=tiny_data(), progress=False)
    assert {step for step, _ in list_checkpoints(tmp_path / "run")} == {1, 2, 3}


# ----------------------------------------------------------------------------- 3. learning-rate warm-up

def test_lr_at_is_a_linear_warmup_then_constant():
    config = tiny_config(lr=3e-4, warmup_steps=5)
    for step in range(5):
        assert lr_at(config, step) == pytest.approx(3e-4 * (step + 1) / 5, rel=1e-12)
    assert lr_at(config, 4) == 3e-4
    assert [lr_at(config, step) for step in (5, 6, 1000)] == [3e-4] * 3
    assert lr_at(tiny_config(lr=3e-4, warmup_steps=0), 0) == 3e-4


def test_logged_learning_rate_rises_linearly_during_warmup(tmp_path, no_sampling):
    train(tiny_config(steps=5, batch_size=4, lr=1e-3, warmup_steps=3), tmp_path / "run", data=tiny_data(),
          progress=False)
    rows = metrics_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([row["lr"] for row in rows], [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3], rtol=1e-12)


# ----------------------------------------------------------------------------- 4. gradient accumulation

def test_gradient_accumulation_matches_one_full_batch(tmp_path, no_sampling):
    # Without clipping, so that a wrongly scaled gradient shows in Adam's moments (the first Adam
    # step itself, lr * g / (|g| + eps), hardly depends on the gradient's scale).
    # --batch-size is per forward pass: 8 images in one pass, or 2 micro-batches of 4.
    runs = {accum: train(tiny_config(batch_size=8 // accum, grad_accum=accum, grad_clip=0.0),
                         tmp_path / f"accum{accum}", data=tiny_data(), progress=False) for accum in (1, 2)}
    full, accum = (load_checkpoint(runs[n].checkpoint)[0] for n in (1, 2))
    assert full.keys() == accum.keys() and any(name.startswith("optim.") for name in full)
    for name in full:
        torch.testing.assert_close(accum[name], full[name], atol=1e-6, rtol=1e-5, msg=name)
    (row_full,), (row_accum,) = metrics_rows(tmp_path / "accum1"), metrics_rows(tmp_path / "accum2")
    assert row_accum["loss"] == pytest.approx(row_full["loss"], rel=1e-6)
    assert row_accum["grad_norm"] == pytest.approx(row_full["grad_norm"], rel=1e-5)
    # ...and the step did something: the weights moved away from the initial ones.
    torch.manual_seed(0)
    initial = build_model(tiny_config()).state_dict()
    assert any(not torch.equal(full[f"model.{name}"], initial[name]) for name in initial)


def test_the_global_batch_is_the_batch_size_times_grad_accum_and_must_fit_the_data(capsys):
    assert TrainConfig(batch_size=8, grad_accum=3).global_batch_size() == 24
    assert TrainConfig(batch_size=8, grad_accum=3).global_batch_size(world_size=2) == 48
    # The built-in digits have 1,500 images: 3 micro-batches of 500 fill exactly one step, of 501 too many.
    assert main(["train", *TINY, "--batch-size", "500", "--grad-accum", "3", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["batch_size"] == 500
    assert main(["train", *TINY, "--batch-size", "501", "--grad-accum", "3", "--dry-run"]) == 3
    assert "fewer than the global batch 1503" in error_line(capsys)


# ----------------------------------------------------------------------------- 5. optimizer and precision

def test_adamw_decays_weights_decoupled_from_the_adam_step(tmp_path, no_sampling, one_adam_step):
    lr, wd = 1e-3, 0.1
    result = train(tiny_config(optimizer="adamw", weight_decay=wd, lr=lr), tmp_path / "run", data=tiny_data(),
                   progress=False)
    _, meta = load_checkpoint(result.checkpoint)
    assert meta["config"]["train"]["optimizer"] == "adamw"
    assert meta["config"]["train"]["weight_decay"] == wd
    assert meta["optimizer"]["param_groups"][0]["weight_decay"] == wd
    # AdamW's first step: w1 = w0 (1 - lr wd) - lr u, where Adam's is w1 = w0 - lr u (same u).
    torch.manual_seed(0)                               # train() seeds torch before building the model
    initial = build_model(tiny_config()).state_dict()
    adam, adamw = weights(one_adam_step), weights(result.checkpoint)
    assert any(not torch.equal(adamw[name], adam[name]) for name in adam)
    for name in adam:
        torch.testing.assert_close(adam[name] - adamw[name], lr * wd * initial[name], atol=1e-7, rtol=1e-4,
                                   msg=name)


def test_fp16_without_cuda_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="CUDA"):
        train(tiny_config(precision="fp16"), tmp_path / "run", data=tiny_data(), progress=False)
    assert not (tmp_path / "run").exists()


def test_bf16_on_the_cpu_trains_with_a_finite_loss(tmp_path, no_sampling):
    result = train(tiny_config(steps=2, batch_size=4, precision="bf16"), tmp_path / "run", data=tiny_data(),
                   progress=False)
    assert math.isfinite(result.final_loss)
    assert result.counters.step == 2 and result.counters.bad_steps == 0
    assert all(math.isfinite(row["loss"]) for row in metrics_rows(tmp_path / "run"))


# ----------------------------------------------------------------------------- 6. TOML configuration files

def write_toml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


TOML_DIGITS = 'preset = "digits"\n[train]\nsteps = 3\nlr = 0.0005\n[diffusion]\ntimesteps = 50\n'


def dry_run(capsys, *args: str) -> dict:
    assert main(["train", "--device", "cpu", "--dry-run", *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_toml_file_sets_the_configuration_and_flags_override_it(tmp_path, capsys):
    config_file = write_toml(tmp_path / "run.toml", TOML_DIGITS)
    config = dry_run(capsys, "--config", config_file)
    assert config["preset"] == "digits"
    assert (config["train"]["steps"], config["train"]["lr"], config["diffusion"]["timesteps"]) == (3, 0.0005, 50)
    config = dry_run(capsys, "--config", config_file, "--lr", "0.0002")
    assert (config["train"]["steps"], config["train"]["lr"]) == (3, 0.0002)


@pytest.fixture
def random_cifar_npz(tmp_path) -> str:
    path = tmp_path / "images.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (128, 32, 32, 3), dtype=np.uint8))
    return str(path)


def test_preset_recipe_is_the_papers_cifar10_run(capsys, random_cifar_npz):
    config = dry_run(capsys, "--preset", "cifar10", "--data", random_cifar_npz)
    t = config["train"]
    assert (t["batch_size"], t["lr"], t["warmup_steps"], t["steps"], t["ema_decay"]) == (128, 2e-4, 5000, 800_000,
                                                                                           0.9999)
    assert config["data"]["hflip"] is True
    assert config["model"]["dropout"] == 0.1


@pytest.fixture
def random_28px_npz(tmp_path) -> str:
    path = tmp_path / "gray28.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (128, 28, 28), dtype=np.uint8))
    return str(path)


@pytest.mark.parametrize("preset", [["--preset", "mnist"], []], ids=["mnist-preset", "chosen-for-the-data"])
def test_the_mnist_recipe_weights_the_loss_by_min_snr_unless_told_otherwise(capsys, random_28px_npz, preset):
    config = dry_run(capsys, *preset, "--data", random_28px_npz)
    assert config["preset"] == "mnist"
    assert (config["diffusion"]["loss_weighting"], config["diffusion"]["min_snr_gamma"]) == ("min-snr", 5.0)
    config = dry_run(capsys, *preset, "--data", random_28px_npz, "--loss-weighting", "uniform")
    assert config["diffusion"]["loss_weighting"] == "uniform"
    # L_vlb alone has no mean squared error to weight: the recipe's weighting gives way to it...
    config = dry_run(capsys, *preset, "--data", random_28px_npz, "--loss", "vlb")
    assert (config["diffusion"]["loss"], config["diffusion"]["loss_weighting"]) == ("vlb", "uniform")
    # ...while asking for both is still refused.
    assert main(["train", "--device", "cpu", "--dry-run", *preset, "--data", random_28px_npz, "--loss", "vlb",
                 "--loss-weighting", "min-snr"]) == 2
    assert "loss weighting" in capsys.readouterr().err
    # The other presets keep the paper's uniform L_simple.
    assert dry_run(capsys, "--preset", "digits", "--data", random_28px_npz)["diffusion"]["loss_weighting"] == "uniform"


def test_toml_overrides_the_recipe_and_flags_override_both(tmp_path, capsys, random_cifar_npz):
    config_file = write_toml(tmp_path / "c.toml", "[train]\nlr = 0.0001\nwarmup_steps = 10\n[data]\nhflip = false\n")
    config = dry_run(capsys, "--preset", "cifar10", "--data", random_cifar_npz, "--config", config_file)
    assert (config["train"]["lr"], config["train"]["warmup_steps"], config["data"]["hflip"]) == (1e-4, 10, False)
    assert config["train"]["batch_size"] == 128                      # still the recipe's
    config = dry_run(capsys, "--preset", "cifar10", "--data", random_cifar_npz, "--config", config_file,
                     "--warmup-steps", "7", "--hflip")
    assert (config["train"]["lr"], config["train"]["warmup_steps"], config["data"]["hflip"]) == (1e-4, 7, True)


@pytest.mark.parametrize("text, phrase", [
    ('preset = "digits"\nbogus = 1\n', "bogus"),
    ("[train]\nbogus_option = 1\n", "bogus_option"),
    ("[train\nsteps = 3\n", "cannot read"),
    ("[model]\nimage_size = 8\n", "image_size"),
    ("[model]\nchannels = 3\n", "channels"),
    ("[train]\nlr = -1.0\n", "learning rate"),
    ("train = 5\n", "train"),
    ("data = 5\n", "data"),
    ("model = 5\n", "model"),
    ('preset = ["digits"]\n', "preset"),
    ('preset = "digits"\n[data]\nname = 5\n', "name"),
])
def test_bad_toml_file_is_one_line_and_exit_2(tmp_path, capsys, text, phrase):
    config_file = write_toml(tmp_path / "bad.toml", text)
    assert main(["train", *TINY, "--config", config_file, "--dry-run"]) == 2
    assert phrase in error_line(capsys)


def test_missing_toml_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", *TINY, "--config", str(tmp_path / "missing.toml"), "--dry-run"]) == 2
    assert "missing.toml" in error_line(capsys)


def test_config_with_resume_is_refused(tmp_path, capsys, cli_run):
    config_file = write_toml(tmp_path / "run.toml", TOML_DIGITS)
    assert main(["train", "--resume", str(cli_run), "--steps", "4", "--config", config_file, "--dry-run"]) == 2
    assert "--config" in error_line(capsys)


# ----------------------------------------------------------------------------- 7. resuming through the CLI

def test_resume_extends_the_run_without_duplicate_metrics(tmp_path, no_sampling, cli_run):
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run, run_dir)
    assert main(["train", "--resume", str(run_dir), "--steps", "4", "--quiet"]) == 0
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]
    assert load_checkpoint(run_dir / "checkpoints" / "step-0000004.safetensors")[1]["step"] == 4
    assert [row["step"] for row in metrics_rows(run_dir)] == [1, 2, 3, 4]
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 4
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert [entry["event"] for entry in provenance] == ["start", "resume from step 2"]


def test_resume_accepts_repeated_flags_with_the_saved_values(capsys, cli_run):
    config = dry_run(capsys, "--resume", str(cli_run), "--steps", "4", "--lr", "0.001", "--batch-size", "4",
                     "--timesteps", "50", "--preset", "digits", "--data", "digits")
    assert (config["train"]["steps"], config["train"]["lr"], config["train"]["batch_size"]) == (4, 1e-3, 4)


@pytest.mark.parametrize("flag", [["--lr", "0.5"], ["--batch-size", "8"], ["--timesteps", "100"], ["--hflip"],
                                  ["--optimizer", "adamw"]])
def test_resume_refuses_a_flag_that_differs_from_the_saved_value(capsys, cli_run, flag):
    assert main(["train", "--resume", str(cli_run), "--steps", "4", *flag, "--dry-run"]) == 2
    assert flag[0] in error_line(capsys)


def test_resume_of_a_finished_run_needs_more_steps(capsys, cli_run):
    assert main(["train", "--resume", str(cli_run), "--quiet"]) == 2
    assert "already at step 2" in error_line(capsys)
    assert main(["train", "--resume", str(cli_run), "--steps", "2", "--quiet"]) == 2
    assert "already at step 2" in error_line(capsys)


@pytest.mark.parametrize("make_dir", [True, False], ids=["empty", "missing"])
def test_resume_without_a_checkpoint_is_a_checkpoint_error(tmp_path, capsys, make_dir):
    run_dir = tmp_path / "run"
    if make_dir:
        run_dir.mkdir()
    assert main(["train", "--resume", str(run_dir), "--steps", "4", "--quiet"]) == 4
    assert "no checkpoint" in error_line(capsys)


# ----------------------------------------------------------------------------- 8. fine-tuning with --init

def test_init_from_loads_the_ema_weights(cli_run):
    checkpoint = list_checkpoints(cli_run)[-1][1]
    tensors, _ = load_checkpoint(checkpoint)
    ema, raw = split_prefix(tensors, "ema"), split_prefix(tensors, "model")
    assert any(not torch.equal(ema[name], raw[name]) for name in ema)     # so the test can tell them apart
    model = build_model(tiny_config())
    init_from(str(checkpoint), model)
    state = model.state_dict()
    assert state.keys() == ema.keys()
    for name in ema:
        assert torch.equal(state[name], ema[name]), name


def test_init_from_another_architecture_is_a_checkpoint_error(cli_run):
    other = Unet(preset_config("digits", dim=16))
    with pytest.raises(CheckpointError, match="do not match"):
        init_from(str(list_checkpoints(cli_run)[-1][1]), other)


def test_init_through_the_cli_fine_tunes_and_records_the_checkpoint(tmp_path, no_sampling, cli_run):
    checkpoint = str(list_checkpoints(cli_run)[-1][1])
    run_dir = tmp_path / "finetune"
    # An EMA with decay 1 (no warm-up) stays at the weights training started from.
    assert main(["train", *TINY, "--steps", "1", "--init", checkpoint, "--ema-decay", "1", "--no-ema-warmup",
                 "--out", str(run_dir)]) == 0
    assert json.loads((run_dir / "config.json").read_text())["train"]["init"] == checkpoint
    tensors, meta = load_checkpoint(run_dir)
    assert meta["step"] == 1 and meta["config"]["train"]["init"] == checkpoint
    start, source = split_prefix(tensors, "ema"), weights(Path(checkpoint), "ema")
    assert start.keys() == source.keys()
    for name in source:
        assert torch.equal(start[name], source[name]), name


# ----------------------------------------------------------------------------- 9. gradient checkpointing

def loss_and_grads(model: Unet, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)                              # the dropout masks
    loss = (model(x, t) - target).pow(2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(monkeypatch, dropout):
    import ddpm.models.unet as unet_module

    calls = []
    real_checkpoint = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    model = Unet(preset_config("digits", dropout=dropout)).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                     # leave the zero-initialised start, so every gradient is non-zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x, target = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.randint(0, 50, (4,), generator=g)

    plain_loss, plain_grads = loss_and_grads(model, x, t, target, seed=1)
    assert calls == []
    model.gradient_checkpointing = True
    ckpt_loss, ckpt_grads = loss_and_grads(model, x, t, target, seed=1)
    assert len(calls) > 0                     # the residual blocks really were checkpointed
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-7)
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    if dropout:                               # the masks matter, so matching them above was not free
        other_loss, _ = loss_and_grads(model, x, t, target, seed=2)
        assert not torch.equal(other_loss, plain_loss)


def test_gradient_checkpointing_option_trains_to_the_same_weights(tmp_path, monkeypatch, no_sampling,
                                                                 one_adam_step):
    import ddpm.models.unet as unet_module

    calls = []
    real_checkpoint = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    result = train(tiny_config(grad_checkpointing=True), tmp_path / "run", data=tiny_data(), progress=False)
    assert len(calls) > 0                     # the option reached the model
    plain, ckpt = weights(one_adam_step), weights(result.checkpoint)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=0, msg=name)


# ----------------------------------------------------------------------------- 10. the run directory

def test_run_directory_files(cli_run):
    with Image.open(cli_run / "loss.png") as chart:
        assert (chart.format, chart.size) == ("PNG", (800, 450))

    provenance = json.loads((cli_run / "provenance.json").read_text())
    assert isinstance(provenance, list) and len(provenance) == 1
    start = provenance[0]
    assert start["event"] == "start" and isinstance(start["argv"], list)
    assert start["versions"]["torch"] == torch.__version__

    rows = metrics_rows(cli_run)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert METRIC_KEYS <= row.keys(), METRIC_KEYS - row.keys()
        assert row["lr"] == 1e-3 and row["bad_steps"] == 0 and row["scaler_skips"] == 0

    # EMA and raw grids side by side: two grids of num_samples images, a gap, and a title band.
    grid_h, grid_w, _ = make_grid(np.zeros((2, 8, 8, 1), np.uint8)).shape
    defaults = inspect.signature(side_by_side).parameters
    with Image.open(cli_run / "samples" / "step-0000002.png") as samples:
        assert samples.size == (2 * grid_w + defaults["gap"].default, grid_h + defaults["title_height"].default)


# ----------------------------------------------------------------------------- 11. loss chart and side-by-side

def chart_pixels(path: Path, series: dict, **kwargs) -> np.ndarray:
    line_chart(series, path, **kwargs)
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_line_chart_has_the_requested_size(tmp_path):
    pixels = chart_pixels(tmp_path / "c.png", {"loss": ([0, 1, 2], [3.0, 1.0, 2.0])}, size=(320, 200))
    assert pixels.shape == (200, 320, 3)


def test_line_chart_drops_non_finite_and_non_positive_points(tmp_path):
    nan, inf = float("nan"), float("inf")
    with_bad = chart_pixels(tmp_path / "a.png", {"loss": ([0, 1, 2, 3], [1.0, nan, inf, 3.0])})
    clean = chart_pixels(tmp_path / "b.png", {"loss": ([0, 3], [1.0, 3.0])})
    assert np.array_equal(with_bad, clean)
    log_bad = chart_pixels(tmp_path / "c.png", {"loss": ([0, 1, 2, 3], [1.0, 0.0, -2.0, 10.0])}, log_y=True)
    log_clean = chart_pixels(tmp_path / "d.png", {"loss": ([0, 3], [1.0, 10.0])}, log_y=True)
    assert np.array_equal(log_bad, log_clean)
    # Nothing drawable at all still gives a chart (axes only).
    empty = chart_pixels(tmp_path / "e.png", {"loss": ([0, 1], [nan, -1.0])}, log_y=True)
    assert empty.shape == (450, 800, 3)


def test_line_chart_draws_the_data(tmp_path):
    rising = chart_pixels(tmp_path / "a.png", {"loss": ([0, 1, 2], [1.0, 2.0, 3.0])})
    again = chart_pixels(tmp_path / "b.png", {"loss": ([0, 1, 2], [1.0, 2.0, 3.0])})
    falling = chart_pixels(tmp_path / "c.png", {"loss": ([0, 1, 2], [3.0, 2.0, 1.0])})
    assert np.array_equal(rising, again)
    assert not np.array_equal(rising, falling)


@pytest.mark.parametrize("channels", [1, 3])
def test_side_by_side_places_each_image_under_a_title_band(channels):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 200, (h, w, channels), dtype=np.uint8) for h, w in [(10, 7), (12, 5), (6, 9)]]
    gap, band = 3, 16                      # a band tall enough for the default font
    out = side_by_side(images, ["a", "b", "c"], gap=gap, title_height=band)
    assert out.shape == (12 + band, 7 + 5 + 9 + 2 * gap, channels)
    x = 0
    for im in images:
        h, w = im.shape[:2]
        assert np.array_equal(out[band:band + h, x:x + w], im)
        assert (out[band + h:, x:x + w] == 255).all()              # white below a shorter image
        if x + w < out.shape[1]:
            assert (out[band:, x + w:x + w + gap] == 255).all()     # white gaps
        x += w + gap
    assert (out[:band] < 255).any()                                 # the titles were drawn


def test_side_by_side_of_grey_and_colour_is_colour():
    grey, colour = np.zeros((4, 4, 1), np.uint8), np.zeros((4, 6, 3), np.uint8)
    out = side_by_side([grey, colour], ["g", "c"], gap=2, title_height=5)
    assert out.shape == (9, 12, 3)


# ----------------------------------------------------------------------------- 12. CIFAR-10 by name

def write_cifar_batches(folder: Path, records_per_batch: int = 2) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, (records_per_batch, CIFAR10_RECORD), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, records_per_batch)
        records.tofile(folder / name)


def test_cifar10_by_name_resolves_with_the_recipe(tmp_path, capsys):
    write_cifar_batches(tmp_path / "cifar-10-batches-bin")
    config = dry_run(capsys, "--data", "cifar10", "--data-root", str(tmp_path), "--preset", "cifar10",
                     "--batch-size", "4")
    assert config["data"]["name"] == "cifar10" and config["data"]["root"] == str(tmp_path)
    assert (config["model"]["image_size"], config["model"]["channels"]) == ([32, 32], 3)
    assert config["data"]["hflip"] is True and config["train"]["batch_size"] == 4


def test_cifar10_pickled_version_is_refused(tmp_path, capsys):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04not loaded")
    assert main(["train", "--data", "cifar10", "--data-root", str(tmp_path), "--batch-size", "4", "--device", "cpu",
                 "--dry-run"]) == 3
    assert "refused" in error_line(capsys)


def test_periodic_fast_metric_is_logged_and_tracks_sample_quality(tmp_path, monkeypatch):
    """--eval-every logs fast_fid rows for the EMA model; blank samples score far worse than real digits."""
    from ddpm.data import load_dataset

    real = load_dataset("digits").images
    served = {"images": real}

    def fake_generate(diffusion, n, **kwargs):       # stand in for sampling: the metric is under test
        return served["images"][:n]

    monkeypatch.setattr(ddpm.train_eval, "generate", fake_generate)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--batch-size", "8", "--timesteps", "50", "--num-images", "2",
                 "--eval-every", "2", "--eval-num-images", "64", "--log-every", "2", "--quiet", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fast_fid" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["fast_n"] == 64 for r in evals)
    real_fid = evals[0]["fast_fid"]
    served["images"] = np.zeros_like(real)
    out2 = tmp_path / "run2"
    assert main(["train", "--steps", "2", "--batch-size", "8", "--timesteps", "50", "--num-images", "2",
                 "--eval-every", "2", "--eval-num-images", "64", "--quiet", "--out", str(out2)]) == 0
    blank = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines() if "fast_fid" in line]
    assert blank[0]["fast_fid"] > 5 * real_fid
    # Evaluation rows do not break the loss curve: it is drawn (coloured pixels, not only axes).
    with Image.open(out / "loss.png") as chart:
        pixels = np.asarray(chart.convert("RGB")).astype(int)
    assert ((pixels.max(axis=2) - pixels.min(axis=2)) > 60).sum() > 1000     # a legend alone has ~250


def test_time_limit_ends_the_run_like_its_last_step_and_resume_continues(tmp_path, no_sampling, monkeypatch):
    """--time-limit: the step that crosses the limit is logged, saved and gets the final grid; the
    run then resumes to its --steps as usual. The clock is a fake that advances 1 s per reading."""
    clock = iter(range(10_000))
    monkeypatch.setattr(ddpm.train.time, "time", lambda: float(next(clock)))
    run_dir = tmp_path / "run"
    args = [*TINY[2:], "--steps", "50", "--checkpoint-every", "0", "--out", str(run_dir)]
    assert main(["train", *args, "--time-limit", str(5 / 60)]) == 0
    checkpoints = list_checkpoints(run_dir)
    assert len(checkpoints) == 1
    stopped = checkpoints[0][0]
    assert 1 <= stopped < 50
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == stopped
    assert (run_dir / "samples.png").read_bytes() == (run_dir / "samples" / f"step-{stopped:07d}.png").read_bytes()
    assert main(["train", "--resume", str(run_dir), "--time-limit", "0", "--quiet"]) == 0
    assert list_checkpoints(run_dir)[-1][0] == 50


def test_a_negative_time_limit_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--time-limit", "-1"])
    assert exc.value.code == 2
    assert "--time-limit" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="time limit"):
        TrainConfig(time_limit=-0.5)
