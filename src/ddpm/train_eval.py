"""What the training loop draws from its model: the sample grids (``--sample-every``) and the evaluation
(``--eval-every``, ``--keep-best``: the metric built once, the EMA's samples scored when due,
checkpoints/best.safetensors kept). The loop in :mod:`ddpm.train` calls these; what they draw uses
generators of their own and never touches the training stream."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .checkpoint import save_checkpoint
from .condition_data import grid_conditions
from .conditions import shown_condition
from .config import RunConfig
from .data import ImageData
from .generate import DEFAULT_GUIDANCE_SCALE, generate
from .images import class_grid_layout, label_rows, make_grid, save_png, side_by_side
from .pixels import to_uint8
from .seeding import derive_seed
from .tracking import Tracker
from .training_state import BEST_CHECKPOINT


def sample_grid(config: RunConfig, run_dir: Path, diffusions: tuple, step: int, *, data: ImageData,
                conditions=None, board=None) -> Path:
    """The EMA and raw weights' samples (``diffusions``) side by side, from one fixed seed (a generator of its
    own); with a tracker ``board`` (:class:`ddpm.tracking.Board`) each grid is also logged as an image
    (``samples/ema``, ``samples/raw``). A class-conditional model gives each class whole rows
    (:func:`ddpm.images.class_grid_layout`), labelled with its name, with guidance; an image-conditioned one
    shows its first training conditions (``data``, ``conditions``) beside them."""
    tc = config.train
    seed = derive_seed(tc.seed, 2)
    n, cond, nrow, rows = tc.num_samples, {}, None, None
    if config.conditional:
        labels, nrow = class_grid_layout(config.model.num_classes, tc.num_samples)
        n, cond = len(labels), {"labels": labels, "guidance_scale": DEFAULT_GUIDANCE_SCALE}
        names = config.model.class_names
        rows = [names[c] if names else str(c) for c in labels[::nrow]]
    panels = []
    if config.condition is not None:    # the first n training conditions, shown beside the samples
        given = grid_conditions(config.condition, data, conditions, n)
        n, cond["conditions"] = len(given), given
        shown = shown_condition(config.condition, given, config.model.image_size)
        panels = [make_grid(to_uint8(shown), nrow=nrow)]
    grids = [make_grid(generate(d, n, batch_size=n, seed=seed, progress=False, **cond), nrow=nrow)
             for d in diffusions]
    if rows:
        grids = [label_rows(grid, rows) for grid in grids]
    if board:
        for name, grid in zip(("ema", "raw"), grids):
            board.image(f"samples/{name}", grid, step)
    return save_png(run_dir / "samples" / f"step-{step:07d}.png",
                    side_by_side(panels + grids, ["condition"] * len(panels) + ["EMA", "raw"]))


def build_evaluator(config: RunConfig, device):
    """The metric of --eval-every, built once with its network and reference statistics (cached), or None.

    The reference is the dataset's test split in the model's size and channels (ddpm.evaluation.training).
    """
    tc = config.train
    if not tc.eval_every:
        return None
    from .evaluation.training import TrainingEvaluator    # the evaluation package is large: loaded when asked for

    d, m = config.data, config.model
    metric = tc.evaluation_metric(m.channels, m.image_size)
    return TrainingEvaluator.build(metric, d.name, data_root=d.root, image_size=d.image_size, channels=d.channels,
                                   inception_weights=tc.inception_weights or None, device=str(device))


def evaluate(config: RunConfig, ema_diffusion, evaluator, tracker: Tracker, step: int) -> dict:
    """EMA samples drawn with DPM-Solver++ in 25 steps, scored; logged to metrics.jsonl, TensorBoard
    (``eval/<key>``) and one console line. Returns the scores."""
    tc = config.train
    sampler = {"sampling": ema_diffusion.default_sampling} if config.diffusion.formulation == "edm" else {
        "sampler": "dpm-solver++", "steps": 25}                                 # EDM: its own, heun over 18 levels
    images = generate(ema_diffusion, tc.eval_samples, batch_size=min(tc.eval_samples, 256),
                      seed=derive_seed(tc.seed, 3), progress=False, **sampler)
    scores = evaluator(images)
    tracker.write_scores(step, scores)
    return scores


def keep_best(run_dir: Path, evaluator, scores: dict, best: float | None, step: int,
              checkpoint_state: Callable[[], tuple[dict, dict]]) -> float | None:
    """Save checkpoints/best.safetensors when the headline value beats ``best`` (its metadata says so);
    returns the best value so far. ``checkpoint_state()``: the run's tensors and metadata at ``step``."""
    from .evaluation.training import is_better            # the evaluation package is large: loaded when asked for

    value = float(scores[evaluator.headline])
    if not is_better(evaluator.metric, value, best):
        return best
    tensors, meta = checkpoint_state()
    meta["best"] = {"metric": evaluator.headline, "value": value, "step": step}
    save_checkpoint(run_dir / "checkpoints" / BEST_CHECKPOINT, tensors, meta)
    return value
