"""Image conditions, paired data and full-reference metrics, against closed forms.

The super-resolution condition is exactly the area downsample of the target brought back by
bicubic interpolation; colorize's is the BT.601 luminance; augmentation adds level x noise and
the level as a channel; paired folders match by relative path, and a missing, extra or shuffled
partner is caught; PSNR and SSIM equal their definitions computed another way.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import correlate

from ddpm.conditions import (ImageCondition, area_downsample, augment, condition_from_input,
                             condition_from_target, luminance, training_levels)
from ddpm.data.pairs import load_pairs
from ddpm.errors import ConfigError, DataError
from ddpm.evaluation.image_metrics import _gaussian_window, psnr, ssim


def test_area_downsample_is_the_block_mean():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8)
    low = area_downsample(x, 4)
    assert low.shape == (2, 3, 2, 2)
    assert low[1, 2, 1, 0] == x[1, 2, 4:8, 0:4].mean()


def test_the_super_resolution_condition_is_the_bicubic_upsampled_area_downsample():
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    condition = ImageCondition("super-resolution", channels=1, scale=4)
    c = condition_from_target(condition, x0)
    expected = torch.nn.functional.interpolate(x0.reshape(2, 1, 2, 4, 2, 4).mean(dim=(3, 5)), size=(8, 8),
                                               mode="bicubic", align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(c, expected)
    # at sampling, the low-resolution input itself gives the same condition
    torch.testing.assert_close(condition_from_input(condition, area_downsample(x0, 4), (8, 8)), c)
    with pytest.raises(ConfigError, match="2x2"):
        condition_from_input(condition, torch.zeros(1, 1, 3, 3), (8, 8))


def test_colorize_gives_the_bt601_luminance():
    x0 = torch.tensor([1.0, -1.0, 0.5]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    y = luminance(x0)
    assert y.shape == (1, 1, 2, 2)
    assert torch.allclose(y, torch.full_like(y, 0.299 - 0.587 + 0.057))
    assert torch.equal(condition_from_target(ImageCondition("colorize", channels=1), x0), y)


def test_augmentation_adds_level_times_noise_and_the_level_channel():
    condition = ImageCondition("super-resolution", channels=1, scale=2, noise=0.5)
    c, noise = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    out = augment(condition, c, torch.tensor([0.1, 0.4]), noise)
    assert out.shape == (2, 2, 4, 4) and condition.input_channels == 2
    assert torch.allclose(out[:, 0], torch.tensor([0.1, 0.4]).view(2, 1, 1).expand(2, 4, 4))
    assert torch.allclose(out[:, 1], out[:, 0])                   # the level's plane
    levels = training_levels(condition, 10_000, torch.Generator().manual_seed(0))
    assert 0 <= levels.min() and levels.max() <= 0.5 and abs(levels.mean() - 0.25) < 0.01
    plain = ImageCondition("super-resolution", channels=1, scale=2)
    assert augment(plain, c, 0.3) is c and plain.input_channels == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "upscale", "channels": 1}, "unknown task"),
    ({"task": "super-resolution", "channels": 1, "scale": 1}, "--scale"),
    ({"task": "colorize", "channels": 1, "scale": 2}, "--scale is for super-resolution"),
    ({"task": "paired", "channels": 1, "noise": 2.0}, "--condition-noise"),
])
def test_nonsense_conditions_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ImageCondition(**kwargs)


def test_a_scale_that_does_not_divide_the_size_is_refused():
    with pytest.raises(ConfigError, match="does not divide"):
        ImageCondition("super-resolution", channels=1, scale=3).check_image_size((28, 28))


# ----------------------------------------------------------------------------- paired folders

def write_pairs(root: Path, names: list[str], shuffle: bool = False) -> tuple[Path, Path]:
    """Targets whose first pixel holds their index; conditions hold the same index (or, shuffled, another)."""
    targets, conditions = root / "targets", root / "conditions"
    order = list(reversed(range(len(names)))) if shuffle else list(range(len(names)))
    for k, name in enumerate(names):
        for folder, value in ((targets, k), (conditions, order[k])):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.full((4, 4), 200, dtype=np.uint8)
            pixels[0, 0] = value
            Image.fromarray(pixels).save(folder / name)
    return targets, conditions


NAMES = ["a/1.png", "a/2.png", "b/1.png", "c.png"]


def test_folders_pair_by_relative_path(tmp_path):
    targets, conditions = write_pairs(tmp_path, NAMES)
    (conditions / "c.png").rename(conditions / "c.bmp")         # another extension pairs all the same
    t, c = load_pairs(targets, conditions)
    assert t.images[:, 0, 0, 0].tolist() == c.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


def test_a_shuffled_pair_folder_is_visible_in_the_rows(tmp_path):
    """The check a training test relies on: shuffled partners give rows whose indices differ."""
    targets, conditions = write_pairs(tmp_path, NAMES, shuffle=True)
    t, c = load_pairs(targets, conditions)
    assert t.images[:, 0, 0, 0].tolist() != c.images[:, 0, 0, 0].tolist()


def test_missing_and_extra_partners_are_named(tmp_path):
    targets, conditions = write_pairs(tmp_path, NAMES)
    (conditions / "a" / "2.png").unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(conditions / "d.png")
    with pytest.raises(DataError, match=r"1 target\(s\) without a condition .*a/2.*1 condition\(s\) without a target .*d"):
        load_pairs(targets, conditions)


def test_arrays_pair_by_order_and_must_have_one_each(tmp_path):
    images = np.zeros((3, 4, 4, 1), np.uint8)
    np.savez(tmp_path / "t.npz", images=images)
    np.savez(tmp_path / "c.npz", images=np.zeros((3, 4, 4, 3), np.uint8))
    t, c = load_pairs(tmp_path / "t.npz", tmp_path / "c.npz")
    assert t.channels == 1 and c.channels == 3                  # any channel counts
    np.savez(tmp_path / "c2.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="2 conditions for 3 targets"):
        load_pairs(tmp_path / "t.npz", tmp_path / "c2.npz")


# ----------------------------------------------------------------------------- PSNR and SSIM

def test_psnr_matches_its_definition():
    x = torch.zeros(1, 1, 4, 4)
    y = torch.full((1, 1, 4, 4), 0.2)
    assert math.isclose(float(psnr(y, x)), 10 * math.log10(4 / 0.04), rel_tol=1e-6)
    u = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    assert math.isclose(float(psnr(u + 5, u)), 10 * math.log10(255 ** 2 / 25), rel_tol=1e-9)
    assert math.isinf(float(psnr(x, x)))


def test_ssim_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, 16))
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1)
    w = _gaussian_window(11, 1.5, 1)[0, 0].numpy()

    def blur(z):                                        # scipy's correlation, valid region only
        return correlate(z, w, mode="constant")[5:-5, 5:-5]

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    expected = (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()
    got = float(ssim(torch.tensor(y)[None, None], torch.tensor(x)[None, None]))
    assert math.isclose(got, expected, rel_tol=1e-9)
    assert math.isclose(float(ssim(torch.tensor(x)[None, None], torch.tensor(x)[None, None])), 1.0, rel_tol=1e-12)
