"""Your own images at any size: presets as network shapes, old checkpoints, fingerprints, class names.

The photo folder is made of crops of the two photos scikit-learn ships (``load_sample_images``:
``china.jpg`` and ``flower.jpg``), saved as JPEG files in one class subfolder per photo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import ConfigError, DataError
from ddpm.checkpoint import save_checkpoint
from ddpm.cli import main
from ddpm.config import RunConfig
from ddpm.build import build_diffusion
from ddpm.data import check_same_dataset, dataset_fingerprint, fingerprint_difference, load_dataset
from ddpm.generate import load_diffusion
from ddpm.sampling import sample_images
from ddpm.models import PRESETS, Unet, UnetConfig, preset_config
from ddpm.samplers import SamplingOptions

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from make_preset_fixture import FIXTURE, TINY, fixed_input, picked, seeded_unet  # noqa: E402
from photos import make_photo_folder  # noqa: E402

LEGACY = json.loads(FIXTURE.read_text())
CROPS_PER_PHOTO = 24
QUICK = ["--steps", "2", "--batch-size", "4", "--timesteps", "25", "--num-images", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """48 RGB crops (96 x 128 pixels) of scikit-learn's two photos, as JPEGs in photos/china/ and photos/flower/."""
    return make_photo_folder(tmp_path_factory.mktemp("own") / "photos", CROPS_PER_PHOTO)


# ----------------------------------------------------------------------------- presets at any size

def _sizes(name: str) -> list[tuple[tuple[int, int], int]]:
    """Two sizes the preset can downsample (square, then 3:5) and a channel count for each."""
    f = preset_config(name, **TINY).downsample_factor
    return [((2 * f, 2 * f), 1), ((3 * f, 5 * f), 3), ((4 * f, 2 * f), 4)]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_keeps_its_shape_at_any_size_it_can_downsample(name):
    """The same weights (names and shapes) as at the preset's own size, and an output of the input's shape."""
    own = Unet(preset_config(name, **TINY)).state_dict()
    for size, channels in _sizes(name):
        model = Unet(preset_config(name, **TINY, image_size=size, channels=channels)).eval()
        weights = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(("conv_in", "conv_out"))}
        assert weights == {k: v.shape for k, v in own.items() if not k.startswith(("conv_in", "conv_out"))}
        x = torch.randn(1, channels, *size)
        with torch.no_grad():
            assert model(x, torch.tensor([5])).shape == x.shape


def test_attention_stays_at_its_level_and_the_config_holds_the_resolved_sizes():
    config = preset_config("cifar10", image_size=(24, 40))
    assert config.attention_levels == (1,)
    assert config.feature_map_sizes() == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert config.attention_resolutions == (12,)                    # the shorter side, as configs always named it
    assert config.to_dict()["attention_levels"] == [1] and config.to_dict()["attention_resolutions"] == [12]
    assert UnetConfig.from_dict(config.to_dict()) == config
    assert preset_config("mnist", image_size=16).attention_resolutions == (4,)
    assert preset_config("celebahq256").attention_resolutions == (16,)


def test_attention_given_by_size_or_by_level_is_the_same_model():
    by_size = UnetConfig(image_size=32, attention_resolutions=(16, 8))
    assert by_size == UnetConfig(image_size=32, attention_levels=(2, 1)) and by_size.attention_levels == (1, 2)
    assert UnetConfig(image_size=32).attention_levels == (1,)       # the paper's place when neither is given
    assert UnetConfig(image_size=32, dim_mults=(1,)).attention_levels == ()
    # Either key replaces the preset's placement.
    assert preset_config("cifar10", attention_resolutions=(8,)).attention_levels == (2,)
    assert preset_config("cifar10", attention_levels=(0, 3)).attention_resolutions == (32, 4)


@pytest.mark.parametrize("options, phrase", [
    (dict(attention_levels=(4,)), "do not exist"),
    (dict(attention_levels=(1, 1)), "twice"),
    (dict(attention_levels=1), "list of integers"),
    (dict(attention_resolutions=(7,)), "match no level"),
    (dict(attention_levels=(2,), attention_resolutions=(16,)), "disagree"),
    (dict(image_size=(20, 32)), "divisible by 8"),
    (dict(image_size=None, attention_resolutions=(16,)), "need an image_size"),
])
def test_attention_and_sizes_that_do_not_fit_are_refused(options, phrase):
    with pytest.raises(ConfigError, match=phrase):
        UnetConfig(**options)


def test_cifar10_keeps_the_papers_parameter_count_at_any_size():
    for size in (32, (24, 40), 64):
        with torch.device("meta"):
            model = Unet(preset_config("cifar10", image_size=size))
        assert model.num_parameters() == 35_746_307                  # Ho et al. 2020, Appendix B


def test_a_model_of_open_size_runs_at_every_multiple_of_its_downsample_factor():
    torch.manual_seed(0)
    model = Unet(image_size=None, channels=3, dim=16, dim_mults=(1, 2, 2), attention_levels=(2,), norm_groups=8)
    assert model.image_size is None and model.config.attention_resolutions is None
    assert model.downsample_factor == 4
    for h, w in ((8, 8), (12, 20), (32, 16)):
        assert model(torch.randn(1, 3, h, w), torch.tensor([1])).shape == (1, 3, h, w)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(1, 3, 10, 8), torch.tensor([1]))
    assert model.config.feature_map_sizes((12, 20)) == [(12, 20), (6, 10), (3, 5)]


# ----------------------------------------------------------------------------- checkpoints written before

@pytest.mark.parametrize("name", PRESETS)
def test_configs_written_before_build_the_same_network(name):
    """The fixture holds what the code before per-level attention wrote and computed, at tiny width."""
    legacy = LEGACY[name]
    assert "attention_levels" not in legacy["config"]
    config = UnetConfig.from_dict(legacy["config"])
    assert config == preset_config(name, **TINY)
    assert config.attention_resolutions == tuple(legacy["config"]["attention_resolutions"])
    model = seeded_unet(legacy["config"])
    assert [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()] == legacy["weights"]
    x, t = fixed_input(legacy["config"])
    with torch.no_grad():
        out = model(x, t)
    np.testing.assert_allclose(picked(out), legacy["output_picked"], rtol=1e-4, atol=1e-5)
    assert out.double().sum().item() == pytest.approx(legacy["output_sum"], rel=1e-4)


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10"])
def test_checkpoints_written_before_load_and_sample_identically(tmp_path, name):
    old = LEGACY[name]["config"]
    model = seeded_unet(old)
    run = RunConfig(preset=name, model=UnetConfig.from_dict(old)).to_dict()
    run["model"] = old                                              # exactly as the old config.json has it
    weights = {f"{prefix}.{k}": v.clone() for prefix in ("model", "ema") for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "checkpoints" / "step-0000010.safetensors", weights,
                           {"step": 10, "config": run})
    loaded, _ = load_diffusion(path, channels_last=False)            # the same kernels as the rebuilt model
    rebuilt = build_diffusion(RunConfig.for_preset(name, **TINY)).eval()
    rebuilt.model.load_state_dict(model.state_dict())
    sampling = SamplingOptions(sampler="ddpm", steps=3)
    torch.testing.assert_close(sample_images(loaded, [0, 1], seed=4, sampling=sampling),
                               sample_images(rebuilt, [0, 1], seed=4, sampling=sampling), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the photo folder with a preset

def test_photos_train_with_the_mnist_preset_in_colour(photos, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(photos), "--preset", "mnist", "--image-size", "16", "--channels", "3",
                 *QUICK, "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["image_size"] == [16, 16] and saved["model"]["channels"] == 3
    assert saved["model"]["attention_levels"] == [2] and saved["model"]["attention_resolutions"] == [4]


def test_photos_train_with_the_digits_preset_at_32(photos, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(photos), "--preset", "digits", "--image-size", "32", *QUICK,
                 "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["attention_resolutions"] == [16]


def test_a_dry_run_shows_where_attention_lands_at_a_non_square_size(photos, capsys):
    assert main(["train", "--data", str(photos), "--preset", "mnist", "--image-size", "24", "40",
                 "--batch-size", "8", "--dry-run"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["image_size"] == [24, 40] and model["channels"] == 3
    assert model["attention_levels"] == [2] and model["attention_resolutions"] == [6]


# ----------------------------------------------------------------------------- fingerprints and class names

def test_the_photo_folder_carries_its_class_names_and_absolute_path(photos, monkeypatch):
    monkeypatch.chdir(photos.parent)
    data = load_dataset("photos", image_size=16)
    assert data.class_names == ["china", "flower"]
    assert data.labels.tolist() == [0] * CROPS_PER_PHOTO + [1] * CROPS_PER_PHOTO
    assert data.path == str(photos) and Path(data.path).is_absolute()
    assert load_dataset("digits").path is None


def test_fingerprint_recognises_a_moved_copy_and_names_what_differs(photos, tmp_path):
    import shutil

    data = load_dataset(photos, image_size=16)
    copy = shutil.copytree(photos, tmp_path / "elsewhere" / "copy")
    assert load_dataset(copy, image_size=16).fingerprint() == data.fingerprint()
    fp = data.fingerprint()
    assert fp["num_images"] == 48 and fp["image_shape"] == [16, 16, 3]
    assert fingerprint_difference(fp, fp) is None
    (copy / "flower" / "00.jpg").unlink()
    assert "image count" in fingerprint_difference(fp, load_dataset(copy, image_size=16).fingerprint())
    assert "image shape" in fingerprint_difference(fp, load_dataset(photos, image_size=24).fingerprint())
    edited = data.images.copy()
    edited[:, 0, 0, 0] ^= 1                                         # one bit in every image
    assert "content" in fingerprint_difference(fp, dataset_fingerprint(edited, data.labels))
    relabelled = data.labels.copy()
    relabelled[:] = 0
    assert "content" in fingerprint_difference(fp, dataset_fingerprint(data.images, relabelled))
    check_same_dataset(fp, data)
    check_same_dataset(None, data)
    with pytest.raises(DataError, match="not the dataset this run trained on: the image count"):
        check_same_dataset(fp, load_dataset(copy, image_size=16))


def test_fingerprint_reads_only_its_sample_of_a_large_memory_mapped_array(tmp_path):
    images = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(200_000, 8, 8, 1))
    images[123_456] = 7
    reads = []

    class Spy:
        shape, dtype = images.shape, images.dtype

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            reads.append(i)
            return images[i]

    fp = dataset_fingerprint(Spy())
    assert len(reads) == 64 and len(set(reads)) == 64
    assert fp == dataset_fingerprint(images) and fp["num_images"] == 200_000
    assert dataset_fingerprint(images[:64])["sample_sha256"] != fp["sample_sha256"]


def test_npz_class_names_name_the_labels(tmp_path):
    path = tmp_path / "set.npz"
    images = np.zeros((3, 4, 4), np.uint8)
    np.savez(path, images=images, labels=np.array([0, 2, 1]), class_names=np.array(["cat", "dog", "owl"]))
    assert load_dataset(path).class_names == ["cat", "dog", "owl"]
    for bad, phrase in [(dict(labels=np.array([0, 2, 1]), class_names=np.array(["cat", "dog"])), "only 2"),
                        (dict(class_names=np.array(["cat"])), "no 'labels'"),
                        (dict(labels=np.array([0, 1, 1]), class_names=np.array(["cat", "cat"])), "distinct"),
                        (dict(labels=np.array([0, 1, 1]), class_names=np.array([1, 2])), "strings")]:
        np.savez(path, images=images, **bad)
        with pytest.raises(DataError, match=phrase):
            load_dataset(path)


# ----------------------------------------------------------------------------- the automatic choice

@pytest.mark.parametrize("size, channels, count, preset, steps, batch", [
    ((16, 16), 3, 48, "digits", 2_000, 48),                         # the photo folder at 16x16
    ((24, 40), 3, 48, "mnist", 5_000, 48),
    ((32, 32), 3, 50_000, "cifar10", 30_000, 128),                  # CIFAR-10's own case: the paper's model
    ((28, 28), 1, 60_000, "mnist", 30_000, 64),                     # 28 does not halve three times: not cifar10
    ((128, 128), 3, 48, "cifar10", 20_000, 48),
    ((256, 256), 3, 30_000, "celebahq256", 200_000, 64),
    ((100, 100), 4, 10, "mnist", 20_000, 10),
])
def test_the_automatic_choice_is_a_fixed_function_of_size_channels_and_count(size, channels, count, preset,
                                                                              steps, batch):
    from ddpm.recipes import choose

    choice = choose(size, channels, count)
    assert (choice.preset, choice.train["steps"], choice.train["batch_size"]) == (preset, steps, batch)
    assert choice.train["batch_size"] <= count and choice.train["warmup_steps"] <= steps // 10
    assert choice == choose(size, channels, count)
    preset_config(choice.preset, image_size=size, channels=channels)   # and it builds at that size


def test_an_odd_image_side_fits_no_preset_and_the_error_says_how_to_resize():
    from ddpm.recipes import choose

    with pytest.raises(DataError, match="--image-size"):
        choose((27, 28), 3, 10)


def test_a_class_is_found_by_name_or_index():
    from ddpm.data import class_index

    assert class_index("flower", ["china", "flower"], 2) == 1
    assert class_index("0", ["china", "flower"], 2) == 0 and class_index(1, None, 2) == 1
    assert class_index("7", ["10", "7"], 2) == 1                     # a name wins over an index
    for spec, names, phrase in [("flwer", ["china", "flower"], "did you mean 'flower'"), ("2", None, "out of range"),
                                ("cat", None, "no names")]:
        with pytest.raises(ConfigError, match=phrase):
            class_index(spec, names, 2)


@pytest.mark.parametrize("classes, samples, rows, per_row", [
    (2, 64, 8, 8), (10, 64, 10, 6), (100, 64, 16, 4), (1, 64, 8, 8), (2, 4, 2, 2), (3, 2, 2, 1),
])
def test_a_class_grid_gives_each_class_whole_rows_for_any_number_of_classes(classes, samples, rows, per_row):
    from ddpm.images import class_grid_layout

    labels, nrow = class_grid_layout(classes, samples)
    assert nrow == per_row and len(labels) == rows * per_row <= samples
    grid_rows = [labels[r * nrow:(r + 1) * nrow] for r in range(rows)]
    assert all(len(set(row)) == 1 for row in grid_rows)             # one class per row
    assert labels == sorted(labels)                                  # classes in order, top to bottom


def test_row_labels_are_written_left_of_the_grid():
    from ddpm.images import label_rows, make_grid

    grid = make_grid(np.zeros((4, 16, 16, 3), np.uint8), nrow=2, scale=1)
    labelled = label_rows(grid, ["flower", ""])
    assert labelled.shape[0] == grid.shape[0] and labelled.shape[1] > grid.shape[1]
    margin = labelled[:, :labelled.shape[1] - grid.shape[1]]
    assert (margin[:18] < 128).any() and not (margin[18:] < 128).any()   # text beside row 0 only
    np.testing.assert_array_equal(labelled[:, margin.shape[1]:], grid)


def test_the_choice_line_says_what_why_how_long_and_how_to_override():
    from ddpm.estimates import choice_line, estimate_seconds_per_step
    from ddpm.recipes import choose

    choice = choose((16, 16), 3, 48)
    config = RunConfig(preset=choice.preset, model=preset_config(choice.preset, image_size=16, channels=3))
    config.train.batch_size, config.train.steps = choice.train["batch_size"], choice.train["steps"]
    seconds = estimate_seconds_per_step(config, torch.device("cpu"), budget_s=1.0)
    assert seconds > 0
    line = choice_line(choice.reason, config, seconds, "cpu")
    assert "\n" not in line and "'digits'" in line and "2,000 steps" in line and "batch 48" in line
    assert " on cpu" in line and "--preset" in line and ("min" in line or " s " in line or " h " in line)
    assert "about 1.7 h on cpu" in choice_line(choice.reason, config, 3.0, "cpu")      # 2,000 steps x 3 s


def test_a_conditional_models_config_names_its_classes():
    config = preset_config("digits", num_classes=2, class_names=["china", "flower"])
    assert config.class_names == ("china", "flower")
    assert config.to_dict()["class_names"] == ["china", "flower"]
    assert UnetConfig.from_dict(config.to_dict()) == config
    assert preset_config("digits").class_names is None
    for bad, phrase in [(dict(num_classes=3, class_names=["a", "b"]), "num_classes is 3"),
                        (dict(class_names=["a"]), "num_classes is None"),
                        (dict(num_classes=2, class_names=["a", "a"]), "distinct"),
                        (dict(num_classes=1, class_names="a"), "distinct")]:
        with pytest.raises(ConfigError, match=phrase):
            preset_config("digits", **bad)


def test_other_dim_mults_keep_the_presets_attention_where_it_still_exists():
    assert preset_config("mnist", dim_mults=(1, 2)).attention_levels == (1,)          # level 2 is gone: innermost
    assert preset_config("cifar10", dim_mults=(1, 2)).attention_levels == (1,)        # level 1 is kept
    assert preset_config("mnist", dim_mults=(1, 2, 2, 4), image_size=32).attention_levels == (2,)
    assert preset_config("mnist", dim_mults=(1, 2), attention_levels=(0,)).attention_levels == (0,)


# ----------------------------------------------------------------------------- the photo folder without a preset

def _stderr_line(capsys, phrase: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if phrase in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def auto_run(photos, tmp_path_factory):
    """A conditional run on the photo folder at 16x16 with no preset, started from the folder's parent
    with relative paths, as a user types them."""
    import os

    work = photos.parent
    old = os.getcwd()
    os.chdir(work)
    try:
        assert main(["train", "--data", "photos", "--image-size", "16", "--conditional", *QUICK,
                     "--out", "auto-run"]) == 0
    finally:
        os.chdir(old)
    return work / "auto-run"


def test_photos_train_at_16_with_no_preset_and_the_choice_is_recorded(auto_run, photos):
    saved = json.loads((auto_run / "config.json").read_text())
    assert saved["preset"] == "digits" and saved["model"]["image_size"] == [16, 16]
    assert saved["data"]["name"] == str(photos)                     # absolute, though typed relative
    assert "digits" in saved["choice"] and "48 image" in saved["choice"]
    assert saved["model"]["class_names"] == ["china", "flower"] and saved["data"]["fingerprint"]["num_images"] == 48


def test_a_dry_run_shows_the_automatic_choice_and_prints_one_line(photos, capsys):
    # --batch-size 4: the estimate times the run's own batch, and the recipe's 48 would make it slow here
    assert main(["train", "--data", str(photos), "--image-size", "24", "40", "--batch-size", "4", "--dry-run"]) == 0
    out = capsys.readouterr()
    saved = json.loads(out.out)
    assert saved["preset"] == "mnist" and saved["train"]["batch_size"] == 4 and saved["train"]["steps"] == 5_000
    lines = [line for line in out.err.splitlines() if "no --preset" in line]
    assert len(lines) == 1 and "'mnist'" in lines[0] and " on cpu" in lines[0]
    assert "its recipe 5,000 steps at batch 48" in lines[0] and "this run: 5,000 steps at batch 4," in lines[0]


def test_photos_train_at_24x40_with_no_preset(photos, tmp_path):
    assert main(["train", "--data", str(photos), "--image-size", "24", "40", *QUICK, "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["preset"] == "mnist"


def test_model_size_flags_shape_the_network(photos, tmp_path, capsys):
    assert main(["train", "--data", str(photos), "--image-size", "16", "--dim", "16", "--dim-mults", "1", "2",
                 "--num-res-blocks", "1", "--attention-levels", "0", "1", "--dry-run"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["dim"], model["dim_mults"], model["num_res_blocks"]) == (16, [1, 2], 1)
    assert model["attention_levels"] == [0, 1] and model["attention_resolutions"] == [16, 8]
    assert main(["train", "--data", str(photos), "--image-size", "16", "--dim", "16", "--dim-mults", "1", "2",
                 *QUICK, "--out", str(tmp_path / "r")]) == 0


def test_a_run_resumes_from_another_directory(auto_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(auto_run), "--steps", "3", "--quiet"]) == 0


def test_a_moved_copy_resumes_and_a_different_folder_is_refused(auto_run, photos, tmp_path, capsys):
    import shutil

    run = shutil.copytree(auto_run, tmp_path / "run")
    copy = shutil.copytree(photos, tmp_path / "moved")
    assert main(["train", "--resume", str(run), "--data", str(copy), "--steps", "4", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["data"]["name"] == str(copy)
    other = shutil.copytree(photos, tmp_path / "other")
    (other / "china" / "00.jpg").unlink()
    assert main(["train", "--resume", str(run), "--data", str(other), "--steps", "5", "--quiet"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image count" in err[0]


def test_a_conditional_run_samples_a_class_by_name(auto_run, tmp_path):
    out = tmp_path / "flowers"
    assert main(["sample", "--checkpoint", str(auto_run), "--class", "flower", "--num-images", "2", "--out", str(out),
                 "--sampler", "ddim", "--steps", "2", "--quiet"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["classes"] == [1] and record["class_names"] == ["flower"]
    assert main(["sample", "--checkpoint", str(auto_run), "--class", "flwer", "--num-images", "1", "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
