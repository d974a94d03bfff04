"""Evaluation: the likelihood bound in bits/dim and sample-quality metrics (FID, KID, precision/recall).

See ``README.md`` (section "Evaluation") and ``ddpm eval --help``.
"""

from .features import InceptionFeatures, LeNet, LenetFeatures, classify, find_inception, load_lenet
from .likelihood import BpdResult, bpd_terms, discretized_gaussian_log_likelihood, evaluate_bpd, normal_kl
from .metrics import (feature_statistics, fid_from_features, frechet_distance, kid, nearest_neighbour_grid,
                      nearest_neighbours, precision_recall)
from .reference import ReferenceStats, default_cache_dir, fast_metric, fast_reference, reference_stats

__all__ = ["InceptionFeatures", "LeNet", "LenetFeatures", "classify", "find_inception", "load_lenet",
           "BpdResult", "bpd_terms", "discretized_gaussian_log_likelihood", "evaluate_bpd", "normal_kl",
           "feature_statistics", "fid_from_features", "frechet_distance", "kid", "nearest_neighbour_grid",
           "nearest_neighbours", "precision_recall",
           "ReferenceStats", "default_cache_dir", "fast_metric", "fast_reference", "reference_stats"]
