"""FID, KID, precision/recall and nearest neighbours against closed forms and clear-cut cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ddpm.evaluation import (ReferenceStats, feature_statistics, fid_from_features, frechet_distance, kid,
                             nearest_neighbour_grid, nearest_neighbours, precision_recall, reference_stats)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_frechet_distance_matches_the_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    a, b = rng(0).normal(size=(5, 5)), rng(1).normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T
    mu1, mu2 = rng(2).normal(size=5), rng(3).normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_kid_is_about_zero_for_one_distribution_and_positive_otherwise():
    x, y = rng(4).normal(size=(1000, 16)), rng(5).normal(size=(1000, 16))
    z = rng(6).normal(loc=0.3, size=(1000, 16))
    same, same_std = kid(x, y, num_subsets=20, subset_size=500)
    other, _ = kid(x, z, num_subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    assert other > 10 * max(abs(same), same_std)


def test_feature_statistics_are_the_mean_and_the_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mean, cov = feature_statistics(x)
    np.testing.assert_allclose(mean, [2.0, 2.0])
    # sum of (x - mean)(x - mean)^T over the 3 points, divided by N - 1 = 2
    np.testing.assert_allclose(cov, np.array([[8.0, 6.0], [6.0, 6.0]]) / 2)


def test_fid_from_features_is_small_for_one_distribution():
    x, y = rng(7).normal(size=(4000, 4)), rng(8).normal(size=(4000, 4))
    assert fid_from_features(x, y) < 0.02
    assert fid_from_features(x, y + 1.0) == pytest.approx(4.0, abs=0.1)


def test_precision_and_recall():
    real = rng(9).normal(size=(500, 2))
    p, r = precision_recall(real, rng(10).normal(size=(500, 2)))
    assert p > 0.9 and r > 0.9, (p, r)      # each one: a tuple comparison would check only p
    far_p, far_r = precision_recall(real, rng(11).normal(size=(500, 2)) + 20.0)
    assert far_p == 0.0 and far_r == 0.0
    # samples from half the real distribution: precise, but they cover only part of it
    half = real[real[:, 0] > 0]
    p, r = precision_recall(real, half)
    assert p == 1.0 and r < 0.7


def test_nearest_neighbours_find_copies_of_training_images():
    train = rng(12).integers(0, 256, size=(50, 8, 8, 1), dtype=np.uint8)
    samples = train[[3, 17, 40]]
    idx, dist = nearest_neighbours(samples, train, k=3)
    assert idx[:, 0].tolist() == [3, 17, 40] and np.all(dist[:, 0] == 0) and np.all(dist[:, 1] > 0)
    grid = nearest_neighbour_grid(samples, train, k=3)
    assert grid.dtype == np.uint8 and grid.ndim == 3


class CountingExtractor:
    """A stand-in extractor: mean pixel value and its square; counts its calls."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        m = images.reshape(len(images), -1).mean(1, dtype=np.float64)
        return np.stack([m, m ** 2, images.reshape(len(images), -1)[:, 0]], axis=1)


def test_reference_stats_are_cached_by_key(tmp_path, monkeypatch):
    extractor = CountingExtractor()
    a = reference_stats("digits", extractor, split="test", n=100, cache_dir=tmp_path)
    b = reference_stats("digits", extractor, split="test", n=100, cache_dir=tmp_path)
    assert extractor.calls == 1 and np.array_equal(a.features, b.features)
    reference_stats("digits", extractor, split="test", n=50, cache_dir=tmp_path)        # another key
    assert extractor.calls == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "env"))
    reference_stats("digits", extractor, split="train", n=20)
    assert len(list((tmp_path / "env").glob("digits-train-n20r-8x8x1-counting.npz"))) == 1
    loaded = ReferenceStats.load(next(tmp_path.glob("digits-test-n100r-*.npz")))
    np.testing.assert_allclose(loaded.mu, a.mu)


def test_reference_subset_is_spread_over_the_dataset_not_a_prefix():
    """Ordered datasets (MNIST's test set: two writer populations in turn) need a random subset."""
    from ddpm.evaluation.reference import subset_indices

    idx = subset_indices(10_000, 2_000)
    assert len(set(idx.tolist())) == 2_000 and list(idx) == sorted(idx)
    assert (idx >= 5_000).mean() == pytest.approx(0.5, abs=0.05)        # both halves represented
    np.testing.assert_array_equal(idx, subset_indices(10_000, 2_000))   # fixed seed: a stable cache key
    np.testing.assert_array_equal(subset_indices(5, 9), np.arange(5))
