"""Export to and import from diffusers: the same network, the same schedule, the same samples.

Every check compares our code with diffusers' own classes run on the same inputs: one forward
pass per preset, the scheduler's tables, whole DDPMPipeline sampling loops fed the same noise,
exact weight round trips, a folder written by diffusers' ``save_pretrained``, and the CLI with
its refusals. Tests that need diffusers skip when it is not installed (the ``diffusers`` extra).
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # everything here is local; never reach for the Hub

import numpy as np
import pytest
import torch

from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.cli import main
from ddpm.config import DataConfig, DiffusionConfig, RunConfig
from ddpm.generate import generate, load_diffusion
from ddpm.sampling import sample_images
from ddpm.models import Unet, UnetConfig, preset_config
from ddpm.denoiser import make_denoiser
from ddpm.samplers import SamplingOptions, sample_ancestral, spaced_timesteps
from ddpm.schedules import NoiseSchedule
from ddpm.seeding import derive_seed

# A small network with every kind of block (attention at the 4x4 level, a width change, both resamplers).
TINY = dict(image_size=8, channels=1, dim=16, dim_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
            dropout=0.0, norm_groups=8)


@pytest.fixture(scope="module")
def dlib():
    diffusers = pytest.importorskip("diffusers")
    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (our init zeroes the last layer of each branch, which would hide
    every mismatch behind a zero output): weights ~ N(0, 1/fan_in), norms 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()


def make_checkpoint(path: Path, config: RunConfig, seed: int = 0) -> tuple[Path, Unet]:
    """A checkpoint with random EMA weights (returned) and different random raw weights."""
    ema = randomize(Unet(config.model), seed)
    raw = randomize(Unet(config.model), seed + 1000)
    tensors = {**{f"model.{k}": v for k, v in raw.state_dict().items()},
               **{f"ema.{k}": v for k, v in ema.state_dict().items()}}
    return save_checkpoint(path, tensors, {"step": 7, "config": config.to_dict()}), ema


def tiny_config(**diffusion) -> RunConfig:
    return RunConfig(preset="custom", model=UnetConfig(**TINY), diffusion=DiffusionConfig(**diffusion))


def assert_forward_equal(ours: torch.nn.Module, theirs: torch.nn.Module, m: UnetConfig, batch: int = 2,
                         seed: int = 0, scale: float = 1.0) -> None:
    """Outputs equal on random x_t; a small ``scale`` makes the first GroupNorm's epsilon visible."""
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(batch, m.channels, *m.image_size, generator=g)
    t = torch.tensor([0, 999, 517, 3][:batch])
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert a.abs().max() > 0.1                                   # a real signal, not zeros
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddpm: error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ----------------------------------------------------------------------------- the network

SMALL_256_LIKE = dict(image_size=64, channels=3, dim=32, dim_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                      attention_resolutions=(4,), dropout=0.0, norm_groups=8)   # celebahq256's blocks at 64x64

FORWARD_CASES = {
    "digits": preset_config("digits"),
    "mnist": preset_config("mnist"),
    "cifar10": preset_config("cifar10"),
    "celebahq256-shaped": UnetConfig(**SMALL_256_LIKE),
    "paper-padding-and-eps": UnetConfig(**{**TINY, "downsample_padding": "same", "norm_eps": 1e-6}),
    "two-heads": preset_config("digits", attention_heads=2, attention_resolutions=(8, 4), dim_mults=(1, 1)),
    "non-square": UnetConfig(**{**TINY, "image_size": (8, 16), "channels": 3}),
}


@pytest.mark.parametrize("name", FORWARD_CASES)
def test_exported_unet_forward_equals_ours(dlib, tmp_path, name):
    config = RunConfig(preset="custom", model=FORWARD_CASES[name])
    checkpoint, model = make_checkpoint(tmp_path / "c.safetensors", config)
    out = main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")])
    assert out == 0
    unet = dlib.UNet2DModel.from_pretrained(tmp_path / "export" / "unet").eval()
    assert sum(p.numel() for p in unet.parameters()) == model.num_parameters()
    assert_forward_equal(model, unet, config.model, batch=1 if name == "cifar10" else 2)
    if config.model.norm_eps != 1e-5:
        assert_forward_equal(model, unet, config.model, scale=1e-3)


@pytest.mark.slow   # 114M parameters exported and run at 256x256; "celebahq256-shaped" above has its layout
def test_celebahq256_preset_forward_equals_diffusers(dlib, tmp_path):
    config = RunConfig(preset="celebahq256", model=preset_config("celebahq256"))
    checkpoint, model = make_checkpoint(tmp_path / "c.safetensors", config)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    unet = dlib.UNet2DModel.from_pretrained(tmp_path / "export" / "unet").eval()
    assert_forward_equal(model, unet, config.model, batch=1)


def test_the_padding_choice_is_visible_in_the_output(dlib):
    """The forward check can fail: diffusers' other padding gives another function."""
    from ddpm.interop.diffusers import unet_to_diffusers_config
    from ddpm.interop.diffusers_weights import state_dict_to_diffusers

    m = UnetConfig(**TINY)
    ours = randomize(Unet(m))
    wrong = dlib.UNet2DModel(**{**unet_to_diffusers_config(m), "downsample_padding": 0}).eval()
    wrong.load_state_dict(state_dict_to_diffusers(ours.state_dict(), m))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    with torch.no_grad():
        assert (wrong(x, t).sample - ours(x, t)).abs().max() > 1e-3


def test_exported_config_is_the_papers_mapping():
    from ddpm.interop.diffusers import unet_to_diffusers_config

    c = unet_to_diffusers_config(preset_config("cifar10"))
    assert c["block_out_channels"] == [128, 256, 256, 256] and c["layers_per_block"] == 2
    assert c["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert c["up_block_types"] == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert (c["flip_sin_to_cos"], c["freq_shift"], c["attention_head_dim"]) == (False, 1, None)
    assert c["dropout"] == 0.1 and c["downsample_padding"] == 1 and c["norm_eps"] == 1e-5


# ----------------------------------------------------------------------------- the scheduler

SCHEDULE_CASES = [
    dict(schedule="linear", timesteps=1000),
    dict(schedule="cosine", timesteps=1000, variance="beta", objective="v", clip_denoised=False),
    dict(schedule="sigmoid", timesteps=1000, objective="x0"),
    dict(schedule="linear", timesteps=400, variance="beta"),
    dict(schedule="cosine", timesteps=50),
]


@pytest.mark.parametrize("options", SCHEDULE_CASES, ids=lambda o: f"{o['schedule']}-{o['timesteps']}")
def test_scheduler_tables_equal_ours(dlib, options):
    from ddpm.interop.diffusers import diffusion_from_diffusers_scheduler, scheduler_to_diffusers_config

    d = DiffusionConfig(**options)
    config = scheduler_to_diffusers_config(d)
    named = d.timesteps == 1000 and d.schedule in ("linear", "cosine")
    assert (config["trained_betas"] is None) == named                  # by name only where the name is exact
    if named:
        assert config["beta_schedule"] == {"linear": "linear", "cosine": "squaredcos_cap_v2"}[d.schedule]
    s = dlib.DDPMScheduler(**json.loads(json.dumps(config)))            # as it comes back from the JSON file
    ours = NoiseSchedule(d.schedule, d.timesteps)
    assert len(s.betas) == d.timesteps
    torch.testing.assert_close(s.betas.double(), ours.betas, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(s.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-4, atol=1e-8)
    # diffusers recomputes beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} in float32 at each step: where beta is
    # small that loses digits to cancellation, so these agree to float32's resolution (~1e-7), not relatively.
    ts = range(1, d.timesteps)
    torch.testing.assert_close(torch.stack([s._get_variance(t, variance_type="fixed_small") for t in ts]).double(),
                               ours.posterior_variance[1:], rtol=1e-4, atol=2e-7)
    torch.testing.assert_close(torch.stack([s._get_variance(t, variance_type="fixed_large") for t in ts]).double(),
                               ours.betas[1:], rtol=1e-4, atol=2e-7)
    assert s.config.variance_type == {"posterior": "fixed_small", "beta": "fixed_large"}[d.variance]
    assert s.config.prediction_type == {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[d.objective]
    assert s.config.clip_sample == d.clip_denoised and s.config.clip_sample_range == 1.0
    assert diffusion_from_diffusers_scheduler(dict(s.config)) == d      # and back


@pytest.mark.parametrize("options", [
    dict(objective="eps", variance="posterior", schedule="linear", timesteps=30, clip_denoised=True),
    dict(objective="v", variance="beta", schedule="cosine", timesteps=40, clip_denoised=False),
    dict(objective="x0", variance="posterior", schedule="sigmoid", timesteps=25, clip_denoised=True),
], ids=["eps-posterior", "v-beta", "x0-sigmoid"])
def test_ddpm_pipeline_sampling_equals_our_ancestral_loop(dlib, tmp_path, options):
    """DDPMPipeline draws x_T and then one noise per step from one generator: our loop gets the same draws."""
    config = tiny_config(**options)
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", config, seed=3)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    pipe = dlib.DDPMPipeline.from_pretrained(tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    T = config.diffusion.timesteps
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=T,
                  output_type="pt").images

    diffusion, _ = load_diffusion(checkpoint)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(3, 1, 8, 8, generator=g)
    denoiser = make_denoiser(diffusion.model, diffusion.schedule, objective=config.diffusion.objective,
                             clip=config.diffusion.clip_denoised)
    x0 = sample_ancestral(denoiser, x_T, diffusion.schedule, spaced_timesteps(T),
                          noise=lambda: torch.randn(3, 1, 8, 8, generator=g), variance=config.diffusion.variance)
    ours = ((x0 + 1) / 2).clamp(0, 1)
    assert ours.std() > 0.05                                            # images, not a constant
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-4)


@pytest.mark.parametrize("variance, spacing", [("posterior", "trailing"), ("beta", "leading")])
def test_pipeline_with_per_image_generators_matches_ddpm_sample_respaced(dlib, tmp_path, variance, spacing):
    """With one generator per image seeded derive_seed(seed, k), DDPMPipeline(num_inference_steps=K) is
    `ddpm sample --sampler ddpm --steps K [--spacing leading]`: same noise, timesteps and respaced variances."""
    config = tiny_config(timesteps=60, variance=variance)
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", config, seed=4)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    pipe = dlib.DDPMPipeline.from_pretrained(tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(derive_seed(11, k)) for k in range(4)]
    theirs = pipe(batch_size=4, generator=generators, num_inference_steps=7, output_type="pt").images
    diffusion, _ = load_diffusion(checkpoint)
    ours = sample_images(diffusion, list(range(4)), seed=11,
                         sampling=SamplingOptions(sampler="ddpm", steps=7, spacing=spacing))
    assert pipe.scheduler.timesteps.tolist() == spaced_timesteps(60, 7, spacing)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------- round trips and imports

def test_import_of_export_reproduces_the_weights_exactly(dlib, tmp_path):
    config = RunConfig(preset="mnist", model=preset_config("mnist"),
                       diffusion=DiffusionConfig(schedule="sigmoid", timesteps=300, objective="v"))
    checkpoint, ema = make_checkpoint(tmp_path / "c.safetensors", config)
    original, _ = load_checkpoint(checkpoint)
    for weights in ("ema", "raw"):
        folder, back = tmp_path / f"export-{weights}", tmp_path / f"back-{weights}.safetensors"
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(folder), "--weights", weights]) == 0
        assert main(["import", "--format", "diffusers", str(folder), "--out", str(back)]) == 0
        tensors, meta = load_checkpoint(back)
        prefix = "ema" if weights == "ema" else "model"
        for name, value in original.items():
            if name.startswith(prefix + "."):
                suffix = name.split(".", 1)[1]
                assert torch.equal(tensors["ema." + suffix], value) and torch.equal(tensors["model." + suffix], value)
        restored = RunConfig.from_dict(meta["config"])
        assert restored.model == config.model and restored.diffusion == config.diffusion
        assert restored.preset == "mnist" and meta["imported_from"]["format"] == "diffusers"


def paper_cifar10_unet_config() -> dict:
    """The configuration of the paper's CIFAR-10 model as diffusers publishes it (TensorFlow's SAME padding
    and GroupNorm epsilon, attention at 16x16); keys newer than that release are left out on purpose."""
    return {"_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
            "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-6, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


def test_import_of_a_folder_saved_by_diffusers_gives_the_same_network(dlib, tmp_path):
    torch.manual_seed(0)                                   # diffusers' own random initialisation
    kwargs = {k: v for k, v in paper_cifar10_unet_config().items() if not k.startswith("_")}
    unet = dlib.UNet2DModel(**kwargs).eval()
    scheduler = dlib.DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                   variance_type="fixed_small", clip_sample=True)
    dlib.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "cifar.safetensors")]) == 0
    diffusion, meta = load_diffusion(tmp_path / "cifar.safetensors")
    m = diffusion.model.config
    assert (m.dim_mults, m.attention_resolutions, m.downsample_padding, m.norm_eps) == ((1, 2, 2, 2), (16,), "same", 1e-6)
    assert diffusion.model.num_parameters() == 35_746_307                       # the paper's model
    assert (diffusion.timesteps, diffusion.objective, diffusion.variance) == (1000, "eps", "posterior")
    assert meta["run_config"].diffusion.schedule == "linear" and diffusion.clip_denoised
    assert_forward_equal(diffusion.model, unet, m, batch=1)
    assert_forward_equal(diffusion.model, unet, m, batch=1, scale=1e-3)     # the 1e-6 GroupNorm epsilon too


def test_import_reads_the_legacy_attention_names(dlib, tmp_path):
    """Folders saved by older diffusers call the attention layers query/key/value/proj_attn."""
    from safetensors.torch import load_file, save_file

    from ddpm.interop.diffusers import unet_to_diffusers_config

    torch.manual_seed(1)
    unet = dlib.UNet2DModel(**unet_to_diffusers_config(UnetConfig(**TINY))).eval()
    dlib.DDPMPipeline(unet=unet, scheduler=dlib.DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "unet" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, value in load_file(path).items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = value
    assert any(".query." in n for n in renamed)
    save_file(renamed, path)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "c.safetensors")]) == 0
    diffusion, _ = load_diffusion(tmp_path / "c.safetensors")
    assert_forward_equal(diffusion.model, unet, diffusion.model.config)


# ----------------------------------------------------------------------------- the command line

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_export_import_then_sample_gives_the_same_images(dlib, tmp_path):
    config = tiny_config(timesteps=40)
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", config, seed=2)
    proc = run_cli("export", "--checkpoint", str(checkpoint), "--format", "diffusers", "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "model_index.json", "scheduler", "unet"]
    assert json.loads((tmp_path / "hf" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert not list(tmp_path.glob(".hf.tmp-*"))
    proc = run_cli("import", "--format", "diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "back.safetensors"))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("sample", "--checkpoint", str(tmp_path / "back.safetensors"), "--num-images", "3", "--steps", "10",
                   "--out", str(tmp_path / "samples"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        imported = f["images"]
    original = generate(load_diffusion(checkpoint)[0], 3, steps=10, seed=0, progress=False)
    np.testing.assert_array_equal(imported, original)


def test_imported_checkpoint_is_an_ordinary_checkpoint(dlib, tmp_path, capsys):
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", tiny_config(timesteps=40))
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back.safetensors")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "back.safetensors")]) == 0
    assert "ema.*" in capsys.readouterr().out
    assert main(["eval", "--metric", "bpd", "--checkpoint", str(tmp_path / "back.safetensors"), "--data", "digits",
                 "--num-images", "2", "--quiet"]) == 0


@pytest.mark.parametrize("command", ["export", "import"])
def test_help_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "examples:" in out and "--format" in out


def test_conditional_model_is_refused(dlib, tmp_path, capsys):
    config = RunConfig(preset="custom", model=UnetConfig(**TINY, num_classes=10))
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", config)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 2
    one_line_error(capsys, "class-conditional")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("model, phrase", [
    (dict(out_channels=2), "learned variances"),
    (dict(dim_mults=(2, 4)), "dim_mults starts at 2"),
    (dict(attention_heads=2, attention_resolutions=(8,), dim_mults=(1, 2)), "same width"),
])
def test_architectures_diffusers_cannot_express_are_refused(dlib, tmp_path, capsys, model, phrase):
    config = RunConfig(preset="custom", model=UnetConfig(**{**TINY, **model}))
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", config)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 2
    one_line_error(capsys, "UNet2DModel cannot express", phrase)
    assert not (tmp_path / "hf").exists()


def test_unknown_model_options_are_refused_not_dropped(dlib):
    """A field this module does not map (added later, e.g. by another feature) must not be exported silently."""
    import dataclasses

    from ddpm.errors import ConfigError
    from ddpm.interop.diffusers import unet_to_diffusers_config

    Extended = dataclasses.make_dataclass("Extended", [("self_condition", bool, dataclasses.field(default=False))],
                                          bases=(UnetConfig,))
    assert unet_to_diffusers_config(Extended(**TINY))["block_out_channels"] == [16, 32]
    with pytest.raises(ConfigError, match="self_condition=True"):
        unet_to_diffusers_config(Extended(**TINY, self_condition=True))


def test_existing_output_is_never_overwritten(dlib, tmp_path, capsys):
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", tiny_config())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 2
    one_line_error(capsys, "not empty")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["mine.txt"]
    (tmp_path / "empty").mkdir()                                         # an empty folder is fine
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    target = tmp_path / "exists.safetensors"
    target.write_bytes(b"mine")
    assert main(["import", str(tmp_path / "empty"), "--out", str(target)]) == 2
    one_line_error(capsys, "already exists")
    assert target.read_bytes() == b"mine"


def test_a_failed_export_leaves_nothing_behind(dlib, tmp_path, capsys, monkeypatch):
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", tiny_config())

    def disk_full(self, save_directory, **kwargs):
        Path(save_directory, "unet").mkdir(parents=True)
        Path(save_directory, "unet", "config.json").write_text("{")      # half written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dlib.DDPMPipeline, "save_pretrained", disk_full)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out" / "hf")]) == 4
    one_line_error(capsys, "No space left on device", "nothing was written")
    assert not (tmp_path / "out" / "hf").exists() and not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("command", ["export", "import"])
def test_missing_diffusers_names_the_extra(tmp_path, capsys, monkeypatch, command):
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", tiny_config())
    (tmp_path / "folder").mkdir()
    real_import = builtins.__import__

    def no_diffusers(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == "diffusers" or name.startswith("diffusers.")):    # not ddpm.interop.diffusers
            raise ImportError(f"No module named {name!r}")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    argv = (["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")] if command == "export"
            else ["import", str(tmp_path / "folder"), "--out", str(tmp_path / "c2.safetensors")])
    assert main(argv) == 2
    one_line_error(capsys, "pip install 'ddpm[diffusers]'")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "c2.safetensors").exists()


@pytest.fixture(scope="module")
def exported(dlib, tmp_path_factory) -> Path:
    """A valid exported folder of the tiny model, copied and damaged by the refusal tests."""
    root = tmp_path_factory.mktemp("exported")
    checkpoint, _ = make_checkpoint(root / "c.safetensors", tiny_config())
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(root / "hf")]) == 0
    return root / "hf"


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_only(folder: Path) -> None:
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not to be unpickled")


DAMAGES = {
    "no-model-index": (lambda f: (f / "model_index.json").unlink(), "model_index.json is missing"),
    "ddim-scheduler": (lambda f: _edit_json(f / "model_index.json", scheduler=["diffusers", "DDIMScheduler"]),
                       "imports only a DDPMScheduler"),
    "scheduler-class": (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", _class_name="PNDMScheduler"),
                        "not a DDPMScheduler"),
    "scale-shift": (lambda f: _edit_json(f / "unet" / "config.json", resnet_time_scale_shift="scale_shift"),
                    "resnet_time_scale_shift"),
    "cross-attention": (lambda f: _edit_json(f / "unet" / "config.json",
                                             down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]),
                        "down_block_types"),
    "fourier-embedding": (lambda f: _edit_json(f / "unet" / "config.json", time_embedding_type="fourier"),
                          "time_embedding_type"),
    "head-width": (lambda f: _edit_json(f / "unet" / "config.json", attention_head_dim=5), "attention_head_dim=5"),
    "freq-shift": (lambda f: _edit_json(f / "unet" / "config.json", freq_shift=8), "freq_shift"),
    "conditional": (lambda f: _edit_json(f / "unet" / "config.json", num_class_embeds=10), "class-conditional"),
    "learned-variance": (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json",
                                              variance_type="learned_range"), "learned variances"),
    "foreign-betas": (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", trained_betas=None,
                                           beta_schedule="scaled_linear", num_train_timesteps=1000),
                      "match none of ddpm's schedules"),
    "newer-option": (lambda f: _edit_json(f / "unet" / "config.json", attention_softcap=30.0), "attention_softcap"),
    "corrupt-json": (lambda f: (f / "unet" / "config.json").write_text("{not json"), "not readable JSON"),
    "corrupt-weights": (lambda f: _truncate(f / "unet" / "diffusion_pytorch_model.safetensors"),
                        "not a readable safetensors file"),
    "pickle-weights": (_pickle_only, "never loads"),
    "wrong-width": (lambda f: _edit_json(f / "unet" / "config.json", block_out_channels=[16, 48]), "shape"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_folders_ddpm_cannot_express_are_refused(exported, tmp_path, capsys, damage):
    folder = tmp_path / "hf"
    shutil.copytree(exported, folder)
    change, phrase = DAMAGES[damage]
    change(folder)
    assert main(["import", str(folder), "--out", str(tmp_path / "c.safetensors")]) == 4
    one_line_error(capsys, phrase)
    assert not (tmp_path / "c.safetensors").exists()


def test_import_of_a_missing_folder_is_refused(dlib, tmp_path, capsys):
    assert main(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.safetensors")]) == 4
    one_line_error(capsys, "no such folder")


def test_training_only_variants_export_and_sampling_variants_are_refused(dlib):
    """Offset noise, importance sampling and the vlb weight shape training only: such a model exports.
    Self-conditioning changes what the network takes, which DDPMPipeline cannot feed: refused."""
    from ddpm.errors import ConfigError
    from ddpm.interop.diffusers import scheduler_to_diffusers_config

    plain = scheduler_to_diffusers_config(DiffusionConfig())
    assert scheduler_to_diffusers_config(DiffusionConfig(offset_noise=0.1)) == plain
    with pytest.raises(ConfigError, match="self_condition"):
        scheduler_to_diffusers_config(DiffusionConfig(self_condition=True))
    with pytest.raises(ConfigError, match="learned"):
        scheduler_to_diffusers_config(DiffusionConfig(variance="learned-range", loss="hybrid"))


# ----------------------------------------------------------------------------- the model card

def fake_run(root: Path, config: RunConfig, argv: list[str]) -> Path:
    """A run directory as `ddpm train` leaves it: config, provenance, a checkpoint and samples.png."""
    from ddpm.images import make_grid, save_png

    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    (run / "provenance.json").write_text(json.dumps([{"event": "start", "argv": argv}]))
    rng = np.random.default_rng(0)
    save_png(run / "samples.png", make_grid(rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)))
    make_checkpoint(run / "checkpoints" / "step-0000007.safetensors", config)
    return run


def test_export_writes_a_hub_model_card_and_the_runs_samples(dlib, tmp_path):
    from huggingface_hub import ModelCard

    config = RunConfig(preset="custom", model=UnetConfig(**TINY), diffusion=DiffusionConfig(timesteps=40),
                       data=DataConfig(name="mnist", image_size=(8, 8)))
    argv = ["/somewhere/bin/ddpm", "train", "--data", "mnist", "--steps", "7", "--out", "runs/tiny"]
    run = fake_run(tmp_path, config, argv)
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    card = ModelCard.load(out / "README.md")                       # the Hub's own parser
    assert card.data.library_name == "diffusers"
    assert card.data.tags == ["pytorch", "diffusers", "unconditional-image-generation"]
    assert card.data.datasets == ["mnist"]
    text = card.text
    assert "ddpm train --data mnist --steps 7 --out runs/tiny" in text
    assert f"ddpm export --checkpoint {run.name} --out {out.name} --weights ema" in text    # no local paths
    assert "training steps: 7" in text and "T = 40" in text and "lr 0.001" in text
    assert "](./samples.png)" in text
    assert (out / "samples.png").read_bytes() == (run / "samples.png").read_bytes()
    pipe = dlib.DDPMPipeline.from_pretrained(out)                  # the card and picture do not get in the way
    assert pipe.unet.config.sample_size == 8


def test_the_card_of_a_run_on_a_folder_holds_no_absolute_path(dlib, tmp_path):
    """A card is published: the dataset folder, the run and the export name their last names only."""
    photos = tmp_path / "home" / "ana" / "photos"
    config = RunConfig(preset="custom", model=UnetConfig(**TINY), diffusion=DiffusionConfig(timesteps=40),
                       data=DataConfig(name=str(photos), image_size=(8, 8)))
    argv = ["/somewhere/bin/ddpm", "train", "--data", str(photos), f"--init={tmp_path}/base.safetensors",
            "--out", str(tmp_path / "runs" / "tiny")]
    run = fake_run(tmp_path, config, argv)
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and "/home/ana" not in text
    assert "dataset: `photos`" in text and "--data photos --init=base.safetensors --out tiny" in text


def test_a_checkpoint_without_a_run_gets_a_card_without_samples(dlib, tmp_path):
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", tiny_config())
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    text = (tmp_path / "hf" / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: diffusers\n") and "datasets:" not in text      # digits: not on the Hub
    assert "samples.png" not in text and not (tmp_path / "hf" / "samples.png").exists()
    assert "was not recorded" in text


def test_exported_files_have_ordinary_permissions(dlib, tmp_path):
    checkpoint, _ = make_checkpoint(tmp_path / "c.safetensors", tiny_config())
    old = os.umask(0o022)
    try:
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path / "hf")): p.stat().st_mode & 0o777
             for p in (tmp_path / "hf").rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in modes
    assert set(modes.values()) == {0o644}, modes

# ----------------------------------------------------------------------------- diffusers' own models

# UNet2DModel with its defaults -- flip_sin_to_cos=True, freq_shift=0, DownBlock2D then AttnDownBlock2D
# blocks, attention_head_dim=8 (so 4 heads at 32 channels, 8 at 64), positional time embedding -- and
# only the size made small: 16x16 grey, narrower blocks.
DIFFUSERS_DEFAULTS_SMALL = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 32, 64, 64))
# DDPMScheduler's defaults (linear betas, fixed_small, epsilon, clip) at T = 40, its betas scaled by
# 1000 / T as ddpm's linear schedule is, so the schedule is one ddpm knows.
SCHEDULER_T40 = dict(num_train_timesteps=40, beta_start=1e-4 * 25, beta_end=0.02 * 25)


@pytest.fixture(scope="module")
def diffusers_default_folder(dlib, tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """A DDPMPipeline folder saved by diffusers from a seeded, randomly initialised default UNet2DModel,
    and the checkpoint `ddpm import` makes of it."""
    root = tmp_path_factory.mktemp("diffusers-defaults")
    torch.manual_seed(0)
    unet = dlib.UNet2DModel(**DIFFUSERS_DEFAULTS_SMALL).eval()
    dlib.DDPMPipeline(unet=unet, scheduler=dlib.DDPMScheduler(**SCHEDULER_T40)).save_pretrained(root / "hf")
    assert main(["import", str(root / "hf"), "--out", str(root / "imported.safetensors")]) == 0
    return root / "hf", root / "imported.safetensors", unet


def test_diffusers_default_unet_imports_with_its_embedding_and_heads(diffusers_default_folder):
    _, checkpoint, unet = diffusers_default_folder
    diffusion, meta = load_diffusion(checkpoint)
    m = diffusion.model.config
    assert (m.flip_sin_to_cos, m.freq_shift, m.attention_head_dim) == (True, 0, 8)
    assert m.dim_mults == (1, 1, 2, 2) and m.attention_resolutions == (8, 4, 2)      # AttnDownBlock2D x 3
    heads = [b.heads for b in diffusion.model.modules() if type(b).__name__ == "AttentionBlock"]
    assert sorted(set(heads)) == [4, 8]                                           # 32 / 8 and 64 / 8
    assert diffusion.model.num_parameters() == sum(p.numel() for p in unet.parameters())
    assert meta["run_config"].preset == "custom"
    assert_forward_equal(diffusion.model, unet, m)


@pytest.mark.parametrize("flip, shift", [(False, 0), (True, 1), (False, 1)])
def test_each_embedding_choice_is_what_diffusers_computes(dlib, flip, shift):
    """The forward check can fail: each (flip_sin_to_cos, freq_shift) is a different network, and ours
    follows diffusers for each."""
    from ddpm.interop.diffusers import unet_from_diffusers_config
    from ddpm.interop.diffusers_weights import state_dict_from_diffusers

    torch.manual_seed(1)
    unet = dlib.UNet2DModel(**DIFFUSERS_DEFAULTS_SMALL, flip_sin_to_cos=flip, freq_shift=shift).eval()
    m = unet_from_diffusers_config(dict(unet.config))
    assert (m.flip_sin_to_cos, m.freq_shift) == (flip, shift)
    ours = Unet(m).eval()
    ours.load_state_dict(state_dict_from_diffusers(unet.state_dict(), m, "unet"))
    assert_forward_equal(ours, unet, m)
    default = Unet(UnetConfig(**{**m.to_dict(), "flip_sin_to_cos": True, "freq_shift": 0})).eval()
    default.load_state_dict(ours.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert (default(x, t) - ours(x, t)).abs().max() > 1e-3


def test_imported_default_model_samples_what_ddpm_pipeline_samples(dlib, diffusers_default_folder):
    folder, checkpoint, _ = diffusers_default_folder
    pipe = dlib.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=40,
                  output_type="pt").images
    diffusion, _ = load_diffusion(checkpoint)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 1, 16, 16, generator=g)
    denoiser = make_denoiser(diffusion.model, diffusion.schedule, objective="eps", clip=True)
    x0 = sample_ancestral(denoiser, x_T, diffusion.schedule, spaced_timesteps(40),
                          noise=lambda: torch.randn(2, 1, 16, 16, generator=g), variance="posterior")
    ours = ((x0 + 1) / 2).clamp(0, 1)
    assert ours.std() > 0.05
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-4)


def test_export_of_the_imported_default_model_keeps_its_embedding(dlib, diffusers_default_folder, tmp_path):
    _, checkpoint, unet = diffusers_default_folder
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "again")]) == 0
    config = json.loads((tmp_path / "again" / "unet" / "config.json").read_text())
    assert (config["flip_sin_to_cos"], config["freq_shift"], config["attention_head_dim"]) == (True, 0, 8)
    assert config["down_block_types"] == list(unet.config.down_block_types)
    again = dlib.UNet2DModel.from_pretrained(tmp_path / "again" / "unet").eval()
    diffusion, _ = load_diffusion(checkpoint)
    assert_forward_equal(diffusion.model, again, diffusion.model.config)


def test_init_from_an_imported_model_fine_tunes_its_architecture(diffusers_default_folder, tmp_path):
    """`ddpm train --init` takes the architecture, the schedule and the image size from the checkpoint
    and starts from its weights: digits (8x8) are resized to the model's 16x16."""
    _, checkpoint, _ = diffusers_default_folder
    out = tmp_path / "run"
    assert main(["train", "--init", str(checkpoint), "--data", "digits", "--steps", "2", "--batch-size", "4",
                 "--lr", "1e-12", "--num-images", "1", "--sample-every", "0", "--log-every", "1",
                 "--checkpoint-every", "0", "--quiet", "--out", str(out)]) == 0
    imported, meta = load_checkpoint(checkpoint)
    trained, trained_meta = load_checkpoint(out)
    saved = RunConfig.from_dict(trained_meta["config"])
    assert saved.model == RunConfig.from_dict(meta["config"]).model
    assert saved.diffusion.timesteps == 40 and saved.data.image_size == (16, 16)
    # lr 1e-12: the weights barely move, so the run started from the imported ones (not a fresh init).
    for name, value in imported.items():
        if name.startswith("ema."):
            torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


@pytest.mark.parametrize("argv, phrase", [
    (["--preset", "digits"], "--preset digits contradicts --init"),
    (["--conditional"], "--conditional contradicts --init"),
    (["--self-condition"], "self_condition = True contradicts --init"),
])
def test_init_refuses_a_contradicting_architecture(diffusers_default_folder, tmp_path, capsys, argv, phrase):
    _, checkpoint, _ = diffusers_default_folder
    out = tmp_path / "run"
    assert main(["train", "--init", str(checkpoint), *argv, "--steps", "1", "--out", str(out)]) == 2
    one_line_error(capsys, phrase, {"--preset": "'custom'", "--conditional": "unconditional"}.get(argv[0], "False"))
    assert not out.exists()


def test_init_refuses_a_contradicting_model_table(diffusers_default_folder, tmp_path, capsys):
    _, checkpoint, _ = diffusers_default_folder
    (tmp_path / "c.toml").write_text("[model]\ndim = 64\n")
    assert main(["train", "--init", str(checkpoint), "--config", str(tmp_path / "c.toml"), "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "dim = 64", "contradicts --init", "dim = 32")


@pytest.mark.slow
def test_the_full_default_unet2dmodel_imports_exactly(dlib):
    """UNet2DModel() as diffusers builds it with no arguments at all (274M parameters; 32x32 RGB)."""
    from ddpm.interop.diffusers import unet_from_diffusers_config
    from ddpm.interop.diffusers_weights import state_dict_from_diffusers

    torch.manual_seed(0)
    unet = dlib.UNet2DModel(sample_size=32).eval()
    m = unet_from_diffusers_config(dict(unet.config))
    ours = Unet(m).eval()
    ours.load_state_dict(state_dict_from_diffusers(unet.state_dict(), m, "unet"))
    assert_forward_equal(ours, unet, m, batch=1)
