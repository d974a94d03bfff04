"""Hugging Face datasets as ddpm data, through the ``datasets`` library (an optional extra).

* ``hf:NAME[:CONFIG][@SPLIT]``: a dataset of the Hub, loaded with ``datasets.load_dataset``
  (downloaded once into the library's cache; ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``
  read the cache only). ``@SPLIT`` overrides ``--split``.
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

The table is Arrow, memory-mapped: nothing is decoded at start-up. :class:`DecodedRows` is the
``images`` array of the :class:`~ddpm.data.image_data.ImageData`: indexing it decodes just those
rows (converted to the dataset's size and channels as a folder's images are), so training,
under torchrun too, decodes only the rows each rank draws, and a resumed run reads the same
pixels. The image column is the first of type ``Image`` unless named; labels come from a
``ClassLabel`` column (``label``/``labels`` unless named), whose names become the class names,
or from a column of integers or strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .image_data import ImageData
from .image_files import convert_image, image_to_array

HUB_PREFIX = "hf:"
LABEL_COLUMNS = ("label", "labels")


@dataclass(frozen=True)
class HubSpec:
    """``hf:NAME[:CONFIG][@SPLIT]`` parsed."""

    name: str
    config: str | None = None
    split: str | None = None


def is_hub_spec(data) -> bool:
    return isinstance(data, str) and data.startswith(HUB_PREFIX)


def parse_hub_spec(text: str) -> HubSpec:
    body = text[len(HUB_PREFIX):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name or "@" in split or (text.count(":") > 2):
        raise ConfigError(f"{text!r} is not a Hub dataset: write hf:NAME, hf:NAME:CONFIG, hf:NAME@SPLIT "
                          f"or hf:NAME:CONFIG@SPLIT")
    return HubSpec(name, config or None, split or None)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``save_to_disk`` (a Dataset, or a DatasetDict of splits)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _datasets():
    try:
        import datasets     # here: an optional extra, and slow to import
    except ImportError:
        raise ConfigError("Hugging Face datasets need the datasets library: pip install 'ddpm[hub]'") from None
    return datasets


def load_hub_dataset(data: str | os.PathLike, *, split: str = "train", image_size: tuple[int, int] | None = None,
                     channels: int | None = None, image_column: str | None = None,
                     label_column: str | None = None) -> ImageData:
    """A Hub dataset (``hf:...``) or a ``save_to_disk`` folder as an :class:`ImageData` whose rows
    are decoded when indexed."""
    table, source = _open_table(data, split)
    column = _image_column(table, image_column, source)
    if len(table) == 0:
        raise DataError(f"{source} holds no rows")
    labels, class_names = _labels(table, label_column, source)
    images = DecodedRows(table, column, image_size, channels, source)
    return ImageData(images, labels, source, class_names, path=source)


def _open_table(data, split: str):
    datasets = _datasets()
    if is_hub_spec(data):
        spec = parse_hub_spec(data)
        split = spec.split or split
        try:
            table = datasets.load_dataset(spec.name, spec.config, split=split)
        except Exception as exc:  # noqa: BLE001 - the library raises many kinds; each becomes one line
            raise DataError(f"cannot load {data}: {_reason(exc)}") from None
        return table, data
    path = Path(data)
    try:
        table = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read the saved dataset {path}: {_reason(exc)}") from None
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise DataError(f"{path} has the splits {', '.join(table)}, not {split!r}: pass --split")
        table = table[split]
    return table, os.path.abspath(path)


def _reason(exc: Exception) -> str:
    """The library's message on one line, with what it means where the kind of error says it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    if kinds & {"GatedRepoError"}:
        return f"{text} (a gated dataset: accept its terms on the Hub, then log in with `hf auth login`)"
    if kinds & {"DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"}:
        return f"{text} (no such dataset, or a private one: check the name and your login)"
    if kinds & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "Timeout"}:
        return f"{text} (no network, and it is not in the local cache)"
    return text


def _image_column(table, named: str | None, source: str) -> str:
    datasets = _datasets()
    if named is not None:
        if named not in table.features:
            raise ConfigError(f"{source} has no column {named!r}; its columns are {', '.join(table.features)}")
        return named
    for name, feature in table.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise DataError(f"{source} has no image column (columns: {', '.join(table.features)}); "
                    f"name one with --image-column")


def _labels(table, named: str | None, source: str) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels and class names from the label column (named, else ``label``/``labels`` if present)."""
    datasets = _datasets()
    if named is None:
        named = next((name for name in LABEL_COLUMNS if name in table.features), None)
        if named is None:
            return None, None
    elif named not in table.features:
        raise ConfigError(f"{source} has no column {named!r}; its columns are {', '.join(table.features)}")
    feature = table.features[named]
    values = list(table.select_columns([named])[named])     # that column alone: no image is decoded
    if isinstance(feature, datasets.ClassLabel):
        return np.asarray(values, dtype=np.int64), list(feature.names)
    if all(isinstance(value, str) for value in values):
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        return np.asarray([index[value] for value in values], dtype=np.int64), names
    if all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values):
        return np.asarray(values, dtype=np.int64), None
    raise DataError(f"column {named!r} of {source} holds neither class labels, integers >= 0 nor strings")


class DecodedRows:
    """uint8 [N, H, W, C] rows of a dataset's image column, decoded when indexed.

    Indexed like a numpy array by an int, a slice or an integer array; every image is converted
    to ``channels`` and resized (cover, then center crop, bicubic) to ``image_size`` as a folder's
    images are. Without ``image_size`` every image must have the first image's size; without
    ``channels`` the first image's mode decides (grey: 1, else 3).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, table, column: str, image_size, channels, source: str):
        self.table, self.column, self.source = table, column, source
        first = table[0][column]
        if channels is None:
            channels = 1 if convert_image(first, None, source).mode == "L" else 3
        self.channels, self.resize = channels, image_size      # None: every image keeps its size
        self.shape = (len(table), *(image_size or (first.height, first.width)), channels)

    def __len__(self) -> int:
        return self.shape[0]

    def _decode(self, i: int, image) -> np.ndarray:
        array = image_to_array(convert_image(image, self.channels, f"row {i} of {self.source}"), self.resize)
        if array.shape != self.shape[1:]:
            raise DataError(f"row {i} of {self.source} is {array.shape[0]}x{array.shape[1]} (HxW), not "
                            f"{self.shape[1]}x{self.shape[2]}; pass --image-size to resize")
        return array

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            return self._decode(i, self.table[i][self.column])
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        if rows.ndim != 1:
            raise IndexError("DecodedRows takes an int, a slice or a 1-D array of rows")
        batch = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        images = self.table[[int(i) for i in rows]][self.column] if len(rows) else []
        for k, (i, image) in enumerate(zip(rows, images)):
            batch[k] = self._decode(int(i), image)
        return batch

    def __array__(self, dtype=None, copy=None):
        array = self[:]
        return array if dtype is None else array.astype(dtype)
