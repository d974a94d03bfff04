"""Paired datasets for image-to-image models: targets from ``--data``, conditions from ``--condition-data``.

Two folders are paired by relative path: ``targets/a/001.png`` goes with ``conditions/a/001.png``
(any image extension on either side: ``001.jpg`` pairs with ``001.png``). A file on one side
without its partner is an error naming it, and so is a file that cannot be decoded (it would shift
every later pair). Any other source (an ``.npz``, a prepared dataset, a Hub dataset, a named
dataset) pairs by row order and must have as many images as the other side. The two sides may
differ in channel count; the conditions are resized to the targets' size when ``image_size`` is
given, else they must already have it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .image_data import ImageData
from .image_files import find_image_files
from .prepared import is_prepared
from .sources import DATASET_NAMES, load_dataset

SHOWN = 5        # file names listed in an error


def _is_image_folder(source) -> bool:
    if isinstance(source, str) and (source in DATASET_NAMES or source.startswith("hf:")):
        return False
    path = Path(source)
    return path.is_dir() and not is_prepared(path) and not (path / "state.json").is_file() \
        and not (path / "dataset_dict.json").is_file()


def pair_keys(root: Path) -> list[str]:
    """The relative paths of a folder's images without their extensions, in the loader's order."""
    return [path.relative_to(root).with_suffix("").as_posix() for path in find_image_files(root)]


def check_pairs(targets: Path, conditions: Path) -> None:
    """Refuse folders whose relative paths differ: name what is missing on each side."""
    target_keys, condition_keys = pair_keys(targets), pair_keys(conditions)
    for keys, what in ((target_keys, targets), (condition_keys, conditions)):
        if len(set(keys)) != len(keys):
            twice = sorted({key for key in keys if keys.count(key) > 1})[:SHOWN]
            raise DataError(f"{what} holds two images of the same name with other extensions: {', '.join(twice)}")
    missing = sorted(set(target_keys) - set(condition_keys))
    extra = sorted(set(condition_keys) - set(target_keys))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} target(s) without a condition in {conditions} (e.g. {', '.join(missing[:SHOWN])})")
        if extra:
            parts.append(f"{len(extra)} condition(s) without a target in {targets} (e.g. {', '.join(extra[:SHOWN])})")
        raise DataError("the pairs do not match: " + "; ".join(parts))
    if target_keys != condition_keys:       # the same names, sorted differently by their extensions
        raise DataError(f"{targets} and {conditions} hold the same names but their extensions sort them "
                        f"differently; give both sides one extension")


def load_pairs(data, condition_data, *, data_root=None, split: str = "train", image_size=None,
               channels: int | None = None, condition_channels: int | None = None) -> tuple[ImageData, ImageData]:
    """(targets, conditions), row k of one paired with row k of the other."""
    folders = _is_image_folder(data) and _is_image_folder(condition_data)
    if folders:
        check_pairs(Path(data), Path(condition_data))
    # Strict decoding: a file left out would shift every later pair.
    targets = load_dataset(data, data_root=data_root, split=split, image_size=image_size, channels=channels,
                           strict=True)
    size = targets.image_size
    conditions = load_dataset(condition_data, data_root=data_root, split=split,
                              image_size=size if image_size is not None else None,
                              channels=condition_channels, strict=True)
    if conditions.num_images != targets.num_images:
        raise DataError(f"{os.fspath(condition_data)} holds {conditions.num_images} conditions for "
                        f"{targets.num_images} targets in {os.fspath(data)}; paired data needs one each")
    if conditions.image_size != size:
        raise DataError(f"the conditions are {conditions.image_size[0]}x{conditions.image_size[1]}, the targets "
                        f"{size[0]}x{size[1]}; pass --image-size to bring both to one size")
    return targets, conditions


def load_paired_data(data, condition_data, **options) -> ImageData:
    """The targets of :func:`load_pairs` holding their conditions (``ImageData.conditions``, in memory)."""
    targets, conditions = load_pairs(data, condition_data, **options)
    rows = conditions.images if not conditions.lazy else conditions.images[np.arange(conditions.num_images)]
    return dataclasses.replace(targets, conditions=np.ascontiguousarray(rows))
