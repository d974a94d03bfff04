"""Prepared datasets: decode a source once, then read it lazily from a memory map.

A prepared dataset is a folder holding

* ``images.npy``: uint8 [N, H, W, C] in NumPy's ``.npy`` format, memory-mappable;
* ``labels.npy``: int64 [N], only when the source has labels;
* ``dataset.json``: the shape, the class names, the source, a content fingerprint
  (count, shape and a hash of a fixed sample of rows) and the resize settings.

:func:`ddpm.data.prepare.prepare_dataset` writes one from any source :func:`ddpm.data.load_dataset` accepts.
Folders of image files are decoded in parallel straight into the memory map, so the
source never has to fit in memory; an interrupted preparation resumes where it stopped.
The folder appears under its final name only when complete (it is built under a hidden
temporary name beside it and renamed).

:func:`open_prepared` reads one back: ``images`` is a read-only memory map, so indexing a
batch of rows reads only those rows from disk. It refuses a truncated array, a
``dataset.json`` that disagrees with the arrays, and a size or channel count other than
the one asked for (a prepared dataset is never resized on the fly). :mod:`ddpm.data.prepare` writes one.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from .image_data import ImageData, dataset_fingerprint, parse_image_size

FORMAT = "ddpm-prepared-dataset"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"


def is_prepared(path: str | os.PathLike) -> bool:
    """A folder holding a ``dataset.json`` is a prepared dataset."""
    return (Path(path) / DATASET_FILE).is_file()


def open_prepared(path: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                  channels: int | None = None) -> ImageData:
    """A prepared dataset whose ``images`` is a read-only memory map: only rows indexed are read.

    Raises:
        DataError: the arrays are missing or truncated, ``dataset.json`` disagrees with them,
            or the dataset was prepared at another ``image_size`` / ``channels`` than asked for.
    """
    path = Path(path)
    description = _read_description(path)
    images = _open_array(path / IMAGES_FILE, np.uint8, ndim=4)
    shape = list(images.shape)
    if shape != description["shape"]:
        raise DataError(f"{path}: {DATASET_FILE} says shape {description['shape']} but {IMAGES_FILE} holds "
                        f"{shape}; prepare the dataset again")
    labels = None
    if description["labels"]:
        labels = np.asarray(_open_array(path / LABELS_FILE, np.int64, ndim=1))
        if labels.shape != (shape[0],):
            raise DataError(f"{path}: {LABELS_FILE} holds {len(labels)} labels for {shape[0]} images")
    found = dataset_fingerprint(images, labels)
    if found != description["fingerprint"]:
        raise DataError(f"{path}: the images differ from the fingerprint in {DATASET_FILE} (sample hash "
                        f"{found['sample_sha256'][:12]}, recorded {str(description['fingerprint'])[:40]}...); "
                        f"the files were changed after preparation: prepare the dataset again")
    _check_prepared_size(path, shape, image_size, channels)
    return ImageData(images, labels, str(path), description.get("class_names"))


def _read_description(path: Path) -> dict:
    try:
        description = json.loads((path / DATASET_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path / DATASET_FILE}: {exc}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise DataError(f"{path / DATASET_FILE} does not describe a prepared dataset (format {FORMAT!r})")
    if description.get("version") != FORMAT_VERSION:
        raise DataError(f"{path / DATASET_FILE} has format version {description.get('version')!r}; this ddpm "
                        f"reads version {FORMAT_VERSION}: prepare the dataset again")
    missing = [key for key in ("shape", "labels", "fingerprint") if key not in description]
    if missing:
        raise DataError(f"{path / DATASET_FILE} lacks {', '.join(missing)}; prepare the dataset again")
    return description


def _open_array(file: Path, dtype, ndim: int) -> np.ndarray:
    """A read-only memory map of one ``.npy`` file, refusing a wrong dtype and a truncated file."""
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{file} is missing; prepare the dataset again") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{file} is truncated or not a .npy array ({exc}); prepare the dataset again") from None
    if array.dtype != dtype or array.ndim != ndim:
        raise DataError(f"{file} holds {array.dtype} of {array.ndim} dimensions, expected {np.dtype(dtype)} "
                        f"of {ndim}; prepare the dataset again")
    return array


def _check_prepared_size(path: Path, shape: list[int], image_size, channels) -> None:
    size = parse_image_size(image_size)
    if (size is not None and tuple(shape[1:3]) != size) or (channels is not None and shape[3] != channels):
        asked = f"{size[0]}x{size[1]}" if size else f"{shape[1]}x{shape[2]}"
        raise DataError(f"{path} was prepared at {shape[3]}-channel {shape[1]}x{shape[2]}, not the "
                        f"{channels or shape[3]}-channel {asked} asked for; a prepared dataset is not resized "
                        f"on the fly: run 'ddpm prepare' again with that --image-size / --channels")


def read_rows(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``images[rows]`` in the order of ``rows``, read in ascending row order (forward on disk)."""
    rows = np.asarray(rows, dtype=np.int64)
    ascending = np.argsort(rows, kind="stable")
    batch = np.empty((len(rows), *images.shape[1:]), dtype=images.dtype)
    batch[ascending] = images[rows[ascending]]
    return batch


class BatchPrefetcher:
    """Each step's rows of a (memory-mapped) dataset, read on a background thread one step ahead.

    ``rows_for_step(step)`` gives the rows this process trains on at ``step``, in batch order;
    it must depend on ``step`` alone (it runs on the background thread). ``get(step)`` returns
    uint8 [B, H, W, C] and int64 [B] (or None) CPU tensors, pinned when ``pin_memory`` (for a
    non-blocking copy to CUDA), and starts reading ``step + 1``. The rows are exactly those
    ``images[rows]`` holds, so training on them equals training on the array in memory.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None,
                 rows_for_step: Callable[[int], np.ndarray], *, pin_memory: bool = False):
        self.images, self.labels, self.rows_for_step, self.pin_memory = images, labels, rows_for_step, pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self._pending: tuple[int, object] | None = None

    def _read(self, step: int):
        import torch   # here: reading and checking a prepared dataset needs no torch

        rows = np.asarray(self.rows_for_step(step), dtype=np.int64)
        x = torch.from_numpy(read_rows(self.images, rows))
        y = None if self.labels is None else torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))
        if self.pin_memory:
            x, y = x.pin_memory(), (None if y is None else y.pin_memory())
        return x, y

    def get(self, step: int):
        """The batch of ``step`` (read now unless it was prefetched); then prefetch ``step + 1``."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == step:
            batch = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()
            batch = self._read(step)
        self._pending = (step + 1, self._pool.submit(self._read, step + 1))
        return batch

    def close(self) -> None:
        """Stop the background thread (waiting for a read in progress)."""
        if self._pending is not None:
            self._pending[1].cancel()
        self._pending = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

