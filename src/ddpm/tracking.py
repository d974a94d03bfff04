"""Where a training run reports (rank 0): ``metrics.jsonl``, TensorBoard, the progress bar or log lines,
and the loss curve ``loss.png``.

:class:`MetricsWindow` averages a logging window's steps (the loss also per timestep quartile);
:class:`Tracker` writes each window's row to ``metrics.jsonl`` and TensorBoard (tags:
:data:`TENSORBOARD_TAGS`) and shows progress; :func:`draw_loss_curve` redraws ``loss.png`` from the
log. TensorBoard is optional: without it, one note says so and the JSONL has every metric.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .plots import line_chart

__all__ = ["MetricsWindow", "Tracker", "TENSORBOARD_TAGS", "tensorboard", "draw_loss_curve", "log_line"]


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


def log_line(step: int, total: int, metrics: dict) -> str:
    """The console line of a metrics row (when stderr is not a terminal, in place of the bar)."""
    loss = "n/a" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
    return (f"step {step}/{total}  loss {loss}  grad norm {metrics['grad_norm']:.3f}  "
            f"{metrics['images_per_s']:.0f} img/s")


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
    """Where a run reports: metrics.jsonl, TensorBoard, the progress bar or log lines (rank 0 alone
    writes files; ``main`` False keeps only a disabled bar)."""

    def __init__(self, run_dir: Path, config: dict, total_steps: int, start_step: int, progress: bool, main: bool):
        self.progress = progress and main
        self.metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if main else None
        # This process logs from step S + 1 on (S = 0 fresh, or the checkpoint's step): anything an
        # earlier process logged there is hidden, as metrics.jsonl dropped it (run_dir.truncate_metrics).
        first = start_step + 1
        self.board = tensorboard(run_dir, purge_step=first, note=self.progress) if main else None
        if self.board:
            self.board.add_text("config", config_markdown(config), first)
        self.interactive = self.progress and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step",
                        disable=not self.interactive, dynamic_ncols=True)
        self.window = MetricsWindow()

    def write(self, row: dict, step: int) -> None:
        """A metrics row in metrics.jsonl and, under its tags, in TensorBoard."""
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.board:
            for key, value in row.items():
                if key in TENSORBOARD_TAGS and value is not None:
                    self.board.add_scalar(TENSORBOARD_TAGS[key], value, step)

    def write_scores(self, step: int, scores: dict) -> None:
        """An evaluation's scores: a metrics.jsonl row, TensorBoard ``eval/<key>``, one console line."""
        self.metrics_file.write(json.dumps({"step": step, **scores}) + "\n")
        self.metrics_file.flush()
        if self.board:
            for key, value in scores.items():
                self.board.add_scalar(f"eval/{key}", value, step)
        if self.progress:
            self.say(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

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
