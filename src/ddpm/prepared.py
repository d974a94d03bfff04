"""Prepared datasets: decode a source once, then read it lazily from a memory map.

A prepared dataset is a folder holding

* ``images.npy``: uint8 [N, H, W, C] in NumPy's ``.npy`` format, memory-mappable;
* ``labels.npy``: int64 [N], only when the source has labels;
* ``dataset.json``: the shape, the class names, the source, a content fingerprint
  (count, shape and a hash of a fixed sample of rows) and the resize settings.

:func:`prepare_dataset` writes one from any source :func:`ddpm.data.load_dataset` accepts.
Folders of image files are decoded in parallel straight into the memory map, so the
source never has to fit in memory; an interrupted preparation resumes where it stopped.
The folder appears under its final name only when complete (it is built under a hidden
temporary name beside it and renamed).

:func:`open_prepared` reads one back: ``images`` is a read-only memory map, so indexing a
batch of rows reads only those rows from disk. It refuses a truncated array, a
``dataset.json`` that disagrees with the arrays, and a size or channel count other than
the one asked for (a prepared dataset is never resized on the fly).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib.format import open_memmap

from . import data as data_module
from .data import ImageData
from .errors import ConfigError, DataError
from .fileio import fsync_dir, write_json

__all__ = ["DATASET_FILE", "PrepareResult", "prepare_dataset", "is_prepared", "open_prepared", "read_rows",
           "BatchPrefetcher", "estimate_folder_bytes", "available_memory", "check_folder_fits_in_memory"]

FORMAT = "ddpm-prepared-dataset"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
PLAN_FILE = "plan.json"        # in the temporary folder: what is being prepared, to resume only the same job
DONE_FILE = "done.npy"         # in the temporary folder: uint8 [N], the state of each row (below)
ROW_TODO, ROW_DONE, ROW_FAILED = 0, 1, 2
RESIZE_METHOD = "cover (bicubic) then center crop"
CHUNK_ROWS = 256               # rows decoded, flushed and marked done together
HEADER_SAMPLE = 32             # folder files whose headers estimate the decoded size

try:                            # the shared fingerprint, once the data module provides it
    from .data import dataset_fingerprint
except ImportError:             # pragma: no cover - the same definition, until then
    FINGERPRINT_SAMPLE, FINGERPRINT_SEED = 64, 0

    def dataset_fingerprint(images: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """Count, shape, and SHA-256 of a fixed sample of 64 rows (seed 0) and their labels."""
        n = len(images)
        digest = hashlib.sha256(f"{n}|{list(images.shape[1:])}|{images.dtype}|{labels is not None}|".encode())
        rows = (range(n) if n <= FINGERPRINT_SAMPLE else
                sorted(int(i) for i in np.random.default_rng(FINGERPRINT_SEED).choice(n, FINGERPRINT_SAMPLE,
                                                                                        replace=False)))
        for i in rows:
            digest.update(np.ascontiguousarray(images[i]).tobytes())
            if labels is not None:
                digest.update(int(labels[i]).to_bytes(8, "little", signed=True))
        return {"num_images": n, "image_shape": [int(side) for side in images.shape[1:]],
                "sample_sha256": digest.hexdigest()}


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` wrote."""

    path: Path
    shape: tuple[int, int, int, int]     # N, H, W, C
    skipped: list[str]                   # "path: reason" of each unreadable source file left out
    resumed_rows: int                    # rows already written by an interrupted earlier run


# ----------------------------------------------------------------------------- preparing

def prepare_dataset(source: str | os.PathLike, out: str | os.PathLike, *, data_root: str | None = None,
                    split: str = "train", image_size: int | tuple[int, int] | None = None,
                    channels: int | None = None, strict: bool = False, workers: int | None = None,
                    progress: bool = False) -> PrepareResult:
    """Decode ``source`` once into a prepared dataset at ``out`` (a new folder).

    ``source``, ``data_root``, ``split``, ``image_size``, ``channels`` and ``strict`` mean
    what they mean to :func:`ddpm.data.load_dataset`. A folder of image files is decoded
    by ``workers`` threads (default: the CPU count) into the memory map, chunk by chunk;
    other sources are loaded whole (they fit in memory by nature) and written out.

    Raises:
        ConfigError: ``out`` exists already, or an option is invalid.
        DataError: the source cannot be read (or, with ``strict``, one of its files).
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists already; prepare writes a new folder and overwrites nothing")
    data_module._check_channels(channels)
    size = data_module._parse_image_size(image_size)
    partial = out.with_name(f".{out.name}.partial")
    is_folder = not (isinstance(source, str) and source in data_module.DATASET_NAMES) and Path(source).is_dir()
    if is_folder and is_prepared(source):
        raise ConfigError(f"{source} is a prepared dataset already; train on it directly with --data {source}")
    if is_folder:
        result = _prepare_folder(Path(source), partial, size, channels, strict, workers, progress)
    else:
        dataset = data_module.load_dataset(source, data_root=data_root, split=split, image_size=size,
                                           channels=channels, strict=strict)
        result = _prepare_in_memory(dataset, partial, _source_record(source, data_root, split), size)
    os.replace(partial, out)
    fsync_dir(out.parent)
    result.path = out
    return result


def _source_record(source, data_root, split) -> dict:
    path = Path(source)
    named = isinstance(source, str) and source in data_module.DATASET_NAMES
    return {"data": str(source) if named else str(path.resolve()),
            "root": str(Path(data_root).resolve()) if data_root else None, "split": split if named else None}


def _prepare_in_memory(dataset: ImageData, partial: Path, source: dict, size) -> PrepareResult:
    """Write a dataset that is in memory already; nothing to resume, so start afresh."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    images = open_memmap(partial / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=dataset.images.shape)
    images[:] = dataset.images
    images.flush()
    del images
    if dataset.labels is not None:
        np.save(partial / LABELS_FILE, dataset.labels.astype(np.int64))
    _write_description(partial, dataset.class_names, source, size, len(dataset.skipped))
    return PrepareResult(partial, dataset.images.shape, list(dataset.skipped), 0)


def _prepare_folder(root: Path, partial: Path, size, channels, strict, workers, progress) -> PrepareResult:
    """Decode a folder of images into ``partial``, resuming an earlier run of the same job."""
    paths = data_module._find_image_files(root)
    labels, class_names = data_module._class_labels(root, paths)
    plan = {"format": FORMAT, "source": str(root.resolve()), "image_size": list(size) if size else None,
            "channels": channels, "files": _list_hash(root, paths)}
    done, failures = _resume_or_start(partial, plan), {}
    resumed = 0 if done is None else int(np.count_nonzero(done != ROW_TODO))
    if done is None:
        shape, failures = _folder_shape(root, paths, size, channels, strict)
        done = _start(partial, plan, (len(paths), *shape), labels, failures)
    images = np.load(partial / IMAGES_FILE, mmap_mode="r+")
    failures.update(_decode_rows(paths, images, done, strict, workers or os.cpu_count() or 1, progress))
    del images
    skipped = [f"{paths[i]}: {failures.get(i, 'could not be decoded')}" for i in np.flatnonzero(done == ROW_FAILED)]
    if len(skipped) == len(paths):
        raise DataError(f"{root}: none of its {len(paths)} image files could be decoded (first: {skipped[0]})")
    shape = _compact(partial, done)
    (partial / PLAN_FILE).unlink()
    (partial / DONE_FILE).unlink()
    source = {"data": str(root.resolve()), "root": None, "split": None}
    _write_description(partial, class_names, source, size, len(skipped))
    return PrepareResult(partial, shape, skipped, resumed)


def _list_hash(root: Path, paths: list[Path]) -> str:
    """SHA-256 of the relative paths and sizes of the files: a resumed run must see the same files."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.relative_to(root).as_posix()}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _resume_or_start(partial: Path, plan: dict) -> np.ndarray | None:
    """The row states of an interrupted run of the same plan, else None (and no stale folder)."""
    try:
        if json.loads((partial / PLAN_FILE).read_text()) == plan:
            done = np.load(partial / DONE_FILE, mmap_mode="r+")
            np.load(partial / IMAGES_FILE, mmap_mode="r")       # refuses a truncated array
            return done
    except (OSError, ValueError):
        pass
    shutil.rmtree(partial, ignore_errors=True)
    return None


def _start(partial: Path, plan: dict, shape: tuple, labels, skipped_early: dict[int, str]) -> np.ndarray:
    """Create the temporary folder: the full-size image array, the labels, the row states, the plan."""
    partial.mkdir(parents=True)
    open_memmap(partial / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=shape).flush()
    if labels is not None:
        np.save(partial / LABELS_FILE, labels)
    done = open_memmap(partial / DONE_FILE, mode="w+", dtype=np.uint8, shape=(shape[0],))
    done[list(skipped_early)] = ROW_FAILED
    done.flush()
    write_json(partial / PLAN_FILE, plan)       # last: only a complete start is ever resumed
    return done


def _folder_shape(root: Path, paths: list[Path], size, channels, strict) -> tuple[tuple, dict[int, str]]:
    """(H, W, C) of the prepared images, read from the file headers where options leave it open.

    Like the in-memory loader: without ``channels`` the data is grey if every image is grey,
    else RGB; without ``image_size`` every image must have the size of the first.
    Returns the shape and the files whose header cannot be read, by index.
    """
    if size is not None and channels is not None:
        return (*size, channels), {}
    headers, unreadable = {}, {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, header in enumerate(pool.map(_read_header, paths)):
            if isinstance(header, DataError):
                if strict:
                    raise header
                unreadable[i] = str(header)
            else:
                headers[i] = header
    if not headers:
        raise DataError(f"{root}: none of its {len(paths)} image files could be decoded")
    if channels is None:
        channels = 1 if all(mode in data_module.GREY_MODES for mode, _ in headers.values()) else 3
    if size is None:
        first = next(iter(headers))
        size = headers[first][1]
        for i, (_, other) in headers.items():
            if other != size:
                raise DataError(f"images in {root} differ in size ({paths[first].name} is {size[0]}x{size[1]} "
                                f"(HxW), {paths[i].name} is {other[0]}x{other[1]} (HxW)); "
                                f"pass --image-size to resize them")
    return (*size, channels), unreadable


def _read_header(path: Path) -> tuple[str, tuple[int, int]] | DataError:
    """(mode, (height, width)) from the file's header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode, (image.height, image.width)
    except (OSError, ValueError, Image.DecompressionBombError):
        return DataError(f"cannot decode image file {path}: it is corrupt or not an image Pillow can read")


def _decode_rows(paths, images: np.ndarray, done: np.ndarray, strict: bool, workers: int,
                 progress: bool) -> dict[int, str]:
    """Decode every row still to do into ``images``, chunk by chunk; returns the failures' reasons.

    A chunk's pixels are flushed to disk before its rows are marked done, so an interruption
    at any moment leaves only rows that are truly written marked as such.
    """
    from tqdm.auto import tqdm

    _, height, width, channels = images.shape
    todo = np.flatnonzero(done == ROW_TODO)
    failures: dict[int, str] = {}

    def decode(i: int) -> np.ndarray | DataError:
        try:
            image = data_module._load_image_file(paths[i], channels)
            array = data_module._image_to_array(image, (height, width))
        except DataError as exc:
            return exc
        if array.shape != images.shape[1:]:
            return DataError(f"{paths[i]} decodes to {array.shape[0]}x{array.shape[1]} (HxW), not {height}x{width}; "
                             f"pass --image-size to resize")
        return array

    bar = tqdm(total=len(done), initial=len(done) - len(todo), desc="preparing", unit="image",
               disable=not (progress and sys.stderr.isatty()), dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=workers) as pool, bar:
        for start in range(0, len(todo), CHUNK_ROWS):
            rows = todo[start:start + CHUNK_ROWS]
            states = np.empty(len(rows), dtype=np.uint8)
            for k, (i, result) in enumerate(zip(rows, pool.map(decode, rows))):
                if isinstance(result, DataError):
                    if strict:
                        raise result
                    failures[int(i)], states[k] = str(result), ROW_FAILED
                else:
                    images[i], states[k] = result, ROW_DONE
            images.flush()
            done[rows] = states
            done.flush()
            bar.update(len(rows))
    return failures


def _compact(partial: Path, done: np.ndarray) -> tuple:
    """Drop the rows of files that failed (rare), chunk by chunk; returns the final shape."""
    good = np.flatnonzero(done == ROW_DONE)
    images = np.load(partial / IMAGES_FILE, mmap_mode="r")
    if len(good) == len(images):
        return images.shape
    compact = open_memmap(partial / f"compact-{IMAGES_FILE}", mode="w+", dtype=np.uint8,
                          shape=(len(good), *images.shape[1:]))
    for start in range(0, len(good), CHUNK_ROWS):
        compact[start:start + CHUNK_ROWS] = images[good[start:start + CHUNK_ROWS]]
    compact.flush()
    shape = compact.shape
    del compact, images
    os.replace(partial / f"compact-{IMAGES_FILE}", partial / IMAGES_FILE)
    if (partial / LABELS_FILE).is_file():
        np.save(partial / LABELS_FILE, np.load(partial / LABELS_FILE)[good])
    return shape


def _write_description(partial: Path, class_names, source: dict, size, skipped: int) -> None:
    """dataset.json, from the arrays as written (so it can only describe what is there)."""
    images = np.load(partial / IMAGES_FILE, mmap_mode="r")
    labels = np.load(partial / LABELS_FILE) if (partial / LABELS_FILE).is_file() else None
    write_json(partial / DATASET_FILE, {
        "format": FORMAT, "version": FORMAT_VERSION,
        "shape": [int(side) for side in images.shape], "dtype": "uint8", "layout": "NHWC",
        "labels": labels is not None, "class_names": list(class_names) if class_names else None,
        "source": source, "fingerprint": dataset_fingerprint(images, labels),
        "resize": {"image_size": list(size) if size else None, "channels": int(images.shape[3]),
                   "method": RESIZE_METHOD if size else None},
        "skipped_files": skipped,
    })


# ----------------------------------------------------------------------------- reading

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
    size = data_module._parse_image_size(image_size)
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
        import torch

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


# ----------------------------------------------------------------------------- memory check for folders

def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: MemAvailable from /proc/meminfo, else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_folder_bytes(paths: list[Path], size: tuple[int, int] | None, channels: int | None) -> int:
    """Decoded uint8 bytes of a folder's images, from the headers of an evenly spaced sample of files."""
    sample = [paths[i] for i in np.linspace(0, len(paths) - 1, min(HEADER_SAMPLE, len(paths))).astype(int)]
    headers = [header for header in map(_read_header, sample) if not isinstance(header, DataError)]
    if size is not None:
        pixels = size[0] * size[1]
    else:
        pixels = int(np.mean([h * w for _, (h, w) in headers])) if headers else 0
    if channels is None:
        channels = 1 if headers and all(mode in data_module.GREY_MODES for mode, _ in headers) else 3
    return len(paths) * pixels * channels


def check_folder_fits_in_memory(root: Path, paths: list[Path], size, channels) -> None:
    """Refuse, before decoding, a folder whose decoded images would not fit in the available memory."""
    available = available_memory()
    if available is None:
        return
    estimate = estimate_folder_bytes(paths, size, channels)
    if estimate > available:
        raise DataError(f"{root}: its {len(paths)} images decode to about {_gigabytes(estimate)}, more than the "
                        f"{_gigabytes(available)} of memory available; prepare it once and train on the "
                        f"prepared copy: ddpm prepare --data {root} --out DATASET_DIR "
                        f"[--image-size N --channels C], then --data DATASET_DIR")


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB"
