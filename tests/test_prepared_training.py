"""Training on a prepared dataset keeps the guarantees of training in memory: under torchrun each
rank reads only its own rows and the result is one process's; an interrupted run resumes bit for bit.

The dataset is an ``.npz`` prepared with ``ddpm prepare``, whose image k holds k in its first
pixel (the other pixels are random), so the rows a reader hands to the loop can be read off
the pixels themselves.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.optim.optimizer import register_optimizer_step_post_hook

from ddpm.data import prepared
from ddpm.checkpoint import list_checkpoints, load_checkpoint
from ddpm.cli import main
from ddpm.signals import StopSignals
from ddpm.training_data import EpochOrder
from test_distributed import TINY, assert_close_checkpoints, torchrun
from test_resume import assert_bit_identical, final_tensors

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from spies import no_sample_grids  # noqa: E402

NUM_IMAGES = 40


def write_numbered_images(path: Path, num_images: int = NUM_IMAGES) -> Path:
    """An .npz of grey 8x8 images (the digits preset's size), image k holding k in its first pixel."""
    images = np.random.default_rng(0).integers(0, 256, (num_images, 8, 8, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(num_images)
    np.savez(path, images=images)
    return path


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> Path:
    """The prepared dataset (the first pixels survive preparation: no resize at the source's size)."""
    root = tmp_path_factory.mktemp("numbered")
    source = write_numbered_images(root / "numbered.npz")
    assert main(["prepare", "--data", str(source), "--out", str(root / "prepared")]) == 0
    images = np.load(root / "prepared" / "images.npy")
    assert images[:, 0, 0, 0].tolist() == list(range(NUM_IMAGES))
    return root / "prepared"


@pytest.fixture
def rows_read(monkeypatch) -> dict[int, list[int]]:
    """Step -> the row numbers of the images the lazy reader handed to that step, in this process."""
    read: dict[int, list[int]] = {}
    real_get = prepared.BatchPrefetcher.get

    def get(self, step):
        x, y = real_get(self, step)
        read[step] = x[:, 0, 0, 0].tolist()
        return x, y

    monkeypatch.setattr(prepared.BatchPrefetcher, "get", get)
    return read


# ----------------------------------------------------------------------------- two ranks under torchrun

@pytest.mark.slow      # minutes of subprocesses; run with -m slow
def test_two_ranks_read_their_own_rows_of_a_prepared_dataset_and_train_like_one_process(numbered, tmp_path,
                                                                                        rows_read):
    """2 processes x batch 4 read disjoint halves of each global batch of 8 from the memory map, and
    end with the weights (and EMA and Adam moments) of 1 process x batch 8 on the same dataset."""
    common = ["train", "--data", str(numbered), "--preset", "digits", *TINY, "--steps", "3", "--hflip",
              "--checkpoint-every", "0", "--seed", "5"]
    reports = tmp_path / "rows"
    reports.mkdir()
    proc = torchrun(*common, "--batch-size", "4", "--out", str(tmp_path / "two"), worker=True,
                    env={"DDPM_TEST_ROWS_DIR": str(reports)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*common, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0

    by_rank = [{int(step): rows for step, rows in json.loads((reports / f"rows{r}.json").read_text()).items()}
               for r in (0, 1)]
    order = EpochOrder(NUM_IMAGES, 8, seed=5)
    for step in range(3):
        mine, theirs = by_rank[0][step], by_rank[1][step]
        assert len(mine) == len(theirs) == 4                      # each rank read its share, not the batch
        assert set(mine).isdisjoint(theirs)
        assert sorted(mine + theirs) == sorted(order.batch(step).tolist())   # together: the global batch
        assert mine + theirs == rows_read[step]                   # ... in the order one process reads it
    assert_close_checkpoints(load_checkpoint(tmp_path / "two")[0], load_checkpoint(tmp_path / "one")[0])
    assert load_checkpoint(tmp_path / "two")[1]["world_size"] == 2


# ----------------------------------------------------------------------------- resume

class Interrupt:
    """After :meth:`arm` (k), SIGINT at the k-th optimizer step from then on, as a user's Ctrl-C. The
    run's own handler (which stops after the step in progress) must be installed, never pytest's."""

    def __init__(self):
        self.at, self.steps = 0, 0

    def arm(self, k: int) -> None:
        self.at, self.steps = k, 0

    def __call__(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps == self.at:
            handler = signal.getsignal(signal.SIGINT)
            assert isinstance(getattr(handler, "__self__", None), StopSignals), "the run's handler is not installed"
            signal.raise_signal(signal.SIGINT)


@pytest.fixture
def interrupt():
    hook = Interrupt()
    handle = register_optimizer_step_post_hook(hook)
    yield hook
    handle.remove()


def test_a_run_on_a_prepared_dataset_interrupted_halfway_resumes_bit_identically(numbered, tmp_path, rows_read,
                                                                                 interrupt):
    """8 steps of 2 x 4 images (five epochs of 40 images, with flips and dropout) in one go, and
    stopped by SIGINT after step 4 then resumed from that checkpoint: the same bits."""
    common = ["train", "--data", str(numbered), "--preset", "digits", "--steps", "8", "--batch-size", "4",
              "--grad-accum", "2", "--timesteps", "50", "--num-images", "2", "--log-every", "1", "--hflip",
              "--dropout", "0.1", "--checkpoint-every", "100", "--precision", "fp32", "--device", "cpu", "--quiet"]
    with no_sample_grids():
        assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    straight_rows = dict(rows_read)
    assert sorted(straight_rows) == list(range(8))                # every batch came from the memory map
    rows_read.clear()

    run_dir = tmp_path / "halves"
    interrupt.arm(3)                         # the flag is seen after the next step: stops after step 4
    with no_sample_grids():
        assert main([*common, "--out", str(run_dir)]) == 130
    assert [step for step, _ in list_checkpoints(run_dir)] == [4]
    assert sorted(rows_read) == [0, 1, 2, 3]
    rows_read.clear()
    interrupt.arm(0)
    with no_sample_grids():
        assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert sorted(rows_read) == [4, 5, 6, 7]                      # the resumed run read on from step 4...
    assert all(rows_read[step] == straight_rows[step] for step in rows_read)   # ...the same rows
    assert_bit_identical(final_tensors(run_dir), final_tensors(tmp_path / "straight"))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
