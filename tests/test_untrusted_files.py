"""Files read from disk are data to check, not to trust: checkpoints whose metadata was edited
(both checksums recomputed, so only validation can catch them), checkpoints pruned by a running
training while a reader opens them, diffusers folders, symlinks out of a run directory, and a
disk that fills while exporting. Each gets one ``ddpm: error:`` line (or, for a symlink, one
warning), a non-zero exit and no change on disk."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers.crafted import craft

from ddpm.cli import main

TINY = ("--steps 4 --batch-size 4 --timesteps 25 --num-images 2 --checkpoint-every 2 --keep-last 2 --log-every 1 "
        "--num-samples 1 --quiet")


def run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stderr, traceback of an escaped exception or '')."""
    err, escaped = io.StringIO(), ""
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:                       # noqa: BLE001 -- any escape is the failure under test
            code, escaped = -1, traceback.format_exc()
    return code, err.getvalue(), escaped


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv: list[str], *words: str, root: Path | None = None, code: int | None = None) -> str:
    """Run ``argv``: one ``ddpm: error:`` line naming ``words``, non-zero exit, ``root`` unchanged."""
    before = snapshot(root) if root else None
    status, err, escaped = run(argv)
    assert not escaped, escaped
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("ddpm: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("ddpm: error: "), err
    assert status != 0 and (code is None or status == code), (status, err)
    for word in words:
        assert word in lines[0], (word, lines[0])
    if root:
        assert snapshot(root) == before
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-step run of a U-Net of width 8 with checkpoints at steps 2 and 4."""
    base = tmp_path_factory.mktemp("untrusted")
    small = base / "small.toml"
    small.write_text("[model]\ndim = 8\n")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", *TINY.split(), "--config", str(small), "--out", str(base / "run")]) == 0
    return base / "run"


def newest(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-*.safetensors"))[-1]


def copy_run(trained: Path, dst: Path, **edits) -> Path:
    """A copy of the run whose checkpoints are all crafted with ``edits`` (see :func:`craft`)."""
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns("tensorboard", "*.lock"))
    for path in (dst / "checkpoints").glob("step-*.safetensors"):
        craft(path, path, **edits)
    return dst


# ----------------------------------------------------------------------------- checkpoint metadata as data

def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        if value is KeyError:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, field", [
    (_set("step", 10 ** 30), "step"),
    (_set("data_position", -8), "data_position"),
    (_set("data_position", 15.5), "data_position"),
    (_set("data_position", 12), "data_position"),                  # not step x global batch (16)
    (_set("rng", KeyError), "rng"),
    (_set("rng", "torch", [1, 2, 3]), "rng.torch"),
    (_set("rng", "numpy", [1]), "rng.numpy"),
    (_set("optimizer", "param_groups", "adam"), "optimizer"),
    (_set("optimizer", "param_groups", 0, "params", [0, 10 ** 6]), "optimizer.param_groups"),
    (_set("counters", "step", 3), "counters.step"),
    (_set("ema_updates", -1), "ema_updates"),
    (_set("global_batch", 0), "global_batch"),
    (_set("config", "model", "dim", 2 ** 30), "config"),
    (_set("scaler", {"scale": 1.0}), "scaler"),
    (_set("imported_from", {"path": ["a"]}), "imported_from"),
])
def test_edited_metadata_is_refused_naming_the_field(trained, tmp_path, edit, field):
    """Metadata edited with both checksums recomputed is refused by inspect, sample and --resume."""
    bad = craft(newest(trained), tmp_path / "bad.safetensors", edit_meta=edit)
    line = refused(["inspect", str(bad)], f"'{field}'" if field not in ("step",) else "step", root=tmp_path,
                   code=4)
    assert str(bad) in line


def test_a_half_precision_ema_tensor_is_refused_naming_it(trained, tmp_path):
    def half(tensors):
        name = sorted(k for k in tensors if k.startswith("ema."))[0]
        tensors[name] = tensors[name].half()
    bad = craft(newest(trained), tmp_path / "bad.safetensors", edit_tensors=half)
    refused(["inspect", str(bad)], "ema.", "F16", root=tmp_path, code=4)


def test_resume_refuses_a_wrong_rng_state_and_optimizer_state(trained, tmp_path):
    for name, edit, field in (("rng", _set("rng", "python", 1, [7] * 3), "rng.python"),
                              ("optim", _set("optimizer", "scalars", "0.step", "many"), "optimizer.scalars"),
                              ("no-rng", _set("rng", KeyError), "'rng'")):
        run_dir = copy_run(trained, tmp_path / name, edit_meta=edit)
        refused(["train", "--resume", str(run_dir), "--steps", "6", "--quiet"], field, root=tmp_path)


def test_init_refuses_a_huge_width_naming_the_field(trained, tmp_path):
    bad = craft(newest(trained), tmp_path / "bad.safetensors", edit_meta=_set("config", "model", "dim", 2 ** 30))
    refused(["train", "--init", str(bad), "--steps", "1", "--out", str(tmp_path / "ft"), "--dry-run"],
            "'config'", "dim", root=tmp_path, code=4)


# ----------------------------------------------------------------------------- readers never race writers

def test_sample_records_the_hash_of_the_bytes_it_loaded_even_if_pruned_meanwhile(trained, tmp_path, monkeypatch):
    """``sample RUN`` while training prunes checkpoints: the file read is deleted right after loading; the
    record's SHA-256 is that of the bytes the images came from, not a second read of the file."""
    import ddpm.generate as generate

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    path = newest(run_dir)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    real = generate.load_checkpoint

    def load_then_prune(*args, **kwargs):
        loaded = real(*args, **kwargs)
        os.unlink(loaded[1]["path"])               # the trainer's --keep-last pruned it
        return loaded

    monkeypatch.setattr(generate, "load_checkpoint", load_then_prune)
    out = tmp_path / "samples"
    code, err, escaped = run(["sample", "--checkpoint", str(run_dir), "--n", "1", "--steps", "2", "--out", str(out)])
    assert code == 0 and not escaped, err + escaped
    record = json.loads((out / "record.json").read_text())
    assert record["checkpoint_sha256"] == digest


def test_a_run_directory_whose_newest_checkpoint_is_pruned_while_opening_it(trained, tmp_path, monkeypatch):
    """Listing finds step 2 as the newest; before it is opened the trainer writes step 4 and prunes step 2."""
    import ddpm.checkpoint as checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    step4 = newest(run_dir)
    aside = tmp_path / "aside.safetensors"
    step4.rename(aside)
    real = checkpoint.list_checkpoints
    calls = []

    def list_then_prune(folder):
        found = real(folder)
        if not calls:
            aside.rename(step4)
            found[-1][1].unlink()
        calls.append(folder)
        return found

    monkeypatch.setattr(checkpoint, "list_checkpoints", list_then_prune)
    code, err, escaped = run(["inspect", str(run_dir)])
    assert code == 0 and not escaped, err + escaped
    assert len(calls) == 2                                  # listed once more, after the first open failed
    tensors, meta = checkpoint.load_checkpoint(run_dir)
    assert meta["path"] == str(step4)
    calls.clear()
    step4.rename(aside)
    shutil.copyfile(aside, run_dir / "checkpoints" / "step-0000002.safetensors")
    loaded = checkpoint.load_newest_verified(run_dir, warn=pytest.fail)
    assert loaded is not None and loaded[1]["path"] == str(step4)


# ----------------------------------------------------------------------------- diffusers folders, export

@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("export") / "pipeline"
    code, err, escaped = run(["export", "--checkpoint", str(trained), "--out", str(out)])
    assert code == 0 and not escaped, err + escaped
    return out


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("where, changes, field", [
    ("unet/config.json", {"sample_size": "28"}, "sample_size"),
    ("unet/config.json", {"block_out_channels": [2 ** 30, 2 ** 30]}, "block_out_channels"),
    ("unet/config.json", {"layers_per_block": 10 ** 9}, "layers_per_block"),
    ("unet/config.json", {"norm_eps": "tiny"}, "norm_eps"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 10 ** 12}, "num_train_timesteps"),
    ("scheduler/scheduler_config.json", {"trained_betas": [0.5] * 3}, "trained_betas"),
    ("scheduler/scheduler_config.json", {"beta_end": float("nan")}, "beta_end"),
])
def test_import_checks_the_diffusers_configuration_before_building_anything(exported, tmp_path, where, changes,
                                                                             field):
    folder = tmp_path / "pipeline"
    shutil.copytree(exported, folder)
    _edit_json(folder / where, **changes)
    refused(["import", str(folder), "--out", str(tmp_path / "imported.safetensors")], field, root=tmp_path, code=4)


def test_import_refuses_integer_weights_naming_the_tensor(exported, tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(exported, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].round().to(torch.int64)
    save_file(tensors, str(weights))
    refused(["import", str(folder), "--out", str(tmp_path / "imported.safetensors")], name, "int64",
            root=tmp_path, code=4)


def test_export_does_not_follow_a_symlink_out_of_the_run_directory(trained, tmp_path):
    """A samples.png that links to a file outside the run is skipped with one warning, never copied."""
    pytest.importorskip("diffusers")
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any run")
    (run_dir / "samples.png").unlink()
    (run_dir / "samples.png").symlink_to(secret)
    out = tmp_path / "pipeline"
    code, err, escaped = run(["export", "--checkpoint", str(run_dir), "--out", str(out)])
    assert code == 0 and not escaped, err + escaped
    assert [line for line in err.splitlines() if line.strip()] == [
        f"ddpm: warning: {run_dir / 'samples.png'} is a symbolic link out of the run directory (to {secret}); "
        "it is not copied into the export"]
    assert not (out / "samples.png").exists()
    assert all(b"not part of any run" not in p.read_bytes() for p in out.rglob("*") if p.is_file())
    inside = run_dir / "samples" / "final.png"                 # a link that stays inside the run is followed
    shutil.copyfile(trained / "samples.png", inside)
    (run_dir / "samples.png").unlink()
    (run_dir / "samples.png").symlink_to(inside)
    code, err, _ = run(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "again")])
    assert code == 0 and not err.strip()
    assert (tmp_path / "again" / "samples.png").read_bytes() == inside.read_bytes()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS])
def test_export_and_import_on_a_failing_disk_leave_nothing_partial(trained, exported, tmp_path, monkeypatch, code):
    """A write that fails half-way (a full disk, an I/O error, a read-only file system): one line, no
    partial folder or file under the final name, every earlier file intact."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def failing(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(code, os.strerror(code), str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    monkeypatch.setattr("ddpm.checkpoint.save_file", failing)
    out = tmp_path / "pipeline"
    before = snapshot(trained)
    refused(["export", "--checkpoint", str(trained), "--out", str(out)], os.strerror(code), "nothing was written",
            root=tmp_path)
    assert not out.exists() and list(tmp_path.iterdir()) == [] and snapshot(trained) == before
    target = tmp_path / "imported.safetensors"
    refused(["import", str(exported), "--out", str(target)], os.strerror(code), root=tmp_path)
    assert not target.exists() and list(tmp_path.iterdir()) == []

    def full_disk(tensors, filename, *args, **kwargs):            # what safetensors itself raises
        real(tensors, filename, *args, **kwargs)
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    refused(["export", "--checkpoint", str(trained), "--out", str(out)], "No space left on device", root=tmp_path)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- inpainting inputs

def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming ``width`` x ``height`` greyscale pixels over a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_inpaint_refuses_a_decompression_bomb_mask_and_an_unbounded_resampling(trained, tmp_path):
    bomb = _png_claiming(tmp_path / "bomb.png", 40_000, 40_000)
    base = ["inpaint", "--checkpoint", str(trained), "--image", "digits:0", "--steps", "2", "--out"]
    refused([*base, str(tmp_path / "a"), "--mask", str(bomb)], "mask", "bomb.png", root=tmp_path, code=3)
    refused([*base, str(tmp_path / "b"), "--mask", "center", "--resample", "1000000"], "resample", "1,000",
            root=tmp_path, code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png"]
