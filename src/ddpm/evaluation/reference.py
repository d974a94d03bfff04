"""Reference statistics of a dataset's features, cached on disk, and the fast metric for training.

A :class:`ReferenceStats` holds the features of a reference set (float32 [N, D]) with their mean
and covariance. :func:`reference_stats` computes them once and caches them as an ``.npz`` under
the cache folder (``--cache-dir``, else ``$DDPM_CACHE``, else ``~/.cache/ddpm``), in a file named
after everything that determines them: dataset, split, number of images, image size, channels
and feature extractor (with a digest of its weights file). Files are written atomically.

The format is the one the ecosystem shares: an ``.npz`` whose arrays ``mu`` [D] and ``sigma`` [D, D]
are the features' mean and covariance, as pytorch-fid and TTUR publish them (e.g. the CIFAR-10
training-set statistics). :meth:`ReferenceStats.load` reads such files (FID only) as well as the
cache's, which add the ``features`` themselves (for KID and precision/recall), a ``key`` and a
``format`` number; :meth:`ReferenceStats.save_statistics` writes ``mu`` and ``sigma`` alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import load_dataset
from ..errors import DataError
from ..fileio import atomic_write
from .features import LENET_WEIGHTS, LenetFeatures, check_images
from .metrics import feature_statistics, frechet_distance, kid

__all__ = ["ReferenceStats", "default_cache_dir", "subset_indices", "reference_stats", "fast_reference", "fast_metric",
           "extractor_key"]

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$DDPM_CACHE`` if set, else ``~/.cache/ddpm``."""
    return Path(os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm")


@dataclass
class ReferenceStats:
    """Features of a reference set and their Gaussian statistics (float64 mean [D], covariance [D, D]).

    ``features`` is None for statistics read from a file that holds only ``mu`` and ``sigma``.
    """

    features: np.ndarray | None
    mu: np.ndarray
    sigma: np.ndarray
    key: str

    @classmethod
    def from_features(cls, features: np.ndarray, key: str = "") -> "ReferenceStats":
        mu, sigma = feature_statistics(features)
        return cls(np.asarray(features, dtype=np.float32), mu, sigma, key)

    @property
    def n(self) -> int | None:
        return None if self.features is None else len(self.features)

    @property
    def dim(self) -> int:
        return len(self.mu)

    def save(self, path: str | os.PathLike) -> Path:
        """The cache's file: ``mu``, ``sigma`` and the ``features``, ``key`` and ``format``."""
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, features=self.features, mu=self.mu, sigma=self.sigma, key=np.array(self.key),
                         format=np.array(CACHE_FORMAT))
        return atomic_write(path, write)

    def save_statistics(self, path: str | os.PathLike) -> Path:
        """``mu`` and ``sigma`` alone, the file pytorch-fid writes and reads (``--save-stats``)."""
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, mu=self.mu, sigma=self.sigma)
        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, *, dim: int | None = None) -> "ReferenceStats":
        """Statistics from an ``.npz`` with ``mu`` [D] and ``sigma`` [D, D] (and ``features`` [N, D] if cached).

        ``dim`` checks D against a feature extractor's; a mismatch or a malformed file is a :class:`DataError`.
        """
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "format" in archive.files and int(archive["format"]) != CACHE_FORMAT:
                    raise DataError(f"{path} is a reference-statistics file of another format")
                if "mu" not in archive.files or "sigma" not in archive.files:
                    raise DataError(f"{path} holds no reference statistics: it needs arrays 'mu' and 'sigma' "
                                    f"(it has {', '.join(archive.files) or 'none'})")
                features = archive["features"] if "features" in archive.files else None
                key = str(archive["key"]) if "key" in archive.files else ""
                stats = cls(features, archive["mu"].astype(np.float64), archive["sigma"].astype(np.float64), key)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read reference statistics {path}: {str(exc).splitlines()[0]}") from None
        stats._check_shapes(path, dim)
        return stats

    def _check_shapes(self, path, dim: int | None) -> None:
        d = self.mu.shape[0] if self.mu.ndim == 1 else None
        if d is None or self.sigma.shape != (d, d) or (self.features is not None and self.features.shape[1:] != (d,)):
            raise DataError(f"{path}: mu {self.mu.shape} and sigma {self.sigma.shape} are not statistics of "
                            f"D-dimensional features (mu [D], sigma [D, D])")
        if dim is not None and d != dim:
            raise DataError(f"{path} holds statistics of {d}-d features; these features are {dim}-d")
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise DataError(f"{path}: mu or sigma holds non-finite values")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def extractor_key(extractor) -> str:
    """``lenet-<digest>`` or ``inception-<resize mode>-<digest>``: the extractor, its variant, its weights' digest."""
    path = getattr(extractor, "path", None) or (LENET_WEIGHTS if extractor.name == "lenet" else None)
    name = "-".join(part for part in (extractor.name, getattr(extractor, "variant", None)) if part)
    return f"{name}-{_file_digest(Path(path))}" if path is not None else name


def _dataset_key(data: str | os.PathLike) -> str:
    """A file-name-safe name: the dataset name, or a path's name with a digest of its absolute path."""
    text = str(data)
    if text in ("digits", "mnist", "fashion-mnist"):
        return text
    resolved = str(Path(text).resolve())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).name)[:40] or "data"
    return f"{stem}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"


def subset_indices(num_images: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` of ``num_images`` indices drawn without replacement with a fixed seed, in ascending order."""
    if n >= num_images:
        return np.arange(num_images)
    return np.sort(np.random.default_rng(seed).choice(num_images, n, replace=False))


def reference_stats(data: str | os.PathLike, extractor, *, split: str = "test", n: int | None = None,
                    data_root: str | os.PathLike | None = None, image_size: tuple[int, int] | None = None,
                    channels: int | None = None, cache_dir: str | os.PathLike | None = None,
                    expect_channels: int | None = None, image_column: str | None = None) -> ReferenceStats:
    """Features of ``n`` images (all when None) of a dataset split, cached on disk.

    A subset is drawn at random with a fixed seed (:func:`subset_indices`), never the first
    ``n``: datasets are often ordered (MNIST's test set holds two writer populations one after
    the other), and a prefix would be a biased reference.

    ``image_size`` / ``channels`` convert the images as :func:`ddpm.data.load_dataset` does
    (to compare with a model's samples, pass the model's size and channels). ``expect_channels``
    instead refuses a dataset whose own channel count differs (samples of the wrong kind).
    ``image_column``: a Hugging Face dataset's image column (part of the cache key).
    """
    dataset = load_dataset(data, data_root=data_root, split=split, image_size=image_size, channels=channels,
                           image_column=image_column)
    if expect_channels is not None and dataset.channels != expect_channels:
        raise DataError(f"the samples have {expect_channels} channel(s) but the reference data {data} has "
                        f"{dataset.channels}: compare images of the same kind")
    count = dataset.num_images if n is None else min(n, dataset.num_images)
    h, w = dataset.image_size
    subset = "" if count == dataset.num_images else "r"          # r: a seeded random subset
    column = "" if image_column is None else "-col_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", image_column)[:40]
    key = f"{_dataset_key(data)}{column}-{split}-n{count}{subset}-{h}x{w}x{dataset.channels}-{extractor_key(extractor)}"
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{key}.npz"
    if path.is_file():
        cached = ReferenceStats.load(path)
        if cached.key == key:
            return cached
    stats = ReferenceStats.from_features(extractor(dataset.images[subset_indices(dataset.num_images, count)]), key)
    stats.save(path)
    return stats


def fast_reference(data: str | os.PathLike = "mnist", *, data_root: str | os.PathLike | None = None,
                   split: str = "test", n: int | None = None, image_size: tuple[int, int] | None = None,
                   channels: int | None = None, cache_dir: str | os.PathLike | None = None) -> ReferenceStats:
    """Reference statistics for :func:`fast_metric`: LeNet features of a dataset split (cached)."""
    return reference_stats(data, LenetFeatures(), split=split, n=n, data_root=data_root, image_size=image_size,
                           channels=channels, cache_dir=cache_dir)


def fast_metric(images: np.ndarray, reference: ReferenceStats, *, kid_subsets: int = 20) -> dict[str, float]:
    """The fast metric for uint8 images [N, H, W, C] against LeNet reference statistics.

    Returns ``fast_fid`` (Frechet distance of the LeNet features) and ``fast_kid`` (unbiased KID),
    cheap enough to run during training on a CPU (a few hundred images take well under a second
    besides sampling them). Images of another size than 28x28 are resized bilinearly.
    """
    features = LenetFeatures()(check_images(images))
    mu, sigma = feature_statistics(features)
    fid = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    kid_mean, _ = kid(features, reference.features, num_subsets=kid_subsets)
    return {"fast_fid": fid, "fast_kid": kid_mean, "fast_n": len(images)}
