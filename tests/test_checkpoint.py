"""Checkpoints: round trip, refusal of foreign / truncated / tampered files, atomic saving."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ddpm import CheckpointError
from ddpm.config import RunConfig
from ddpm.checkpoint import (checkpoint_path, flatten_optimizer_state, list_checkpoints, load_checkpoint,
                             load_weights, read_metadata, resolve_checkpoint, save_checkpoint, split_prefix,
                             unflatten_optimizer_state)
from ddpm.fileio import atomic_write


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.w": torch.randn(4, 3, generator=g), "model.b": torch.randn(3, generator=g),
            "ema.w": torch.randn(4, 3, generator=g), "ema.b": torch.randn(3, generator=g)}


CONFIG = RunConfig.for_preset("digits").to_dict()          # a valid configuration (the tensors need not fit it)


def test_round_trip_preserves_tensors_and_metadata(tmp_path):
    path = checkpoint_path(tmp_path, 42)
    assert path.name == "step-0000042.safetensors"
    tensors = _tensors()
    save_checkpoint(path, tensors, {"step": 42, "config": CONFIG})
    loaded, meta = load_checkpoint(path)
    assert set(loaded) == set(tensors)
    for k in tensors:
        assert loaded[k].dtype == tensors[k].dtype and torch.equal(loaded[k], tensors[k])
    assert meta["step"] == 42 and meta["config"] == CONFIG and meta["format_version"] == 1
    assert split_prefix(loaded, "model").keys() == {"w", "b"}


def test_run_directory_resolves_to_newest_checkpoint(tmp_path):
    for step in (5, 100, 20):
        save_checkpoint(checkpoint_path(tmp_path, step), _tensors(step), {"step": step, "config": CONFIG})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 20, 100]
    assert resolve_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)
    assert read_metadata(tmp_path)["step"] == 100


def test_missing_and_empty_run_directory_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        resolve_checkpoint(tmp_path)


def test_non_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a ddpm checkpoint"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="without ddpm metadata"):
        load_checkpoint(path)


def test_truncated_file_is_refused(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, _tensors(), {"step": 1, "config": CONFIG})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_tampered_tensor_fails_the_checksum(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, _tensors(), {"step": 1, "config": CONFIG})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF                                 # flip bits inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_renamed_tensor_fails_the_checksum(tmp_path):
    """A tensor renamed (here without changing the name order) keeps every byte: the checksum covers the names."""
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, _tensors(), {"step": 1, "config": CONFIG})
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.c"] = tensors.pop("model.b")
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_load_weights_refuses_missing_or_unexpected_tensors(change):
    model = torch.nn.Linear(3, 2)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if change == "missing":
        del tensors["model.bias"]
    else:
        tensors["model.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="do not match"):
        load_weights(model, tensors, "model", "c.safetensors")
    load_weights(model, {f"model.{k}": v for k, v in model.state_dict().items()}, "model", "c.safetensors")


def test_future_format_version_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file({"model.w": torch.zeros(1)}, str(path), metadata={"ddpm": json.dumps({"format_version": 99})})
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, code):
    path = checkpoint_path(tmp_path, 7)
    save_checkpoint(path, _tensors(0), {"step": 7, "config": CONFIG})
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=f"{os.strerror(code)}; the file already at .* is intact"):
        save_checkpoint(path, _tensors(1), {"step": 7, "config": CONFIG})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]      # no temporary file left behind


def test_atomic_write_failure_mid_write_leaves_target_intact(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def half_write(tmp):
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, half_write)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, info = flatten_optimizer_state(opt.state_dict())
    json.dumps(info)                                                  # the rest must be JSON
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(info)))
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(restored)
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(fresh.state_dict()["state"][idx][key], value)


def test_optimizer_state_keeps_number_valued_entries():
    """torch's Adam keeps its step as a tensor, but an optimizer may keep plain numbers: they go to the JSON."""
    momentum = torch.arange(3.0)
    state = {"state": {0: {"momentum_buffer": momentum, "step": 7}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    tensors, info = flatten_optimizer_state(state)
    assert set(tensors) == {"optim.0.momentum_buffer"}
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(info)))
    assert restored["state"][0]["step"] == 7 and torch.equal(restored["state"][0]["momentum_buffer"], momentum)
    assert restored["param_groups"] == state["param_groups"]


def test_checkpoint_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(checkpoint_path(tmp_path, 1), _tensors(), {"step": 1, "config": CONFIG})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644          # readable by collaborators, as other files are


# ----------------------------------------------------------------------------- metadata checksum, finiteness, fallback

def test_an_edited_header_fails_the_metadata_checksum(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, _tensors(), {"step": 1, "config": CONFIG})
    data = path.read_bytes()
    old, new = b'\\"schedule\\": \\"linear\\"', b'\\"schedule\\": \\"cosine\\"'
    assert old in data
    path.write_bytes(data.replace(old, new))          # same length: the tensors and their checksum are intact
    for read in (read_metadata, load_checkpoint):
        with pytest.raises(CheckpointError, match="failed its metadata checksum"):
            read(path)


def test_checkpoints_without_a_metadata_checksum_still_load(tmp_path):
    """Files written before the metadata checksum existed: the tensor checksum alone, as before."""
    from ddpm.checkpoint import tensor_checksum

    path = tmp_path / "old.safetensors"
    tensors = _tensors()
    meta = json.dumps({"format_version": 1, "step": 3, "config": CONFIG})
    save_file(tensors, str(path), metadata={"ddpm": meta, "checksum": tensor_checksum(tensors)})
    loaded, meta = load_checkpoint(path)
    assert meta["step"] == 3 and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("name", ["model.w", "ema.w"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_their_name(tmp_path, name, value):
    tensors = _tensors()
    tensors[name] = tensors[name].clone()
    tensors[name][1, 2] = value
    path = save_checkpoint(checkpoint_path(tmp_path, 1), tensors, {"step": 1, "config": CONFIG})
    with pytest.raises(CheckpointError, match=f"non-finite weights \\(NaN or inf in {name}\\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("meta, message", [
    ({"step": 1}, "'config' entry is missing"),
    ({"step": 1, "config": [1]}, "'config' is a list, not an object"),
    ({"step": -1, "config": CONFIG}, "no valid step"),
    ({"step": "3", "config": CONFIG}, "no valid step"),
    ({"config": CONFIG}, "no valid step"),
])
def test_metadata_without_step_or_config_object_is_refused(tmp_path, meta, message):
    path = save_checkpoint(checkpoint_path(tmp_path, 1), _tensors(), meta)
    with pytest.raises(CheckpointError, match=message):
        read_metadata(path)


def test_newest_verified_checkpoint_skips_broken_ones_with_a_warning_each(tmp_path):
    from ddpm.checkpoint import load_newest_verified

    for step in (2, 4, 6):
        save_checkpoint(checkpoint_path(tmp_path, step), _tensors(step), {"step": step, "config": CONFIG})
    newest = checkpoint_path(tmp_path, 6)
    newest.write_bytes(newest.read_bytes()[:-9])                       # truncated by a crash
    nan = _tensors(4)
    nan["ema.w"] = torch.full_like(nan["ema.w"], float("nan"))
    save_checkpoint(checkpoint_path(tmp_path, 4), nan, {"step": 4, "config": CONFIG})
    warnings: list[str] = []
    tensors, meta = load_newest_verified(tmp_path, warn=warnings.append)
    assert meta["step"] == 2 and torch.equal(tensors["model.w"], _tensors(2)["model.w"])
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert str(newest) in warnings[0] and str(checkpoint_path(tmp_path, 4)) in warnings[1]
    assert "non-finite" in warnings[1]


def test_newest_verified_checkpoint_of_a_run_without_any_good_one(tmp_path):
    from ddpm.checkpoint import load_newest_verified

    assert load_newest_verified(tmp_path, warn=pytest.fail) is None          # no checkpoint at all: None
    path = save_checkpoint(checkpoint_path(tmp_path, 2), _tensors(), {"step": 2, "config": CONFIG})
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(CheckpointError, match="none of the 1 checkpoint\\(s\\) of .* verifies; the newest: "):
        load_newest_verified(tmp_path, warn=lambda message: None)


def test_a_failed_first_save_does_not_claim_a_previous_checkpoint(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="No space left on device; no checkpoint was written"):
        save_checkpoint(checkpoint_path(tmp_path, 1), _tensors(), {"step": 1, "config": CONFIG})
    monkeypatch.undo()
    first = save_checkpoint(checkpoint_path(tmp_path, 1), _tensors(), {"step": 1, "config": CONFIG})
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=f"No space left on device; the previous checkpoint {first} is intact"):
        save_checkpoint(checkpoint_path(tmp_path, 2), _tensors(), {"step": 2, "config": CONFIG})
