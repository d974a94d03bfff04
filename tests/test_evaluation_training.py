"""The metric of --eval-every: its default by image kind, which value is better, and what it logs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.data import load_dataset
from ddpm.errors import ConfigError
from ddpm.evaluation import (LenetFeatures, ReferenceStats, fast_metric, fast_reference, feature_statistics,
                             frechet_distance)
from ddpm.evaluation.inception import INCEPTION_WEIGHTS_FILE
from ddpm.config import default_training_metric
from ddpm.evaluation.training import TrainingEvaluator, is_better
from helpers.inception_layout import random_layout


def test_the_fast_metric_is_the_default_for_mnist_like_images_and_fid_otherwise():
    assert default_training_metric(1, (28, 28)) == "fast" and default_training_metric(1, (8, 8)) == "fast"
    assert default_training_metric(3, (32, 32)) == "fid" and default_training_metric(1, (64, 64)) == "fid"
    assert default_training_metric(3, (8, 8)) == "fid"


def test_lower_fid_and_kid_are_better_higher_is_is_better():
    assert is_better("fid", 3.0, 4.0) and not is_better("fid", 5.0, 4.0)
    assert is_better("kid", 0.01, 0.02) and is_better("fast", 10.0, 11.0)
    assert is_better("is", 9.5, 9.0) and not is_better("is", 8.0, 9.0)
    assert is_better("is", 1.0, None) and not is_better("fid", math.nan, None)
    with pytest.raises(ConfigError):
        is_better("bpd", 1.0, 2.0)


def test_the_fast_evaluator_logs_what_the_fast_metric_gives(tmp_path):
    images = load_dataset("digits", split="train").images[:64]
    evaluator = TrainingEvaluator.build("fast", "digits", cache_dir=tmp_path)
    assert evaluator.headline == "fast_fid"
    expected = fast_metric(images, fast_reference("digits", cache_dir=tmp_path))
    assert evaluator(images) == expected


def test_the_fid_kid_and_is_evaluators_log_their_values(tmp_path):
    """The routing of each metric with cheap stand-ins for the networks (the Inception networks
    themselves are tested in test_evaluation_inception.py): LeNet features, and a classifier
    whose one-hot predictions spread evenly over 4 classes give IS = 4 exactly."""
    images = load_dataset("digits", split="train").images[:40]
    lenet = LenetFeatures()
    reference = ReferenceStats.from_features(lenet(load_dataset("digits", split="test").images))
    fid = TrainingEvaluator("fid", reference, lenet)(images)
    assert set(fid) == {"fid"} and fid["fid"] == pytest.approx(
        frechet_distance(*feature_statistics(lenet(images)), reference.mu, reference.sigma))
    kid_values = TrainingEvaluator("kid", reference, lenet)(images)
    assert set(kid_values) == {"kid", "kid_std"}
    one_hot = TrainingEvaluator("is", None, lambda x: np.eye(1008)[np.arange(len(x)) % 4])(images)
    assert one_hot == {"is": pytest.approx(4.0), "is_std": pytest.approx(0.0, abs=1e-9)}


def test_the_is_evaluator_loads_the_full_network(tmp_path):
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(random_layout(seed=2), weights)
    score = TrainingEvaluator.build("is", "digits", inception_weights=str(weights))
    values = score(load_dataset("digits", split="train").images[:2])
    assert set(values) == {"is", "is_std"} and values["is"] >= 1.0 and score.headline == "is"


def test_an_unknown_metric_or_missing_weights_fail_before_training():
    with pytest.raises(ConfigError, match="--eval-metric"):
        TrainingEvaluator.build("bpd", "digits")
    with pytest.raises(ConfigError, match=INCEPTION_WEIGHTS_FILE):
        TrainingEvaluator.build("is", "digits")
