"""Behaviour of ddpm.data: named datasets, IDX parsing, .npz archives, image folders, tensors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import DATASET_NAMES, ImageData, load_dataset
from ddpm.pixels import to_tensor, to_uint8
from ddpm.errors import ConfigError, DataError

MNIST_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


# ----------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits_raw() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images


def test_digits_split_sizes_shapes_and_labels():
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    assert train.images.shape == (1500, 8, 8, 1)
    assert test.images.shape == (297, 8, 8, 1)
    assert train.images.dtype == np.uint8 and test.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.labels.shape == (1500,)
    assert set(train.labels.tolist()) == set(range(10))
    assert train.class_names == [str(d) for d in range(10)]
    assert train.name == "digits"
    assert (train.num_images, train.image_size, train.channels) == (1500, (8, 8), 1)


def test_digits_uint8_mapping_and_fixed_split(digits_raw):
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    raw_train = digits_raw[:1500]
    assert np.all(train.images[..., 0][raw_train == 16] == 255)
    assert np.all(train.images[..., 0][raw_train == 0] == 0)
    np.testing.assert_array_equal(train.images[..., 0], np.rint(raw_train * 255 / 16).astype(np.uint8))
    # the test split is the last 297 images, in order
    np.testing.assert_array_equal(test.images[..., 0], np.rint(digits_raw[1500:] * 255 / 16).astype(np.uint8))
    assert train.images.max() == 255 and train.images.min() == 0


def test_digits_resize_and_channels():
    data = load_dataset("digits", split="test", image_size=(16, 12), channels=3)
    assert data.images.shape == (297, 16, 12, 3)
    np.testing.assert_array_equal(data.images[..., 0], data.images[..., 2])


# ----------------------------------------------------------------------------- IDX files

def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write ``array`` (uint8) as an IDX file; gzip it when ``path`` ends with .gz."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_idx_root(root: Path, compressed: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    suffix = ".gz" if compressed else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 4, 6), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([0, 9, 3, 3, 1], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 4, 6), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([2, 7, 5], dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(root / f"{stem}{suffix}", array)
    return arrays


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path, compressed, name):
    arrays = make_idx_root(tmp_path, compressed)
    train = load_dataset(name, data_root=tmp_path)
    test = load_dataset(name, data_root=str(tmp_path), split="test")
    np.testing.assert_array_equal(train.images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(train.labels, [0, 9, 3, 3, 1])
    np.testing.assert_array_equal(test.images[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(test.labels, [2, 7, 5])
    assert train.images.shape == (5, 4, 6, 1) and train.labels.dtype == np.int64
    assert train.images.flags.writeable
    assert train.name == name
    assert len(train.class_names) == 10
    if name == "fashion-mnist":
        assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    else:
        assert train.class_names == [str(d) for d in range(10)]


def test_idx_truncated_file(tmp_path):
    make_idx_root(tmp_path, compressed=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated") as error:
        load_dataset("mnist", data_root=tmp_path)
    assert "train-images-idx3-ubyte" in str(error.value)


def test_idx_truncated_header(tmp_path):
    make_idx_root(tmp_path, compressed=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">I", 0x801) + b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", data_root=tmp_path)


def test_idx_extra_bytes(tmp_path):
    make_idx_root(tmp_path, compressed=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x01")
    with pytest.raises(DataError, match="header announces"):
        load_dataset("mnist", data_root=tmp_path, split="test")


def test_idx_wrong_magic(tmp_path):
    make_idx_root(tmp_path, compressed=False)
    # a label file where the image file should be
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="not an IDX image file"):
        load_dataset("mnist", data_root=tmp_path)


def test_idx_count_mismatch(tmp_path):
    make_idx_root(tmp_path, compressed=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_dataset("mnist", data_root=tmp_path)


def test_idx_label_out_of_range(tmp_path):
    make_idx_root(tmp_path, compressed=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 10], dtype=np.uint8))
    with pytest.raises(DataError, match="label 10"):
        load_dataset("fashion-mnist", data_root=tmp_path)


def test_idx_missing_data_root():
    with pytest.raises(DataError, match="--data-root") as error:
        load_dataset("mnist")
    for stem in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert stem in str(error.value)


def test_idx_data_root_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_dataset("mnist", data_root=tmp_path / "nowhere")


def test_idx_missing_file(tmp_path):
    make_idx_root(tmp_path, compressed=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    assert load_dataset("mnist", data_root=tmp_path).num_images == 5  # train split is unaffected
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_root=tmp_path, split="test")


def test_idx_corrupt_gzip(tmp_path):
    make_idx_root(tmp_path, compressed=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_root=tmp_path)


# ----------------------------------------------------------------------------- real MNIST

@pytest.fixture(scope="module")
def real_mnist() -> tuple[ImageData, ImageData]:
    if not (MNIST_ROOT / "train-images-idx3-ubyte.gz").exists() and not (MNIST_ROOT / "train-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found at {MNIST_ROOT}")
    return load_dataset("mnist", data_root=MNIST_ROOT), load_dataset("mnist", data_root=MNIST_ROOT, split="test")


def test_real_mnist(real_mnist):
    train, test = real_mnist
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.labels.shape == (60000,) and test.labels.shape == (10000,)
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    assert train.images.max() == 255 and train.images.min() == 0
    # digits are drawn in the middle: the border is mostly black, the center mostly not
    assert train.images[:, :2].mean() < 1 < train.images[:, 10:18, 10:18].mean()


# ----------------------------------------------------------------------------- .npz archives

def test_npz_three_dimensional_with_labels(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 6, 7), dtype=np.uint8)
    labels = np.array([1, 0, 2, 2, 1], dtype=np.int32)
    path = tmp_path / "set.npz"
    np.savez(path, images=images, labels=labels)
    for split in ("train", "test"):  # a path is loaded whole for either split
        data = load_dataset(str(path), split=split)
        assert data.images.shape == (5, 6, 7, 1)
        np.testing.assert_array_equal(data.images[..., 0], images)
        np.testing.assert_array_equal(data.labels, labels)
        assert data.labels.dtype == np.int64
        assert data.name == str(path) and data.class_names is None


def test_npz_four_dimensional_without_labels(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez_compressed(path, images=images)
    data = load_dataset(path)
    np.testing.assert_array_equal(data.images, images)
    assert data.labels is None and data.channels == 3


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


GOOD_IMAGES = np.zeros((4, 5, 5), dtype=np.uint8)


@pytest.mark.parametrize("arrays, message", [
    ({"pictures": GOOD_IMAGES}, "no 'images' array"),
    ({"images": GOOD_IMAGES.astype(np.float32)}, "dtype float32, expected uint8"),
    ({"images": np.zeros((4, 25), dtype=np.uint8)}, "has shape"),
    ({"images": np.zeros((4, 5, 5, 2), dtype=np.uint8)}, "has shape"),
    ({"images": np.zeros((0, 5, 5), dtype=np.uint8)}, "no images"),
    ({"images": GOOD_IMAGES, "labels": np.arange(3)}, "'labels' .* has shape"),
    ({"images": GOOD_IMAGES, "labels": np.zeros(4, dtype=np.float64)}, "'labels' .* expected integers"),
    ({"images": GOOD_IMAGES, "labels": np.array([0, 1, -1, 2])}, "negative label"),
    ({"images": np.array([None] * 4, dtype=object)}, "corrupt or needs pickle"),
], ids=["missing-key", "float", "2-d", "two-channels", "empty", "label-length", "float-labels",
        "negative-labels", "object-array"])
def test_npz_bad_contents(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as error:
        load_dataset(str(path))
    assert "bad.npz" in str(error.value)


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 20, b"PK\x03\x04 truncated zip"],
                         ids=["empty", "random", "truncated-zip"])
def test_npz_corrupt_file(tmp_path, content):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="broken.npz"):
        load_dataset(str(path))


def test_npz_that_is_a_plain_npy(tmp_path):
    path = tmp_path / "array.npz"
    with open(path, "wb") as file:
        np.save(file, GOOD_IMAGES)
    with pytest.raises(DataError, match="not an .npz archive"):
        load_dataset(str(path))


def test_npz_channel_conversions(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    rgb_path = save_npz(tmp_path / "rgb.npz", images=rgb)

    grey = load_dataset(rgb_path, channels=1).images
    pillow_grey = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in rgb])
    np.testing.assert_array_equal(grey[..., 0], pillow_grey)

    rgba = load_dataset(rgb_path, channels=4).images
    np.testing.assert_array_equal(rgba[..., :3], rgb)
    assert np.all(rgba[..., 3] == 255)

    rgba_path = save_npz(tmp_path / "rgba.npz", images=rgba)
    np.testing.assert_array_equal(load_dataset(rgba_path, channels=3).images, rgb)

    grey_path = save_npz(tmp_path / "grey.npz", images=grey[..., 0])
    repeated = load_dataset(grey_path, channels=3).images
    for c in range(3):
        np.testing.assert_array_equal(repeated[..., c], grey[..., 0])


def test_npz_resize(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    path = save_npz(tmp_path / "set.npz", images=images)
    np.testing.assert_array_equal(load_dataset(path, image_size=8).images, images)  # native size: unchanged
    assert load_dataset(path, image_size=(4, 10)).images.shape == (2, 4, 10, 3)


# ----------------------------------------------------------------------------- image folders

def gradient(height: int, width: int, channels: int = 3) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x * 7 + y * 3 + 40 * c) % 256 for c in range(channels)]
    return np.stack(planes, axis=-1).astype(np.uint8)


def test_folder_of_mixed_modes_loads_as_rgb(tmp_path):
    rgb = gradient(6, 8)
    Image.fromarray(rgb).save(tmp_path / "a_rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "b_grey.png")
    Image.fromarray(np.dstack([rgb, np.full((6, 8), 128, np.uint8)])).save(tmp_path / "c_rgba.PNG")
    Image.fromarray(rgb).convert("P").save(tmp_path / "d_palette.png")
    Image.fromarray(rgb[..., 0]).convert("1").save(tmp_path / "e_bilevel.png")
    Image.fromarray(rgb).save(tmp_path / "f_photo.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "g_grey_alpha.png")
    (tmp_path / "notes.txt").write_text("not an image")

    data = load_dataset(tmp_path)
    assert data.images.shape == (7, 6, 8, 3) and data.images.dtype == np.uint8
    assert data.labels is None and data.class_names is None
    np.testing.assert_array_equal(data.images[0], rgb)                       # a_rgb.png, sorted first
    np.testing.assert_array_equal(data.images[1], np.repeat(rgb[..., :1], 3, axis=-1))  # grey repeated
    np.testing.assert_array_equal(data.images[2], rgb)                       # alpha dropped
    assert set(np.unique(data.images[4]).tolist()) <= {0, 255}              # bilevel
    assert np.abs(data.images[5].astype(int) - rgb).mean() < 8              # jpeg is lossy


def test_folder_of_grey_images_loads_as_one_channel(tmp_path):
    grey = gradient(5, 5, channels=1)[..., 0]
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.fromarray(grey).save(tmp_path / "b.jpeg")
    Image.fromarray(grey).convert("1").save(tmp_path / "c.bmp")
    data = load_dataset(tmp_path)
    assert data.images.shape == (3, 5, 5, 1)
    np.testing.assert_array_equal(data.images[0, ..., 0], grey)
    assert load_dataset(tmp_path, channels=3).images.shape == (3, 5, 5, 3)
    assert load_dataset(tmp_path, channels=4).images.shape == (3, 5, 5, 4)


def test_folder_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)).save(tmp_path / "deep.png")
    data = load_dataset(tmp_path)
    np.testing.assert_array_equal(data.images[0, ..., 0], [[0, 100], [255, 200]])


def test_folder_class_subfolders_give_labels(tmp_path):
    for name, value in [("dog/x.png", 10), ("cat/b.png", 20), ("cat/a.png", 30), ("dog/deeper/y.png", 40)]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(tmp_path / name)
    (tmp_path / "empty_class").mkdir()
    data = load_dataset(tmp_path)
    assert data.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])
    # sorted: cat/a, cat/b, dog/deeper/y, dog/x
    np.testing.assert_array_equal(data.images[:, 0, 0, 0], [30, 20, 40, 10])


def test_folder_images_beside_subfolders_have_no_labels(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "cat" / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "loose.png")
    data = load_dataset(tmp_path)
    assert data.num_images == 2 and data.labels is None and data.class_names is None


def test_folder_resize_and_center_crop_non_square(tmp_path):
    Image.fromarray(gradient(10, 20)).save(tmp_path / "wide.png")
    Image.fromarray(gradient(30, 9)).save(tmp_path / "tall.png")
    data = load_dataset(tmp_path, image_size=(6, 4))
    assert data.images.shape == (2, 6, 4, 3)
    assert load_dataset(tmp_path, image_size=7).images.shape == (2, 7, 7, 3)


def test_folder_center_crop_keeps_the_middle(tmp_path):
    wide = gradient(10, 30)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    data = load_dataset(tmp_path, image_size=10)  # covers at scale 1: crop only
    np.testing.assert_array_equal(data.images[0], wide[:, 10:20])


def test_folder_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(gradient(4, 8)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_dataset(tmp_path).image_size == (8, 4)


def test_folder_corrupt_image_names_the_file_when_strict(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "x.png").write_bytes(np.random.default_rng(5).bytes(200))
    with pytest.raises(DataError, match="x.png"):
        load_dataset(tmp_path, strict=True)


def test_folder_corrupt_image_is_skipped_and_counted_by_default(tmp_path):
    for k in range(3):
        Image.fromarray(np.full((4, 4), 50 * k, np.uint8)).save(tmp_path / f"good{k}.png")
    (tmp_path / "x.png").write_bytes(np.random.default_rng(5).bytes(200))
    data = load_dataset(tmp_path)
    assert data.num_images == 3
    assert len(data.skipped) == 1 and "x.png" in data.skipped[0]
    assert sorted(int(img[0, 0, 0]) for img in data.images) == [0, 50, 100]


def test_folder_skipping_keeps_labels_aligned(tmp_path):
    for cls, value in (("a", 10), ("b", 200)):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(tmp_path / cls / "ok.png")
    (tmp_path / "a" / "bad.png").write_bytes(b"not an image at all")
    data = load_dataset(tmp_path)
    assert data.labels.tolist() == [0, 1] and data.images[:, 0, 0, 0].tolist() == [10, 200]


def test_folder_with_only_unreadable_images_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    (tmp_path / "y.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of its 2 image files"):
        load_dataset(tmp_path)


def _write_cifar_batch(path, labels, rng):
    """Records in the CIFAR-10 binary layout: a label byte, then the R, G and B planes."""
    records = np.zeros((len(labels), 3073), np.uint8)
    records[:, 0] = labels
    records[:, 1:] = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    path.write_bytes(records.tobytes())
    return records


def test_cifar10_binary_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    train = [_write_cifar_batch(folder / f"data_batch_{i}.bin", [i, 9 - i], rng) for i in range(1, 6)]
    _write_cifar_batch(folder / "test_batch.bin", [3], rng)
    data = load_dataset("cifar10", data_root=tmp_path)
    assert data.images.shape == (10, 32, 32, 3) and data.labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    first = train[0][0]
    # pixel (row 0, col 1) of image 0: red plane byte 1, green byte 1025, blue byte 2049 of the record
    assert data.images[0, 0, 1].tolist() == [first[1 + 1], first[1 + 1024 + 1], first[1 + 2048 + 1]]
    assert data.class_names[3] == "cat"
    assert load_dataset("cifar10", data_root=folder, split="test").num_images == 1


def test_cifar10_pickled_version_is_refused(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"pickle")
    with pytest.raises(DataError, match="refused for safety"):
        load_dataset("cifar10", data_root=tmp_path)


def test_cifar10_wrong_size_and_missing_root(tmp_path):
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)]:
        (tmp_path / name).write_bytes(b"\x00" * 3000)
    with pytest.raises(DataError, match="not a multiple"):
        load_dataset("cifar10", data_root=tmp_path)
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("cifar10")


def test_folder_truncated_image_names_the_file(tmp_path):
    Image.fromarray(gradient(32, 32)).save(tmp_path / "cut.png")
    path = tmp_path / "cut.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="cut.png"):
        load_dataset(tmp_path, strict=True)


def test_folder_empty_or_without_images(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        load_dataset(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="no image files"):
        load_dataset(tmp_path)


def test_folder_mixed_sizes_need_image_size(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="--image-size") as error:
        load_dataset(tmp_path)
    assert "b.png" in str(error.value)
    assert load_dataset(tmp_path, image_size=4).images.shape == (2, 4, 4, 1)


# ----------------------------------------------------------------------------- options and paths

def test_names_are_the_documented_ones():
    assert DATASET_NAMES == ("digits", "mnist", "fashion-mnist", "cifar10")


@pytest.mark.parametrize("kwargs", [
    {"split": "validation"}, {"channels": 2}, {"channels": True}, {"image_size": 0},
    {"image_size": (8,)}, {"image_size": (8, -1)}, {"image_size": 8.0},
], ids=["split", "channels-2", "channels-bool", "size-0", "size-1-tuple", "size-negative", "size-float"])
def test_bad_options_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        load_dataset("digits", **kwargs)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or directory") as error:
        load_dataset(str(tmp_path / "missing.npz"))
    assert "missing.npz" in str(error.value)


def test_unsupported_file(tmp_path):
    path = tmp_path / "images.csv"
    path.write_text("1,2,3")
    with pytest.raises(DataError, match="expected a .npz file or a folder"):
        load_dataset(str(path))


# ----------------------------------------------------------------------------- tensors

def test_to_tensor_layout_and_range():
    images = gradient(3, 5)[None]
    tensor = to_tensor(images)
    assert tensor.shape == (1, 3, 3, 5) and tensor.dtype == torch.float32
    assert float(tensor[0, 1, 2, 4]) == pytest.approx(images[0, 2, 4, 1] / 255)
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0


def test_tensor_round_trip_is_exact():
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(to_uint8(to_tensor(every_value)), every_value)
    rgb = np.random.default_rng(6).integers(0, 256, (4, 7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(to_tensor(rgb)), rgb)


def test_to_uint8_rounds_and_clamps():
    images = torch.tensor([-0.2, 0.0, 100.4 / 255, 100.6 / 255, 1.0, 1.3]).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(to_uint8(images)[0, 0, :, 0], [0, 0, 100, 101, 255, 255])


def test_tensor_helpers_reject_wrong_input():
    with pytest.raises(ValueError):
        to_tensor(np.zeros((1, 4, 4, 1), dtype=np.float32))
    with pytest.raises(ValueError):
        to_tensor(np.zeros((4, 4, 1), dtype=np.uint8))
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((1, 1, 2, 2), float("nan")))
