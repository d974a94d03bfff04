"""``ddpm import --format openai hf://OWNER/NAME``: a Hub repository holding an improved-/guided-diffusion
state dict converted to safetensors imports as the same file does locally; a .pt on the Hub is never
read. The repositories live in a Hub cache under tmp (offline), laid out as huggingface_hub lays it out."""

from __future__ import annotations

import pytest
import torch

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hub_constants  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ddpm.checkpoint import load_checkpoint  # noqa: E402
from ddpm.cli import main  # noqa: E402
from helpers.openai_reference import Arch, reference_state_dict  # noqa: E402
from test_hub import SHA_MAIN, _repo  # noqa: E402

ARCH = Arch(image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
            num_heads=2, learn_sigma=True, use_scale_shift_norm=True, rescale_steps=20)
FLAGS = ("--image_size 8 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 --attention_resolutions 4 "
         "--num_heads 2 --learn_sigma True --diffusion_steps 20 --noise_schedule cosine --rescale_timesteps True")


@pytest.fixture
def repos(tmp_path, monkeypatch):
    """me/adm (the state dict as model.safetensors), me/adm-pt (only model.pt), me/adm-two (two files)."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = {k: v.contiguous() for k, v in reference_state_dict(ARCH, torch.Generator().manual_seed(0)).items()}
    save_file(state, str(_repo(cache, "me/adm", {"main": SHA_MAIN})[SHA_MAIN] / "model.safetensors"))
    torch.save(state, _repo(cache, "me/adm-pt", {"main": SHA_MAIN})[SHA_MAIN] / "model.pt")
    two = _repo(cache, "me/adm-two", {"main": SHA_MAIN})[SHA_MAIN]
    for name in ("a.safetensors", "b.safetensors"):
        save_file(state, str(two / name))
    return cache


def test_a_hub_safetensors_state_dict_imports_as_the_local_file_does(repos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = repos / "models--me--adm" / "snapshots" / SHA_MAIN / "model.safetensors"
    assert main(["import", "--format", "openai", "hf://me/adm", "--flags", FLAGS, "--out", "hub.safetensors"]) == 0
    assert main(["import", "--format", "openai", str(local), "--flags", FLAGS, "--out", "local.safetensors"]) == 0
    (hub_tensors, hub_meta), (local_tensors, local_meta) = (load_checkpoint(tmp_path / f"{n}.safetensors")
                                                            for n in ("hub", "local"))
    assert hub_tensors.keys() == local_tensors.keys() and hub_meta["config"] == local_meta["config"]
    assert all(torch.equal(hub_tensors[k], local_tensors[k]) for k in hub_tensors)


def test_a_pt_on_the_hub_is_never_loaded(repos, tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    monkeypatch.chdir(tmp_path)
    assert main(["import", "--format", "openai", "hf://me/adm-pt", "--flags", FLAGS, "--out", "m.safetensors"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no .safetensors file; ddpm never loads a .pt" in err[0]
    assert main(["import", "--format", "openai", "hf://me/adm-two", "--flags", FLAGS, "--out", "m.safetensors"]) == 4
    assert "holds 2 .safetensors files (a.safetensors, b.safetensors)" in capsys.readouterr().err
    assert not loads and not (tmp_path / "m.safetensors").exists()
