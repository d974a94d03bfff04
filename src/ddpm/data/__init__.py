"""Datasets: where images come from, the in-memory dataset type, and prepared (memory-mapped) datasets.

* :mod:`ddpm.data.sources`: :func:`load_dataset` by name (digits, MNIST / Fashion-MNIST IDX,
  CIFAR-10 binary) or from a path (a folder of images, an ``.npz``, a prepared dataset);
* :mod:`ddpm.data.image_data`: :class:`ImageData`, dataset fingerprints, class names;
* :mod:`ddpm.data.image_files`: finding, decoding and resizing image files;
* :mod:`ddpm.data.sequences`: float sequences [N, C, L] from an ``.npz`` (a sequence model's data);
* :mod:`ddpm.data.prepared`: the prepared-dataset format, read lazily from a memory map;
* :mod:`ddpm.data.prepare`: ``ddpm prepare``, which writes one.
"""

from .image_data import (ImageData, check_same_dataset, class_index, dataset_fingerprint,  # noqa: F401
                         fingerprint_difference)
from .sources import DATASET_NAMES, data_source, load_dataset  # noqa: F401

__all__ = ["ImageData", "DATASET_NAMES", "load_dataset", "data_source", "dataset_fingerprint",
           "fingerprint_difference", "check_same_dataset", "class_index"]
