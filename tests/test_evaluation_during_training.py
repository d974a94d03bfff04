"""--eval-every with --eval-metric and --keep-best: what reaches metrics.jsonl, TensorBoard and the
console, and which checkpoint is kept as the best (never pruned by --keep-last)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ddpm.tracking
import ddpm.train_eval
from ddpm.checkpoint import list_checkpoints, read_metadata
from ddpm.cli import main
from ddpm.evaluation import training

TINY = ["--steps", "6", "--batch-size", "8", "--timesteps", "30", "--num-images", "2", "--sample-every", "0",
        "--device", "cpu", "--eval-num-images", "16", "--log-every", "3"]


class FakeBoard:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        pass

    def add_image(self, tag, image, step, dataformats="CHW"):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class Scripted:
    """An evaluator whose headline values follow a script (the metrics' maths is tested elsewhere)."""

    def __init__(self, metric: str, values):
        self.metric, self.headline, self.values = metric, training.HEADLINE[metric][0], iter(values)

    def __call__(self, images):
        return {self.headline: next(self.values), "n": len(images)}


@pytest.fixture
def scripted(monkeypatch):
    """TrainingEvaluator.build gives a Scripted evaluator; a spy TensorBoard; no real sampling."""
    state = type("State", (), {})()
    state.values, state.built, state.board = [], [], FakeBoard()

    def build(metric, data, **kwargs):
        state.built.append(metric)
        return Scripted(metric, state.values)

    monkeypatch.setattr(training.TrainingEvaluator, "build", staticmethod(build))
    monkeypatch.setattr(ddpm.tracking, "tensorboard", lambda run_dir, **options: state.board)
    monkeypatch.setattr(ddpm.train_eval, "generate", lambda diffusion, n, **kw: np.zeros((n, 8, 8, 1), np.uint8))
    return state


def eval_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" not in r]


@pytest.mark.parametrize("metric, values, best_step", [("fid", [5.0, 3.0, 4.0], 4), ("is", [5.0, 9.0, 7.0], 4),
                                                        ("kid", [0.2, 0.3, 0.1], 6)])
def test_keep_best_keeps_the_lowest_fid_kid_or_the_highest_is(tmp_path, scripted, metric, values, best_step):
    scripted.values = values
    run = tmp_path / "run"
    assert main(["train", *TINY, "--eval-every", "2", "--eval-metric", metric, "--keep-best", metric,
                 "--checkpoint-every", "1", "--keep-last", "1", "--inception-weights", "w.pth", "--quiet",
                 "--out", str(run)]) == 0
    assert [r["step"] for r in eval_rows(run)] == [2, 4, 6]
    assert [r[metric] for r in eval_rows(run)] == values
    best = read_metadata(run / "checkpoints" / "best.safetensors")
    assert best["best"] == {"metric": metric, "value": values[best_step // 2 - 1], "step": best_step}
    assert best["step"] == best_step                        # the weights of that step, not a later one
    assert [step for step, _ in list_checkpoints(run)] == [6]   # --keep-last 1 pruned the others, not the best
    assert (f"eval/{metric}", values[0], 2) in scripted.board.scalars


def test_the_best_survives_a_resume_and_is_only_replaced_by_a_better_one(tmp_path, scripted):
    scripted.values = [3.0, 4.0]
    run = tmp_path / "run"
    common = ["--eval-every", "2", "--eval-metric", "fid", "--keep-best", "fid", "--checkpoint-every", "2", "--quiet"]
    assert main(["train", *TINY[2:], "--steps", "4", *common, "--out", str(run)]) == 0
    scripted.values = [3.5, 2.0]
    assert main(["train", "--resume", str(run), "--steps", "8", "--quiet"]) == 0
    best = read_metadata(run / "checkpoints" / "best.safetensors")["best"]
    assert best == {"metric": "fid", "value": 2.0, "step": 8}


def test_one_console_line_per_evaluation_after_saying_it_starts(tmp_path, scripted, capsys):
    scripted.values = [12.5, 11.0, 10.0]
    assert main(["train", *TINY, "--eval-every", "2", "--eval-metric", "fid", "--out", str(tmp_path / "run")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval")]
    assert lines[::2] == ["evaluating at step 2...", "evaluating at step 4...", "evaluating at step 6..."]
    assert len(lines) == 6 and "step 2" in lines[1] and "fid 12.5" in lines[1]


def test_the_default_metric_is_fast_for_digits_and_fid_for_colour_images(tmp_path, scripted):
    scripted.values = [1.0] * 3
    assert main(["train", *TINY, "--eval-every", "2", "--quiet", "--out", str(tmp_path / "grey")]) == 0
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    assert main(["train", *TINY, "--data", str(rgb), "--preset", "digits", "--channels", "3", "--eval-every", "2",
                 "--quiet", "--out", str(tmp_path / "rgb")]) == 0
    assert scripted.built == ["fast", "fid"]


def test_the_fast_metric_still_logs_fast_fid_under_its_old_name(tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm.train_eval, "generate", lambda diffusion, n, **kw: np.zeros((n, 8, 8, 1), np.uint8))
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", *TINY, "--eval-every", "3", "--eval-metric", "fast", "--keep-best", "fast", "--quiet",
                 "--out", str(run)]) == 0
    rows = eval_rows(run)
    assert [r["step"] for r in rows] == [3, 6] and all({"fast_fid", "fast_kid", "fast_n"} <= set(r) for r in rows)
    assert read_metadata(run / "checkpoints" / "best.safetensors")["best"]["metric"] == "fast_fid"


@pytest.mark.parametrize("argv, phrase", [
    (["--keep-best", "fid"], "--eval-every"),
    (["--eval-every", "2", "--keep-best", "fid", "--eval-metric", "kid"], "--eval-metric fid"),
    (["--eval-every", "2", "--eval-metric", "is"], "--inception-weights"),
])
def test_inconsistent_evaluation_options_are_one_line_before_any_run_folder(tmp_path, capsys, argv, phrase):
    out = tmp_path / "never"
    assert main(["train", *TINY, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error:") and phrase in err[0]
    assert not out.exists()
