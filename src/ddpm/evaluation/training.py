"""The metric of ``--eval-every`` during training: one of fast, fid, kid, is, and which value is better.

A :class:`TrainingEvaluator` is built once per run (its reference statistics are computed or read
from the cache then) and called on each evaluation's uint8 samples; it returns the values to log,
keyed as ``metrics.jsonl`` and TensorBoard (under ``eval/``) name them. :func:`is_better` tells
``--keep-best`` which checkpoint to keep: the lowest FID, KID or fast FID, the highest IS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..config import TRAINING_METRICS
from ..errors import ConfigError
from .features import InceptionFeatures, LenetFeatures
from .inception import InceptionClassifier
from .metrics import feature_statistics, frechet_distance, inception_score, kid
from .reference import fast_metric, reference_stats

__all__ = ["HEADLINE", "TrainingEvaluator", "is_better"]

# The value --keep-best compares for each metric, and whether higher is better.
HEADLINE = {"fast": ("fast_fid", False), "fid": ("fid", False), "kid": ("kid", False), "is": ("is", True)}


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric``'s headline beats ``best`` (None: nothing yet)."""
    if metric not in HEADLINE:
        raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(TRAINING_METRICS)}")
    if best is None:
        return bool(np.isfinite(value))
    return value > best if HEADLINE[metric][1] else value < best


@dataclass
class TrainingEvaluator:
    """One metric of samples against the training data's reference (see :func:`TrainingEvaluator.build`)."""

    metric: str
    reference: object = None           # ReferenceStats for fast / fid / kid
    network: object = None             # the feature extractor, or the classifier for is
    info: dict = field(default_factory=dict)

    @property
    def headline(self) -> str:
        return HEADLINE[self.metric][0]

    @classmethod
    def build(cls, metric: str, data: str | os.PathLike, *, data_root=None, split: str = "test",
              image_size: tuple[int, int] | None = None, channels: int | None = None, ref_n: int | None = None,
              inception: str | None = None, inception_weights: str | None = None, device: str = "cpu",
              cache_dir=None) -> "TrainingEvaluator":
        """Load the network and the reference statistics (cached) once, before training starts.

        The reference is ``ref_n`` images (None: all) of the dataset's ``split`` (the test split, as
        the fast metric has always used), converted to the model's ``image_size`` and ``channels``.
        """
        if metric not in TRAINING_METRICS:
            raise ConfigError(f"--eval-metric must be one of {', '.join(TRAINING_METRICS)}; got {metric!r}")
        if metric == "is":
            return cls(metric, None, InceptionClassifier(inception_weights, device=device))
        extractor = LenetFeatures() if metric == "fast" else InceptionFeatures(inception, device=device)
        reference = reference_stats(data, extractor, split=split, n=ref_n, data_root=data_root,
                                    image_size=image_size, channels=channels, cache_dir=cache_dir)
        return cls(metric, reference, extractor, {"n_reference": reference.n})

    def __call__(self, images: np.ndarray) -> dict[str, float]:
        """Values to log for uint8 samples [N, H, W, C]: fast_fid/fast_kid/fast_n, fid, kid/kid_std or is/is_std."""
        if self.metric == "fast":
            return fast_metric(images, self.reference)
        if self.metric == "is":
            mean, std = inception_score(self.network(images), splits=min(10, len(images)))
            return {"is": mean, "is_std": std}
        features = self.network(images)
        if self.metric == "kid":
            mean, std = kid(features, self.reference.features, num_subsets=20)
            return {"kid": mean, "kid_std": std}
        return {"fid": frechet_distance(*feature_statistics(features), self.reference.mu, self.reference.sigma)}
