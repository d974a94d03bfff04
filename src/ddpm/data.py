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
  ``labels``, and ``class_names`` for them), or a folder of image files, whose class
  subfolders give labels and class names. A path is always loaded whole, so
  ``split`` does not apply to it: ``train`` and ``test`` give the same images.

Dataset names take precedence over paths: write ``./mnist`` to load a folder
called ``mnist``.

Pixels stay uint8 in memory; :func:`to_tensor` turns one batch into float32 NCHW in
[0, 1] and :func:`to_uint8` turns model output back into uint8 NHWC.

:func:`dataset_fingerprint` identifies a dataset cheaply at any size (image count, image
shape, a hash of a fixed sample of images), so that a run can recognise its data after
the files were moved or copied, and refuse other data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ConfigError, DataError
from .pixels import to_tensor, to_uint8        # re-exported: the pixel mappings live in ddpm.pixels

__all__ = ["ImageData", "DATASET_NAMES", "SPLITS", "IMAGE_EXTENSIONS", "load_dataset", "data_source",
           "dataset_fingerprint", "fingerprint_difference", "check_same_dataset", "class_index", "to_tensor", "to_uint8"]

DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

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

MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
# Folder images in these modes load as one channel when ``channels`` is None.
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# Grey modes with more than 8 bits per pixel, which Pillow's "L" conversion would clip.
HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")

FINGERPRINT_SAMPLE = 64   # images hashed by dataset_fingerprint
FINGERPRINT_SEED = 0      # seed of the generator that picks them

_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC  # Image.Resampling exists from Pillow 9.1
_LUMA_CHUNK = 4096  # images per chunk when converting RGB to grey, to bound the uint32 scratch


@dataclass
class ImageData:
    """A dataset in memory: ``images`` uint8 [N, H, W, C], ``labels`` int64 [N] or None.

    ``class_names[k]`` names label k (subfolder names, an .npz's ``class_names``, or the
    built-in datasets' classes); ``path`` is the absolute path a folder or .npz was read
    from (None for a dataset loaded by name).
    """

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)   # "path: reason" of each unreadable file left out
    path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError("ImageData.images must be a uint8 numpy array of shape [N, H, W, C]")
        if self.labels is not None and not (isinstance(self.labels, np.ndarray) and self.labels.dtype == np.int64
                                            and self.labels.shape == (len(self.images),)):
            raise ValueError(f"ImageData.labels must be an int64 numpy array of shape [{len(self.images)}] or None")

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.images.shape[1], self.images.shape[2]

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    def fingerprint(self) -> dict:
        """:func:`dataset_fingerprint` of these images and labels."""
        return dataset_fingerprint(self.images, self.labels)


# ----------------------------------------------------------------------------- public entry point

def load_dataset(data: str | os.PathLike, *, data_root: str | os.PathLike | None = None, split: str = "train",
                 image_size: int | tuple[int, int] | None = None, channels: int | None = None,
                 strict: bool = False) -> ImageData:
    """Load a dataset by name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``) or from a path.

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

    Raises:
        ConfigError: ``split``, ``channels`` or ``image_size`` is not a valid value.
        DataError: the files are missing, empty, corrupt or of the wrong shape.
    """
    _check_split(split)
    _check_channels(channels)
    size = _parse_image_size(image_size)
    if isinstance(data, str) and data in DATASET_NAMES:
        if data == "digits":
            dataset = _load_digits(split)
        elif data == "cifar10":
            dataset = _load_cifar10(data_root, split)
        else:
            dataset = _load_idx_dataset(data, data_root, split)
        return _resize_and_convert(dataset, size, channels)
    if isinstance(data, str) and not data:
        raise ConfigError(f"no dataset given: pass one of {', '.join(DATASET_NAMES)} or a path")
    path = Path(data)
    if not path.exists():
        raise DataError(f"no such file or directory: {path} (dataset names are {', '.join(DATASET_NAMES)})")
    if path.is_dir():
        from .prepared import is_prepared, open_prepared   # a folder holding dataset.json is prepared

        if is_prepared(path):
            dataset = open_prepared(path, image_size=size, channels=channels)
        else:
            dataset = _load_image_folder(path, size, channels, strict)
    elif path.suffix.lower() == ".npz":
        dataset = _resize_and_convert(_load_npz(path), size, channels)
    else:
        raise DataError(f"cannot load {path}: expected a .npz file or a folder of images")
    return replace(dataset, path=data_source(data))


def data_source(data: str | os.PathLike) -> str:
    """``data`` as a run should record it: a dataset name unchanged, a path made absolute.

    An absolute path keeps meaning the same files from any working directory.
    """
    if isinstance(data, str) and data in DATASET_NAMES:
        return data
    return os.path.abspath(os.path.expanduser(os.fspath(data)))


# ----------------------------------------------------------------------------- fingerprints

def dataset_fingerprint(images: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Image count, image shape and a content hash that identify a dataset, cheaply at any size.

    ``images`` is any array indexable by row (in memory or memory-mapped) of shape [N, ...].
    The hash is SHA-256 over the count, shape and dtype, then the bytes of
    :data:`FINGERPRINT_SAMPLE` rows (all rows when there are fewer) picked by a generator
    seeded with :data:`FINGERPRINT_SEED`, with their labels when ``labels`` is given. Only
    those rows are read, so the cost does not grow with N. Returns a JSON-able dict:
    ``{"num_images": N, "image_shape": [H, W, C], "sample_sha256": hex}``.
    """
    n = len(images)
    digest = hashlib.sha256(f"{n}|{list(images.shape[1:])}|{images.dtype}|{labels is not None}|".encode())
    for i in _fingerprint_rows(n):
        digest.update(np.ascontiguousarray(images[i]).tobytes())
        if labels is not None:
            digest.update(int(labels[i]).to_bytes(8, "little", signed=True))
    return {"num_images": n, "image_shape": [int(side) for side in images.shape[1:]],
            "sample_sha256": digest.hexdigest()}


def _fingerprint_rows(n: int) -> list[int]:
    if n <= FINGERPRINT_SAMPLE:
        return list(range(n))
    rows = np.random.default_rng(FINGERPRINT_SEED).choice(n, FINGERPRINT_SAMPLE, replace=False)
    return sorted(int(i) for i in rows)


def fingerprint_difference(recorded: dict, found: dict) -> str | None:
    """What differs between two fingerprints, in words (None when they match)."""
    if recorded["num_images"] != found["num_images"]:
        return f"the image count differs ({recorded['num_images']} recorded, {found['num_images']} found)"
    if list(recorded["image_shape"]) != list(found["image_shape"]):
        return (f"the image shape (H x W x C) differs ({_format_shape(recorded['image_shape'])} recorded, "
                f"{_format_shape(found['image_shape'])} found)")
    if recorded["sample_sha256"] != found["sample_sha256"]:
        return (f"the content differs (the hash of up to {FINGERPRINT_SAMPLE} sampled images and their labels: "
                f"{recorded['sample_sha256'][:12]} recorded, {found['sample_sha256'][:12]} found)")
    return None


def check_same_dataset(recorded: dict | None, data: ImageData) -> None:
    """Refuse ``data`` (one line naming what differs) unless it has the ``recorded`` fingerprint."""
    if recorded is None:
        return
    difference = fingerprint_difference(recorded, data.fingerprint())
    if difference:
        raise DataError(f"{data.path or data.name} is not the dataset this run trained on: {difference}")


def _format_shape(shape) -> str:
    return "x".join(str(side) for side in shape)


# ----------------------------------------------------------------------------- class names

def class_index(spec: str | int, class_names: list[str] | None, num_classes: int) -> int:
    """The label of class ``spec``: one of ``class_names``, else an index in 0..num_classes-1.

    A name wins over an index, so a folder class called ``"7"`` is found by its name.
    """
    import difflib

    text = str(spec)
    if class_names and text in class_names:
        return class_names.index(text)
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < num_classes:
            raise ConfigError(f"class {index} is out of range: this model has classes 0..{num_classes - 1}")
        return index
    if not class_names:
        raise ConfigError(f"unknown class {text!r}: this model's classes have no names; give an index "
                          f"0..{num_classes - 1}")
    close = difflib.get_close_matches(text, class_names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
    raise ConfigError(f"unknown class {text!r}{hint}; the classes are {shown}, or an index 0..{num_classes - 1}")


# ----------------------------------------------------------------------------- option checks

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _check_channels(channels: int | None) -> None:
    if channels is not None and (isinstance(channels, bool) or channels not in MODE_FOR_CHANNELS):
        raise ConfigError(f"channels must be 1, 3 or 4, got {channels!r}")


def _parse_image_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """An int H means (H, H); returns (height, width) or None."""
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size)):
        raise ConfigError(f"image_size must be a positive int or a (height, width) pair, got {image_size!r}")
    return tuple(size)


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
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path}: it is not a valid .npz archive") from exc
    if isinstance(archive, np.ndarray):
        raise DataError(f"{path} is a single .npy array, not an .npz archive with an 'images' array")
    with archive:
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
    from .prepared import check_folder_fits_in_memory

    paths = _find_image_files(root)
    check_folder_fits_in_memory(root, paths, size, channels)    # refused before any decoding
    labels, class_names = _class_labels(root, paths)

    def load(path: Path) -> np.ndarray | DataError:
        try:
            return _image_to_array(_load_image_file(path, channels), size)
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
        _check_same_size(root, paths, arrays)
    if channels is None and any(array.shape[-1] == 3 for array in arrays):
        arrays = [np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array for array in arrays]
    return ImageData(np.stack(arrays), labels, str(root), class_names, skipped)


def _find_image_files(root: Path) -> list[Path]:
    paths = [path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]
    if not paths:
        raise DataError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(paths, key=lambda path: path.relative_to(root).parts)


def _class_labels(root: Path, paths: list[Path]) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from the first folder under ``root``; none if any image lies directly in ``root``."""
    first_parts = [path.relative_to(root).parts for path in paths]
    if any(len(parts) == 1 for parts in first_parts):
        return None, None
    class_names = sorted({parts[0] for parts in first_parts})
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[parts[0]] for parts in first_parts], dtype=np.int64), class_names


def _load_image_file(path: Path, channels: int | None) -> Image.Image:
    """Decode one image (EXIF orientation applied) into mode L, RGB or RGBA.

    With ``channels`` None the mode is L for grey images and RGB otherwise.
    """
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
        if image.mode in HIGH_DEPTH_MODES:
            image = Image.fromarray(_high_depth_to_uint8(np.asarray(image), image.mode, path))
        target_mode = MODE_FOR_CHANNELS[channels] if channels else ("L" if image.mode in GREY_MODES else "RGB")
        return image.convert(target_mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image file {path}: it is corrupt or not an image Pillow can read") from exc


def _high_depth_to_uint8(pixels: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """16-bit grey is scaled to 0..255; 32-bit int / float grey must already lie in 0..255."""
    if mode.startswith("I;16"):
        return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DataError(f"image {path} (mode {mode}) has values outside 0..255; convert it to 8-bit first")
    return np.rint(pixels).astype(np.uint8)


def _image_to_array(image: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    """Optionally resize + center-crop, then return uint8 [H, W, C]."""
    if size is not None:
        image = _cover_and_center_crop(image, size)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _check_same_size(root: Path, paths: list[Path], arrays: list[np.ndarray]) -> None:
    first_shape = arrays[0].shape[:2]
    for path, array in zip(paths, arrays):
        if array.shape[:2] != first_shape:
            raise DataError(f"images in {root} differ in size ({paths[0].name} is {_format_size(first_shape)}, "
                            f"{path.name} is {_format_size(array.shape[:2])}); pass --image-size to resize them")


def _format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} (HxW)"


# ----------------------------------------------------------------------------- resizing and channels

def _cover_and_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale (bicubic) so the image covers ``size`` = (H, W), then crop its center to exactly that."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    new_width = max(width, round(image.width * scale))
    new_height = max(height, round(image.height * scale))
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), _BICUBIC)
    left = (new_width - width) // 2
    top = (new_height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _resize_and_convert(dataset: ImageData, size: tuple[int, int] | None, channels: int | None) -> ImageData:
    """Apply ``image_size`` and ``channels`` to an in-memory dataset, image by image, in uint8."""
    images = dataset.images
    if size is not None and images.shape[1:3] != size:
        images = _resize_images(images, size)
    if channels is not None and images.shape[-1] != channels:
        images = _convert_channels(images, channels)
    return replace(dataset, images=images)


def _resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    num_channels = images.shape[-1]
    resized = np.empty((len(images), *size, num_channels), dtype=np.uint8)
    for i, pixels in enumerate(images):
        image = Image.fromarray(pixels[..., 0] if num_channels == 1 else pixels)
        resized[i] = np.asarray(_cover_and_center_crop(image, size)).reshape(*size, num_channels)
    return resized


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """1 <-> 3 <-> 4 channels: grey repeats, colour to grey is luma, alpha dropped or set to 255."""
    if channels == 1:
        return _luma(images[..., :3])
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]
    if channels == 3:
        return np.ascontiguousarray(rgb)
    alpha = np.full((*images.shape[:-1], 1), 255, dtype=np.uint8)
    return np.concatenate([rgb, alpha], axis=-1)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, L = R 299/1000 + G 587/1000 + B 114/1000, in Pillow's fixed point."""
    grey = np.empty((*rgb.shape[:-1], 1), dtype=np.uint8)
    for start in range(0, len(rgb), _LUMA_CHUNK):
        block = rgb[start:start + _LUMA_CHUNK].astype(np.uint32)
        weighted = block[..., 0] * 19595 + block[..., 1] * 38470 + block[..., 2] * 7471 + 0x8000
        grey[start:start + _LUMA_CHUNK, ..., 0] = weighted >> 16
    return grey
