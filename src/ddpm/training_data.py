"""The training data of a run: loaded and checked against the model, and the order it is read in.

Every process of a run walks the same global batches (:class:`EpochOrder`, one permutation per epoch
seeded by the run's seed) and takes its own rows of each (:func:`rank_rows`); a memory-mapped dataset
is read a step ahead on another thread (:func:`lazy_reader`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import distributed
from .condition_data import check_condition_data
from .config import RunConfig
from .data import ImageData, check_same_dataset, load_dataset
from .data.hub import is_hub_spec
from .data.pairs import load_paired_data
from .data.prepared import BatchPrefetcher
from .errors import DataError
from .seeding import derive_seed

__all__ = ["load_training_data", "check_training_data", "EpochOrder", "rank_rows", "lazy_reader"]


def load_training_data(config: RunConfig) -> ImageData:
    """Load the dataset that ``config.data`` names and check that it fits the model, and that it is the
    dataset whose fingerprint the run recorded (if it did)."""
    d = config.data
    if d.fingerprint is not None and not is_hub_spec(d.name) and not Path(d.name).exists():
        raise DataError(f"the run's data {d.name} is gone; if it moved, pass --data NEW_PATH (a copy is "
                        "recognised by its fingerprint)")
    if d.condition_data is None:
        data = load_dataset(d.name, data_root=d.root, split=d.split, image_size=d.image_size, channels=d.channels,
                            strict=d.strict, image_column=d.image_column, label_column=d.label_column)
    else:                               # paired image conditions, row k for image k (ddpm.data.pairs)
        data = load_paired_data(d.name, d.condition_data, data_root=d.root, split=d.split, image_size=d.image_size,
                                channels=d.channels)
    check_same_dataset(d.fingerprint, data)
    check_training_data(config, data)
    return data


def check_training_data(config: RunConfig, data: ImageData, world_size: int | None = None) -> None:
    """Raise :class:`DataError` unless ``data`` matches the model and holds at least one global batch
    (``world_size`` processes; default: as many as the launcher started)."""
    if data.image_size != tuple(config.model.image_size) or data.channels != config.model.channels:
        size, expected = "x".join(map(str, data.image_size)), "x".join(map(str, config.model.image_size))
        raise DataError(f"dataset {data.name!r} has {data.channels}-channel {size} "
                        f"{'sequences' if len(data.image_size) == 1 else 'images'} but the model expects "
                        f"{config.model.channels}-channel {expected}; pass --image-size / --channels")
    if config.conditional:
        if data.labels is None:
            raise DataError(f"dataset {data.name!r} has no class labels; a class-conditional model needs them "
                            "(class subfolders, an .npz 'labels' array, or a labelled built-in dataset)")
        if len(data.labels) and not 0 <= int(data.labels.min()) <= int(data.labels.max()) < config.model.num_classes:
            raise DataError(f"dataset {data.name!r} has labels {int(data.labels.min())}..{int(data.labels.max())} "
                            f"but the model has num_classes = {config.model.num_classes}")
    check_condition_data(config, data)
    world = distributed.env_world_size() if world_size is None else world_size
    global_batch = config.train.global_batch_size(world)
    if data.num_images < global_batch:
        what = (f"the batch size {global_batch}" if global_batch == config.train.batch_size else
                f"the global batch {global_batch} (--batch-size {config.train.batch_size} x {world} process(es) "
                f"x grad_accum {config.train.grad_accum})")
        raise DataError(f"dataset {data.name!r} has {data.num_images} images, fewer than {what}; lower --batch-size")


class EpochOrder:
    """Global batches of indices: one permutation per epoch seeded by (seed, epoch), last partial batch
    dropped; the same for any number of processes (each takes its rows of the global batch)."""

    def __init__(self, num_images: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_images, batch_size, seed
        self.steps_per_epoch = num_images // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 1))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


def rank_rows(batch_size: int, world_size: int, grad_accum: int, rank: int) -> torch.Tensor:
    """The rows of the global batch that ``rank`` trains on, micro-batch after micro-batch.

    The global batch of batch_size x world_size x grad_accum rows is cut into grad_accum chunks of
    batch_size x world_size rows (one micro-batch of every rank); rank r takes rows
    [r * batch_size, (r + 1) * batch_size) of each chunk. So two ranks with batch b cover exactly
    the rows one rank with batch 2b covers, micro-batch by micro-batch.
    """
    chunk = batch_size * world_size
    return torch.cat([torch.arange(a * chunk + rank * batch_size, a * chunk + (rank + 1) * batch_size)
                      for a in range(grad_accum)])


def lazy_reader(images: np.ndarray, num_images: int, global_batch: int, seed: int, mine: torch.Tensor,
                device: torch.device) -> BatchPrefetcher:
    """Reads this rank's rows (``mine`` of each global batch) of a memory-mapped dataset, a step ahead.

    The rows are those of :class:`EpochOrder` with the run's seed, so a lazy run trains on exactly
    the pixels an in-memory run does; the reader keeps an order of its own, since it runs on another
    thread. Pinned memory on CUDA lets the copy to the device overlap the step.
    """
    order, mine = EpochOrder(num_images, global_batch, seed), mine.cpu()
    return BatchPrefetcher(images, None, lambda step: order.batch(step)[mine].numpy(),
                           pin_memory=device.type == "cuda")
