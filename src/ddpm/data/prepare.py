"""ddpm prepare: decode a dataset once into a prepared (memory-mappable) folder.

:func:`prepare_dataset` writes one from any source :func:`ddpm.data.load_dataset` accepts.
Folders of image files are decoded in parallel straight into the memory map, so the
source never has to fit in memory; an interrupted preparation resumes where it stopped.
The folder appears under its final name only when complete (it is built under a hidden
temporary name beside it and renamed). :mod:`ddpm.data.prepared` describes the format and reads it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, OutputError
from ..fileio import fsync_dir, write_json
from .image_data import ImageData, check_channels, dataset_fingerprint, parse_image_size
from .hub import is_hub_spec, is_saved_dataset
from .image_files import GREY_MODES, class_labels, find_image_files, image_to_array, load_image_file, read_header
from .prepared import DATASET_FILE, FORMAT, FORMAT_VERSION, IMAGES_FILE, LABELS_FILE, is_prepared
from .sources import DATASET_NAMES, load_dataset

PLAN_FILE = "plan.json"        # in the temporary folder: what is being prepared, to resume only the same job
DONE_FILE = "done.npy"         # in the temporary folder: uint8 [N], the state of each row (below)
ROW_TODO, ROW_DONE, ROW_FAILED = 0, 1, 2
RESIZE_METHOD = "cover (bicubic) then center crop"
CHUNK_ROWS = 256               # rows decoded, flushed and marked done together
# A full, failing or read-only disk: one line, not a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


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
                    progress: bool = False, image_column: str | None = None,
                    label_column: str | None = None) -> PrepareResult:
    """Decode ``source`` once into a prepared dataset at ``out`` (a new folder).

    ``source``, ``data_root``, ``split``, ``image_size``, ``channels`` and ``strict`` mean
    what they mean to :func:`ddpm.data.load_dataset`. A folder of image files is decoded
    by ``workers`` threads (default: the CPU count) into the memory map, chunk by chunk;
    other sources are loaded whole (they fit in memory by nature) and written out.

    Raises:
        ConfigError: ``out`` exists already, or an option is invalid.
        DataError: the source cannot be read (or, with ``strict``, one of its files).
        OutputError: the disk is full or cannot be written; nothing appears under ``out``.
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists already; prepare writes a new folder and overwrites nothing")
    check_channels(channels)
    size = parse_image_size(image_size)
    partial = out.with_name(f".{out.name}.partial")
    is_folder = (not (isinstance(source, str) and (source in DATASET_NAMES or is_hub_spec(source)))
                 and Path(source).is_dir() and not is_saved_dataset(Path(source)))
    if is_folder and is_prepared(source):
        raise ConfigError(f"{source} is a prepared dataset already; train on it directly with --data {source}")
    try:
        if is_folder:
            result = _prepare_folder(Path(source), partial, size, channels, strict, workers, progress)
        else:
            dataset = load_dataset(source, data_root=data_root, split=split, image_size=size,
                                   channels=channels, strict=strict, image_column=image_column,
                                   label_column=label_column)
            result = _prepare_in_memory(dataset, partial, _source_record(source, data_root, split), size)
    except OSError as exc:
        _write_failed(exc, partial, out)
    os.replace(partial, out)
    fsync_dir(out.parent)
    result.path = out
    return result


def _write_failed(exc: OSError, partial: Path, out: Path) -> None:
    """Turn a full or failing disk into one line; keep a resumable temporary folder, drop any other."""
    if exc.errno not in WRITE_ERRNOS or isinstance(exc, OutputError):
        raise exc
    resumable = (partial / PLAN_FILE).is_file()
    if not resumable:
        shutil.rmtree(partial, ignore_errors=True)
    kept = (f"; the rows written so far are kept in {partial}, and the same command resumes there"
            if resumable else "")
    raise OutputError(f"cannot write the prepared dataset {out}: {exc.strerror or exc}{kept}") from None


def _new_array(path: Path, shape: tuple, dtype=np.uint8) -> np.ndarray:
    """A new ``.npy`` memory map whose disk blocks are allocated now.

    A memory map over a sparse file on a full disk dies with SIGBUS when a page is written;
    allocating every block first turns that into an ``OSError`` (ENOSPC) here, before any work.
    """
    array = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
    return array


def _source_record(source, data_root, split) -> dict:
    path = Path(source)
    named = isinstance(source, str) and (source in DATASET_NAMES or is_hub_spec(source))
    return {"data": str(source) if named else str(path.resolve()),
            "root": str(Path(data_root).resolve()) if data_root else None, "split": split if named else None}


def _prepare_in_memory(dataset: ImageData, partial: Path, source: dict, size) -> PrepareResult:
    """Write a dataset that is in memory already; nothing to resume, so start afresh."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    images = _new_array(partial / IMAGES_FILE, dataset.images.shape)
    for start in range(0, len(images), CHUNK_ROWS):         # chunks: a Hub dataset decodes as it is read
        images[start:start + CHUNK_ROWS] = dataset.images[start:start + CHUNK_ROWS]
    images.flush()
    del images
    if dataset.labels is not None:
        np.save(partial / LABELS_FILE, dataset.labels.astype(np.int64))
    _write_description(partial, dataset.class_names, source, size, len(dataset.skipped))
    return PrepareResult(partial, dataset.images.shape, list(dataset.skipped), 0)


def _prepare_folder(root: Path, partial: Path, size, channels, strict, workers, progress) -> PrepareResult:
    """Decode a folder of images into ``partial``, resuming an earlier run of the same job."""
    paths = find_image_files(root)
    labels, class_names = class_labels(root, paths)
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
    _new_array(partial / IMAGES_FILE, shape).flush()
    if labels is not None:
        np.save(partial / LABELS_FILE, labels)
    done = _new_array(partial / DONE_FILE, (shape[0],))
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
        for i, header in enumerate(pool.map(read_header, paths)):
            if isinstance(header, DataError):
                if strict:
                    raise header
                unreadable[i] = str(header)
            else:
                headers[i] = header
    if not headers:
        raise DataError(f"{root}: none of its {len(paths)} image files could be decoded")
    if channels is None:
        channels = 1 if all(mode in GREY_MODES for mode, _ in headers.values()) else 3
    if size is None:
        first = next(iter(headers))
        size = headers[first][1]
        for i, (_, other) in headers.items():
            if other != size:
                raise DataError(f"images in {root} differ in size ({paths[first].name} is {size[0]}x{size[1]} "
                                f"(HxW), {paths[i].name} is {other[0]}x{other[1]} (HxW)); "
                                f"pass --image-size to resize them")
    return (*size, channels), unreadable




def _decode_rows(paths, images: np.ndarray, done: np.ndarray, strict: bool, workers: int,
                 progress: bool) -> dict[int, str]:
    """Decode every row still to do into ``images``, chunk by chunk; returns the failures' reasons.

    A chunk's pixels are flushed to disk before its rows are marked done, so an interruption
    at any moment leaves only rows that are truly written marked as such.
    """
    _, height, width, channels = images.shape
    todo = np.flatnonzero(done == ROW_TODO)
    failures: dict[int, str] = {}

    def decode(i: int) -> np.ndarray | DataError:
        try:
            image = load_image_file(paths[i], channels)
            array = image_to_array(image, (height, width))
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
    compact = _new_array(partial / f"compact-{IMAGES_FILE}", (len(good), *images.shape[1:]))
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
