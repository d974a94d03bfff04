"""``ddpm import --format openai``: improved-/guided-diffusion state dicts become ddpm checkpoints.

The state dicts are drawn with the repositories' exact key names and shapes (reduced widths and
sizes) by ``helpers/openai_reference.py``, whose forward pass, written from the published
architecture without ddpm, is the reference the imported network must reproduce.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import load_checkpoint, split_prefix
from ddpm.cli import main
from ddpm.config import RunConfig
from ddpm.errors import CheckpointError, ConfigError
from ddpm.interop.openai import import_openai, parse_openai_flags
from ddpm.models import Unet, UnetConfig
from helpers.openai_reference import Arch, reference_forward, reference_state_dict

# improved-diffusion's CIFAR-10 flags at 1/4 width (their num_heads 4, legacy attention, scale-shift).
CIFAR_FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True --dropout 0.3 "
               "--diffusion_steps 4000 --noise_schedule cosine")
CIFAR = Arch(image_size=32, model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
             attention_resolutions=(16, 8), num_heads=4, learn_sigma=True, use_scale_shift_norm=True,
             rescale_steps=4000)
# guided-diffusion's class-conditional ImageNet-64 flags at half the resolution, reduced width, depth and
# class count (the 64x64 model's channel_mult and attention levels).
IMAGENET_FLAGS = ("--attention_resolutions 16,8,4 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                  "--image_size 32 --channel_mult 1,2,3,4 --learn_sigma True --noise_schedule cosine --num_channels 32 "
                  "--num_head_channels 16 --num_res_blocks 1 --resblock_updown True --use_new_attention_order True "
                  "--use_fp16 True --use_scale_shift_norm True")
IMAGENET = Arch(image_size=32, model_channels=32, channel_mult=(1, 2, 3, 4), num_res_blocks=1,
                attention_resolutions=(16, 8, 4), num_head_channels=16, learn_sigma=True, num_classes=5,
                use_scale_shift_norm=True, resblock_updown=True, new_attention_order=True)


def _write_pt(tmp_path: Path, arch: Arch, seed: int = 0) -> tuple[Path, dict]:
    state = reference_state_dict(arch, torch.Generator().manual_seed(seed))
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path, state


def _imported_net(ckpt: Path) -> tuple[Unet, RunConfig]:
    tensors, meta = load_checkpoint(ckpt)
    config = RunConfig.from_dict(meta["config"])
    net = Unet(config.model).eval()
    net.load_state_dict(split_prefix(tensors, "ema"))
    return net, config


@pytest.mark.parametrize("arch, flags, label", [(CIFAR, CIFAR_FLAGS, False), (IMAGENET, IMAGENET_FLAGS, True)],
                         ids=["improved-cifar10", "guided-imagenet64-cond"])
def test_imported_network_equals_the_reference_forward(tmp_path, arch, flags, label):
    path, state = _write_pt(tmp_path, arch)
    ckpt = import_openai(path, tmp_path / "out.safetensors", flags)
    net, config = _imported_net(ckpt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, arch.image_size, arch.image_size, generator=g)
    t = torch.tensor([3, 917])
    y = torch.tensor([4, 1]) if label else None
    expected = reference_forward(state, arch, x, t, y)
    with torch.no_grad():
        got = net(x, t, y)
    assert expected.shape == (2, 6, arch.image_size, arch.image_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    d = config.diffusion
    assert (d.timesteps, d.schedule, d.variance, d.objective) == (
        4000 if arch is CIFAR else 1000, "cosine", "learned-range", "eps")


def test_legacy_attention_order_is_what_makes_the_cifar_import_match(tmp_path):
    """Read as guided-diffusion's new order, the same improved-diffusion weights compute something else."""
    path, state = _write_pt(tmp_path, CIFAR)
    ckpt = import_openai(path, tmp_path / "out.safetensors", CIFAR_FLAGS + " --use_new_attention_order True"
                         " --rescale_timesteps True --rescale_learned_sigmas True")
    net, _ = _imported_net(ckpt)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        assert not torch.allclose(net(x, t), reference_forward(state, CIFAR, x, t), atol=1e-3)


def test_flags_take_each_repositories_defaults():
    improved = parse_openai_flags("--image_size 32")
    guided = parse_openai_flags("--image_size 64 --resblock_updown True")
    assert improved["rescale_timesteps"] is True and guided["rescale_timesteps"] is False
    assert improved["use_scale_shift_norm"] and improved["num_heads"] == 4
    with pytest.raises(ConfigError, match="unknown flag"):
        parse_openai_flags("--image_size 32 --no_such_flag 1")
    with pytest.raises(ConfigError, match="True or False"):
        parse_openai_flags("--learn_sigma maybe")


class _WritesAFile:
    """A pickle payload that, if ever unpickled, writes a file."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"input_blocks.0.0.weight": _WritesAFile(str(target))}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as info:
        import_openai(path, tmp_path / "out.safetensors", CIFAR_FLAGS)
    assert "\n" not in str(info.value)
    assert not target.exists()
    assert not (tmp_path / "out.safetensors").exists()
    pickle.loads(pickle.dumps(_WritesAFile(str(tmp_path / "control"))))   # the payload does work when unpickled
    assert (tmp_path / "control").exists()


def test_every_shape_is_checked_before_writing(tmp_path):
    state = reference_state_dict(CIFAR, torch.Generator().manual_seed(0))
    state["middle_block.1.qkv.weight"] = torch.zeros(3 * 32, 32, 1)          # 32 channels where 64 belong
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"middle_block.1.qkv.weight has shape \[96, 32, 1\]"):
        import_openai(tmp_path / "bad.pt", tmp_path / "out.safetensors", CIFAR_FLAGS)
    path, _ = _write_pt(tmp_path, CIFAR)
    with pytest.raises(CheckpointError, match="do the --flags match"):          # flags of another width
        import_openai(path, tmp_path / "out.safetensors", CIFAR_FLAGS.replace("--num_channels 32", "--num_channels 64"))
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_imports_and_samples(tmp_path, monkeypatch, capsys):
    arch = Arch(image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_heads=2, learn_sigma=True, use_scale_shift_norm=True, rescale_steps=20)
    path, _ = _write_pt(tmp_path, arch)
    monkeypatch.chdir(tmp_path)
    flags = ("--image_size 8 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 --attention_resolutions 4 "
             "--num_heads 2 --learn_sigma True --diffusion_steps 20 --noise_schedule cosine --rescale_timesteps True")
    assert main(["import", "--format", "openai", str(path), "--flags", flags, "--out", "m.safetensors"]) == 0
    assert main(["sample", "--checkpoint", "m.safetensors", "--num-images", "2", "--steps", "4", "--out", "s",
                 "--device", "cpu", "--quiet"]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as npz:
        images = npz[npz.files[0]]
    assert images.shape[0] == 2 and images.shape[-3:] in ((8, 8, 3), (3, 8, 8))
    capsys.readouterr()
    assert main(["import", "--format", "openai", str(path), "--flags", flags + " --bogus 1", "--out", "n.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddpm: error: --flags: unknown"), err
    assert not (tmp_path / "n.safetensors").exists()


def test_new_unet_options_are_validated():
    for bad in (dict(use_scale_shift_norm=1), dict(resblock_updown="yes"), dict(timestep_scale=0),
                dict(timestep_scale=True)):
        with pytest.raises(ConfigError):
            UnetConfig(**bad)
