"""Hugging Face datasets as ddpm data: a ``save_to_disk`` folder and ``hf:NAME[:CONFIG][@SPLIT]``
load as lazily decoded images with their labels and class names; nothing is decoded at start-up;
two ranks decode disjoint rows; ``prepare`` and ``train`` (resumed bit for bit) take them. No test
reaches the network: a Hub name is served by a recorded stand-in for ``datasets.load_dataset``.

The tiny dataset's image k holds k in its first pixel, so the rows decoded can be read off the pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.cli import main
from ddpm.data import hub, load_dataset
from ddpm.training_data import lazy_reader, rank_rows
from test_resume import assert_bit_identical, final_tensors

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

NUM = 12
CLASSES = ["cat", "dog", "eel"]


def numbered_table(num: int = NUM):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (num, 8, 8, 3), dtype=np.uint8)
    pixels[:, 0, 0, :] = np.arange(num)[:, None]
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=CLASSES),
                                  "note": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels],
                                        "kind": [i % 3 for i in range(num)], "note": ["x"] * num},
                                       features=features)
    return table, pixels


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, np.ndarray]:
    table, pixels = numbered_table()
    folder = tmp_path_factory.mktemp("hub") / "saved"
    table.save_to_disk(str(folder))
    return folder, pixels


def test_a_saved_dataset_loads_lazily_with_its_class_names(saved, monkeypatch):
    folder, pixels = saved
    decoded = []
    real = hub.convert_image
    monkeypatch.setattr(hub, "convert_image", lambda *args: decoded.append(args[2]) or real(*args))
    data = load_dataset(folder, label_column="kind")
    assert data.lazy and data.images.shape == (NUM, 8, 8, 3) and len(decoded) <= 1    # the first row, for its mode
    assert data.class_names == CLASSES and data.labels.tolist() == [i % 3 for i in range(NUM)]
    decoded.clear()
    np.testing.assert_array_equal(data.images[[5, 2]], pixels[[5, 2]])
    assert len(decoded) == 2
    np.testing.assert_array_equal(data.images[:], pixels)


def test_string_labels_are_numbered_in_sorted_order(tmp_path):
    """Class indices do not depend on the order of the rows: the names sorted, each label its name's index."""
    names = ["zebra", "ant", "mole", "ant", "zebra", "mole"]
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"img": [Image.new("RGB", (8, 8)) for _ in names], "kind": names},
                                       features=features)
    table.save_to_disk(str(tmp_path / "saved"))
    data = load_dataset(tmp_path / "saved", label_column="kind")
    assert data.class_names == ["ant", "mole", "zebra"]
    assert data.labels.tolist() == [2, 0, 1, 0, 2, 1]


def test_columns_are_found_or_named_and_a_wrong_name_is_one_line(saved):
    folder, _ = saved
    assert load_dataset(folder).labels is None                     # no 'label' column: unlabelled
    grey = load_dataset(folder, image_column="img", channels=1, image_size=4)
    assert grey.images.shape == (NUM, 4, 4, 1)
    with pytest.raises(Exception, match="no column 'picture'"):
        load_dataset(folder, image_column="picture")
    with pytest.raises(Exception, match="no image column"):
        hub._image_column(datasets.Dataset.from_dict({"a": [1]}), None, "x")


def test_a_hub_name_reaches_load_dataset_with_its_config_and_split(monkeypatch):
    table, pixels = numbered_table()
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: calls.append((args, kw)) or table)
    data = load_dataset("hf:someone/numbers:small@test", label_column="kind")
    assert calls == [(("someone/numbers", "small"), {"split": "test"})]
    assert data.path == "hf:someone/numbers:small@test" and data.class_names == CLASSES
    load_dataset("hf:someone/numbers", split="test")
    assert calls[-1] == (("someone/numbers", None), {"split": "test"})
    np.testing.assert_array_equal(data.images[[0, 11]], pixels[[0, 11]])


def test_no_network_is_one_line(monkeypatch, capsys, tmp_path):
    def offline(*args, **kw):
        raise ConnectionError("Couldn't reach 'someone/numbers' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code = main(["train", "--data", "hf:someone/numbers", "--dry-run", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("ddpm: error: cannot load hf:someone/numbers")
    assert "no network" in err[0]


def test_a_malformed_hub_name_is_refused():
    with pytest.raises(Exception, match="is not a Hub dataset"):
        hub.parse_hub_spec("hf:")


def test_two_ranks_decode_disjoint_rows(saved, monkeypatch):
    folder, _ = saved
    data = load_dataset(folder)
    seen = {0: set(), 1: set()}
    for rank in (0, 1):
        mine = rank_rows(3, 2, 1, rank)
        with lazy_reader(data.images, data.num_images, 6, 0, mine, torch.device("cpu")) as reader:
            for step in range(2):
                x, _ = reader.get(step)
                seen[rank] |= set(x[:, 0, 0, 0].tolist())
    assert seen[0] and seen[1] and seen[0].isdisjoint(seen[1])


def test_prepare_writes_the_decoded_rows(saved, tmp_path):
    folder, pixels = saved
    assert main(["prepare", "--data", str(folder), "--out", str(tmp_path / "p")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "p" / "images.npy"), pixels)


def test_training_on_a_saved_dataset_resumes_bit_for_bit(saved, tmp_path):
    folder, _ = saved
    common = ["train", "--data", str(folder), "--preset", "digits", "--image-size", "8", "--batch-size", "4",
              "--timesteps", "50", "--num-images", "2", "--quiet", "--checkpoint-every", "2", "--seed", "3"]
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "halves")]) == 0
    assert main(["train", "--resume", str(tmp_path / "halves"), "--steps", "4", "--quiet"]) == 0
    assert_bit_identical(final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "halves"))
