"""Where a training run reports (rank 0): ``metrics.jsonl``, an experiment tracker (TensorBoard or
Weights & Biases), the progress bar or log lines, and the loss curve ``loss.png``.

:class:`MetricsWindow` averages a logging window's steps (the loss also per timestep quartile);
:class:`Tracker` writes each window's row to ``metrics.jsonl`` and to the tracker ``--tracker`` names
(tags: :data:`TENSORBOARD_TAGS`) and shows progress; :func:`draw_loss_curve` redraws ``loss.png``
from the log. A tracker is a :class:`Board`: scalars, image grids, the configuration, close
(:class:`TensorBoardBoard`, :class:`WandbBoard`). Both are optional packages: without tensorboard,
one note says so and the JSONL has every metric; ``--tracker wandb`` without wandb is an error
before any work (:func:`check_tracker`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .estimates import format_duration
from .fileio import atomic_write
from .plots import line_chart

__all__ = ["MetricsWindow", "Tracker", "TENSORBOARD_TAGS", "TRACKERS", "Board", "TensorBoardBoard", "WandbBoard",
           "tensorboard", "check_tracker", "open_board", "draw_loss_curve", "log_line"]

TRACKERS = ("tensorboard", "wandb", "none")     # --tracker: where scalars, grids and the config go besides the JSONL
WANDB_RUN_ID = "wandb-run-id"                   # RUN_DIR/wandb-run-id: the W&B run a resumed run continues


class MetricsWindow:
    """Metrics averaged over one logging window, including the loss per timestep quartile."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss, self.norm, self.steps, self.images, self.time = 0.0, 0.0, 0, 0, time.time()
        self.q_sum, self.q_count = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)

    def add(self, per_sample: torch.Tensor, t: torch.Tensor, T: int, grad_norm: float, *,
            loss: float | None = None, world: int = 1) -> None:
        """One step: this rank's per-sample losses and timesteps; ``loss`` the global mean when several
        ranks (``world``) trained on equal shares of the batch."""
        if not torch.isfinite(per_sample).all() or (loss is not None and not math.isfinite(loss)):
            return
        self.loss += float(per_sample.mean()) if loss is None else loss
        self.norm += grad_norm if math.isfinite(grad_norm) else 0.0
        self.steps += 1
        self.images += per_sample.shape[0] * world
        q = (t * 4 // T).long().clamp(0, 3).cpu()            # t: a timestep of T, or a probability of T = 1
        self.q_sum.index_add_(0, q, per_sample.double().cpu())
        self.q_count.index_add_(0, q, torch.ones_like(q, dtype=torch.float64))

    def flush(self, step: int, lr: float, counters, start_time: float) -> dict:
        """The window's row of ``metrics.jsonl`` at ``step`` (``counters``: the run's bad and skipped steps)."""
        elapsed = max(time.time() - self.time, 1e-9)
        n = max(self.steps, 1)
        # Undefined values (no finite step, an empty quartile) are null: strict JSON has no NaN.
        metrics = {"step": step, "loss": self.loss / n if self.steps else None, "grad_norm": self.norm / n,
                   "lr": lr, "images_per_s": self.images / elapsed, "bad_steps": counters.bad_steps,
                   "scaler_skips": counters.scaler_skips, "elapsed_s": time.time() - start_time}
        for q in range(4):
            metrics[f"loss_q{q}"] = float(self.q_sum[q] / self.q_count[q]) if self.q_count[q] else None
        self.reset()
        return metrics

    def peek(self) -> dict:
        """The window's averages so far, without ending it (a progress line between logged rows)."""
        n = max(self.steps, 1)
        return {"loss": self.loss / n if self.steps else None, "grad_norm": self.norm / n,
                "images_per_s": self.images / max(time.time() - self.time, 1e-9)}


def log_line(step: int, total: int, metrics: dict, eta_s: float | None = None) -> str:
    """The console line of a metrics row (when stderr is not a terminal, in place of the bar), with the
    estimated time to the last step when known."""
    loss = "n/a" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
    eta = "" if eta_s is None else f"  ETA {format_duration(eta_s).removeprefix('about ')}"
    return (f"step {step}/{total}  loss {loss}  grad norm {metrics['grad_norm']:.3f}  "
            f"{metrics['images_per_s']:.0f} img/s{eta}")


# The TensorBoard tag of each metrics.jsonl key, grouped as TensorBoard shows them (the JSONL keys
# stay as they are: other code reads them). elapsed_s is left out: every event carries its wall time.
TENSORBOARD_TAGS = {"loss": "loss/train", **{f"loss_q{q}": f"loss/q{q}" for q in range(4)}, "lr": "lr",
                    "grad_norm": "grad_norm", "images_per_s": "throughput/images_per_s",
                    "bad_steps": "health/bad_steps", "scaler_skips": "health/scaler_skips"}


@functools.cache
def note_no_tensorboard(reason: str) -> None:
    """One line on stderr, once per process, instead of event files."""
    print(f"ddpm: note: {reason}, so no TensorBoard log is written (pip install 'ddpm[tensorboard]'); "
          "metrics.jsonl has every metric", file=sys.stderr)


def tensorboard(run_dir: Path, purge_step: int | None = None, note: bool = True):
    """A TensorBoard writer on ``RUN_DIR/tensorboard``, or None without the tensorboard package (after
    a one-line note with ``note``). ``purge_step``: TensorBoard hides the events an earlier process
    logged at that step and later (the work a resumed run lost and does again), so no step shows twice."""
    try:
        from torch.utils.tensorboard import SummaryWriter      # optional dependency: imported when used
    except Exception as exc:      # missing, or installed but broken (a protobuf it cannot use): the JSONL has all
        if note:
            note_no_tensorboard("tensorboard is not installed" if isinstance(exc, ImportError) else
                                f"tensorboard could not be loaded ({type(exc).__name__}: {exc})")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


def config_markdown(config: dict) -> str:
    """The run's resolved config (as in config.json) as a Markdown code block, for TensorBoard's text tab."""
    return "```json\n" + json.dumps(config, indent=2) + "\n```"


class Board:
    """An experiment tracker as a run uses it (rank 0 alone): scalars, image grids, the configuration."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars under their tags at ``step``."""

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """A uint8 image grid [H, W, C] (C = 1, 3 or 4) at ``step``."""

    def config(self, config: dict, step: int) -> None:
        """The run's resolved configuration (as in config.json)."""

    def flush(self) -> None:
        """What was logged, on disk (with each checkpoint)."""

    def close(self) -> None:
        """The end of this process's logging."""


class TensorBoardBoard(Board):
    """``RUN_DIR/tensorboard`` through a ``SummaryWriter`` (:func:`tensorboard`)."""

    def __init__(self, writer):
        self.writer = writer

    def scalars(self, values, step):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag, grid, step):
        rgb = np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def config(self, config, step):
        self.writer.add_text("config", config_markdown(config), step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def _import_wandb():
    try:
        import wandb      # optional dependency: imported when --tracker wandb asks for it
    except Exception as exc:          # missing, or installed but broken
        why = "is not installed" if isinstance(exc, ImportError) else f"could not be loaded ({type(exc).__name__}: {exc})"
        raise ConfigError(f"--tracker wandb needs the wandb package, which {why}: pip install 'ddpm[wandb]'") from None
    return wandb


def check_tracker(tracker: str) -> None:
    """Before any work: ``--tracker wandb`` needs the wandb package (one-line ConfigError without it)."""
    if tracker == "wandb":
        _import_wandb()


class WandbBoard(Board):
    """A Weights & Biases run in ``RUN_DIR/wandb`` (``WANDB_MODE=offline`` keeps it there, to sync later).

    Its id is kept in ``RUN_DIR/wandb-run-id``: a resumed run logs to the same W&B run. Every entry
    carries the optimizer step as ``step``, the x axis of every chart (W&B's own counter keeps rising
    over resumes, so steps a resumed run does again are logged again, never refused).
    """

    def __init__(self, run_dir: Path, project: str, name: str):
        self.wandb = _import_wandb()
        id_file = run_dir / WANDB_RUN_ID
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(4)
            atomic_write(id_file, lambda tmp: tmp.write_text(run_id + "\n", encoding="utf-8"))
        project = project or os.environ.get("WANDB_PROJECT") or "ddpm"
        try:
            self.run = self.wandb.init(project=project, name=name or None, id=run_id, resume="allow", dir=str(run_dir))
        except Exception as exc:  # noqa: BLE001 - no login, no network, a refused project: each one line
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(f"Weights & Biases could not start the run ({text}); log in with `wandb login` "
                              f"or set WANDB_MODE=offline, then: ddpm train --resume {run_dir}") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, values, step):
        self.run.log({**values, "step": step})

    def image(self, tag, grid, step):
        self.run.log({tag: self.wandb.Image(grid[..., 0] if grid.shape[2] == 1 else grid), "step": step})

    def config(self, config, step):
        self.run.config.update(config, allow_val_change=True)     # a resumed run may extend --steps

    def close(self):
        self.run.finish()


def open_board(tracker: str, run_dir: Path, train: dict, start_step: int, note: bool) -> Board | None:
    """The tracker ``tracker`` names for a run logging from ``start_step + 1`` on, or None (``none``, or
    TensorBoard not installed). ``train``: the run's ``train`` settings (the W&B project and name)."""
    if tracker == "wandb":
        return WandbBoard(run_dir, train.get("wandb_project", ""), train.get("wandb_name", ""))
    if tracker == "tensorboard":
        # This process logs from step S + 1 on (S = 0 fresh, or the checkpoint's step): anything an
        # earlier process logged there is hidden, as metrics.jsonl dropped it (run_dir.truncate_metrics).
        writer = tensorboard(run_dir, purge_step=start_step + 1, note=note)
        return TensorBoardBoard(writer) if writer is not None else None
    return None


def draw_loss_curve(run_dir: Path) -> None:
    """``loss.png``: the logged loss, over all timesteps and per timestep quartile, against the step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]                      # evaluation rows carry fast_fid instead
    if not rows:
        return
    steps = [r["step"] for r in rows]
    def column(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else r[key] for r in rows]

    series = {"all timesteps": (steps, column("loss"))}
    for q in range(4):
        series[f"t in quartile {q} of [0, T)"] = (steps, column(f"loss_q{q}"))
    line_chart(series, run_dir / "loss.png", title=f"run {run_dir.resolve().name}: training loss, mean over each "
               "logging window", xlabel="optimizer step", ylabel="loss", log_y=True)


class Tracker:
    """Where a run reports: metrics.jsonl, the tracker of ``config["train"]["tracker"]`` (a :class:`Board`:
    TensorBoard by default), the progress bar or log lines (rank 0 alone writes files; ``main`` False
    keeps only a disabled bar)."""

    # Outside a terminal: a progress line at least this often (besides every logged row).
    LINE_EVERY_S = 30.0

    def __init__(self, run_dir: Path, config: dict, total_steps: int, start_step: int, progress: bool, main: bool,
                 clock=time.monotonic):
        self.progress = progress and main
        self.total, self.clock = total_steps, clock
        self._first: tuple[float, int] | None = None      # (time, step) at the end of this process's first step
        self._last_line: float | None = None
        self.metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if main else None
        train = config.get("train", {})
        self.board = open_board(train.get("tracker", "tensorboard"), run_dir, train, start_step,
                                self.progress) if main else None
        if self.board:
            self.board.config(config, start_step + 1)
        self.interactive = self.progress and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step",
                        disable=not self.interactive, dynamic_ncols=True)
        self.window = MetricsWindow()

    def write(self, row: dict, step: int) -> None:
        """A metrics row in metrics.jsonl and, under its tags, in TensorBoard."""
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.board:
            self.board.scalars({TENSORBOARD_TAGS[key]: value for key, value in row.items()
                                if key in TENSORBOARD_TAGS and value is not None}, step)

    def write_scores(self, step: int, scores: dict) -> None:
        """An evaluation's scores: a metrics.jsonl row, TensorBoard ``eval/<key>``, one console line."""
        self.metrics_file.write(json.dumps({"step": step, **scores}) + "\n")
        self.metrics_file.flush()
        if self.board:
            self.board.scalars({f"eval/{key}": value for key, value in scores.items()}, step)
        if self.progress:
            self.say(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    def eta_s(self, done: int) -> float | None:
        """Seconds to the last step at the pace since this process's first step (its warm-up left out)."""
        now = self.clock()
        if self._first is None:
            self._first = (now, done)
        since, first = self._first
        return (self.total - done) * (now - since) / (done - first) if done > first else None

    def progress_line(self, done: int, metrics: dict | None) -> None:
        """Outside a terminal (where the bar shows its own ETA): a line with the step, loss, images/s and ETA,
        with each logged row (``metrics``), at the second step (the first pace known) and every ~30 s."""
        if not self.progress or self.interactive:
            return
        eta = self.eta_s(done)
        now = self.clock()
        first_pace = eta is not None and self._last_line is None
        if metrics is None and not first_pace and (self._last_line is None or now - self._last_line < self.LINE_EVERY_S):
            return
        print(log_line(done, self.total, metrics or self.window.peek(), eta), file=sys.stderr, flush=True)
        self._last_line = now

    def say(self, line: str) -> None:
        """One line on stderr, above the bar on a terminal."""
        (self.bar.write(line, file=sys.stderr) if self.interactive else print(line, file=sys.stderr, flush=True))

    def flush(self) -> None:
        """Events on disk up to now (with each checkpoint: a crash loses no more than the checkpoint does)."""
        if self.board:
            self.board.flush()

    def close(self) -> None:
        self.bar.close()
        if self.metrics_file:
            self.metrics_file.close()
        if self.board:
            self.board.close()
