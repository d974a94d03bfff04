"""Image datasets loaded into memory as uint8 arrays of shape [N, H, W, C].

Where the data comes from (``load_dataset(data, ...)``):

* ``"digits"``: scikit-learn's built-in 8x8 digits (1797 images, values 0..16,
  mapped to uint8 as round(v * 255 / 16)). It has no official split, so we fix one:
  the first 1500 images are ``train`` and the last 297 are ``test``.
* ``"mnist"`` / ``"fashion-mnist"``: the four canonical IDX files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``)
  read from ``data_root``; 60000 train / 10000 test images of 28x28.
* any other string is a path: a ``.npz`` archive holding ``images`` (and optionally
  ``labels``, and ``class_names`` for them), an ``.npz`` of float ``sequences`` [N, C, L]
  (:mod:`ddpm.data.sequences`, for a sequence model), or a folder of image files, whose class
  subfolders give labels and class names. A path is always loaded whole, so
  ``split`` does not apply to it: ``train`` and ``test`` give the same images.

Dataset names take precedence over paths: write ``./mnist`` to load a folder
called ``mnist``.

Pixels stay uint8 in memory (:mod:`ddpm.pixels` maps them to and from tensors).
"""

from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .image_files import (check_folder_fits_in_memory, check_same_size, class_labels, find_image_files,
                          image_to_array, load_image_file, resize_and_convert, MODE_FOR_CHANNELS)
from .image_data import ImageData, check_channels, check_split, parse_image_size
from .hub import is_hub_spec, is_saved_dataset, load_hub_dataset
from .prepared import is_prepared, open_prepared
from .sequences import is_sequence_archive, load_sequences, open_npz

DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10")

DIGITS_TRAIN_SIZE = 1500  # digits[:1500] is "train", digits[1500:] (297 images) is "test"
DIGITS_MAX_VALUE = 16

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N)
IDX_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IDX_FILE_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

CIFAR10_RECORD = 1 + 3 * 32 * 32   # label byte, then the red, green and blue 32x32 planes
CIFAR10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}

CLASS_NAMES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "digits": [str(digit) for digit in range(10)],
    "mnist": [str(digit) for digit in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}


def load_dataset(data: str | os.PathLike, *, data_root: str | os.PathLike | None = None, split: str = "train",
                 image_size: int | tuple[int, int] | None = None, channels: int | None = None,
                 strict: bool = False, image_column: str | None = None,
                 label_column: str | None = None) -> ImageData:
    """Load a dataset by name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``), from the
    Hugging Face Hub (``hf:NAME[:CONFIG][@SPLIT]``) or from a path.

    Args:
        data: a name from :data:`DATASET_NAMES`, or a path to a ``.npz`` archive or a
            folder of images. Names take precedence over paths.
        data_root: folder holding the IDX files of ``mnist`` / ``fashion-mnist``, or the
            binary CIFAR-10 batches (``cifar-10-batches-bin/``, or the ``.bin`` files
            themselves) for ``cifar10``; not used by the other sources.
        split: ``"train"`` or ``"test"``. ``digits`` uses a fixed split: the first
            1500 images are train, the last 297 are test. A path (``.npz`` or folder)
            is loaded whole for either split.
        image_size: ``H`` (square) or ``(H, W)``. Images are resized so that they
            cover the target (bicubic), then center-cropped to exactly (H, W).
            Without it, a folder's images must all have the same size.
        channels: 1, 3 or 4. Grey to colour repeats the channel, colour to grey
            uses the ITU-R 601-2 luma (Pillow's "L"), alpha is dropped or added as
            255. Without it, a folder loads as 1 channel if every image is grey,
            else 3; other sources keep their own channels.
        strict: a folder image that cannot be decoded is an error; by default it is
            left out, and listed in ``ImageData.skipped``.
        image_column, label_column: the columns of a Hugging Face dataset (``hf:...`` or a
            ``save_to_disk`` folder) that hold the images and the labels; found when not given
            (:mod:`ddpm.data.hub`). Its rows are decoded when read, never at start-up.

    Raises:
        ConfigError: ``split``, ``channels`` or ``image_size`` is not a valid value.
        DataError: the files are missing, empty, corrupt or of the wrong shape.
    """
    check_split(split)
    check_channels(channels)
    size = parse_image_size(image_size)
    named = isinstance(data, str) and data in DATASET_NAMES
    hub = not named and (is_hub_spec(data) or (Path(data).is_dir() and is_saved_dataset(Path(data))))
    if not hub and (image_column is not None or label_column is not None):
        option = "--image-column" if image_column is not None else "--label-column"
        raise ConfigError(f"{option} names a column of a Hugging Face dataset (hf:NAME or a save_to_disk "
                          f"folder); {data} is not one")
    if named:
        return resize_and_convert(_load_named(data, data_root, split), size, channels)
    if hub:
        return load_hub_dataset(data, split=split, image_size=size, channels=channels,
                                image_column=image_column, label_column=label_column)
    return replace(_load_path(data, size, channels, strict), path=data_source(data))


def _load_named(name: str, data_root, split: str) -> ImageData:
    if name == "digits":
        return _load_digits(split)
    if name == "cifar10":
        return _load_cifar10(data_root, split)
    return _load_idx_dataset(name, data_root, split)


def _load_path(data, size, channels, strict: bool) -> ImageData:
    """A folder of images, a prepared dataset or an ``.npz`` archive."""
    if isinstance(data, str) and not data:
        raise ConfigError(f"no dataset given: pass one of {', '.join(DATASET_NAMES)} or a path")
    path = Path(data)
    if not path.exists():
        raise DataError(f"no such file or directory: {path} (dataset names are {', '.join(DATASET_NAMES)})")
    if path.is_dir():
        if is_prepared(path):
            return open_prepared(path, image_size=size, channels=channels)
        return _load_image_folder(path, size, channels, strict)
    if path.suffix.lower() == ".npz":
        if is_sequence_archive(path):       # float [N, C, L]: a sequence model's data (ddpm.data.sequences)
            return load_sequences(path, image_size=size, channels=channels)
        return resize_and_convert(_load_npz(path), size, channels)
    raise DataError(f"cannot load {path}: expected a .npz file or a folder of images")


def has_splits(data: str | os.PathLike | None) -> bool:
    """Whether ``data`` names a dataset with train and test splits (a built-in name or ``hf:...``), unlike a
    folder or an .npz file."""
    return isinstance(data, str) and (data in DATASET_NAMES or data.startswith("hf:"))


def data_source(data: str | os.PathLike) -> str:
    """``data`` as a run should record it: a dataset name (or Hub dataset) unchanged, a path made absolute.

    An absolute path keeps meaning the same files from any working directory.
    """
    if isinstance(data, str) and (data in DATASET_NAMES or is_hub_spec(data)):
        return data
    return os.path.abspath(os.path.expanduser(os.fspath(data)))




# ----------------------------------------------------------------------------- digits

def _load_digits(split: str) -> ImageData:
    """scikit-learn's 8x8 digits; train = first 1500 images, test = last 297."""
    from sklearn.datasets import load_digits  # imported lazily: scikit-learn is slow to import

    digits = load_digits()
    images = np.rint(digits.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    part = slice(None, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    return ImageData(np.ascontiguousarray(images[part]), labels[part].copy(), "digits", CLASS_NAMES["digits"])


# ----------------------------------------------------------------------------- CIFAR-10 (binary version)

def _load_cifar10(data_root: str | os.PathLike | None, split: str) -> ImageData:
    """The binary CIFAR-10 batches: records of one label byte and 3072 pixel bytes (R, G, B planes).

    The pickled "python version" is refused: loading it would unpickle files from the internet.
    """
    if data_root is None:
        raise DataError("cifar10 needs --data-root: a folder holding cifar-10-batches-bin/ "
                        "(data_batch_1.bin ... data_batch_5.bin, test_batch.bin)")
    root = Path(data_root)
    folder = root / "cifar-10-batches-bin" if (root / "cifar-10-batches-bin").is_dir() else root
    missing = [name for name in CIFAR10_FILES[split] if not (folder / name).is_file()]
    if missing:
        pickled = (root / "cifar-10-batches-py").is_dir() or (folder / "data_batch_1").is_file()
        hint = (" It holds the pickled Python version, which is refused for safety: use the binary version "
                "(cifar-10-binary.tar.gz)." if pickled else "")
        raise DataError(f"{folder} lacks the CIFAR-10 binary file(s) {', '.join(missing)}.{hint}")
    chunks = []
    for name in CIFAR10_FILES[split]:
        raw = np.fromfile(folder / name, dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR10_RECORD:
            raise DataError(f"{folder / name} is not a CIFAR-10 binary batch: {raw.size} bytes is not a "
                            f"multiple of the {CIFAR10_RECORD}-byte record")
        chunks.append(raw.reshape(-1, CIFAR10_RECORD))
    records = np.concatenate(chunks)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{folder}: labels above 9; these are not CIFAR-10 batches")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ImageData(np.ascontiguousarray(images), labels, "cifar10", CLASS_NAMES["cifar10"])


# ----------------------------------------------------------------------------- MNIST-style IDX files

def _load_idx_dataset(name: str, data_root: str | os.PathLike | None, split: str) -> ImageData:
    """Read ``{train,t10k}-{images,labels}`` IDX files (plain or .gz) from ``data_root``."""
    needed = ", ".join(IDX_FILE_STEMS)
    if data_root is None:
        raise DataError(f"loading {name!r} needs --data-root, a folder containing {needed} (plain or .gz)")
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; it must contain {needed} (plain or .gz)")
    prefix = IDX_SPLIT_PREFIX[split]
    images_path = _find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(images_path, IDX_IMAGES_MAGIC, "image")
    labels = _read_idx(labels_path, IDX_LABELS_MAGIC, "label").astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    class_names = CLASS_NAMES[name]
    if len(labels) and labels.max() >= len(class_names):
        raise DataError(f"{labels_path} has label {labels.max()}, outside 0..{len(class_names) - 1}")
    return ImageData(images[..., None], labels, name, class_names)


def _find_idx_file(root: Path, stem: str) -> Path:
    """``root/stem`` if it exists, else ``root/stem.gz``."""
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root} has no {stem} (plain or .gz)")


def _read_idx(path: Path, magic: int, kind: str) -> np.ndarray:
    """Parse one IDX file: big-endian magic, big-endian uint32 dims, then the bytes."""
    raw = _read_maybe_gzipped(path)
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: it is too short to hold an IDX header")
    (found_magic,) = struct.unpack(">I", raw[:4])
    if found_magic != magic:
        raise DataError(f"{path} is not an IDX {kind} file (magic number {found_magic:#010x}, "
                        f"expected {magic:#010x})")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path} is truncated: it is too short to hold an IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected_bytes = int(np.prod(dims, dtype=np.int64))
    found_bytes = len(raw) - header_size
    if found_bytes < expected_bytes:
        raise DataError(f"{path} is truncated: its header announces {expected_bytes} bytes of data "
                        f"but it holds {found_bytes}")
    if found_bytes > expected_bytes:
        raise DataError(f"{path} holds {found_bytes} bytes of data but its header announces {expected_bytes}")
    # frombuffer over immutable bytes gives a read-only view; copy so callers own the array.
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims).copy()


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as file:
                return file.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: it is unreadable or not a valid gzip file") from exc


# ----------------------------------------------------------------------------- .npz archives

def _load_npz(path: Path) -> ImageData:
    """``images`` uint8 [N, H, W] or [N, H, W, C] (C in 1, 3, 4), optional integer ``labels`` [N]
    and, with labels, optional ``class_names`` (strings, one per class)."""
    with open_npz(path, " with an 'images' array") as archive:
        if "images" not in archive.files:
            raise DataError(f"{path} has no 'images' array (it has: {', '.join(archive.files) or 'nothing'})")
        images = _read_npz_array(archive, "images", path)
        labels = _read_npz_array(archive, "labels", path) if "labels" in archive.files else None
        names = _read_npz_array(archive, "class_names", path) if "class_names" in archive.files else None
    images = _check_npz_images(images, path)
    if labels is not None:
        labels = _check_npz_labels(labels, len(images), path)
    class_names = _check_npz_class_names(names, labels, path) if names is not None else None
    return ImageData(images, labels, str(path), class_names)


def _read_npz_array(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"cannot read array {key!r} from {path}: it is corrupt or needs pickle") from exc


def _check_npz_images(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DataError(f"'images' in {path} has dtype {images.dtype}, expected uint8 (values 0..255)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in MODE_FOR_CHANNELS or 0 in images.shape[1:3]:
        raise DataError(f"'images' in {path} has shape {images.shape}, "
                        f"expected N x H x W or N x H x W x C with C in 1, 3, 4")
    if len(images) == 0:
        raise DataError(f"'images' in {path} holds no images")
    return images


def _check_npz_labels(labels: np.ndarray, num_images: int, path: Path) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'labels' in {path} has dtype {labels.dtype}, expected integers")
    if labels.shape != (num_images,):
        raise DataError(f"'labels' in {path} has shape {labels.shape}, expected ({num_images},) "
                        f"to match the images")
    if labels.min() < 0:
        raise DataError(f"'labels' in {path} has negative label {labels.min()}")
    return labels.astype(np.int64)


def _check_npz_class_names(names: np.ndarray, labels: np.ndarray | None, path: Path) -> list[str]:
    if labels is None:
        raise DataError(f"{path} has 'class_names' but no 'labels' array for them to name")
    if names.dtype.kind != "U" or names.ndim != 1:
        raise DataError(f"'class_names' in {path} must be a 1-D array of strings; got {names.dtype} "
                        f"of shape {names.shape}")
    class_names = [str(name) for name in names]
    if any(not name.strip() for name in class_names) or len(set(class_names)) != len(class_names):
        raise DataError(f"'class_names' in {path} must be distinct and non-empty; got {class_names}")
    if len(labels) and labels.max() >= len(class_names):
        raise DataError(f"'labels' in {path} go up to {labels.max()}, but 'class_names' names only "
                        f"{len(class_names)} classes")
    return class_names


# ----------------------------------------------------------------------------- folders of images

def _load_image_folder(root: Path, size: tuple[int, int] | None, channels: int | None,
                       strict: bool = False) -> ImageData:
    """Every image under ``root`` (recursive, sorted); class subfolders give labels.

    Files are decoded by a pool of threads (Pillow releases the GIL while decoding). An
    unreadable file is an error with ``strict``, else left out and listed in ``skipped``.
    """
    paths = find_image_files(root)
    check_folder_fits_in_memory(root, paths, size, channels)    # refused before any decoding
    labels, class_names = class_labels(root, paths)

    def load(path: Path) -> np.ndarray | DataError:
        try:
            return image_to_array(load_image_file(path, channels), size)
        except DataError as exc:
            if strict:
                raise
            return exc

    workers = min(8, os.cpu_count() or 1) if len(paths) > 64 else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(load, paths))
    skipped = [f"{path}: {result}" for path, result in zip(paths, results) if isinstance(result, DataError)]
    good = [i for i, result in enumerate(results) if not isinstance(result, DataError)]
    if not good:
        raise DataError(f"{root}: none of its {len(paths)} image files could be decoded (first: {skipped[0]})")
    paths, arrays = [paths[i] for i in good], [results[i] for i in good]
    labels = labels[good] if labels is not None else None
    if size is None:
        check_same_size(root, paths, arrays)
    if channels is None and any(array.shape[-1] == 3 for array in arrays):
        arrays = [np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array for array in arrays]
    return ImageData(np.stack(arrays), labels, str(root), class_names, skipped)


