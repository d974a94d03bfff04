"""Checkpoints crafted to look valid: metadata or tensors edited and BOTH checksums recomputed the
way :func:`ddpm.checkpoint.save_checkpoint` computes them, so that only validation
(:mod:`ddpm.checkpoint_schema`) can tell that they are wrong. Reads the file with safetensors
directly, never through the loader under test."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ddpm.checkpoint import metadata_checksum, tensor_checksum


def craft(src: Path, dst: Path, edit_meta=None, edit_tensors=None) -> Path:
    """Copy a checkpoint with its metadata and/or tensors edited and BOTH checksums recomputed as
    :func:`ddpm.checkpoint.save_checkpoint` computes them: only validation can tell it is wrong."""
    with safe_open(str(src), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["ddpm"])
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    text = json.dumps(meta)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"ddpm": text, "checksum": tensor_checksum(tensors),
                                           "meta_checksum": metadata_checksum(text)})
    return dst
