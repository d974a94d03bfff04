"""Prepared datasets: ``ddpm prepare`` writes what the in-memory loader would load, resumes when
interrupted, appears only when complete; reading refuses truncated or disagreeing files and other
sizes; training on a prepared dataset gives the weights of training on the same data in memory."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.checkpoint import load_checkpoint
from ddpm.cli import main
from ddpm.data import image_files, load_dataset, prepare, prepared, sources
from ddpm.data.image_data import dataset_fingerprint

TINY = ["--steps", "2", "--batch-size", "4", "--timesteps", "50", "--num-images", "2", "--quiet"]


def cli_error(capsys, *args: str) -> tuple[int, str]:
    """Run ``ddpm ARGS`` in-process; return (exit code, the one stderr line) of a failure."""
    capsys.readouterr()
    code = main(list(args))
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("ddpm: error: "), lines[0]
    return code, lines[0]


def write_folder(root: Path, per_class: int = 6, bad: int = 1) -> Path:
    """Two class subfolders of RGB PNGs of assorted sizes, plus ``bad`` files that are not images."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (20 + i, 24 + 2 * i, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i:02d}.png")
    for i in range(bad):
        (root / "dog" / f"zz-broken-{i}.png").write_bytes(b"not an image")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "photos")


def test_prepare_writes_what_the_in_memory_loader_loads(tmp_path, folder, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "--data", str(folder), "--out", str(out), "--image-size", "16", "12",
                 "--workers", "3"]) == 0
    assert "1 unreadable file(s) skipped" in capsys.readouterr().out
    in_memory = load_dataset(folder, image_size=(16, 12))
    images = np.load(out / "images.npy", mmap_mode="r")
    np.testing.assert_array_equal(images, in_memory.images)
    np.testing.assert_array_equal(np.load(out / "labels.npy"), in_memory.labels)
    description = json.loads((out / "dataset.json").read_text())
    assert description["shape"] == [12, 16, 12, 3]
    assert description["class_names"] == ["cat", "dog"]
    assert description["source"]["data"] == str(folder.resolve())
    assert description["resize"]["image_size"] == [16, 12] and description["resize"]["channels"] == 3
    assert description["skipped_files"] == 1
    assert description["fingerprint"] == dataset_fingerprint(in_memory.images, in_memory.labels)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos", "prepared"]   # no temporary left


def test_strict_makes_an_unreadable_file_an_error_and_writes_nothing(tmp_path, folder, capsys):
    out = tmp_path / "prepared"
    code, line = cli_error(capsys, "prepare", "--data", str(folder), "--out", str(out), "--image-size", "8",
                           "--channels", "3", "--strict")
    assert code == 3 and "zz-broken-0.png" in line
    assert not out.exists()


def full_disk(monkeypatch, after: int = 0) -> None:
    """Fault injection: the disk is full from the (after+1)-th block allocation of a new array on."""
    calls = []

    def fallocate(fd, offset, length):
        calls.append(length)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare.os, "posix_fallocate", fallocate)


@pytest.mark.parametrize("source", ["digits", "folder"])
def test_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path, folder, capsys, monkeypatch, source):
    """The arrays' blocks are allocated before they are memory-mapped for writing: a full disk is
    then an error line, not a SIGBUS, and neither the output nor a temporary folder is left."""
    out = tmp_path / "prepared"
    full_disk(monkeypatch)
    data = "digits" if source == "digits" else str(folder)
    code, line = cli_error(capsys, "prepare", "--data", data, "--out", str(out), "--image-size", "8",
                           "--channels", "3")
    assert code == 2 and "No space left on device" in line and str(out) in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos"]


def test_a_full_disk_after_the_start_keeps_the_resumable_rows(tmp_path, folder, capsys, monkeypatch):
    """Full while compacting (after every row was decoded): the temporary folder and its plan stay, and the
    same command, with space again, resumes without decoding anything."""
    out = tmp_path / "prepared"
    full_disk(monkeypatch, after=2)         # images and row states allocated; the compacted copy fails
    code, line = cli_error(capsys, "prepare", "--data", str(folder), "--out", str(out), "--image-size", "8",
                           "--channels", "3")
    assert code == 2 and "resumes" in line and not out.exists()
    monkeypatch.undo()
    decoded = []
    monkeypatch.setattr(prepare, "load_image_file", lambda *args: decoded.append(args))
    assert main(["prepare", "--data", str(folder), "--out", str(out), "--image-size", "8", "--channels", "3"]) == 0
    assert decoded == [] and np.load(out / "images.npy").shape == (12, 8, 8, 3)


def test_an_existing_output_folder_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, line = cli_error(capsys, "prepare", "--data", "digits", "--out", str(out))
    assert code == 2 and "exists" in line
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_preparation_resumes_without_decoding_done_rows_again(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_ROWS", 4)
    decoded: list[str] = []
    real_load = image_files.load_image_file

    def load_then_interrupt(path, channels):
        if len(decoded) == 6:               # in the second chunk: the first four rows are on disk
            raise KeyboardInterrupt
        decoded.append(Path(path).parent.name + "/" + Path(path).name)
        return real_load(path, channels)

    out = tmp_path / "prepared"
    monkeypatch.setattr(prepare, "load_image_file", load_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(folder, out, image_size=10, channels=3, workers=1)
    assert not out.exists() and (tmp_path / ".prepared.partial").is_dir()
    first_run = list(decoded)
    decoded.clear()

    def load_and_record(path, channels):
        decoded.append(Path(path).parent.name + "/" + Path(path).name)
        return real_load(path, channels)

    monkeypatch.setattr(prepare, "load_image_file", load_and_record)
    result = prepare.prepare_dataset(folder, out, image_size=10, channels=3, workers=1)
    assert result.resumed_rows == 4
    assert set(first_run[:4]).isdisjoint(decoded) and len(decoded) == 13 - 4
    np.testing.assert_array_equal(np.load(out / "images.npy"), load_dataset(folder, image_size=10).images)
    assert not (tmp_path / ".prepared.partial").exists()


def test_a_prepared_folder_is_read_lazily_from_a_read_only_memory_map(tmp_path):
    prepare.prepare_dataset("digits", tmp_path / "digits")
    dataset = load_dataset(tmp_path / "digits")          # a folder holding dataset.json is prepared
    assert isinstance(dataset.images, np.memmap) and not dataset.images.flags.writeable
    expected = load_dataset("digits")
    np.testing.assert_array_equal(dataset.images[[5, 1, 1499]], expected.images[[5, 1, 1499]])
    np.testing.assert_array_equal(dataset.labels, expected.labels)
    assert dataset.class_names == expected.class_names


@pytest.fixture
def prepared_digits(tmp_path) -> Path:
    prepare.prepare_dataset("digits", tmp_path / "digits")
    return tmp_path / "digits"


def train_error(capsys, path: Path, *extra: str) -> tuple[int, str]:
    return cli_error(capsys, "train", "--data", str(path), "--preset", "digits", "--out",
                     str(path.parent / "run"), *TINY, *extra)


def test_a_truncated_array_is_refused(prepared_digits, capsys):
    images = prepared_digits / "images.npy"
    images.write_bytes(images.read_bytes()[:-64])
    code, line = train_error(capsys, prepared_digits)
    assert code == 3 and "truncated" in line and "images.npy" in line
    assert not (prepared_digits.parent / "run").exists()


def test_a_description_that_disagrees_with_the_array_is_refused(prepared_digits, capsys):
    description = json.loads((prepared_digits / "dataset.json").read_text())
    description["shape"][0] = 1400
    (prepared_digits / "dataset.json").write_text(json.dumps(description))
    code, line = train_error(capsys, prepared_digits)
    assert code == 3 and "1400" in line and "1500" in line


def test_images_changed_after_preparation_are_refused(prepared_digits, capsys):
    images = np.load(prepared_digits / "images.npy", mmap_mode="r+")
    images[:] = 255 - images                       # every row, so the sampled rows change too
    images.flush()
    del images
    code, line = train_error(capsys, prepared_digits)
    assert code == 3 and "fingerprint" in line


def test_a_dataset_prepared_at_another_size_is_refused(prepared_digits, capsys):
    code, line = train_error(capsys, prepared_digits, "--image-size", "16")
    assert code == 3 and "8x8" in line and "16x16" in line and "ddpm prepare" in line


def test_a_large_folder_is_refused_before_decoding(tmp_path, folder, capsys, monkeypatch):
    monkeypatch.setattr(image_files, "available_memory", lambda: 10_000)
    decoded = []
    monkeypatch.setattr(sources, "load_image_file", lambda *args: decoded.append(args))
    code, line = cli_error(capsys, "train", "--data", str(folder), "--preset", "digits", "--image-size", "32",
                           "--channels", "3", "--out", str(tmp_path / "run"), *TINY)
    # 13 files x 32 x 32 x 3 bytes = 39936 bytes > 10000 available
    assert code == 3 and "0.0 GB" in line and f"ddpm prepare --data {folder}" in line
    assert decoded == []


def test_the_size_estimate_reads_headers_only(folder):
    paths = image_files.find_image_files(folder)
    assert image_files.estimate_folder_bytes(paths, (32, 32), 3) == 13 * 32 * 32 * 3
    per_image = [h * w for h, w in ((20 + i, 24 + 2 * i) for i in range(6))]
    estimate = image_files.estimate_folder_bytes(paths, None, None)
    assert estimate == 13 * int(np.mean(per_image * 2)) * 3     # the broken file's header is not counted


def test_training_on_a_prepared_dataset_gives_the_weights_of_training_in_memory(prepared_digits, monkeypatch):
    runs = prepared_digits.parent
    common = ["--preset", "digits", *TINY, "--hflip", "--seed", "3"]
    assert main(["train", "--data", "digits", "--out", str(runs / "memory"), *common]) == 0
    steps_read, real_get = [], prepared.BatchPrefetcher.get
    monkeypatch.setattr(prepared.BatchPrefetcher, "get", lambda self, step: (steps_read.append(step),
                                                                             real_get(self, step))[1])
    assert main(["train", "--data", str(prepared_digits), "--out", str(runs / "mapped"), *common]) == 0
    assert steps_read == [0, 1]                     # the batches came from the memory map, step by step
    memory, _ = load_checkpoint(runs / "memory")
    mapped, _ = load_checkpoint(runs / "mapped")
    assert memory.keys() == mapped.keys()
    assert [k for k in memory if not torch.equal(memory[k], mapped[k])] == []


def test_read_rows_returns_the_rows_asked_for_in_their_order():
    images = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
    rows = np.array([7, 2, 9, 2, 0])
    np.testing.assert_array_equal(prepared.read_rows(images, rows), images[rows])


def test_the_prefetcher_reads_the_next_step_on_a_background_thread(tmp_path):
    import threading

    images = np.random.default_rng(0).integers(0, 256, (40, 3, 3, 1), dtype=np.uint8)
    labels = np.arange(40, dtype=np.int64)
    asked: list[tuple[int, str]] = []

    def rows_for_step(step: int) -> np.ndarray:
        asked.append((step, threading.current_thread().name))
        return np.random.default_rng(step).permutation(40)[:8]

    with prepared.BatchPrefetcher(images, labels, rows_for_step) as reader:
        for step in (0, 1, 2, 5, 6):              # 5: not the prefetched step (3), read at once
            x, y = reader.get(step)
            rows = np.random.default_rng(step).permutation(40)[:8]
            np.testing.assert_array_equal(x.numpy(), images[rows])
            np.testing.assert_array_equal(y.numpy(), labels[rows])
    background = [step for step, thread in asked if thread.startswith("batch-prefetch")]
    assert set(background) - {3, 7} == {1, 2, 6}     # 3 and 7 were started ahead, maybe read, never used
    assert [step for step, thread in asked if not thread.startswith("batch-prefetch")] == [0, 5]


def test_two_ranks_read_disjoint_rows_whose_union_is_the_global_batch(tmp_path):
    from numpy.lib.format import open_memmap

    from ddpm.train import EpochOrder, lazy_reader, rank_rows

    images = open_memmap(tmp_path / "rows.npy", mode="w+", dtype=np.uint8, shape=(200, 1, 1, 1))
    images[:, 0, 0, 0] = np.arange(200)              # each row holds its own index
    images.flush()
    images = np.load(tmp_path / "rows.npy", mmap_mode="r")
    batch_size, world, grad_accum, seed = 3, 2, 2, 7
    global_batch = batch_size * world * grad_accum
    readers = [lazy_reader(images, 200, global_batch, seed, rank_rows(batch_size, world, grad_accum, rank),
                           torch.device("cpu")) for rank in range(world)]
    order = EpochOrder(200, global_batch, seed)
    try:
        for step in (0, 1, 17, 16):                  # 16 and 17 are in the second epoch
            read = [reader.get(step)[0].flatten().tolist() for reader in readers]
            assert len(read[0]) == len(read[1]) == batch_size * grad_accum
            assert set(read[0]).isdisjoint(read[1])
            assert sorted(read[0] + read[1]) == sorted(order.batch(step).tolist())
    finally:
        for reader in readers:
            reader.close()
