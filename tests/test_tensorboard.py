"""TensorBoard as a training run writes it, read back from the event files with TensorBoard's own
reader: the grouped scalar tags (and nothing else), the EMA and raw sample grids at the sample steps,
the resolved config as text, each step once after a resume; without tensorboard, one note and no
event files."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddpm.tracking
from ddpm.cli import main
from ddpm.images import side_by_side

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard (the tensorboard extra) is not installed")

# A tiny U-Net (dim 8, two levels) on the 8x8 digits, 4 steps: a sample grid at steps 2 and 4.
TINY = ["--steps", "4", "--batch-size", "4", "--timesteps", "25", "--num-images", "2", "--dim", "8",
        "--dim-mults", "1", "2", "--log-every", "1", "--sample-every", "2", "--checkpoint-every", "2",
        "--precision", "fp32", "--device", "cpu", "--quiet"]
SCALARS = {"loss/train", "loss/q0", "loss/q1", "loss/q2", "loss/q3", "lr", "grad_norm",
           "throughput/images_per_s", "health/bad_steps", "health/scaler_skips"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tb") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def events(run_dir: Path):
    """Every event of RUN_DIR/tensorboard as TensorBoard shows them (nothing sampled away, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def decoded(image_event) -> np.ndarray:
    with Image.open(io.BytesIO(image_event.encoded_image_string)) as im:
        return np.asarray(im.convert("RGB"))


@needs_tensorboard
def test_scalars_are_the_grouped_tags_with_the_values_of_metrics_jsonl(run_dir):
    acc = events(run_dir)
    assert set(acc.Tags()["scalars"]) == SCALARS                  # grouped, and no flat key left over
    rows = {row["step"]: row for row in metrics_rows(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4]
    for tag, key in (("loss/train", "loss"), ("lr", "lr"), ("grad_norm", "grad_norm"),
                     ("throughput/images_per_s", "images_per_s"), ("loss/q1", "loss_q1")):
        logged = {e.step: e.value for e in acc.Scalars(tag)}
        expected = {step: row[key] for step, row in rows.items() if row[key] is not None}
        assert logged.keys() == expected.keys(), tag
        for step in expected:
            assert logged[step] == pytest.approx(expected[step], rel=1e-6), (tag, step)


@needs_tensorboard
def test_the_ema_and_raw_grids_are_logged_at_each_sample_step(run_dir):
    acc = events(run_dir)
    assert set(acc.Tags()["images"]) == {"samples/ema", "samples/raw"}
    gap, title = (side_by_side.__defaults__[0], side_by_side.__defaults__[1])
    for step in (2, 4):
        with Image.open(run_dir / "samples" / f"step-{step:07d}.png") as im:
            written = np.asarray(im.convert("RGB"))                # EMA left, raw right, under their titles
        width = (written.shape[1] - gap) // 2
        halves = {"samples/ema": written[title:, :width], "samples/raw": written[title:, width + gap:]}
        assert not np.array_equal(halves["samples/ema"], halves["samples/raw"])
        for tag, half in halves.items():
            logged = [e for e in acc.Images(tag) if e.step == step]
            assert len(logged) == 1, (tag, step)
            np.testing.assert_array_equal(decoded(logged[0]), half, err_msg=f"{tag} at step {step}")
    assert [e.step for e in acc.Images("samples/ema")] == [2, 4]


@needs_tensorboard
def test_the_resolved_config_is_logged_once_as_a_json_code_block(run_dir):
    acc = events(run_dir)
    assert acc.Tags()["tensors"] == ["config/text_summary"]       # add_text's tag for "config"
    (event,) = acc.Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert text.startswith("```json\n") and text.endswith("\n```")
    assert json.loads(text[len("```json\n"):-len("\n```")]) == json.loads((run_dir / "config.json").read_text())
    assert event.step == 1


@needs_tensorboard
def test_a_resumed_run_appends_and_shows_each_step_once(run_dir, tmp_path):
    """Work lost after the step-2 checkpoint (steps 3 and 4 were logged) is done again: TensorBoard shows
    the new steps 3 and 4, not both lives of them."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "step-0000004.safetensors").unlink()
    old_files = sorted((run / "tensorboard").iterdir())
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert set(old_files) < set((run / "tensorboard").iterdir())          # appended beside the first file
    acc = events(run)
    assert set(acc.Tags()["scalars"]) == SCALARS
    for tag in ("loss/train", "grad_norm", "lr"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4], tag
    rows = {row["step"]: row for row in metrics_rows(run)}
    assert [e.value for e in acc.Scalars("loss/train")] == pytest.approx([rows[s]["loss"] for s in (1, 2, 3, 4)])
    for tag in ("samples/ema", "samples/raw"):
        assert [e.step for e in acc.Images(tag)] == [2, 4], tag
    # The config each process trained with, at the first step it trained.
    assert [e.step for e in acc.Tensors("config/text_summary")] == [1, 3]


def test_without_tensorboard_a_run_writes_no_event_files_and_says_so_once(tmp_path, monkeypatch, capsys):
    """One note among the run's log lines; --quiet silences it like the others."""
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)            # import fails as if not installed
    for flags, expected in (([], 1), (["--quiet"], 0)):
        ddpm.tracking.note_no_tensorboard.cache_clear()
        out = tmp_path / f"run{expected}"
        try:
            assert main(["train", *[a for a in TINY if a != "--quiet"], *flags, "--steps", "2", "--out", str(out)]) == 0
        finally:
            ddpm.tracking.note_no_tensorboard.cache_clear()
        err = capsys.readouterr().err.splitlines()
        notes = [line for line in err if line.startswith("ddpm: note:")]
        assert notes == ["ddpm: note: tensorboard is not installed, so no TensorBoard log is written "
                         "(pip install 'ddpm[tensorboard]'); metrics.jsonl has every metric"] * expected, err
        assert not list(out.rglob("events.out.tfevents.*")) and (out / "samples.png").is_file()
        assert [row["step"] for row in metrics_rows(out)] == [1, 2]
