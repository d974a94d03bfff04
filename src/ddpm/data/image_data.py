"""The in-memory image dataset type, its fingerprint, class names and the checks of its options.

:func:`dataset_fingerprint` identifies a dataset cheaply at any size (image count, image
shape, a hash of a fixed sample of images), so that a run can recognise its data after
the files were moved or copied, and refuse other data.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, DataError

SPLITS = ("train", "test")
MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}

FINGERPRINT_SAMPLE = 64   # images hashed by dataset_fingerprint
FINGERPRINT_SEED = 0      # seed of the generator that picks them


@dataclass
class ImageData:
    """A dataset: ``images`` uint8 [N, H, W, C], ``labels`` int64 [N] or None.

    ``images`` is a numpy array in memory, a memory map (a prepared dataset), or an array-like
    that decodes the rows it is indexed with (a Hugging Face dataset): see :attr:`lazy`.

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
    conditions: np.ndarray | None = None     # paired image conditions, uint8 [N, H, W, C_c]: row k conditions image k

    def __post_init__(self) -> None:
        if self.is_sequences:            # ddpm.data.sequences: float data x0, not pixels
            if self.conditions is not None:
                raise ValueError("sequence data has no paired image conditions")
        elif getattr(self.images, "dtype", None) != np.uint8 or getattr(self.images, "ndim", None) != 4:
            raise ValueError("ImageData.images must be a uint8 array of shape [N, H, W, C] "
                             "(or float32 sequences [N, L, C])")
        if self.labels is not None and not (isinstance(self.labels, np.ndarray) and self.labels.dtype == np.int64
                                            and self.labels.shape == (len(self.images),)):
            raise ValueError(f"ImageData.labels must be an int64 numpy array of shape [{len(self.images)}] or None")
        if self.conditions is not None and (getattr(self.conditions, "dtype", None) != np.uint8
                                            or self.conditions.ndim != 4 or len(self.conditions) != len(self.images)):
            raise ValueError("ImageData.conditions must be a uint8 array of shape [N, H, W, C_c] or None")

    @property
    def is_sequences(self) -> bool:
        """Sequences (:mod:`ddpm.data.sequences`): ``images`` holds float32 [N, L, C], data x0 in [-1, 1]."""
        return getattr(self.images, "dtype", None) == np.float32 and getattr(self.images, "ndim", None) == 3

    @property
    def lazy(self) -> bool:
        """Rows are read (or decoded) when indexed: the dataset is not held in memory."""
        return isinstance(self.images, np.memmap) or not isinstance(self.images, np.ndarray)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int] | tuple[int]:
        """(height, width); (L,) for sequences."""
        return (self.images.shape[1],) if self.is_sequences else (self.images.shape[1], self.images.shape[2])

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def fingerprint(self) -> dict:
        """:func:`dataset_fingerprint` of these images and labels."""
        return dataset_fingerprint(self.images, self.labels)




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

def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def check_channels(channels: int | None) -> None:
    if channels is not None and (isinstance(channels, bool) or channels not in MODE_FOR_CHANNELS):
        raise ConfigError(f"channels must be 1, 3 or 4, got {channels!r}")


def parse_image_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """An int H means (H, H); returns (height, width) or None."""
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size)):
        raise ConfigError(f"image_size must be a positive int or a (height, width) pair, got {image_size!r}")
    return tuple(size)
