"""``ddpm ema``: a run's post-hoc EMA (EDM2, :mod:`ddpm.posthoc_ema`) rebuilt as a checkpoint, or swept.

* :func:`write_reconstruction`: the average of one relative length sigma_rel at a stored step,
  written as an ordinary checkpoint (its ``ema.*`` weights), ready for ``ddpm sample``, ``eval``, ``export``;
* :func:`sweep`: each of several lengths rebuilt and scored with the run's training metric, as the
  loop's evaluation scores its EMA (DPM-Solver++ in 25 steps, the evaluation seed), then a table,
  ``ema-sweep.json`` and ``ema-sweep.png`` (quality against sigma_rel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .build import build_diffusion
from .checkpoint import read_metadata, save_checkpoint
from .config import RunConfig
from .errors import ConfigError, OutputError
from .fileio import check_output_path, write_json
from .generate import generate
from .plots import line_chart
from .posthoc_ema import (DEFAULT_SWEEP, MAX_ERROR, Reconstruction, list_snapshots, plan_reconstruction,
                          read_snapshot_meta, reconstruct, reconstruction_checkpoint)
from .seeding import derive_seed

__all__ = ["write_reconstruction", "sweep", "SweepResult", "SWEEP_JSON", "SWEEP_PLOT", "stored_snapshots"]

SWEEP_JSON, SWEEP_PLOT = "ema-sweep.json", "ema-sweep.png"


def stored_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, list[float]]]:
    """(step, gammas) of each snapshot of ``run_dir``; one line when the run kept none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"--checkpoint {run_dir}: ddpm ema needs a run directory (with ema-snapshots/)")
    found = list_snapshots(run_dir)
    if not found:
        raise ConfigError(f"{run_dir} has no post-hoc EMA snapshots: it was trained without profiles "
                          "(train with --ema-snapshot-every N to keep them)")
    return [(step, read_snapshot_meta(path)["gammas"]) for step, path in found]


def write_reconstruction(run_dir: str | os.PathLike, sigma_rel: float, out: str | os.PathLike, *,
                         step: int | None = None, overwrite: bool = False) -> tuple[Path, Reconstruction]:
    """Rebuild the average of length ``sigma_rel`` at ``step`` (default: the last snapshot) and write it
    to ``out`` as a checkpoint. The output path and the profiles' reach are checked before any tensor is read;
    an ``out`` inside the run's checkpoints/ is refused (a resume or pruning would take it for the run's own)."""
    run_dir = Path(run_dir)
    snapshots = stored_snapshots(run_dir)
    out = check_output_path(out, overwrite=overwrite)
    if out.resolve().is_relative_to((run_dir / "checkpoints").resolve()):
        raise OutputError(f"--out {out} is inside {run_dir / 'checkpoints'}, which holds the run's own checkpoints; "
                          "write the rebuilt average elsewhere")
    plan_reconstruction(snapshots, sigma_rel, step)             # the reach, before any tensor is read
    (rec,) = reconstruct(run_dir, [sigma_rel], step)
    tensors, meta = reconstruction_checkpoint(run_dir, rec)
    return save_checkpoint(out, tensors, meta), rec


@dataclass
class SweepResult:
    metric: str                  # the headline value's name, e.g. fast_fid
    step: int
    rows: list[dict]             # sigma_rel, gamma, rel_error, snapshots, and the scores of each length
    json_path: Path
    plot: Path | None            # None without matplotlib


def reachable(snapshots, sigma_rels: Sequence[float], step: int | None) -> list[float]:
    """The lengths of ``sigma_rels`` that the stored profiles reach (within :data:`MAX_ERROR`)."""
    kept = []
    for s in sigma_rels:
        try:
            plan_reconstruction(snapshots, s, step)
        except ConfigError:
            continue
        kept.append(s)
    return kept


def sweep(run_dir: str | os.PathLike, sigma_rels: Sequence[float] | None = None, *, step: int | None = None,
          n: int | None = None, metric: str | None = None, out_dir: str | os.PathLike | None = None,
          device: str = "cpu", overwrite: bool = False, log=print) -> SweepResult:
    """Score the average of each length in ``sigma_rels`` (default: those of 0.025 ... 0.25 the stored
    profiles reach) with the run's metric on ``n`` images (default: the run's --eval-num-images)."""
    from .evaluation.training import TrainingEvaluator   # the evaluation package is large: loaded when asked for

    run_dir = Path(run_dir)
    snapshots = stored_snapshots(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    for name in (SWEEP_JSON, SWEEP_PLOT):
        check_output_path(out_dir / name, overwrite=overwrite)
    if sigma_rels is None:
        sigma_rels = reachable(snapshots, DEFAULT_SWEEP, step)
        if not sigma_rels:
            raise ConfigError(f"none of the lengths {DEFAULT_SWEEP[0]} ... {DEFAULT_SWEEP[-1]} is within the reach "
                              "of the stored profiles; give --sigma-rels")
    config = RunConfig.from_dict(read_metadata(run_dir)["config"])
    tc, d, m = config.train, config.data, config.model
    metric = metric or tc.evaluation_metric(m.channels, m.image_size)
    evaluator = TrainingEvaluator.build(metric, d.name, data_root=d.root, image_size=d.image_size, channels=d.channels,
                                        inception_weights=tc.inception_weights or None, device=device)
    recs = reconstruct(run_dir, list(sigma_rels), step)          # every length checked before any tensor is read
    rows = [{"sigma_rel": r.sigma_rel, "gamma": r.gamma, "rel_error": r.rel_error, "snapshots": len(r.inputs),
             **_score(config, r, evaluator, n or tc.eval_samples, device)} for r in recs]
    headline = evaluator.headline
    log(f"{'sigma_rel':>9}  {'gamma':>7}  {'fit error':>9}  {headline:>10}")
    for row in rows:
        log(f"{row['sigma_rel']:9.3f}  {row['gamma']:7.2f}  {100 * row['rel_error']:8.2f}%  {row[headline]:10.4f}")
    best = min(rows, key=lambda r: r[headline]) if metric != "is" else max(rows, key=lambda r: r[headline])
    log(f"best: sigma_rel {best['sigma_rel']:g} ({headline} {best[headline]:.4f}) at step {recs[0].step}")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out_dir / SWEEP_JSON, {"run": str(run_dir), "step": recs[0].step, "metric": headline,
                                                  "max_error": MAX_ERROR, "rows": rows})
    return SweepResult(headline, recs[0].step, rows, json_path, _plot(rows, headline, recs[0].step, out_dir / SWEEP_PLOT))


def _score(config: RunConfig, rec: Reconstruction, evaluator, n: int, device: str) -> dict:
    """The reconstruction's samples scored as the training loop scores its EMA (ddpm.train_eval.evaluate)."""
    diffusion = build_diffusion(config)
    diffusion.model.load_state_dict(rec.state, strict=True)
    diffusion = diffusion.to(device).eval()
    images = generate(diffusion, n, batch_size=min(n, 256), seed=derive_seed(config.train.seed, 3), progress=False,
                      sampler="dpm-solver++", steps=25)
    return {k: float(v) for k, v in evaluator(images).items()}


def _plot(rows: list[dict], headline: str, step: int, path: Path) -> Path | None:
    xs = [r["sigma_rel"] for r in rows]
    return line_chart({headline: (xs, [r[headline] for r in rows])}, path, xlabel="sigma_rel (EMA length / steps)",
                      ylabel=headline, title=f"post-hoc EMA at step {step:,}", integer_x=False)
