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

Loading also refuses non-finite weights (NaN or inf in ``model.*`` or ``ema.*``), and checks
every metadata field against its type, range and the tensors (:mod:`ddpm.checkpoint_schema`,
which validates the configuration with :meth:`ddpm.config.RunConfig.from_dict`) before any
reader uses it, whatever the checksums say. A file is opened once per load: its tensors,
metadata and SHA-256 all come from the same bytes, so a run pruning it meanwhile cannot make
them disagree.
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
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from .checkpoint_schema import check_checkpoint
from .errors import CheckpointError, OutputError
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


_MAX_HEADER = 100 * 2 ** 20          # bytes of safetensors header JSON a checkpoint may have


def _parse_header(path: Path, head: bytes, size: int) -> tuple[dict, dict]:
    """(the ``__metadata__`` strings, the tensor layout ``{name: (dtype, shape)}``) of a safetensors header.

    ``head`` starts at the file's first byte; ``size`` is the file's length.
    """
    bad = f"{path} is not a ddpm checkpoint (not a readable safetensors file"
    if len(head) < 8:
        raise CheckpointError(f"{bad}: {len(head)} bytes)")
    n = int.from_bytes(head[:8], "little")
    if n > min(_MAX_HEADER, size - 8) or len(head) < 8 + n:
        raise CheckpointError(f"{bad}: a header of {n:,} bytes in a file of {size:,})")
    try:
        header = json.loads(head[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{bad}: its header is not JSON)") from None
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(meta or {}, dict):
        raise CheckpointError(f"{bad}: its header is not a JSON object)")
    layout = {}
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(entry.get("dtype"), str)):
            raise CheckpointError(f"{bad}: tensor {name!r} has no dtype and shape)")
        layout[name] = (entry["dtype"], tuple(shape))
    if "ddpm" not in (meta or {}):
        raise CheckpointError(f"{path} is not a ddpm checkpoint (a safetensors file without ddpm metadata)")
    return meta, layout


def _read(given: str | os.PathLike, whole: bool) -> tuple[Path, bytes, int]:
    """(path, bytes, file size) of the checkpoint ``given`` (a file, or a run directory's newest): the
    whole file, or (``whole=False``) its header only, from ONE open of the file.

    A run that prunes its checkpoints may delete the newest between listing and opening: the
    listing is then taken once more.
    """
    for attempt in (0, 1):
        path = resolve_checkpoint(given)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if whole:
                    return path, f.read(), size
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                return path, head + f.read(min(n, _MAX_HEADER, size)), size
        except FileNotFoundError:
            if attempt or not Path(given).is_dir():
                raise CheckpointError(f"{path} disappeared while it was being opened (deleted by a run that "
                                      "prunes its checkpoints?); try again") from None
        except IsADirectoryError:
            raise CheckpointError(f"{path} is not a ddpm checkpoint (a directory)") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    raise AssertionError("unreachable")


def _metadata(path: Path, header: dict, layout: dict, validate: bool = True) -> dict:
    """The ``ddpm`` metadata of a parsed header, verified and validated (:mod:`ddpm.checkpoint_schema`)."""
    text = header["ddpm"]
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError, TypeError):
        raise CheckpointError(f"{path} has corrupt ddpm metadata") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has corrupt ddpm metadata (not a JSON object)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; "
                              f"this ddpm reads version {FORMAT_VERSION}")
    if "meta_checksum" in header and header["meta_checksum"] != metadata_checksum(text):
        raise CheckpointError(f"{path} failed its metadata checksum: the header was modified or is corrupt")
    if validate:
        check_checkpoint(path, meta, layout)
    meta["path"] = str(path)
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint (file or run directory), validated, without reading tensors.

    ``meta["path"]`` is the file read.
    """
    path, head, size = _read(path, whole=False)
    header, layout = _parse_header(path, head, size)
    return _metadata(path, header, layout)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint (file or run directory): (tensors, metadata).

    The file is read once: tensors, metadata and ``meta["sha256"]`` (of the file's bytes) all come
    from that one read, so a run pruning the file meanwhile cannot make them disagree. The tensor
    checksum is verified unless ``verify=False``; a truncated, tampered, foreign or inconsistent
    file raises :class:`CheckpointError`. ``meta["path"]`` is the file read.
    """
    path, data, size = _read(path, whole=True)
    header, layout = _parse_header(path, data, size)
    meta = _metadata(path, header, layout, validate=False)      # validated once the bytes are known good
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from None
    if verify and tensor_checksum(tensors) != header.get("checksum"):
        raise CheckpointError(f"{path} failed its checksum: the file is corrupt or was modified")
    _check_finite(path, tensors)
    check_checkpoint(path, meta, layout)
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return {k: v.to(device) for k, v in tensors.items()}, meta


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or inf weights: they would only give NaN images (or a NaN run) much later."""
    for name in sorted(tensors):
        t = tensors[name]
        if name.startswith(("model.", "ema.", "ema@", "phema.")) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
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
    for attempt in (0, 1):
        found = list_checkpoints(run_dir)
        if not found:
            return None
        first_error = None
        for _, path in reversed(found):
            try:
                return load_checkpoint(path, device=device)
            except CheckpointError as exc:
                if attempt == 0 and not path.exists():
                    break                   # pruned by a run while listed: list again (once)
                first_error = first_error or exc
                warn(f"skipped a checkpoint that does not verify: {exc}")
        else:
            raise CheckpointError(f"none of the {len(found)} checkpoint(s) of {run_dir} verifies; "
                                  f"the newest: {first_error}")
    raise CheckpointError(f"the checkpoints of {run_dir} kept disappearing while being read (a run pruning them?); "
                          "try again")


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
