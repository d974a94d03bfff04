"""Hugging Face datasets through the CLI: --image-column and --label-column for train, eval and prepare
(saved in the configuration, read from TOML, reused by --resume), the automatic preset choice and
--dry-run with hf: data, eval against hf: data. A Hub name is served by a stand-in for
``datasets.load_dataset``; nothing reaches the network.

The tiny dataset has two image columns: ``thumb`` (4x4, first, so found by default) and ``img`` (8x8),
and its labels in ``kind`` (a ClassLabel that is not called label).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddpm.cli import main
from ddpm.config import DataConfig
from ddpm.errors import ConfigError

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

NUM = 12
CLASSES = ["cat", "dog", "eel"]
TINY = ["--batch-size", "4", "--timesteps", "25", "--num-images", "2", "--dim", "8", "--dim-mults", "1",
        "--num-res-blocks", "1", "--attention-levels", "--precision", "fp32", "--device", "cpu", "--quiet"]


def two_column_table():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (NUM, 8, 8, 3), dtype=np.uint8)
    features = datasets.Features({"thumb": datasets.Image(), "img": datasets.Image(),
                                  "kind": datasets.ClassLabel(names=CLASSES)})
    table = datasets.Dataset.from_dict({"thumb": [Image.fromarray(p[:4, :4]) for p in pixels],
                                        "img": [Image.fromarray(p) for p in pixels],
                                        "kind": [i % 3 for i in range(NUM)]}, features=features)
    return table, pixels


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    table, pixels = two_column_table()
    folder = tmp_path_factory.mktemp("hubcli") / "saved"
    table.save_to_disk(str(folder))
    return folder, pixels


@pytest.fixture
def hub(monkeypatch):
    """``hf:someone/numbers`` served from memory; the calls recorded."""
    table, _ = two_column_table()
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: calls.append((args, kw)) or table)
    return calls


def dry_run(capsys, *args) -> tuple[dict, str]:
    assert main(["train", *args, "--dry-run"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_the_columns_choose_the_images_and_labels_and_are_saved(saved, capsys):
    folder, _ = saved
    config, err = dry_run(capsys, "--data", str(folder))
    assert config["model"]["image_size"] == [4, 4] and config["data"]["image_column"] is None   # the first Image column
    assert config["choice"] and "no --preset given: chose" in err          # the automatic choice, in one line
    config, _ = dry_run(capsys, "--data", str(folder), "--image-column", "img", "--label-column", "kind",
                        "--conditional")
    assert config["model"]["image_size"] == [8, 8] and config["model"]["num_classes"] == 3
    assert config["model"]["class_names"] == CLASSES
    assert (config["data"]["image_column"], config["data"]["label_column"]) == ("img", "kind")
    assert main(["train", "--data", str(folder), "--conditional", "--dry-run"]) != 0       # no label column found
    assert "label" in capsys.readouterr().err


def test_the_columns_are_read_from_toml(saved, capsys, tmp_path):
    folder, _ = saved
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\nname = "{folder}"\nimage_column = "img"\nlabel_column = "kind"\n')
    config, _ = dry_run(capsys, "--config", str(toml), "--conditional")
    assert config["model"]["image_size"] == [8, 8] and config["model"]["num_classes"] == 3


def test_a_hub_run_trains_and_resumes_with_its_columns(hub, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "hf:someone/numbers", "--image-column", "img", "--label-column", "kind",
                 "--conditional", "--steps", "1", "--checkpoint-every", "1", "--out", str(run), *TINY]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["name"] == "hf:someone/numbers" and saved["choice"]             # chosen from the data
    assert (saved["data"]["image_column"], saved["data"]["label_column"]) == ("img", "kind")
    assert saved["model"]["image_size"] == [8, 8] and saved["model"]["class_names"] == CLASSES
    assert main(["train", "--resume", str(run), "--steps", "2", "--quiet"]) == 0, capsys.readouterr().err
    assert [args for args, _ in hub] == [("someone/numbers", None)] * 2
    assert json.loads((run / "config.json").read_text())["data"]["image_column"] == "img"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_prepare_takes_the_columns(saved, tmp_path):
    folder, pixels = saved
    out = tmp_path / "prepared"
    assert main(["prepare", "--data", str(folder), "--image-column", "img", "--label-column", "kind",
                 "--out", str(out), "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(out / "images.npy"), pixels)
    assert np.load(out / "labels.npy").tolist() == [i % 3 for i in range(NUM)]
    assert json.loads((out / "dataset.json").read_text())["class_names"] == CLASSES


def test_eval_reads_hub_data_with_its_image_column(hub, saved, tmp_path, capsys):
    _, pixels = saved
    stats = tmp_path / "stats.npz"
    assert main(["eval", "--save-stats", str(stats), "--data", "hf:someone/numbers@train", "--image-column", "img",
                 "--features", "lenet", "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0, \
        capsys.readouterr().err
    assert hub and hub[0][1] == {"split": "train"} and stats.is_file()
    (cached,) = (tmp_path / "cache").iterdir()
    assert "col_img" in cached.name and "-8x8x3-" in cached.name        # the 8x8 column's images, keyed by it


def test_a_column_for_other_data_or_an_empty_one_is_one_error_line(capsys):
    assert main(["train", "--data", "digits", "--image-column", "img", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error: --image-column names a column of a Hugging Face")
    with pytest.raises(ConfigError, match="column name"):
        DataConfig(label_column="")
