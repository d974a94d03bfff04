"""Checkpoints: safetensors weights with JSON metadata; loading never executes code.

One file per checkpoint, ``RUN_DIR/checkpoints/step-NNNNNNN.safetensors``, holding the
tensors ``model.*`` (raw weights), ``ema.*`` (the moving average) and ``optim.*``
(optimizer state), and in the safetensors header:

* ``ddpm``: JSON with ``format_version``, ``step``, ``config`` (the full :class:`RunConfig`)
  and any further run state;
* ``checksum``: SHA-256 over every tensor's name, dtype, shape and bytes, verified on load,
  so a truncated or tampered file is refused;
* ``meta_checksum``: SHA-256 of the ``ddpm`` JSON text, so an edited header (say ``schedule``
  changed from linear to cosine) is refused like edited weights. Checkpoints written before it
  existed have none and load as before.

Loading also refuses non-finite weights (NaN or inf in ``model.*`` or ``ema.*``) and metadata
without a ``step`` or a ``config`` object; the configuration's bounds are checked by
:meth:`ddpm.config.RunConfig.from_dict` before any model is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .errors import OutputError
from .fileio import atomic_write

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "read_metadata", "resolve_checkpoint",
           "load_newest_verified", "metadata_checksum", "checkpoint_path", "list_checkpoints", "tensor_checksum",
           "split_prefix", "load_weights", "flatten_optimizer_state",
           "unflatten_optimizer_state"]

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}.safetensors"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints of a run directory, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file as given, or the newest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path} holds no checkpoints (expected {path}/checkpoints/step-NNNNNNN.safetensors)")
        return found[-1][1]
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    return path


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def metadata_checksum(text: str) -> str:
    """SHA-256 of the ``ddpm`` metadata exactly as stored (a JSON string)."""
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write tensors and JSON-serialisable ``meta`` to ``path`` atomically.

    A failure (full disk, permission) raises :class:`CheckpointError`; any previous file at
    ``path`` is left intact and no temporary file remains.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps({"format_version": FORMAT_VERSION, **meta})
    header = {"ddpm": text, "checksum": tensor_checksum(tensors), "meta_checksum": metadata_checksum(text)}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, 0o666 & ~_umask())          # safetensors creates files 0600; honour the umask instead

    kept = _kept_on_failure(Path(path))
    try:
        return atomic_write(path, write)
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, OutputError):                  # its message already names the path
            reason = str(exc).removeprefix(f"cannot write {path}: ")
        raise CheckpointError(f"could not save checkpoint {path}: {reason}; {kept}") from None


def _kept_on_failure(path: Path) -> str:
    """What a failed save leaves intact, said truthfully (there may be no previous checkpoint)."""
    if path.exists():
        return f"the file already at {path} is intact"
    earlier = []
    if path.parent.name == "checkpoints":
        earlier = [p for _, p in list_checkpoints(path.parent.parent) if p != path]
    return f"the previous checkpoint {earlier[-1]} is intact" if earlier else "no checkpoint was written"


def _header(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a ddpm checkpoint (not a readable safetensors file: {exc})") from None
    if "ddpm" not in header:
        raise CheckpointError(f"{path} is not a ddpm checkpoint (a safetensors file without ddpm metadata)")
    return header


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint (file or run directory), without reading tensors."""
    path = resolve_checkpoint(path)
    header = _header(path)
    text = header["ddpm"]
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path} has corrupt ddpm metadata") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has corrupt ddpm metadata (not a JSON object)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; "
                              f"this ddpm reads version {FORMAT_VERSION}")
    if "meta_checksum" in header and header["meta_checksum"] != metadata_checksum(text):
        raise CheckpointError(f"{path} failed its metadata checksum: the header was modified or is corrupt")
    _check_metadata(path, meta)
    return meta


def _check_metadata(path: Path, meta: dict) -> None:
    """The run state every reader relies on: a step count and a configuration object."""
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path} has no valid step in its metadata (got {step!r})")
    if "config" not in meta:
        raise CheckpointError(f"{path} has no configuration in its metadata (the 'config' entry is missing)")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path} has an unusable configuration: 'config' is a {type(meta['config']).__name__}, "
                              "not an object")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint (file or run directory): (tensors, metadata).

    The tensor checksum is verified unless ``verify=False``; a truncated, tampered or
    foreign file raises :class:`CheckpointError`.
    """
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    header = _header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from None
    if verify and tensor_checksum(tensors) != header.get("checksum"):
        raise CheckpointError(f"{path} failed its checksum: the file is corrupt or was modified")
    _check_finite(path, tensors)
    meta["path"] = str(path)
    return {k: v.to(device) for k, v in tensors.items()}, meta


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or inf weights: they would only give NaN images (or a NaN run) much later."""
    for name in sorted(tensors):
        t = tensors[name]
        if name.startswith(("model.", "ema.")) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path} holds non-finite weights (NaN or inf in {name}); it cannot be used")


def _warn(message: str) -> None:
    print(f"ddpm: warning: {message}", file=sys.stderr)


def load_newest_verified(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
                         warn: Callable[[str], None] = _warn) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint of ``run_dir`` that loads and verifies: (tensors, metadata).

    Each newer checkpoint that fails (truncated, tampered, non-finite) is skipped with one
    ``warn`` line naming it. None when the run has no checkpoint at all; a run whose
    checkpoints all fail raises :class:`CheckpointError` naming the newest one and why.
    """
    found = list_checkpoints(run_dir)
    if not found:
        return None
    first_error = None
    for _, path in reversed(found):
        try:
            return load_checkpoint(path, device=device)
        except CheckpointError as exc:
            first_error = first_error or exc
            warn(f"skipped a checkpoint that does not verify: {exc}")
    raise CheckpointError(f"none of the {len(found)} checkpoint(s) of {run_dir} verifies; the newest: {first_error}")


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.``, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: str) -> None:
    """Load the ``prefix.*`` tensors of a checkpoint into ``model``, strictly.

    Missing, unexpected or wrongly shaped tensors raise :class:`CheckpointError` naming the file.
    """
    try:
        model.load_state_dict(split_prefix(tensors, prefix), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: the {prefix}.* weights do not match the model's architecture ({first})") from None


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (``optim.<param>.<key>``) and JSON-able rest."""
    tensors, scalars = {}, {}
    for idx, st in state_dict["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict] = {}
    for name, value in split_prefix(tensors, "optim").items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in info.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}
