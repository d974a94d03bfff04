"""The training variants end to end: through the CLI, across a resume, and with old checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.cli import main
from ddpm.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from ddpm.data import load_dataset
from ddpm.generate import generate, load_diffusion
from ddpm.models import preset_config
from ddpm.timestep_sampling import ImportanceSampler
from ddpm.train import train

from test_cli import TINY, assert_one_line_error, run_cli
from test_cli_sample import one_line_error
from test_resume import assert_bit_identical, final_tensors

VARIANTS = {
    # Everything that combines: Improved DDPM's learned variance and hybrid loss with importance-sampled t,
    # plus offset noise and self-conditioning.
    "improved-all": ["--variance", "learned-range", "--loss", "hybrid", "--timestep-sampling", "importance",
                     "--offset-noise", "0.1", "--self-condition"],
    # The bound alone with the paper's fixed variance, for likelihood experiments.
    "vlb-fixed": ["--loss", "vlb", "--timestep-sampling", "importance"],
}
SAVED = {
    "improved-all": dict(variance="learned-range", loss="hybrid", timestep_sampling="importance",
                         offset_noise=0.1, self_condition=True),
    "vlb-fixed": dict(variance="posterior", loss="vlb", timestep_sampling="importance", offset_noise=0.0,
                      self_condition=False),
}


def cli(*argv: str) -> None:
    """The CLI in-process (``ddpm ARGV``), which must succeed."""
    assert main(list(argv)) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny run of each variant, and a plain one, trained through the CLI."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name, flags in {**VARIANTS, "plain": []}.items():
        cli("train", *TINY, *flags, "--out", str(root / name))
        out[name] = root / name
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_samples_and_evaluates_without_extra_flags(variant, runs, tmp_path):
    run_dir = runs[variant]
    saved = json.loads((run_dir / "config.json").read_text())["diffusion"]
    assert {k: saved[k] for k in SAVED[variant]} == SAVED[variant]
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(x) for x in losses)
    tensors, _ = load_checkpoint(run_dir)
    assert tensors["timestep_sampler.counts"].sum().item() == 4 * 8          # every sample of 4 steps recorded

    cli("sample", "--checkpoint", str(run_dir), "--num-images", "3", "--out", str(tmp_path / "s"), "--quiet")
    record = json.loads((tmp_path / "s" / "record.json").read_text())
    assert record["variance"] == SAVED[variant]["variance"]                   # the checkpoint's, with no flag
    for sampler in ("ddim", "dpm-solver++"):                                  # they ignore the variance channels
        cli("sample", "--checkpoint", str(run_dir), "--num-images", "2", "--steps", "5", "--sampler", sampler,
            "--out", str(tmp_path / sampler), "--quiet")
    cli("eval", "--checkpoint", str(run_dir), "--metric", "bpd", "--data", "digits", "--num-images", "4", "--quiet",
        "--out", str(tmp_path / "e.json"))
    bpd = json.loads((tmp_path / "e.json").read_text())["bpd"]
    assert math.isfinite(bpd) and bpd > 0


def test_learned_variance_checkpoint_samples_with_its_variance(runs):
    """The learned variance is what sampling uses: forcing the fixed one changes the images."""
    diffusion, _ = load_diffusion(runs["improved-all"])
    assert diffusion.model.conv_out.out_channels == 2 and diffusion.model.conv_in.in_channels == 2
    learned = generate(diffusion, 4, seed=1, progress=False)
    again = generate(diffusion, 4, seed=1, progress=False, variance="learned-range")
    fixed = generate(diffusion, 4, seed=1, progress=False, variance="posterior")
    assert np.array_equal(learned, again) and not np.array_equal(learned, fixed)


@pytest.mark.parametrize("argv, phrase", [
    (["--variance", "learned-range"], "need an L_vlb term"),
    (["--loss", "hybrid"], "only trains a learned variance"),
    (["--timestep-sampling", "importance"], "needs --loss vlb or --loss hybrid"),
    (["--loss", "vlb", "--offset-noise", "0.2"], "no longer be the bound"),
    (["--offset-noise", "-1"], "expected a number >= 0"),
])
def test_nonsense_combinations_are_one_line_errors(argv, phrase, capsys):
    assert phrase in one_line_error(capsys, ["train", *argv, "--dry-run"])


def test_nonsense_combination_in_a_real_process_is_one_line():
    assert_one_line_error(run_cli("train", "--loss", "hybrid", "--dry-run"), 2, "only trains a learned variance")


def test_learned_range_sampling_of_a_fixed_variance_model_is_a_one_line_error(runs, tmp_path, capsys):
    line = one_line_error(capsys, ["sample", "--checkpoint", str(runs["plain"]), "--num-images", "2", "--variance",
                                   "learned-range", "--out", str(tmp_path / "s"), "--quiet"])
    assert "learned variances" in line


# ----------------------------------------------------------------------------- resume

def variant_config(steps: int) -> RunConfig:
    """Every variant's randomness on (importance sampling, offset noise, self-conditioning coins) plus the
    existing sources (dropout, flips, gradient accumulation); T = 4 so importance sampling warms up early."""
    return RunConfig(preset="digits", model=preset_config("digits", dropout=0.1),
                     diffusion=DiffusionConfig(timesteps=4, schedule="cosine", variance="learned-range", loss="hybrid",
                                               timestep_sampling="importance", offset_noise=0.1, self_condition=True),
                     data=DataConfig(hflip=True),
                     train=TrainConfig(steps=steps, batch_size=16, grad_accum=2, num_samples=2, log_every=1,
                                       checkpoint_every=3, warmup_steps=2, keep_last=0))


def test_resume_with_importance_sampling_is_bit_identical(tmp_path):
    digits = load_dataset("digits")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(variant_config(9), whole, data=digits, progress=False)
    train(variant_config(6), parts, data=digits, progress=False)
    mid, _ = load_checkpoint(parts)
    sampler = ImportanceSampler(4)
    sampler.load_state_tensors(mid)
    assert sampler.warmed_up                          # the resumed part draws t from the histories
    train(variant_config(9), parts, data=digits, resume=True, progress=False)
    assert_bit_identical(final_tensors(parts), final_tensors(whole))     # weights, optimizer and histories


# ----------------------------------------------------------------------------- old checkpoints

def test_checkpoint_without_the_new_fields_loads_with_the_old_behaviour(runs, tmp_path):
    run_dir = runs["plain"]
    tensors, meta = load_checkpoint(run_dir)
    config = meta.pop("config")
    for key in ("loss", "vlb_weight", "timestep_sampling", "offset_noise", "self_condition"):
        del config["diffusion"][key]
    del config["model"]["in_channels"]
    meta.pop("path")
    old = save_checkpoint(tmp_path / "old" / "checkpoints" / "step-0000004.safetensors", tensors,
                          {**meta, "config": config})
    new_diffusion, _ = load_diffusion(run_dir)
    old_diffusion, old_meta = load_diffusion(old)
    assert old_meta["run_config"].diffusion == DiffusionConfig(timesteps=50)
    assert old_diffusion.model.conv_in.in_channels == 1 and old_diffusion.model.conv_out.out_channels == 1
    assert np.array_equal(generate(old_diffusion, 3, progress=False), generate(new_diffusion, 3, progress=False))
    # ... and it resumes (the flags a new run would need are all absent).
    cli("train", "--resume", str(tmp_path / "old"), "--steps", "5", "--quiet")
