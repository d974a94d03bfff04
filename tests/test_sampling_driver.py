"""The one sampling driver (ddpm.sampling): every path to the samplers goes through it, with the
sampler's options resolved once into a plan; the sampling modules import one another one way only."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm
import ddpm.sampling
from ddpm.checkpoint import save_checkpoint
from ddpm.cli import main
from ddpm.config import DiffusionConfig, RunConfig
from ddpm.editing import edit, inpaint, invert
from ddpm.generate import generate, interpolate, load_diffusion, progressive_frames, sampling_options
from ddpm.models import Unet, UnetConfig
from ddpm.samplers import SamplingOptions
from ddpm.sampling import resolve_plan

SRC = Path(ddpm.__file__).parent
T = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint (T = 24) whose outputs are not all alike (weights drawn, not zero)."""
    torch.manual_seed(0)
    config = RunConfig(preset="custom", model=UnetConfig(image_size=8, channels=1, dim=8, dim_mults=(1, 2),
                                                         num_res_blocks=1, attention_resolutions=(), norm_groups=4),
                       diffusion=DiffusionConfig(timesteps=T))
    state = Unet(config.model).state_dict()
    tensors = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.{k}": v.clone() for k, v in state.items()}}
    return save_checkpoint(tmp_path_factory.mktemp("driver") / "tiny.safetensors", tensors,
                           {"step": 1, "config": config.to_dict()})


@pytest.fixture
def denoisers(monkeypatch) -> list[dict]:
    """The keywords of every denoiser the driver builds (it is the only place that builds one)."""
    built: list[dict] = []
    original = ddpm.sampling.make_denoiser

    def spy(*args, **kwargs):
        built.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(ddpm.sampling, "make_denoiser", spy)
    return built


def test_every_way_of_sampling_builds_its_denoiser_in_the_driver(checkpoint, denoisers):
    diffusion, _ = load_diffusion(checkpoint)
    images = torch.rand(2, 1, 8, 8)
    runs = {
        "GaussianDiffusion.sample": lambda: diffusion.sample(2, sampler="ddim", steps=3, progress=False,
                                                             generator=torch.Generator().manual_seed(0)),
        "generate": lambda: generate(diffusion, 2, sampler="ddim", steps=3, progress=False),
        "interpolate": lambda: interpolate(diffusion, images[0], images[1], t=5, n_interp=2, invert=True,
                                           sampling=sampling_options("ddim", 3)),
        "inpaint": lambda: inpaint(diffusion, images, torch.ones(8, 8, dtype=torch.bool),
                                   sampling=sampling_options("ddim", 3)),
        "edit": lambda: edit(diffusion, images, 0.5, sampling=sampling_options("ddim", 3)),
        "invert": lambda: invert(diffusion, images, steps=3),
    }
    counts = {}
    for name, run in runs.items():
        before = len(denoisers)
        run()
        counts[name] = len(denoisers) - before
    assert counts == {"GaussianDiffusion.sample": 1, "generate": 1, "interpolate": 2, "inpaint": 1, "edit": 1,
                      "invert": 1}
    # inversion runs without clipping whatever the checkpoint says; sampling with the checkpoint's rule
    assert denoisers[2]["clip"] is False and denoisers[3]["clip"] is diffusion.clip_denoised is True


def test_the_timesteps_are_resolved_once_per_run(checkpoint, tmp_path, monkeypatch):
    calls = []
    original = SamplingOptions.timesteps
    monkeypatch.setattr(SamplingOptions, "timesteps", lambda self, n, *schedule: calls.append(n) or original(self, n, *schedule))
    diffusion, _ = load_diffusion(checkpoint)
    generate(diffusion, 5, batch_size=2, sampler="ddim", steps=4, progress=False)          # three batches
    assert calls == [T]
    calls.clear()
    progressive_frames(diffusion, 3, frames=3, batch_size=2, sampling=sampling_options("ddim", 4), progress=False)
    assert calls == [T]
    calls.clear()
    assert main(["sample", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s"), "--quiet", "--num-images",
                 "3", "--batch-size", "2", "--sampler", "ddim", "--steps", "4", "--progressive"]) == 0
    assert calls == [T]                 # planned, sampled in two batches, framed, titled and recorded from one plan


def test_a_plan_holds_what_the_options_and_the_checkpoint_say(checkpoint):
    diffusion, _ = load_diffusion(checkpoint)
    plan = resolve_plan(diffusion, SamplingOptions(sampler="ddpm", steps=4))
    assert plan.timesteps == (23, 17, 11, 5) and plan.steps == 4
    assert plan.sampler_kwargs == {"variance": diffusion.variance} and plan.clip is True
    assert resolve_plan(diffusion, plan) is plan                    # a plan is not resolved again
    dynamic = resolve_plan(diffusion, SamplingOptions(sampler="ddim", dynamic_thresholding=True))
    assert not dynamic.clip and dynamic.dynamic_thresholding and dynamic.steps == T
    from_t = resolve_plan(diffusion, SamplingOptions(sampler="ddim", steps=3), start=9)
    assert from_t.timesteps == (9, 6, 2) and resolve_plan(diffusion, from_t, start=9) is from_t
    assert not from_t.unclipped().clip


def test_sample_keeps_taking_clip_denoised_with_dynamic_thresholding(checkpoint):
    """Dynamic thresholding replaces clipping, as before: clip_denoised=True with it is no error, and the same."""
    diffusion, _ = load_diffusion(checkpoint)
    kwargs = dict(sampler="ddim", steps=3, progress=False, dynamic_thresholding=True)
    a = diffusion.sample(2, generator=torch.Generator().manual_seed(1), clip_denoised=True, **kwargs)
    b = diffusion.sample(2, generator=torch.Generator().manual_seed(1), **kwargs)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def _imports(path: Path) -> set[str]:
    """The ddpm modules a file imports, at module level or inside functions."""
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[:len(package) - node.level + 1] + ((node.module,) if node.module else ()))
            found.update(f"{base}.{a.name}" for a in node.names)
            found.add(base)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddpm"):
            found.add(node.module)
    return found


def test_the_sampling_modules_import_one_another_one_way():
    order = ["sampling", "generate", "viz", "sample_job", "editing"]        # each may import those before it
    for i, name in enumerate(order):
        later = {f"ddpm.{m}" for m in order[i + 1:]}
        assert not _imports(SRC / f"{name}.py") & later, name
    assert not _imports(SRC / "gaussian_diffusion.py") & {f"ddpm.{m}" for m in order[1:]}
