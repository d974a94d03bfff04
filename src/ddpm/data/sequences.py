"""Sequence datasets: an ``.npz`` archive holding float sequences [N, C, L] (1D signals, time series).

A sequence archive holds an array ``sequences`` [N, C, L] of real numbers, or, without ``images``,
one array only, of 3 dimensions and a float dtype (uint8 [N, H, W] stays grey images). The values
are the data x0 themselves, no pixels: they must already lie in [-1, 1], the range the diffusion
maths works in (Ho et al. 2020, Sec. 3.3) and the one its x0 estimates are clipped to while sampling.
Scale them before training (e.g. x / max |x|, kept to undo on the samples); samples come back in the
same units. Loaded whole, as float32 [N, L, C] (channels last, like images' [N, H, W, C]) in an
:class:`~ddpm.data.image_data.ImageData` whose ``image_size`` is (L,).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .image_data import ImageData

__all__ = ["SEQUENCES_KEY", "is_sequence_archive", "load_sequences", "open_npz", "MAX_SEQUENCE_CHANNELS"]

SEQUENCES_KEY = "sequences"        # the array's name in training archives and in ddpm sample's samples.npz
MAX_SEQUENCE_CHANNELS = 128        # the model's in/out channel bound (config._MODEL_INTS)


def open_npz(path: Path, wanted: str = ""):
    """The .npz archive at ``path``, opened without pickles; an unreadable file or a bare .npy array is one
    :class:`DataError` (``wanted``, e.g. " with an 'images' array", says what the archive should hold)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path}: it is not a valid .npz archive") from exc
    if isinstance(archive, np.ndarray):
        raise DataError(f"{path} is a single .npy array, not an .npz archive{wanted}")
    return archive


def _sequence_key(archive) -> str | None:
    """The archive's sequence array: ``sequences``, or its only array when that is 3-D float data."""
    if SEQUENCES_KEY in archive.files:
        return SEQUENCES_KEY
    if "images" in archive.files or len(archive.files) != 1:
        return None
    key = archive.files[0]
    try:                                # the header alone: shape and dtype, no data read
        with archive.zip.open(f"{key}.npy") as f:
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error):
        return None
    return key if len(shape) == 3 and np.issubdtype(dtype, np.floating) else None


def is_sequence_archive(path: str | Path) -> bool:
    """Whether ``path`` is an .npz of sequences (see the module docstring); False for image archives."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with open_npz(path) as archive:
            return _sequence_key(archive) is not None
    except DataError:
        return False


def load_sequences(path: str | Path, *, image_size=None, channels=None) -> ImageData:
    """The sequences of ``path`` as float32 [N, L, C] (values checked: finite, within [-1, 1]).
    ``image_size`` and ``channels`` (options of images) are refused."""
    path = Path(path)
    if image_size is not None or channels is not None:
        option = "--image-size resizes" if image_size is not None else "--channels converts"
        raise ConfigError(f"{option} images; {path} holds sequences [N, C, L], which are used as they are")
    with open_npz(path) as archive:
        key = _sequence_key(archive)
        if key is None:
            raise DataError(f"{path} holds no sequences: expected an array {SEQUENCES_KEY!r} [N, C, L]")
        try:
            x = archive[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"cannot read array {key!r} from {path}: it is corrupt or needs pickle") from exc
    if x.ndim != 3 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{key!r} in {path} has shape {x.shape} and dtype {x.dtype}; expected real numbers [N, C, L]")
    n, c, length = x.shape
    if 0 in x.shape or c > MAX_SEQUENCE_CHANNELS:
        raise DataError(f"{key!r} in {path} has shape {x.shape}; expected N >= 1 sequences of 1 to "
                        f"{MAX_SEQUENCE_CHANNELS} channels and length L >= 1")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{key!r} in {path} holds NaN or infinite values")
    peak = float(np.abs(x).max())
    if peak > 1.0:
        raise DataError(f"{key!r} in {path} reaches |x| = {peak:.4g}; sequences are the data x0 and must lie in "
                        "[-1, 1] (scale them first, e.g. x / max|x|, and undo that on the samples)")
    return ImageData(np.ascontiguousarray(x.transpose(0, 2, 1)), None, str(path))
