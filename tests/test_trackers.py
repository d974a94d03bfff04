"""--tracker: Weights & Biases gets the scalars, sample grids and configuration TensorBoard gets (a
recorded fake wandb module, and the real package in offline mode where installed); a resumed run logs
to the same W&B run; without wandb, one error line before any work; --tracker none writes only
metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from ddpm.cli import main
from ddpm.config import TrainConfig
from ddpm.errors import ConfigError
from ddpm.tracking import TENSORBOARD_TAGS

# A tiny U-Net (dim 8, two levels) on the 8x8 digits, 4 steps: a sample grid at steps 2 and 4.
TINY = ["--steps", "4", "--batch-size", "4", "--timesteps", "25", "--num-images", "2", "--dim", "8",
        "--dim-mults", "1", "2", "--log-every", "1", "--sample-every", "2", "--checkpoint-every", "2",
        "--precision", "fp32", "--device", "cpu", "--quiet"]


class FakeRun:
    """What a run hands wandb, recorded."""

    def __init__(self, record: dict, **init):
        self.record = record
        record["inits"].append(init)
        self.config = types.SimpleNamespace(update=lambda values, **kw: record["configs"].append(values))

    def define_metric(self, name, **options):
        self.record["metrics"].append((name, options))

    def log(self, values: dict):
        self.record["logs"].append(values)

    def finish(self):
        self.record["finished"] += 1


def fake_wandb() -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.record = {"inits": [], "configs": [], "logs": [], "metrics": [], "finished": 0}
    module.init = lambda **init: FakeRun(module.record, **init)
    module.Image = lambda array: ("image", np.array(array))
    return module


@pytest.fixture
def wandb(monkeypatch):
    module = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return module


def series(logs: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each scalar tag's (step, value) pairs in the order logged."""
    out: dict = {}
    for entry in logs:
        for tag, value in entry.items():
            if tag != "step" and not isinstance(value, tuple):
                out.setdefault(tag, []).append((entry["step"], value))
    return out


def test_wandb_records_what_tensorboard_records_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, wandb):
    """The scalars under TensorBoard's tags with the values of metrics.jsonl (which test_tensorboard.py
    reads back from the event files), the EMA and raw grids at the sample steps, the resolved config;
    --resume logs to the run whose id RUN_DIR/wandb-run-id keeps."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--tracker", "wandb", "--wandb-project", "digits",
                 "--wandb-name", "tiny", "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--steps", "4", "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected: dict = {}
    for row in rows:
        for key, tag in TENSORBOARD_TAGS.items():
            if row.get(key) is not None:
                expected.setdefault(tag, []).append((row["step"], row[key]))
    logged = series(wandb.record["logs"])
    assert logged == expected and [s for s, _ in logged["loss/train"]] == [1, 2, 3, 4]
    images = [(tag, entry["step"], value[1]) for entry in wandb.record["logs"] for tag, value in entry.items()
              if isinstance(value, tuple)]
    assert [(tag, step) for tag, step, _ in images] == [(f"samples/{w}", s) for s in (2, 4) for w in ("ema", "raw")]
    assert all(grid.dtype == np.uint8 and grid.ndim == 2 for _, _, grid in images)     # grey grids, [H, W]
    assert not np.array_equal(images[0][2], images[1][2])                              # EMA and raw differ
    first, again = wandb.record["inits"]
    assert first == again == {"project": "digits", "name": "tiny", "id": (run / "wandb-run-id").read_text().strip(),
                              "resume": "allow", "dir": str(run)}
    saved = json.loads((run / "config.json").read_text())
    assert wandb.record["configs"][-1] == saved and [c["train"]["steps"] for c in wandb.record["configs"]] == [2, 4]
    assert ("*", {"step_metric": "step"}) in wandb.record["metrics"] and wandb.record["finished"] == 2
    assert not (run / "tensorboard").exists()


def test_the_wandb_project_defaults_to_wandb_project_from_the_environment(tmp_path, wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    assert main(["train", *TINY, "--steps", "1", "--tracker", "wandb", "--out", str(tmp_path / "run")]) == 0
    (init,) = wandb.record["inits"]
    assert init["project"] == "from-env" and init["name"] is None


def test_without_wandb_the_tracker_is_one_error_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)                  # import fails as if not installed
    out = tmp_path / "run"
    assert main(["train", *TINY, "--tracker", "wandb", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ddpm: error: --tracker wandb needs the wandb package, which is not installed: "
                   "pip install 'ddpm[wandb]'"]
    assert not out.exists()


def test_a_wandb_run_that_cannot_start_is_one_error_line(tmp_path, wandb, capsys):
    def refuse(**init):
        raise RuntimeError("api_key not configured (no-tty).\n call wandb.login(key=[your_api_key])")

    wandb.init = refuse
    out = tmp_path / "run"
    assert main(["train", *TINY, "--tracker", "wandb", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error: Weights & Biases could not start the run (api_key not "
                                               "configured (no-tty). call wandb.login"), err
    assert not list(out.glob("checkpoints/*.safetensors"))


def test_tracker_none_writes_only_metrics_jsonl(tmp_path, wandb):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "1", "--tracker", "none", "--out", str(out)]) == 0
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists() and wandb.record["inits"] == []
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_tracker_settings_are_checked(capsys, tmp_path):
    with pytest.raises(ConfigError, match="tracker must be one of"):
        TrainConfig(tracker="mlflow")
    with pytest.raises(ConfigError, match="one line"):
        TrainConfig(tracker="wandb", wandb_name="a\nb")
    assert main(["train", *TINY, "--wandb-project", "p", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == ("ddpm: error: --wandb-project names a Weights & Biases run: "
                                               "give --tracker wandb as well")
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\ndim = 8\n[train]\ntracker = "none"\n')
    assert main(["train", "--config", str(toml), "--dry-run", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["tracker"] == "none"


needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")


@needs_wandb
@pytest.mark.slow
def test_real_wandb_offline_keeps_the_run_in_the_run_directory_and_resumes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--tracker", "wandb", "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--steps", "4", "--quiet"]) == 0
    run_id = (run / "wandb-run-id").read_text().strip()
    lives = sorted((run / "wandb").glob("offline-run-*"))
    assert lives and all(p.name.endswith(f"-{run_id}") for p in lives)       # both processes: one W&B run
    media = sorted(p.name.split("_")[0] for p in (run / "wandb").rglob("media/images/samples/*.png"))
    assert media == ["ema", "ema", "raw", "raw"]                  # the grids of steps 2 and 4 (named by W&B's counter)
    logs = b"".join(p.read_bytes() for p in (run / "wandb").rglob("run-*.wandb"))
    assert b"loss/train" in logs and b"throughput/images_per_s" in logs
