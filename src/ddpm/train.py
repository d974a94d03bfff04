"""The training loop (Ho et al. 2020, Algorithm 1), reading top to bottom in labelled phases.

Randomness is derived from ``(seed, step)``: the data order of each epoch, and the
timesteps, noise, flips, dropout and (class-conditional models) label dropout of each step, all drawn for the whole batch before it
is split into micro-batches. A step's result therefore depends only on the weights, the
optimizer state and the step number, which is what makes a resumed run continue exactly
(bit for bit on the CPU). Sample grids use generators of their own and never touch the
training stream.

Data parallelism (``torchrun``, :mod:`ddpm.distributed`) is the same loop: the global batch of
batch_size x world_size x grad_accum images is drawn, with its flips, t, noise and label
dropout, exactly as one process would draw it, and is cut into grad_accum chunks of
batch_size x world_size rows; rank r takes rows [r * batch_size, (r + 1) * batch_size) of
each chunk. One process with batch 2b and two with batch b therefore train on the same rows
with the same randomness (DistributedDataParallel averages the gradients), and so do grad_accum
and extra processes. Only dropout masks differ per rank (the global RNG is seeded with the rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .checkpoint import checkpoint_path, flatten_optimizer_state, list_checkpoints, save_checkpoint
from .condition_data import paired_conditions
from .conditions import training_condition
from .config import RunConfig
from .data import ImageData
from .errors import TrainingError, TrainingInterrupted
from .fileio import atomic_write
from .build import build_diffusion
from .gaussian_diffusion import GaussianDiffusion
from .losses import Loss, make_loss
from .lr_schedules import LRSchedule, schedule_from_train_config
from .posthoc_ema import save_snapshot
from .pixels import to_model_range, uint8_to_unit
from .precision import autocast, channels_last, check_precision, resolve_precision
from .data.prepared import BatchPrefetcher
from .denoiser import CONDITION_KEY
from .run_dir import open_run, prune_checkpoints
from .seeding import derive_seed
from .signals import StopSignals, Stopped
from .tracking import Tracker, draw_loss_curve
from .train_eval import build_evaluator, evaluate, keep_best, sample_grid
from .training_data import EpochOrder, check_training_data, lazy_reader, load_training_data, rank_rows
from .training_state import Counters, State, best_so_far, restore_or_start, rng_states

__all__ = ["label_dropout", "lr_at", "train", "TrainResult", "Setup"]


def label_dropout(y: torch.Tensor, num_classes: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null label ``num_classes`` with probability ``p`` (Ho & Salimans 2022,
    Algorithm 1), so one network learns the conditional and the unconditional model."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


def lr_at(config: RunConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to the peak, then the run's
    schedule (constant by default; :mod:`ddpm.lr_schedules`)."""
    return schedule_from_train_config(config.train)(step)


# ----------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None        # None on ranks other than 0, which write nothing
    grid: Path | None
    final_loss: float
    seconds: float
    counters: Counters


def train(config: RunConfig, run_dir: str | os.PathLike, *, data: ImageData | None = None,
          resume: bool = False, progress: bool = True, loss: Loss | None = None, objective: Loss | None = None,
          stop: StopSignals | None = None) -> TrainResult:
    """Train the model ``config`` describes and write everything to ``run_dir``.

    ``loss`` (a :class:`ddpm.losses.Loss`, e.g. :class:`ddpm.distill.DistillationLoss`; ``objective``
    is its earlier name) replaces the loss that ``config.diffusion`` names: it draws the timesteps
    and extras and gives the per-sample losses of the network; everything else (EMA, checkpoints,
    resume, logs) is the same.

    The run directory receives ``config.json``, ``provenance.json``, ``metrics.jsonl``,
    ``loss.png``, ``checkpoints/step-NNNNNNN.safetensors`` and ``samples/step-NNNNNNN.png``
    (EMA and raw weights side by side); the final grid is also copied to ``samples.png``. With the
    tensorboard package, ``tensorboard/`` holds the same metrics, the grids and the config
    (docs/tensorboard.md); without it, one note says so (unless ``progress`` is off).
    With ``resume`` it continues from the newest checkpoint in ``run_dir`` that verifies. A precision
    of ``"auto"`` becomes the one :func:`ddpm.precision.resolve_precision` picks on this device,
    printed once (with ``progress``) and recorded in ``config.json`` and every checkpoint. ``stop``:
    SIGINT / SIGTERM handlers the caller installed earlier (before the run directory existed);
    None installs them here.

    Under torchrun (after :func:`ddpm.distributed.init`) every process runs this function: the
    U-Net is wrapped in DistributedDataParallel, each rank trains on its rows of the global batch,
    and only rank 0 writes files, keeps the EMA and draws sample grids (see the module docstring).
    """
    setup, state = _set_up(config, Path(run_dir), data, resume, loss if loss is not None else objective, progress)
    tracker = Tracker(setup.run_dir, setup.config.to_dict(), setup.tc.steps, state.counters.step, progress,
                      setup.main)
    evaluator = build_evaluator(setup.config, setup.device) if setup.main else None
    if evaluator is not None and setup.tc.keep_best:
        state.best = best_so_far(setup.run_dir, evaluator.headline)
    try:
        with contextlib.nullcontext(stop) if stop is not None else StopSignals() as stop:
            for step in range(state.counters.step, setup.tc.steps):
                batch = _draw_batch(setup, step)                           # Algorithm 1, lines 2-4
                per_sample = _forward_backward(setup, batch)               # line 5: the gradient of the loss
                outcome = _agree(setup, step, per_sample, stop)
                grad_norm = _optimizer_step(setup, state, batch, per_sample, outcome)   # line 5: the update
                _log_step(setup, state, tracker, batch, per_sample, outcome, grad_norm)
                _snapshot(setup, state, outcome)
                _checkpoint(setup, state, tracker, outcome)
                _sample_and_evaluate(setup, state, tracker, evaluator, outcome)
                if outcome.time_up:
                    break
    except distributed.PeerLost as exc:
        raise distributed.PeerLost(f"{exc}; continue from the newest checkpoint with: ddpm train --resume "
                                   f"{setup.run_dir}") from None
    finally:
        tracker.close()
        if setup.reader is not None:
            setup.reader.close()
    return _finish(setup, state)


# ----------------------------------------------------------------------------- phase 1: set-up

@dataclass(frozen=True)
class Setup:
    """What a run fixes before its first step and keeps unchanged (built once by :func:`_set_up`)."""

    config: RunConfig
    run_dir: Path
    world: int
    rank: int
    device: torch.device
    data: ImageData
    images: torch.Tensor | None          # uint8 [N, H, W, C] on the device, kept compact (None: read lazily)
    labels: torch.Tensor | None
    diffusion: GaussianDiffusion         # around the raw weights (sample grids)
    model: nn.Module                     # the U-Net being trained
    net: nn.Module                       # what the loss calls: the U-Net, or DDP around it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loss: Loss
    global_batch: int
    order: EpochOrder
    mine: torch.Tensor                   # this rank's rows of the global batch
    start_time: float
    lr_schedule: LRSchedule              # the learning rate of each step (ddpm.lr_schedules)
    reader: BatchPrefetcher | None = None   # a memory-mapped dataset: this rank's rows, one step ahead
    conditions: torch.Tensor | None = None  # paired image conditions, uint8 [N, H, W, C_c], row k for image k

    @property
    def tc(self):
        return self.config.train

    @property
    def main(self) -> bool:
        return self.rank == 0


def _resolved_precision(config: RunConfig, device: torch.device):
    """``config`` with precision "auto" replaced by what runs on ``device`` (and that choice, else None)."""
    if config.train.precision != "auto":
        return config, None
    chosen = resolve_precision(config.train.precision, device)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, precision=chosen.precision)), chosen


def _model_and_optimizer(config: RunConfig, device: torch.device):
    """The diffusion around a new U-Net on ``device``, its optimizer and (fp16) gradient scaler."""
    tc = config.train
    diffusion = build_diffusion(config).to(device)
    model = diffusion.model
    model.gradient_checkpointing = tc.grad_checkpointing
    if channels_last(device, tc.precision, training=True):
        model.to(memory_format=torch.channels_last)       # faster convolutions (ddpm.precision); EMA copies it
    optim_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    # The fused step (one kernel over all parameters) on the CPU and CUDA: benchmarks/RESULTS.md, "Speed".
    optimizer = optim_cls(model.parameters(), lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay,
                          fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None
    return diffusion, model, optimizer, scaler


def _set_up(config: RunConfig, run_dir: Path, data: ImageData | None, resume: bool, loss: Loss | None,
            progress: bool = False) -> tuple[Setup, State]:
    """Device, precision, data, model, optimizer, loss, EMA (restored when resuming), the run directory's files."""
    start_time = time.time()
    world, rank = distributed.world_size(), distributed.rank()
    device = distributed.training_device(config.train.device)
    config, chosen = _resolved_precision(config, device)   # what runs here; config.json and checkpoints record it
    tc = config.train
    check_precision(device, tc.precision)
    torch.manual_seed(tc.seed)
    if data is None:
        data = load_training_data(config)
    else:
        check_training_data(config, data, world)
    lazy = data.lazy                                       # a prepared or Hub dataset stays on disk
    images = None if lazy else torch.from_numpy(data.images).to(device)
    labels = torch.from_numpy(data.labels).to(device) if config.conditional else None
    diffusion, model, optimizer, scaler = _model_and_optimizer(config, device)
    loss = loss if loss is not None else make_loss(config.diffusion, diffusion.schedule_on(device))
    global_batch = tc.global_batch_size(world)
    state = restore_or_start(run_dir, config, model, optimizer, scaler, global_batch, resume, rank == 0,
                             loss.timestep_sampler)
    mine = rank_rows(tc.batch_size, world, tc.grad_accum, rank).to(device)
    setup = Setup(config=config, run_dir=run_dir, world=world, rank=rank, device=device, data=data, images=images,
                  labels=labels, diffusion=diffusion, model=model, net=_data_parallel(model, world, device),
                  optimizer=optimizer, scaler=scaler, loss=loss, global_batch=global_batch,
                  order=EpochOrder(data.num_images, global_batch, tc.seed), mine=mine, start_time=start_time,
                  lr_schedule=schedule_from_train_config(tc),
                  reader=lazy_reader(data.images, data.num_images, global_batch, tc.seed, mine, device) if lazy else None,
                  conditions=paired_conditions(config, data, device))
    if setup.main:
        if chosen is not None and progress:
            print(chosen.line(), file=sys.stderr)         # once the set-up has passed its checks
        open_run(run_dir, config.to_dict(), state.counters.step, resume)
        state.ema_diffusion = build_diffusion(config, state.ema.model)
    return setup, state


def _data_parallel(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the U-Net under torchrun (the replicas start from rank 0's
    weights, and the backward pass averages their gradients); the U-Net itself in one process."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel     # loaded with torch.distributed: only under torchrun

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------- phase 2: one step

@dataclass
class _Batch:
    """One optimizer step's rows of this rank: data x0 in [-1, 1] and everything drawn for them."""

    step: int
    x0: torch.Tensor
    t: torch.Tensor
    t_weights: torch.Tensor | None       # importance sampling: losses weighted by 1 / (T p_t)
    noise: torch.Tensor
    y: torch.Tensor | None
    extras: dict
    c: torch.Tensor | None = None         # the image condition of an image-conditioned model (augmented)


def _draw_batch(setup: Setup, step: int) -> _Batch:
    """The step's images, flips, timesteps, noise, label dropout and the loss's extras, in that order.

    All randomness comes from (seed, step), drawn for the whole global batch; this rank then keeps
    its rows (``setup.mine``). The options that are off draw nothing.
    """
    tc, mine, device, config = setup.tc, setup.mine, setup.device, setup.config
    setup.model.train()
    for group in setup.optimizer.param_groups:
        group["lr"] = setup.lr_schedule(step)
    step_seed = derive_seed(tc.seed, step, 0)
    torch.manual_seed(step_seed if setup.rank == 0 else derive_seed(tc.seed, step, 0, setup.rank))   # dropout
    g = torch.Generator(device=device).manual_seed(step_seed)    # flips, t, eps
    index = setup.order.batch(step).to(device)
    shape = (index.shape[0], config.model.channels, *config.model.image_size)
    if setup.reader is None:
        x = uint8_to_unit(setup.images[index[mine]])
    else:                               # the same rows, read from the memory map (ahead, on another thread)
        x = uint8_to_unit(setup.reader.get(step)[0].to(device, non_blocking=True))
    paired = None if setup.conditions is None else uint8_to_unit(setup.conditions[index[mine]])
    if config.data.hflip:
        flip = torch.rand(shape[0], generator=g, device=device)[mine] < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if paired is not None:          # a pair is flipped together
            paired = torch.where(flip[:, None, None, None], paired.flip(3), paired)
    t, t_weights = setup.loss.draw_timesteps(shape[0], g, device)
    noise = torch.randn(shape, generator=g, device=device)
    y = None
    if setup.labels is not None:        # drawn after the noise, so unconditional runs keep their random stream
        y = label_dropout(setup.labels[index], config.model.num_classes, tc.label_dropout, g)[mine]
    noise, extras = setup.loss.draw_extras(noise, g)
    x0, c = to_model_range(x), None
    if config.condition is not None:    # drawn last: the other runs keep their random stream
        c = training_condition(config.condition, x0, None if paired is None else to_model_range(paired), g,
                               batch=shape[0], rows=mine)
    return _Batch(step=step, x0=x0, t=t[mine], t_weights=None if t_weights is None else t_weights[mine],
                  noise=noise[mine], y=y, extras={k: v[mine] for k, v in extras.items()}, c=c)


def _forward_backward(setup: Setup, batch: _Batch) -> torch.Tensor:
    """Per-sample losses of this rank's rows, micro-batch by micro-batch (gradient accumulation), with
    their gradient; DDP averages the gradients over the ranks in the last backward pass only."""
    tc, micro, scaler = setup.tc, setup.tc.batch_size, setup.scaler
    setup.optimizer.zero_grad(set_to_none=True)
    losses = []
    for a, i in enumerate(range(0, batch.x0.shape[0], micro)):
        rows = slice(i, i + micro)
        sync = contextlib.nullcontext() if setup.world == 1 or a == tc.grad_accum - 1 else setup.net.no_sync()
        kwargs = None if batch.y is None else {"y": batch.y[rows]}
        if batch.c is not None:                         # the image condition: ddpm.denoiser.model_output
            kwargs = {**(kwargs or {}), CONDITION_KEY: batch.c[rows]}
        with sync, distributed.collective("a training step"):
            with autocast(setup.device, tc.precision):
                per_sample = setup.loss.losses(setup.net, batch.x0[rows], batch.t[rows], batch.noise[rows],
                                               model_kwargs=kwargs, **{k: v[rows] for k, v in batch.extras.items()})
            weighted = per_sample if batch.t_weights is None else per_sample * batch.t_weights[rows]
            loss = weighted.mean() * (1 / tc.grad_accum)
            (scaler.scale(loss) if scaler else loss).backward()
        losses.append(per_sample.detach())
    return torch.cat(losses)


@dataclass
class _Outcome:
    """What every rank agrees on after a step's backward pass."""

    loss: float                          # the global mean loss
    time_up: bool                        # --time-limit reached
    signum: int | None                   # a stop signal received (by any rank)
    last: bool                           # the run's last step: --steps or --time-limit reached


def _agree(setup: Setup, step: int, per_sample: torch.Tensor, stop: StopSignals) -> _Outcome:
    """The global mean loss (so that every rank takes the same skip decision), any stop signal received
    by any rank, and the time limit: one small all-reduce per step with several ranks."""
    tc = setup.tc
    time_up = bool(tc.time_limit) and time.time() - setup.start_time >= 60 * tc.time_limit
    if setup.world > 1:
        received = stop.received
        total, count, n_int, n_term, n_late = distributed.all_reduce_sum(
            [float(per_sample.double().sum()), per_sample.numel(), float(received == signal.SIGINT),
             float(received is not None and received != signal.SIGINT), float(time_up)], "a training step")
        signum = None if not (n_int or n_term) else (signal.SIGTERM if n_term else signal.SIGINT)
        loss, time_up = total / count, n_late > 0
    else:
        loss, signum = float(per_sample.mean()), stop.received
    # --time-limit ends the run like its last step
    return _Outcome(loss, time_up, signum, last=step + 1 == tc.steps or time_up)


def _optimizer_step(setup: Setup, state: State, batch: _Batch, per_sample: torch.Tensor, outcome: _Outcome) -> float:
    """Clip the gradient and update (EMA, the loss's timestep histories), or skip a step whose loss or
    gradient is not finite; returns the gradient norm."""
    tc, scaler, counters = setup.tc, setup.scaler, state.counters
    if scaler:
        scaler.unscale_(setup.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(setup.model.parameters(),
                                                     tc.grad_clip if tc.grad_clip > 0 else math.inf))
    if math.isfinite(outcome.loss) and (math.isfinite(grad_norm) or scaler):
        if scaler:
            scale = scaler.get_scale()
            scaler.step(setup.optimizer)
            scaler.update()
            counters.scaler_skips += int(scaler.get_scale() < scale)
        else:
            setup.optimizer.step()
        if state.ema is not None:
            state.ema.update(setup.model)
        counters.bad_in_row = 0
        _observe(setup, batch, per_sample)
    else:
        setup.optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.update()
        counters.bad_steps += 1
        counters.bad_in_row += 1
        if counters.bad_in_row >= tc.max_bad_steps:
            last = list_checkpoints(setup.run_dir)
            raise TrainingError(
                f"{counters.bad_in_row} steps in a row had a non-finite loss or gradient (step {batch.step + 1}: "
                f"loss {outcome.loss}, gradient norm {grad_norm}); training stopped. Last good checkpoint: "
                f"{last[-1][1] if last else 'none'}. Try a lower --lr, --grad-clip 1 or --precision fp32")
    counters.step = batch.step + 1
    if state.power_ema is not None:                    # every step, skipped or not: t = steps done (EDM2 Eq. 127)
        state.power_ema.update(setup.model, counters.step)
    return grad_norm


def _observe(setup: Setup, batch: _Batch, per_sample: torch.Tensor) -> None:
    """The loss's one look at the step: (t, unweighted loss) of the whole global batch, in its row order
    (gathered from every rank, so every rank keeps the same importance-sampling histories)."""
    if setup.loss.timestep_sampler is None:
        return
    t_all, loss_all = batch.t, per_sample
    if setup.world > 1:
        by_row = torch.argsort(distributed.all_gather_cat(setup.mine, "gathering the timestep losses"))
        t_all = distributed.all_gather_cat(batch.t, "gathering the timestep losses")[by_row]
        loss_all = distributed.all_gather_cat(per_sample.float(), "gathering the timestep losses")[by_row]
    setup.loss.observe(t_all, loss_all)


# ----------------------------------------------------------------------------- phase 3: bookkeeping

def _log_step(setup: Setup, state: State, tracker: Tracker, batch: _Batch, per_sample: torch.Tensor,
              outcome: _Outcome, grad_norm: float) -> None:
    """Metrics and progress after a step (rank 0). With several ranks the loss is the global mean; its
    quartiles come from rank 0's rows."""
    tc, done = setup.tc, state.counters.step
    state.loss = outcome.loss
    if not setup.main:
        return
    t, T = _noise_position(setup.config.diffusion, batch.t)
    tracker.window.add(per_sample, t, T, grad_norm,
                       loss=None if setup.world == 1 else outcome.loss, world=setup.world)
    tracker.bar.update(1)
    tracker.bar.set_postfix(loss=f"{outcome.loss:.4f}", refresh=False)
    metrics = None
    if done % tc.log_every == 0 or outcome.last:
        metrics = tracker.window.flush(done, setup.lr_schedule(batch.step), state.counters, setup.start_time)
        tracker.write(metrics, done)
    tracker.progress_line(done, metrics)          # outside a terminal: step, loss, images/s, ETA


def _noise_position(d, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t, T) for the loss quartiles; EDM's sigma as its probability under ln sigma ~ N(P_mean, P_std^2), T = 1."""
    if d.formulation != "edm":
        return t, d.timesteps
    return torch.special.ndtr((t.double().log() - d.p_mean) / d.p_std), 1


def _snapshot(setup: Setup, state: State, outcome: _Outcome) -> None:
    """The post-hoc EMA profiles saved to ema-snapshots/ when due and at the last step (rank 0), before the
    checkpoint of the same step, so a resume never lacks a snapshot its checkpoint has passed."""
    every, done = setup.tc.ema_snapshot_every, state.counters.step
    if state.power_ema is not None and (done % every == 0 or outcome.last):
        save_snapshot(setup.run_dir, done, state.power_ema)


def _checkpoint(setup: Setup, state: State, tracker: Tracker, outcome: _Outcome) -> None:
    """A checkpoint when one is due, at the last step and after a stop signal (then
    :class:`TrainingInterrupted` is raised: the run stops there, to be resumed)."""
    tc, done = setup.tc, state.counters.step
    if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or outcome.last or outcome.signum is not None:
        with distributed.agree("saving a checkpoint"):        # the others wait for rank 0's save
            if setup.main:
                state.last_checkpoint = _save(setup, state, done)
                tracker.flush()
    if outcome.signum is not None:
        name = signal.Signals(outcome.signum).name
        raise TrainingInterrupted(f"{name} received: stopped after step {done} and saved {state.last_checkpoint}; "
                                  f"continue with: ddpm train --resume {setup.run_dir}", 128 + outcome.signum)


def _sample_and_evaluate(setup: Setup, state: State, tracker: Tracker, evaluator, outcome: _Outcome) -> None:
    """The sample grid and the evaluation when due, and at the last step (rank 0)."""
    tc, done = setup.tc, state.counters.step
    phase = None
    try:
        if setup.main and ((tc.sample_every and done % tc.sample_every == 0) or outcome.last):
            phase = f"the {'final ' if outcome.last else ''}sample grids (EMA and raw) at step {done}"
            _say(tracker, phase.removeprefix("the ") + "..." if outcome.last else None)
            state.grid = _sample_grid(setup, state, done, tracker.board)
        if setup.main and evaluator is not None and (done % tc.eval_every == 0 or outcome.last):
            phase = f"the evaluation at step {done}"
            _say(tracker, f"evaluating at step {done}...")
            scores = evaluate(setup.config, state.ema_diffusion, evaluator, tracker, done)
            if tc.keep_best:
                state.best = keep_best(setup.run_dir, evaluator, scores, state.best, done,
                                       lambda: _checkpoint_state(setup, state, done))
    except Stopped as exc:          # a stop signal between two sampler steps: save the run, then stop
        raise _stopped_during(setup, state, tracker, phase, exc.signum) from None


def _say(tracker: Tracker, line: str | None) -> None:
    """What a long phase is doing, on stderr (with progress)."""
    if line and tracker.progress:
        tracker.say(line)


def _stopped_during(setup: Setup, state: State, tracker: Tracker, phase: str, signum: int) -> TrainingInterrupted:
    """The error that ends a run stopped during ``phase``, after a checkpoint of its step (unless one is there)."""
    done = state.counters.step
    if state.last_checkpoint != checkpoint_path(setup.run_dir, done):
        state.last_checkpoint = _save(setup, state, done)
        tracker.flush()
    return TrainingInterrupted(f"{signal.Signals(signum).name} received during {phase}: stopped, saved "
                               f"{state.last_checkpoint}; continue with: ddpm train --resume {setup.run_dir}",
                               128 + signum)


def _save(setup: Setup, state: State, step: int) -> Path:
    """A checkpoint of the whole run state at ``step``; older ones pruned, the loss curve redrawn."""
    path = save_checkpoint(checkpoint_path(setup.run_dir, step), *_checkpoint_state(setup, state, step))
    prune_checkpoints(setup.run_dir, setup.tc.keep_last, setup.tc.milestone_every)
    draw_loss_curve(setup.run_dir)
    return path


def _checkpoint_state(setup: Setup, state: State, step: int) -> tuple[dict, dict]:
    """The tensors and metadata of a checkpoint of the whole run state at ``step``."""
    scaler, data, ema, power = setup.scaler, setup.data, state.ema, state.power_ema
    optim_tensors, optim_info = flatten_optimizer_state(setup.optimizer.state_dict())
    sampler = setup.loss.timestep_sampler
    tensors = {**{f"model.{k}": v for k, v in setup.model.state_dict().items()},
               **ema.state_tensors(), **(power.state_tensors() if power else {}), **optim_tensors,
               **(sampler.state_tensors() if sampler else {})}
    meta = {"step": step, "config": setup.config.to_dict(), "ema_updates": ema.num_updates, "optimizer": optim_info,
            "ema_decays": list(ema.decays), "ema_profiles": list(setup.tc.ema_profiles) if power else [],
            "counters": vars(state.counters), "scaler": scaler.state_dict() if scaler else None,
            "dataset": data.name, "num_images": data.num_images, "data_position": step * setup.global_batch,
            "global_batch": setup.global_batch, "world_size": setup.world, "rng": rng_states()}
    return tensors, meta


def _sample_grid(setup: Setup, state: State, step: int, board=None) -> Path:
    """The grid of step ``step`` (:func:`ddpm.train_eval.sample_grid`) from the EMA and the raw weights."""
    return sample_grid(setup.config, setup.run_dir, (state.ema_diffusion, setup.diffusion.eval()), step,
                       data=setup.data, conditions=setup.conditions, board=board)


def _finish(setup: Setup, state: State) -> TrainResult:
    """The final checkpoint and grid (drawn when the last step did not draw one), copied to samples.png."""
    seconds = time.time() - setup.start_time
    if not setup.main:
        return TrainResult(run_dir=setup.run_dir, checkpoint=None, grid=None, final_loss=state.loss, seconds=seconds,
                           counters=state.counters)
    last_ckpt = state.last_checkpoint
    if last_ckpt is None:           # resumed a run that was already complete
        last_ckpt = list_checkpoints(setup.run_dir)[-1][1]
    grid = state.grid if state.grid is not None else _sample_grid(setup, state, state.counters.step)
    final_grid = atomic_write(setup.run_dir / "samples.png", lambda tmp: shutil.copyfile(grid, tmp))
    return TrainResult(run_dir=setup.run_dir, checkpoint=last_ckpt, grid=final_grid, final_loss=state.loss,
                       seconds=time.time() - setup.start_time, counters=state.counters)
