"""Sample-quality metrics on feature vectors: FID, KID, precision and recall, nearest neighbours.

Every function takes features as float arrays [N, D] (from :mod:`ddpm.evaluation.features`)
and computes in float64.

* Frechet distance (Heusel et al. 2017): ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}),
  with tr (S_1 S_2)^{1/2} = sum of sqrt(eigenvalues of S_1^{1/2} S_2 S_1^{1/2}), a symmetric PSD matrix.
* KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, averaged over random subsets; can be slightly negative.
* Precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around
  its points, of radius the distance to the k-th nearest neighbour (k = 3) within the set.
* Inception Score (Salimans et al. 2016): exp(E_x KL(p(y | x) || p(y))) from class probabilities,
  computed as their reference code does: the images in 10 consecutive splits, p(y) the mean of
  p(y | x) over a split, and the mean and standard deviation of the 10 scores.
* Nearest neighbours in pixel space, for a memorisation check (:func:`nearest_neighbour_grid`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from ..images import make_grid

__all__ = ["feature_statistics", "frechet_distance", "fid_from_features", "kid", "precision_recall", "inception_score",
           "nearest_neighbours", "nearest_neighbour_grid"]


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ConfigError(f"{name} must be features [N, D] with N >= 2, got shape {x.shape}")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D]."""
    x = _as_features(features, "features")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues set to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ConfigError(f"mismatched statistics: means {mu1.shape} and {mu2.shape}, "
                          f"covariances {sigma1.shape} and {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)           # eigenvalues of S_1 S_2, all >= 0
    trace_sqrt = np.sqrt(np.clip(middle, 0.0, None)).sum()
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def fid_from_features(features1, features2) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3: mean off-diagonal k_xx + k_yy - 2 mean k_xy."""
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kid(features1, features2, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation over subsets of the unbiased MMD^2.

    Each subset draws min(``subset_size``, N1, N2) points of each set without replacement.
    """
    x, y = _as_features(features1, "features1"), _as_features(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ConfigError(f"feature sizes differ: {x.shape[1]} and {y.shape[1]}")
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = [_polynomial_mmd2_unbiased(x[rng.choice(len(x), size, replace=False)],
                                        y[rng.choice(len(y), size, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x log y with 0 log 0 = 0 (a one-hot distribution has zeros)."""
    return np.where(x > 0, x * np.log(np.where(x > 0, y, 1.0)), 0.0)


def inception_score(probs, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class probabilities p(y | x) [N, K]: mean and standard deviation over ``splits``.

    Split i holds images i N / splits .. (i + 1) N / splits - 1 (consecutive, as the reference
    code takes them); its score is exp(mean_x KL(p(y | x) || p(y))) with p(y) the split's mean.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) < splits or splits < 1:
        raise ConfigError(f"the Inception Score needs probabilities [N, K] with N >= {splits} splits, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ConfigError("the Inception Score needs probabilities: non-negative rows that sum to 1")
    scores = []
    for i in range(splits):
        part = p[i * len(p) // splits:(i + 1) * len(p) // splits]
        p_y = part.mean(axis=0, keepdims=True)
        kl = (_xlogy(part, part) - _xlogy(part, np.broadcast_to(p_y, part.shape))).sum(axis=1)   # KL(p(y|x) || p(y))
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i:i + chunk], b) for i in range(0, len(a), chunk)])


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for i in range(0, len(x), 2048):
        d = torch.cdist(x[i:i + 2048], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)          # the 1st smallest is the point itself
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of ``points`` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(points[i:i + 2048], centres) <= radii[None, :]).any(dim=1)
              for i in range(0, len(points), 2048)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features, fake_features, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-th nearest neighbour radii.

    precision: share of fake points inside the real manifold; recall: share of real points
    inside the fake manifold.
    """
    real = torch.from_numpy(_as_features(real_features, "real features"))
    fake = torch.from_numpy(_as_features(fake_features, "fake features"))
    if min(len(real), len(fake)) <= k:
        raise ConfigError(f"precision and recall with k = {k} need more than {k} points in each set")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


def nearest_neighbours(samples: np.ndarray, train: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """For each uint8 sample [N, H, W, C], the k closest training images in pixel space (L2).

    Returns (indices [N, k] into ``train``, distances [N, k] in uint8 units).
    """
    if samples.shape[1:] != train.shape[1:]:
        raise ConfigError(f"samples {samples.shape[1:]} and training images {train.shape[1:]} differ in shape")
    a = torch.from_numpy(samples.reshape(len(samples), -1).astype(np.float32))
    b = torch.from_numpy(train.reshape(len(train), -1).astype(np.float32))
    d = _pairwise_distances(a, b)
    dist, idx = d.topk(min(k, len(train)), dim=1, largest=False)
    return idx.numpy(), dist.numpy()


def nearest_neighbour_grid(samples: np.ndarray, train: np.ndarray, k: int = 3) -> np.ndarray:
    """A uint8 grid image: one row per sample, the sample first, then its k closest training images."""
    idx, _ = nearest_neighbours(samples, train, k)
    rows = [np.concatenate([samples[i:i + 1], train[idx[i]]]) for i in range(len(samples))]
    return make_grid(np.concatenate(rows), nrow=idx.shape[1] + 1)
