"""Evaluation: the likelihood bound in bits/dim and sample-quality metrics (FID, KID, precision/recall, IS).

See ``docs/evaluation.md`` and ``ddpm eval --help``. :func:`evaluate` of an :class:`EvalConfig` is the
whole pipeline that ``ddpm eval`` runs.
"""

from .features import InceptionFeatures, InceptionPreprocess, LeNet, LenetFeatures, classify, find_inception, load_lenet
from .inception import InceptionClassifier, InceptionV3, load_inception_v3
from .likelihood import BpdResult, bpd_terms, evaluate_bpd
from .metrics import (feature_statistics, fid_from_features, frechet_distance, inception_score, kid,
                      nearest_neighbour_grid, nearest_neighbours, precision_recall)
from .pipeline import EVAL_METRICS, EvalConfig, default_metrics, evaluate
from .reference import ReferenceStats, default_cache_dir, fast_metric, fast_reference, reference_stats

__all__ = ["InceptionFeatures", "InceptionPreprocess", "LeNet", "LenetFeatures", "classify", "find_inception",
           "load_lenet", "InceptionClassifier", "InceptionV3", "load_inception_v3",
           "BpdResult", "bpd_terms", "evaluate_bpd",
           "feature_statistics", "fid_from_features", "frechet_distance", "inception_score", "kid",
           "nearest_neighbour_grid", "nearest_neighbours", "precision_recall",
           "EVAL_METRICS", "EvalConfig", "default_metrics", "evaluate",
           "ReferenceStats", "default_cache_dir", "fast_metric", "fast_reference", "reference_stats"]
