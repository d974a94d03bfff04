"""The training loop (Ho et al. 2020, Algorithm 1), reading top to bottom in labelled phases.

Randomness is derived from ``(seed, step)``: the data order of each epoch, and the
timesteps, noise, flips and dropout of each step. A step's result therefore depends only
on the weights, the optimizer state and the step number, which is what makes a resumed
run continue exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import checkpoint_path, flatten_optimizer_state, save_checkpoint
from .config import RunConfig, build_diffusion
from .data import ImageData, load_dataset
from .errors import ConfigError, DataError
from .fileio import atomic_write, write_json
from .generate import generate, select_device, write_samples
from .images import make_grid, save_png

__all__ = ["EMA", "derive_seed", "new_run_dir", "prepare_run_dir", "load_training_data", "check_training_data", "train", "TrainResult"]


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence), e.g. (seed, step)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class EMA:
    """Exponential moving average of a model's parameters; buffers are copied as they are.

    shadow <- decay_n * shadow + (1 - decay_n) * param, with decay_n = ema_decay, or with
    warm-up min(ema_decay, (1 + n) / (10 + n)) after n updates, so short runs are usable.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params, params = dict(self.model.named_parameters()), dict(model.named_parameters())
        ema_buffers, buffers = dict(self.model.named_buffers()), dict(model.named_buffers())
        if ema_params.keys() != params.keys() or ema_buffers.keys() != buffers.keys():
            raise ValueError("EMA and model have different parameter or buffer names")
        names = list(params)
        torch._foreach_lerp_([ema_params[n] for n in names], [params[n].detach() for n in names], 1.0 - decay)
        for name, b in buffers.items():
            ema_buffers[name].copy_(b)
        self.num_updates += 1


# ----------------------------------------------------------------------------- run directories

def new_run_dir(root: str | os.PathLike = "runs") -> Path:
    """The next free numbered directory ``root/NNN``."""
    root = Path(root)
    taken = [int(p.name) for p in root.glob("[0-9][0-9][0-9]*") if p.name.isdigit()] if root.is_dir() else []
    return root / f"{max(taken, default=0) + 1:03d}"


def prepare_run_dir(out: str | os.PathLike | None) -> Path:
    """Create the run directory; an existing non-empty one is an error (it would mix two runs)."""
    run_dir = Path(out) if out is not None else new_run_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists and is not empty; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ----------------------------------------------------------------------------- data

def load_training_data(config: RunConfig) -> ImageData:
    """Load the dataset that ``config.data`` names and check that it fits the model."""
    d = config.data
    data = load_dataset(d.name, data_root=d.root, split=d.split, image_size=d.image_size, channels=d.channels)
    check_training_data(config, data)
    return data


def check_training_data(config: RunConfig, data: ImageData) -> None:
    """Raise :class:`DataError` unless ``data`` matches the model and holds at least one batch."""
    if data.image_size != tuple(config.model.image_size) or data.channels != config.model.channels:
        raise DataError(f"dataset {data.name!r} has {data.channels}-channel {data.image_size[0]}x{data.image_size[1]} "
                        f"images but the model expects {config.model.channels}-channel "
                        f"{config.model.image_size[0]}x{config.model.image_size[1]}; "
                        "pass --image-size / --channels")
    if data.num_images < config.train.batch_size:
        raise DataError(f"dataset {data.name!r} has {data.num_images} images, fewer than the batch size "
                        f"{config.train.batch_size}; lower --batch-size")


class EpochOrder:
    """Batches of indices: one permutation per epoch seeded by (seed, epoch), last partial batch dropped."""

    def __init__(self, num_images: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_images, batch_size, seed
        self.steps_per_epoch = num_images // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 1))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


# ----------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    grid: Path
    final_loss: float
    seconds: float


def _log_line(step: int, total: int, metrics: dict) -> str:
    return (f"step {step}/{total}  loss {metrics['loss']:.4f}  grad norm {metrics['grad_norm']:.3f}  "
            f"{metrics['images_per_s']:.0f} img/s")


def train(config: RunConfig, run_dir: str | os.PathLike, *, data: ImageData | None = None,
          progress: bool = True) -> TrainResult:
    """Train the model ``config`` describes and write everything to ``run_dir``.

    The run directory receives ``config.json``, ``metrics.jsonl``,
    ``checkpoints/step-NNNNNNN.safetensors`` and ``samples/step-NNNNNNN.png``; the final
    sample grid is also copied to ``samples.png``.
    """
    tc = config.train
    run_dir = Path(run_dir)
    start_time = time.time()

    # --- Phase 1: set-up (device, data, model, optimizer, EMA) ---------------------------
    device = select_device(tc.device)
    torch.manual_seed(tc.seed)
    if data is None:
        data = load_training_data(config)
    else:
        check_training_data(config, data)
    images = torch.from_numpy(data.images).to(device)             # uint8 [N, H, W, C], kept compact
    diffusion = build_diffusion(config).to(device)
    model = diffusion.model
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    order = EpochOrder(data.num_images, tc.batch_size, tc.seed)
    write_json(run_dir / "config.json", config.to_dict())
    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
    interactive = progress and sys.stderr.isatty()
    bar = tqdm(total=tc.steps, desc="training", unit="step", disable=not interactive, dynamic_ncols=True)

    def save(step: int) -> Path:
        optim_tensors, optim_info = flatten_optimizer_state(optimizer.state_dict())
        tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                   **{f"ema.{k}": v for k, v in ema.model.state_dict().items()}, **optim_tensors}
        meta = {"step": step, "config": config.to_dict(), "ema_updates": ema.num_updates,
                "optimizer": optim_info, "dataset": data.name, "num_images": data.num_images}
        return save_checkpoint(checkpoint_path(run_dir, step), tensors, meta)

    def sample_grid(step: int) -> Path:
        samples = generate(_ema_diffusion, tc.num_samples, batch_size=tc.num_samples,
                           seed=derive_seed(tc.seed, 2), progress=False)
        return save_png(run_dir / "samples" / f"step-{step:07d}.png", make_grid(samples))

    _ema_diffusion = build_diffusion(config, ema.model)

    # --- Phase 2: the loop (Algorithm 1) ----------------------------------------------------
    window_loss, window_norm, window_n, window_t = 0.0, 0.0, 0, time.time()
    last_ckpt, grid, loss_value = None, None, float("nan")
    try:
        for step in range(tc.steps):
            model.train()
            # All randomness of this step comes from (seed, step).
            step_seed = derive_seed(tc.seed, step, 0)
            torch.manual_seed(step_seed)                                   # dropout
            g = torch.Generator(device=device).manual_seed(step_seed)     # t, eps, flips
            x = to_tensor_on_device(images[order.batch(step).to(device)])
            if config.data.hflip:
                flip = torch.rand(x.shape[0], generator=g, device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)

            loss = diffusion(x, generator=g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       tc.grad_clip if tc.grad_clip > 0 else math.inf)
            optimizer.step()
            ema.update(model)

            # Bookkeeping: metrics, progress, checkpoints, sample grids.
            loss_value = loss.item()
            window_loss, window_norm, window_n = window_loss + loss_value, window_norm + float(grad_norm), window_n + 1
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if done % tc.log_every == 0 or done == tc.steps:
                elapsed = time.time() - window_t
                metrics = {"step": done, "loss": window_loss / window_n, "grad_norm": window_norm / window_n,
                           "lr": tc.lr, "images_per_s": window_n * tc.batch_size / max(elapsed, 1e-9),
                           "elapsed_s": time.time() - start_time}
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                if progress and not interactive:
                    print(_log_line(done, tc.steps, metrics), file=sys.stderr, flush=True)
                window_loss, window_norm, window_n, window_t = 0.0, 0.0, 0, time.time()
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps:
                last_ckpt = save(done)
            if (tc.sample_every and done % tc.sample_every == 0) or done == tc.steps:
                grid = sample_grid(done)
    finally:
        bar.close()
        metrics_file.close()

    # --- Phase 3: finish ---------------------------------------------------------------------
    final_grid = atomic_write(run_dir / "samples.png", lambda tmp: shutil.copyfile(grid, tmp))
    return TrainResult(run_dir=run_dir, checkpoint=last_ckpt, grid=final_grid, final_loss=loss_value,
                       seconds=time.time() - start_time)


def to_tensor_on_device(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [0, 1], on the batch's device."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0)
