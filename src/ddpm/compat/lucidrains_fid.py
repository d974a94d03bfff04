"""The FID of lucidrains' ``Trainer(calculate_fid=True)``: at each milestone, as there.

lucidrains scores ``num_fid_samples`` samples of the moving average at every ``save_and_sample_every``
steps, the milestones, and at no other step. :func:`milestone_fid` does that for the checkpoint of a
milestone: the EMA weights it holds, the diffusion's own sampler (DDIM over ``sampling_timesteps``
when set, as there), a progress bar over the samples, the Inception FID against the training
folder (:class:`ddpm.evaluation.training.TrainingEvaluator`), a row ``{"step", "fid"}`` in
``metrics.jsonl`` and one console line. SIGINT or SIGTERM stop it at once (a
:class:`~ddpm.errors.TrainingInterrupted`); the milestone's checkpoint is already on disk.
"""

from __future__ import annotations

import copy
import json
import signal
import sys
import threading
from contextlib import contextmanager

import numpy as np
from tqdm.auto import tqdm

from ..checkpoint import checkpoint_path, load_checkpoint, load_weights
from ..device import select_device
from ..errors import TrainingInterrupted
from ..evaluation.training import TrainingEvaluator
from ..generate import generate

__all__ = ["milestone_fid", "stop_on_signals"]

FID_BATCH = 256          # samples drawn per call


@contextmanager
def stop_on_signals(what: str):
    """SIGINT / SIGTERM raise :class:`TrainingInterrupted` at once inside the block (main thread only)."""
    def stop(signum, frame):
        name = signal.Signals(signum).name
        raise TrainingInterrupted(f"{name} received: stopped {what}", 128 + signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def milestone_fid(trainer, step: int) -> float:
    """The FID of ``trainer.num_fid_samples`` EMA samples of the checkpoint at ``step``, logged and printed."""
    path = checkpoint_path(trainer.results_folder, step)
    with stop_on_signals(f"the FID at step {step} (the checkpoint {path} is saved)"):
        tensors, _ = load_checkpoint(path)
        ema = copy.deepcopy(trainer.ema.ema_model)
        load_weights(ema.model, tensors, "ema", str(path))
        device = select_device(trainer.config.train.device)
        ema = ema.to(device).eval()
        data = trainer.config.data
        evaluator = TrainingEvaluator.build("fid", data.name, data_root=data.root, image_size=data.image_size,
                                            channels=data.channels, device=str(device))
        n, images = trainer.num_fid_samples, []
        with tqdm(total=n, desc=f"FID at step {step}", unit="sample", dynamic_ncols=True) as bar:
            for start in range(0, n, FID_BATCH):
                k = min(FID_BATCH, n - start)
                images.append(generate(ema, k, batch_size=k, seed=step, start_index=start, progress=False,
                                       sampling=ema.sampling_options()))
                bar.update(k)
        fid = float(evaluator(np.concatenate(images))["fid"])
    with open(trainer.results_folder / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({"step": step, "fid": fid}) + "\n")
    print(f"eval at step {step}: fid {fid:.4g}", file=sys.stderr, flush=True)
    return fid


def milestone_ends(start: int, steps: int, every: int) -> list[int]:
    """The steps a run from ``start`` to ``steps`` stops at to score a milestone: each multiple of ``every``
    after ``start`` and before ``steps``, then ``steps``."""
    return [m for m in range(every, steps, every) if m > start] + [steps]

