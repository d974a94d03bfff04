"""Hub models: ``hf://OWNER/NAME[@REVISION]`` checkpoints and diffusers pipelines, and ``--push-to-hub``.

Nothing here reaches the internet: repositories live in a Hub cache under tmp, laid out as
huggingface_hub lays it out (models--OWNER--NAME/refs/REV, snapshots/SHA/...), the "no network"
case points the client at a closed local port, and the Hub's refusals and uploads go through
recorded fakes of ``snapshot_download`` and ``HfApi``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hub_constants, errors as hub_errors  # noqa: E402

from ddpm.checkpoint import read_metadata, save_checkpoint  # noqa: E402
from ddpm.cli import main  # noqa: E402
from ddpm.config import DataConfig, DiffusionConfig, RunConfig  # noqa: E402
from ddpm.errors import CheckpointError, ConfigError  # noqa: E402
from ddpm.interop import hub  # noqa: E402
from ddpm.models import Unet, UnetConfig  # noqa: E402

TINY = RunConfig(preset="custom", model=UnetConfig(image_size=8, channels=1, dim=16, dim_mults=(1, 2),
                                                   num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
                                                   norm_groups=8),
                 diffusion=DiffusionConfig(timesteps=50), data=DataConfig(image_size=(8, 8), channels=1))
SHA_MAIN, SHA_V1 = "a" * 40, "b" * 40


def _checkpoint(path: Path, step: int) -> Path:
    state = Unet(TINY.model).state_dict()
    tensors = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.{k}": v.clone() for k, v in state.items()}}
    return save_checkpoint(path, tensors, {"step": step, "config": TINY.to_dict()})


def _repo(cache: Path, repo_id: str, refs: dict[str, str]) -> dict[str, Path]:
    """An empty cached repository with ``refs`` (name -> commit); returns each commit's snapshot folder."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    folders = {}
    for ref, sha in refs.items():
        (root / "refs" / ref).write_text(sha)
        folders[sha] = root / "snapshots" / sha
        folders[sha].mkdir(parents=True, exist_ok=True)
    return folders


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A Hub cache holding me/digits (main: step 3, v1: step 7), me/bert (another kind), offline."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snaps = _repo(cache, "me/digits", {"main": SHA_MAIN, "v1": SHA_V1})
    _checkpoint(snaps[SHA_MAIN] / "model.safetensors", 3)
    _checkpoint(snaps[SHA_V1] / "model.safetensors", 7)
    (snaps[SHA_MAIN] / "README.md").write_text("# digits\n")
    bert = _repo(cache, "me/bert", {"main": SHA_MAIN})[SHA_MAIN]
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return cache


def test_a_checkpoint_by_id_and_revision_from_the_cache(cache):
    assert read_metadata(hub.resolve_checkpoint_source("hf://me/digits"))["step"] == 3
    assert read_metadata(hub.resolve_checkpoint_source("hf://me/digits@v1"))["step"] == 7
    assert read_metadata(hub.resolve_checkpoint_source(f"hf://me/digits@{SHA_V1}"))["step"] == 7
    assert read_metadata(hub.resolve_checkpoint_source("me/digits", bare=True))["step"] == 3
    assert hub.resolve_checkpoint_source("me/digits") == "me/digits"          # bare ids only when asked


def test_cli_reads_a_hub_checkpoint(cache, capsys):
    assert main(["inspect", "--checkpoint", "hf://me/digits@v1"]) == 0
    out = capsys.readouterr().out
    assert f"snapshots/{SHA_V1}/model.safetensors" in out


def test_train_init_and_checkpoint_options_are_resolved(cache):
    import argparse

    args = argparse.Namespace(command="train", init="hf://me/digits@v1", checkpoint=None)
    hub.resolve_hub_args(args)
    assert read_metadata(args.init)["step"] == 7
    args = argparse.Namespace(command="import", checkpoint="hf://me/digits")
    hub.resolve_hub_args(args)
    assert args.checkpoint == "hf://me/digits"                    # import resolves its own source


def _one_line_error(capsys, argv) -> str:
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddpm: error: "), err
    return err


def test_offline_and_not_cached_is_one_line(cache, capsys):
    err = _one_line_error(capsys, ["inspect", "--checkpoint", "hf://me/absent"])
    assert "not in the local Hub cache" in err and "HF_HUB_OFFLINE" in err


def test_no_network_is_one_line(cache, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")    # nothing listens there
    err = _one_line_error(capsys, ["inspect", "--checkpoint", "hf://me/absent"])
    assert "cannot be reached" in err


def _response(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))


@pytest.mark.parametrize("exc, words", [
    (lambda: hub_errors.RepositoryNotFoundError("404", response=_response(404)), "no such model repository"),
    (lambda: hub_errors.GatedRepoError("403", response=_response(403)), "is gated"),
    (lambda: hub_errors.RevisionNotFoundError("404", response=_response(404)), "has no revision"),
])
def test_hub_refusals_are_one_line(cache, capsys, monkeypatch, exc, words):
    def refuse(**kwargs):
        raise exc()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    assert words in _one_line_error(capsys, ["inspect", "--checkpoint", "hf://me/x@r"])


def test_a_repository_of_another_kind_is_refused(cache, capsys):
    assert "a bert" in _one_line_error(capsys, ["inspect", "--checkpoint", "hf://me/bert"])


def test_only_safetensors_json_and_markdown_are_asked_for(cache, monkeypatch):
    calls = []
    real = huggingface_hub.snapshot_download

    def record(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record)
    hub.resolve_checkpoint_source("hf://me/digits@v1")
    (call,) = calls
    assert call["repo_id"] == "me/digits" and call["revision"] == "v1" and call["local_files_only"] is True
    assert sorted(call["allow_patterns"]) == ["*.json", "*.md", "*.safetensors"]
    assert "trust_remote_code" not in call


def _recording_api(sent: dict):
    class FakeApi:
        """Records what ddpm sends: the repository it creates and the files and card it uploads."""

        def create_repo(self, **kwargs):
            sent["create"] = kwargs

        def upload_folder(self, *, folder_path, **kwargs):
            files = {p.relative_to(folder_path).as_posix(): p for p in Path(folder_path).rglob("*") if p.is_file()}
            sent["upload"] = kwargs
            sent["files"] = sorted(files)
            sent["card"] = files["README.md"].read_text()

    return FakeApi


def test_export_pushes_the_exported_folder_with_its_card(tmp_path, capsys, monkeypatch):
    """The CLI wiring, with the diffusers export replaced by a folder of known files (no diffusers import)."""
    import ddpm.cli.cmd_io as interop_diffusers       # where ddpm export finds it

    def fake_export(checkpoint, out, *, weights="ema", command=None):
        out = Path(out)
        (out / "unet").mkdir(parents=True)
        (out / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
        (out / "README.md").write_text("---\nlibrary_name: ddpm\n---\n# card\n")
        return out

    sent = {}
    monkeypatch.setattr(interop_diffusers, "export_diffusers", fake_export)
    monkeypatch.setattr(huggingface_hub, "HfApi", _recording_api(sent))
    assert main(["export", "--checkpoint", "ck", "--out", str(tmp_path / "pipe"), "--push-to-hub", "me/pipe",
                 "--private"]) == 0
    assert sent["create"] == {"repo_id": "me/pipe", "repo_type": "model", "private": True, "exist_ok": True}
    assert sent["upload"]["repo_id"] == "me/pipe" and sent["upload"]["repo_type"] == "model"
    assert sent["files"] == ["README.md", "unet/diffusion_pytorch_model.safetensors"]
    assert sent["card"].startswith("---\nlibrary_name: ddpm")
    assert "https://huggingface.co/me/pipe" in capsys.readouterr().out
    err = _one_line_error(capsys, ["export", "--checkpoint", "ck", "--out", str(tmp_path / "p2"), "--private"])
    assert "--push-to-hub" in err and not (tmp_path / "p2").exists()


def test_push_without_a_login_is_one_line(tmp_path):
    class NoToken:
        def create_repo(self, **kwargs):
            raise hub_errors.LocalTokenNotFoundError("no token")

    with pytest.raises(ConfigError, match="hf auth login"):
        hub.push_to_hub(tmp_path, "me/pipe", api=NoToken())


@pytest.mark.slow
def test_import_and_push_a_diffusers_pipeline(cache, tmp_path, capsys, monkeypatch):
    """End to end with diffusers (its import alone takes seconds): export and push, import back from the cache."""
    pytest.importorskip("diffusers")
    ckpt = _checkpoint(tmp_path / "local.safetensors", 5)
    sent = {}
    monkeypatch.setattr(huggingface_hub, "HfApi", _recording_api(sent))
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "pipe"),
                 "--push-to-hub", "me/pipe", "--private"]) == 0
    assert sent["create"] == {"repo_id": "me/pipe", "repo_type": "model", "private": True, "exist_ok": True}
    assert sent["upload"]["repo_id"] == "me/pipe"
    assert {"README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} <= set(sent["files"])
    assert "ddpm" in sent["card"]
    assert "https://huggingface.co/me/pipe" in capsys.readouterr().out

    # What was pushed, put in the cache as the Hub client would, imports back; sampling it asks for the import.
    snap = _repo(cache, "me/pipe", {"main": SHA_MAIN})[SHA_MAIN]
    for name in sent["files"]:
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes((tmp_path / "pipe" / name).read_bytes())
    assert main(["import", "hf://me/pipe", "--out", str(tmp_path / "back.safetensors")]) == 0
    assert read_metadata(tmp_path / "back.safetensors")["imported_from"]["format"] == "diffusers"
    capsys.readouterr()
    assert "ddpm import hf://me/pipe" in _one_line_error(capsys, ["inspect", "--checkpoint", "hf://me/pipe"])


def test_bad_hub_ids_are_refused():
    with pytest.raises(ConfigError):
        hub.parse_hub_source("hf://just-a-name")
    with pytest.raises(ConfigError):
        hub.push_to_hub(".", "no slash")
    assert hub.parse_hub_source("hf://a/b@main") == ("a/b", "main")
    with pytest.raises(CheckpointError):
        hub.repository_kind(Path("/nonexistent-dir"), "hf://a/b")
