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
import copy
import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from . import distributed
from .checkpoint import (checkpoint_path, flatten_optimizer_state, list_checkpoints, load_checkpoint,
                         load_newest_verified, load_weights, save_checkpoint, unflatten_optimizer_state)
from .config import RunConfig
from .resolve import checkpoint_global_batch  # re-exported: its earlier home
from .data import ImageData, check_same_dataset, load_dataset
from .diffusion import to_model_range
from .errors import CheckpointError, ConfigError, DataError, TrainingError, TrainingInterrupted
from .build import build_diffusion
from .gaussian_diffusion import GaussianDiffusion
from .errors import OutputError
from .fileio import LOCK_FILE, RunLock, atomic_write, check_output_path, write_json
from .generate import DEFAULT_GUIDANCE_SCALE, generate
from .images import class_grid_layout, label_rows, make_grid, save_png, side_by_side
from .losses import Loss, make_loss
from .pixels import uint8_to_unit as to_tensor_on_device   # its earlier name here
from .plots import line_chart
from .precision import autocast, channels_last, check_precision, resolve_precision
from .data.prepared import BatchPrefetcher
from .seeding import derive_seed
from .timestep_sampling import ImportanceSampler

__all__ = ["EMA", "EpochOrder", "label_dropout", "derive_seed", "new_run_dir", "prepare_run_dir", "load_training_data",
           "check_training_data", "checkpoint_global_batch", "rank_rows", "lr_at", "train", "TrainResult",
           "BEFORE_FIRST_CHECKPOINT", "check_restartable", "claim_run_dir", "StopSignals"]


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


def label_dropout(y: torch.Tensor, num_classes: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null label ``num_classes`` with probability ``p`` (Ho & Salimans 2022,
    Algorithm 1), so one network learns the conditional and the unconditional model."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)


def lr_at(config: RunConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to the peak, then constant."""
    tc = config.train
    if tc.warmup_steps and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    return tc.lr


# ----------------------------------------------------------------------------- run directories

def new_run_dir(root: str | os.PathLike = "runs") -> Path:
    """The next free numbered directory ``root/NNN``."""
    root = Path(root)
    taken = [int(p.name) for p in root.glob("[0-9][0-9][0-9]*") if p.name.isdigit()] if root.is_dir() else []
    return root / f"{max(taken, default=0) + 1:03d}"


# What a run writes before its first checkpoint. A directory that holds no more than these (and no
# checkpoint) is a run stopped before it saved anything to resume from: the same command may start
# it again from step 0, and --resume starts it from its config.json (docs/robustness.md).
BEFORE_FIRST_CHECKPOINT = frozenset({"config.json", "provenance.json", "metrics.jsonl", "loss.png", "samples",
                                     "checkpoints", "tensorboard", LOCK_FILE})


def prepare_run_dir(out: str | os.PathLike | None) -> Path:
    """Create the run directory: new, empty, or holding only what a run writes before its first checkpoint.

    Anything else (a checkpoint, files of another program) is an error: it would mix two runs.
    """
    run_dir = check_output_path(Path(out) if out is not None else new_run_dir(), directory=True)
    check_restartable(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}", exc.errno) from None
    return run_dir


def check_restartable(run_dir: Path) -> None:
    """Refuse a run directory that holds more than a run writes before its first checkpoint."""
    if not run_dir.is_dir():
        return
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in BEFORE_FIRST_CHECKPOINT
                    and not p.name.startswith("."))
    if others or list_checkpoints(run_dir):
        held = ", ".join(others[:3]) if others else "checkpoints"
        raise ConfigError(f"run directory {run_dir} already exists and is not empty ({held}); choose another "
                          "--out, or continue it with --resume")


def claim_run_dir(out: str | os.PathLike | None) -> tuple[Path, RunLock]:
    """:func:`prepare_run_dir`, then its lock, then the check again (another run may have saved meanwhile)."""
    run_dir = prepare_run_dir(out)
    lock = RunLock(run_dir).acquire()
    try:
        check_restartable(run_dir)
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def _provenance() -> dict:
    """Who ran what: command line, versions, git commit of the source tree when available."""
    import PIL
    import safetensors

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "cwd": os.getcwd(),
            "host": platform.node(), "python": platform.python_version(),
            "versions": {"ddpm": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "pillow": PIL.__version__, "safetensors": safetensors.__version__},
            "git_commit": commit}


def _append_provenance(run_dir: Path, event: str) -> None:
    path = run_dir / "provenance.json"
    history = json.loads(path.read_text()) if path.exists() else []
    write_json(path, history + [{"event": event, **_provenance()}])


# ----------------------------------------------------------------------------- data

def load_training_data(config: RunConfig) -> ImageData:
    """Load the dataset that ``config.data`` names and check that it fits the model, and that it is the
    dataset whose fingerprint the run recorded (if it did)."""
    d = config.data
    if d.fingerprint is not None and not Path(d.name).exists():
        raise DataError(f"the run's data {d.name} is gone; if it moved, pass --data NEW_PATH (a copy is "
                        "recognised by its fingerprint)")
    data = load_dataset(d.name, data_root=d.root, split=d.split, image_size=d.image_size, channels=d.channels,
                        strict=d.strict)
    check_same_dataset(d.fingerprint, data)
    check_training_data(config, data)
    return data


def check_training_data(config: RunConfig, data: ImageData, world_size: int | None = None) -> None:
    """Raise :class:`DataError` unless ``data`` matches the model and holds at least one global batch
    (``world_size`` processes; default: as many as the launcher started)."""
    if data.image_size != tuple(config.model.image_size) or data.channels != config.model.channels:
        raise DataError(f"dataset {data.name!r} has {data.channels}-channel {data.image_size[0]}x{data.image_size[1]} "
                        f"images but the model expects {config.model.channels}-channel "
                        f"{config.model.image_size[0]}x{config.model.image_size[1]}; "
                        "pass --image-size / --channels")
    if config.conditional:
        if data.labels is None:
            raise DataError(f"dataset {data.name!r} has no class labels; a class-conditional model needs them "
                            "(class subfolders, an .npz 'labels' array, or a labelled built-in dataset)")
        if len(data.labels) and not 0 <= int(data.labels.min()) <= int(data.labels.max()) < config.model.num_classes:
            raise DataError(f"dataset {data.name!r} has labels {int(data.labels.min())}..{int(data.labels.max())} "
                            f"but the model has num_classes = {config.model.num_classes}")
    world = distributed.env_world_size() if world_size is None else world_size
    global_batch = config.train.global_batch_size(world)
    if data.num_images < global_batch:
        what = (f"the batch size {global_batch}" if global_batch == config.train.batch_size else
                f"the global batch {global_batch} (--batch-size {config.train.batch_size} x {world} process(es) "
                f"x grad_accum {config.train.grad_accum})")
        raise DataError(f"dataset {data.name!r} has {data.num_images} images, fewer than {what}; lower --batch-size")


class EpochOrder:
    """Global batches of indices: one permutation per epoch seeded by (seed, epoch), last partial batch
    dropped; the same for any number of processes (each takes its rows of the global batch)."""

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


def rank_rows(batch_size: int, world_size: int, grad_accum: int, rank: int) -> torch.Tensor:
    """The rows of the global batch that ``rank`` trains on, micro-batch after micro-batch.

    The global batch of batch_size x world_size x grad_accum rows is cut into grad_accum chunks of
    batch_size x world_size rows (one micro-batch of every rank); rank r takes rows
    [r * batch_size, (r + 1) * batch_size) of each chunk. So two ranks with batch b cover exactly
    the rows one rank with batch 2b covers, micro-batch by micro-batch.
    """
    chunk = batch_size * world_size
    return torch.cat([torch.arange(a * chunk + rank * batch_size, a * chunk + (rank + 1) * batch_size)
                      for a in range(grad_accum)])



def lazy_reader(images: np.ndarray, num_images: int, global_batch: int, seed: int, mine: torch.Tensor,
                device: torch.device) -> BatchPrefetcher:
    """Reads this rank's rows (``mine`` of each global batch) of a memory-mapped dataset, a step ahead.

    The rows are those of :class:`EpochOrder` with the run's seed, so a lazy run trains on exactly
    the pixels an in-memory run does; the reader keeps an order of its own, since it runs on another
    thread. Pinned memory on CUDA lets the copy to the device overlap the step.
    """
    order, mine = EpochOrder(num_images, global_batch, seed), mine.cpu()
    return BatchPrefetcher(images, None, lambda step: order.batch(step)[mine].numpy(),
                           pin_memory=device.type == "cuda")

# ----------------------------------------------------------------------------- checkpoints of a run

def _prune_checkpoints(run_dir: Path, keep_last: int, milestone_every: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, sparing milestones."""
    if keep_last <= 0:
        return
    found = list_checkpoints(run_dir)
    for step, path in found[:-keep_last]:
        if not (milestone_every and step % milestone_every == 0):
            path.unlink(missing_ok=True)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files left by a process killed mid-save (the checkpoints themselves are intact)."""
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (work lost since the checkpoint a resume starts from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue                     # a line cut short by a crash
    atomic_write(path, lambda tmp: tmp.write_text("".join(x + "\n" for x in kept)))


@dataclass
class Counters:
    """Run state beyond the weights, saved in every checkpoint."""

    step: int = 0                 # optimizer steps done
    bad_steps: int = 0            # steps skipped for a non-finite loss or gradient, in total
    bad_in_row: int = 0           # ... and consecutively, up to now
    scaler_skips: int = 0         # fp16 steps the gradient scaler skipped (overflow while finding its scale)


# ----------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None        # None on ranks other than 0, which write nothing
    grid: Path | None
    final_loss: float
    seconds: float
    counters: Counters


class StopSignals:
    """Turn SIGINT / SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            # Ctrl-C under torchrun reaches a worker twice at once (from the terminal, and forwarded
            # by torchrun): that is still one request to stop after the step.
            if signum == self.received and time.monotonic() - self._received_at < 2.0:
                return
            raise KeyboardInterrupt                 # a second signal: stop at once
        self.received, self._received_at = signum, time.monotonic()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# The TensorBoard tag of each metrics.jsonl key, grouped as TensorBoard shows them (the JSONL keys
# stay as they are: other code reads them). elapsed_s is left out: every event carries its wall time.
TENSORBOARD_TAGS = {"loss": "loss/train", **{f"loss_q{q}": f"loss/q{q}" for q in range(4)}, "lr": "lr",
                    "grad_norm": "grad_norm", "images_per_s": "throughput/images_per_s",
                    "bad_steps": "health/bad_steps", "scaler_skips": "health/scaler_skips"}


@functools.cache
def _note_no_tensorboard(reason: str) -> None:
    """One line on stderr, once per process, instead of event files."""
    print(f"ddpm: note: {reason}, so no TensorBoard log is written (pip install 'ddpm[tensorboard]'); "
          "metrics.jsonl has every metric", file=sys.stderr)


def _tensorboard(run_dir: Path, purge_step: int | None = None, note: bool = True):
    """A TensorBoard writer on ``RUN_DIR/tensorboard``, or None without the tensorboard package (after
    a one-line note with ``note``). ``purge_step``: TensorBoard hides the events an earlier process
    logged at that step and later (the work a resumed run lost and does again), so no step shows twice."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:      # missing, or installed but broken (a protobuf it cannot use): the JSONL has all
        if note:
            _note_no_tensorboard("tensorboard is not installed" if isinstance(exc, ImportError) else
                                 f"tensorboard could not be loaded ({type(exc).__name__}: {exc})")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


def _draw_loss_curve(run_dir: Path) -> None:
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


def train(config: RunConfig, run_dir: str | os.PathLike, *, data: ImageData | None = None,
          resume: bool = False, progress: bool = True, loss: Loss | None = None, objective: Loss | None = None,
          stop: "StopSignals | None" = None) -> TrainResult:
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
    run = _set_up(config, Path(run_dir), data, resume, loss if loss is not None else objective, progress)
    log = _Log(run, progress)
    try:
        with contextlib.nullcontext(stop) if stop is not None else StopSignals() as stop:
            for step in range(run.counters.step, run.tc.steps):
                batch = _draw_batch(run, step)                       # Algorithm 1, lines 2-4
                per_sample = _forward_backward(run, batch)           # line 5: the gradient of the loss
                outcome = _agree(run, per_sample, stop)
                grad_norm = _optimizer_step(run, batch, per_sample, outcome)
                if _bookkeeping(run, log, batch, per_sample, outcome, grad_norm):
                    break
    except distributed.PeerLost as exc:
        raise distributed.PeerLost(f"{exc}; continue from the newest checkpoint with: ddpm train --resume "
                                   f"{run.run_dir}") from None
    finally:
        log.close()
        if run.reader is not None:
            run.reader.close()
    return _finish(run, log)


# ----------------------------------------------------------------------------- phase 1: set-up

@dataclass
class _Run:
    """Everything a run holds while its loop runs (set up once by :func:`_set_up`)."""

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
    counters: Counters
    ema: EMA | None                      # rank 0 alone keeps the moving average
    global_batch: int
    order: EpochOrder
    mine: torch.Tensor                   # this rank's rows of the global batch
    start_time: float
    ema_diffusion: GaussianDiffusion | None = None
    reader: BatchPrefetcher | None = None   # a memory-mapped dataset: this rank's rows, one step ahead

    @property
    def tc(self):
        return self.config.train

    @property
    def main(self) -> bool:
        return self.rank == 0


def _set_up(config: RunConfig, run_dir: Path, data: ImageData | None, resume: bool, loss: Loss | None,
            progress: bool = False) -> _Run:
    """Device, precision, data, model, optimizer, loss, EMA (restored when resuming), the run directory's files."""
    tc, start_time = config.train, time.time()
    world, rank = distributed.world_size(), distributed.rank()
    device = distributed.training_device(tc.device)
    chosen = None
    if tc.precision == "auto":                # what runs here; config.json and the checkpoints record it
        chosen = resolve_precision(tc.precision, device)
        tc = dataclasses.replace(tc, precision=chosen.precision)
        config = dataclasses.replace(config, train=tc)
    check_precision(device, tc.precision)
    torch.manual_seed(tc.seed)
    if data is None:
        data = load_training_data(config)
    else:
        check_training_data(config, data, world)
    lazy = data.lazy                                       # a prepared or Hub dataset stays on disk
    images = None if lazy else torch.from_numpy(data.images).to(device)
    labels = torch.from_numpy(data.labels).to(device) if config.conditional else None
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
    loss = loss if loss is not None else make_loss(config.diffusion, diffusion.schedule_on(device))
    global_batch = tc.global_batch_size(world)
    counters, ema = _restore_or_start(run_dir, config, model, optimizer, scaler, global_batch, resume, rank == 0,
                                      loss)
    run = _Run(config=config, run_dir=run_dir, world=world, rank=rank, device=device, data=data, images=images,
               labels=labels, diffusion=diffusion, model=model, net=_data_parallel(model, world, device),
               optimizer=optimizer, scaler=scaler, loss=loss, counters=counters, ema=ema, global_batch=global_batch,
               order=EpochOrder(data.num_images, global_batch, tc.seed),
               mine=rank_rows(tc.batch_size, world, tc.grad_accum, rank).to(device), start_time=start_time)
    if lazy:
        run.reader = lazy_reader(data.images, data.num_images, global_batch, tc.seed, run.mine, device)
    if run.main:
        if chosen is not None and progress:
            print(chosen.line(), file=sys.stderr)         # once the set-up has passed its checks
        # config.json first: from the moment the directory holds anything, --resume can restart it.
        write_json(run_dir / "config.json", config.to_dict())
        _remove_stale_temporaries(run_dir)
        _truncate_metrics(run_dir / "metrics.jsonl", counters.step)    # a fresh start (step 0) keeps none
        _append_provenance(run_dir, f"resume from step {counters.step}" if resume else "start")
        run.ema_diffusion = build_diffusion(config, ema.model)
    return run


def _restore_or_start(run_dir: Path, config: RunConfig, model: nn.Module, optimizer, scaler, global_batch: int,
                      resume: bool, main: bool, loss: Loss) -> tuple[Counters, EMA | None]:
    """The run state: restored from the newest checkpoint, or fresh (from ``init`` weights when given)."""
    tc = config.train
    with distributed.agree("loading the checkpoint"):
        if resume:
            return _restore(run_dir, config, model, optimizer, scaler, global_batch, keep_ema=main,
                            timestep_sampler=loss.timestep_sampler)
        if tc.init:
            _init_from(tc.init, model)
        return Counters(), EMA(model, tc.ema_decay, tc.ema_warmup) if main else None


def _data_parallel(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the U-Net under torchrun (the replicas start from rank 0's
    weights, and the backward pass averages their gradients); the U-Net itself in one process."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

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


def _draw_batch(run: _Run, step: int) -> _Batch:
    """The step's images, flips, timesteps, noise, label dropout and the loss's extras, in that order.

    All randomness comes from (seed, step), drawn for the whole global batch; this rank then keeps
    its rows (``run.mine``). The options that are off draw nothing.
    """
    tc, mine, device = run.tc, run.mine, run.device
    run.model.train()
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.config, step)
    step_seed = derive_seed(tc.seed, step, 0)
    torch.manual_seed(step_seed if run.rank == 0 else derive_seed(tc.seed, step, 0, run.rank))   # dropout
    g = torch.Generator(device=device).manual_seed(step_seed)    # flips, t, eps
    index = run.order.batch(step).to(device)
    shape = (index.shape[0], run.config.model.channels, *run.config.model.image_size)
    if run.reader is None:
        x = to_tensor_on_device(run.images[index[mine]])
    else:                               # the same rows, read from the memory map (ahead, on another thread)
        x = to_tensor_on_device(run.reader.get(step)[0].to(device, non_blocking=True))
    if run.config.data.hflip:
        flip = torch.rand(shape[0], generator=g, device=device)[mine] < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    t, t_weights = run.loss.draw_timesteps(shape[0], g, device)
    noise = torch.randn(shape, generator=g, device=device)
    y = None
    if run.labels is not None:          # drawn after the noise, so unconditional runs keep their random stream
        y = label_dropout(run.labels[index], run.config.model.num_classes, tc.label_dropout, g)[mine]
    noise, extras = run.loss.draw_extras(noise, g)
    return _Batch(step=step, x0=to_model_range(x), t=t[mine], t_weights=None if t_weights is None else t_weights[mine],
                  noise=noise[mine], y=y, extras={k: v[mine] for k, v in extras.items()})


def _forward_backward(run: _Run, batch: _Batch) -> torch.Tensor:
    """Per-sample losses of this rank's rows, micro-batch by micro-batch (gradient accumulation), with
    their gradient; DDP averages the gradients over the ranks in the last backward pass only."""
    tc, micro, scaler = run.tc, run.tc.batch_size, run.scaler
    run.optimizer.zero_grad(set_to_none=True)
    losses = []
    for a, i in enumerate(range(0, batch.x0.shape[0], micro)):
        rows = slice(i, i + micro)
        sync = contextlib.nullcontext() if run.world == 1 or a == tc.grad_accum - 1 else run.net.no_sync()
        kwargs = None if batch.y is None else {"y": batch.y[rows]}
        with sync, distributed.collective("a training step"):
            with autocast(run.device, tc.precision):
                per_sample = run.loss.losses(run.net, batch.x0[rows], batch.t[rows], batch.noise[rows],
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


def _agree(run: _Run, per_sample: torch.Tensor, stop: "StopSignals") -> _Outcome:
    """The global mean loss (so that every rank takes the same skip decision), any stop signal received
    by any rank, and the time limit: one small all-reduce per step with several ranks."""
    time_up = bool(run.tc.time_limit) and time.time() - run.start_time >= 60 * run.tc.time_limit
    if run.world == 1:
        return _Outcome(float(per_sample.mean()), time_up, stop.received)
    received = stop.received
    total, count, n_int, n_term, n_late = distributed.all_reduce_sum(
        [float(per_sample.double().sum()), per_sample.numel(), float(received == signal.SIGINT),
         float(received is not None and received != signal.SIGINT), float(time_up)], "a training step")
    signum = None if not (n_int or n_term) else (signal.SIGTERM if n_term else signal.SIGINT)
    return _Outcome(total / count, n_late > 0, signum)


def _optimizer_step(run: _Run, batch: _Batch, per_sample: torch.Tensor, outcome: _Outcome) -> float:
    """Clip the gradient and update (EMA, the loss's timestep histories), or skip a step whose loss or
    gradient is not finite; returns the gradient norm."""
    tc, scaler, counters = run.tc, run.scaler, run.counters
    if scaler:
        scaler.unscale_(run.optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                                     tc.grad_clip if tc.grad_clip > 0 else math.inf))
    if math.isfinite(outcome.loss) and (math.isfinite(grad_norm) or scaler):
        if scaler:
            scale = scaler.get_scale()
            scaler.step(run.optimizer)
            scaler.update()
            counters.scaler_skips += int(scaler.get_scale() < scale)
        else:
            run.optimizer.step()
        if run.ema is not None:
            run.ema.update(run.model)
        counters.bad_in_row = 0
        _observe(run, batch, per_sample)
    else:
        run.optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.update()
        counters.bad_steps += 1
        counters.bad_in_row += 1
        if counters.bad_in_row >= tc.max_bad_steps:
            last = list_checkpoints(run.run_dir)
            raise TrainingError(
                f"{counters.bad_in_row} steps in a row had a non-finite loss or gradient (step {batch.step + 1}: "
                f"loss {outcome.loss}, gradient norm {grad_norm}); training stopped. Last good checkpoint: "
                f"{last[-1][1] if last else 'none'}. Try a lower --lr, --grad-clip 1 or --precision fp32")
    counters.step = batch.step + 1
    return grad_norm


def _observe(run: _Run, batch: _Batch, per_sample: torch.Tensor) -> None:
    """The loss's one look at the step: (t, unweighted loss) of the whole global batch, in its row order
    (gathered from every rank, so every rank keeps the same importance-sampling histories)."""
    if run.loss.timestep_sampler is None:
        return
    t_all, loss_all = batch.t, per_sample
    if run.world > 1:
        by_row = torch.argsort(distributed.all_gather_cat(run.mine, "gathering the timestep losses"))
        t_all = distributed.all_gather_cat(batch.t, "gathering the timestep losses")[by_row]
        loss_all = distributed.all_gather_cat(per_sample.float(), "gathering the timestep losses")[by_row]
    run.loss.observe(t_all, loss_all)


# ----------------------------------------------------------------------------- phase 3: bookkeeping

class _Log:
    """Where a run reports: metrics.jsonl, TensorBoard, the progress bar or log lines (rank 0)."""

    def __init__(self, run: _Run, progress: bool):
        main = run.main
        self.progress = progress and main
        self.metrics_file = open(run.run_dir / "metrics.jsonl", "a", encoding="utf-8") if main else None
        # This process logs from step S + 1 on (S = 0 fresh, or the checkpoint's step): anything an
        # earlier process logged there is hidden, as metrics.jsonl dropped it (_truncate_metrics).
        first = run.counters.step + 1
        self.board = _tensorboard(run.run_dir, purge_step=first, note=self.progress) if main else None
        if self.board:
            self.board.add_text("config", _config_markdown(run.config), first)
        self.interactive = self.progress and sys.stderr.isatty()
        self.bar = tqdm(total=run.tc.steps, initial=run.counters.step, desc="training", unit="step",
                        disable=not self.interactive, dynamic_ncols=True)
        self.window = _Window()
        self.evaluator = _evaluator(run) if main else None
        self.best = _best_so_far(run) if self.evaluator is not None and run.tc.keep_best else None
        self.last_ckpt = self.grid = None
        self.loss = float("nan")

    def write(self, row: dict, step: int) -> None:
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.board:
            for key, value in row.items():
                if key in TENSORBOARD_TAGS and value is not None:
                    self.board.add_scalar(TENSORBOARD_TAGS[key], value, step)

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


def _bookkeeping(run: _Run, log: _Log, batch: _Batch, per_sample: torch.Tensor, outcome: _Outcome,
                 grad_norm: float) -> bool:
    """Metrics, progress, checkpoints, sample grids and evaluation after a step (files on rank 0 only);
    raises :class:`TrainingInterrupted` after a stop signal, returns True when the run is over early.
    With several ranks the loss is the global mean; its quartiles come from rank 0's rows."""
    tc, done = run.tc, run.counters.step
    final_step = done == tc.steps or outcome.time_up          # --time-limit ends the run like its last step
    log.loss = outcome.loss
    if run.main:
        log.window.add(per_sample, batch.t, run.config.diffusion.timesteps, grad_norm,
                       loss=None if run.world == 1 else outcome.loss, world=run.world)
        log.bar.update(1)
        log.bar.set_postfix(loss=f"{outcome.loss:.4f}", refresh=False)
        if done % tc.log_every == 0 or final_step:
            metrics = log.window.flush(done, lr_at(run.config, batch.step), run.global_batch, run.counters,
                                       run.start_time)
            log.write(metrics, done)
            if log.progress and not log.interactive:
                print(_log_line(done, tc.steps, metrics), file=sys.stderr, flush=True)
    if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or final_step or outcome.signum is not None:
        with distributed.agree("saving a checkpoint"):        # the others wait for rank 0's save
            if run.main:
                log.last_ckpt = _save(run, done)
                log.flush()
    if outcome.signum is not None:
        name = signal.Signals(outcome.signum).name
        raise TrainingInterrupted(f"{name} received: stopped after step {done} and saved {log.last_ckpt}; "
                                  f"continue with: ddpm train --resume {run.run_dir}", 128 + outcome.signum)
    if run.main and ((tc.sample_every and done % tc.sample_every == 0) or final_step):
        log.grid = _sample_grid(run, done, log.board)
    if run.main and log.evaluator is not None and (done % tc.eval_every == 0 or final_step):
        _evaluate(run, log, done)
    return outcome.time_up


def _save(run: _Run, step: int) -> Path:
    """A checkpoint of the whole run state at ``step``; older ones pruned, the loss curve redrawn."""
    path = save_checkpoint(checkpoint_path(run.run_dir, step), *_checkpoint_state(run, step))
    _prune_checkpoints(run.run_dir, run.tc.keep_last, run.tc.milestone_every)
    _draw_loss_curve(run.run_dir)
    return path


def _checkpoint_state(run: _Run, step: int) -> tuple[dict, dict]:
    """The tensors and metadata of a checkpoint of the whole run state at ``step``."""
    counters, scaler, data = run.counters, run.scaler, run.data
    optim_tensors, optim_info = flatten_optimizer_state(run.optimizer.state_dict())
    sampler = run.loss.timestep_sampler
    tensors = {**{f"model.{k}": v for k, v in run.model.state_dict().items()},
               **{f"ema.{k}": v for k, v in run.ema.model.state_dict().items()}, **optim_tensors,
               **(sampler.state_tensors() if sampler else {})}
    meta = {"step": step, "config": run.config.to_dict(), "ema_updates": run.ema.num_updates, "optimizer": optim_info,
            "counters": vars(counters), "scaler": scaler.state_dict() if scaler else None,
            "dataset": data.name, "num_images": data.num_images, "data_position": step * run.global_batch,
            "global_batch": run.global_batch, "world_size": run.world, "rng": _rng_states()}
    return tensors, meta


def _sample_grid(run: _Run, step: int, board=None) -> Path:
    """EMA and raw weights side by side, from one fixed seed (a generator of its own); with a
    TensorBoard ``board`` each grid is also logged as an image (``samples/ema``, ``samples/raw``).
    A class-conditional model gives each class whole rows (:func:`ddpm.images.class_grid_layout`),
    labelled with its name, with guidance."""
    tc, config = run.tc, run.config
    seed = derive_seed(tc.seed, 2)
    n, cond, nrow, rows = tc.num_samples, {}, None, None
    if config.conditional:
        labels, nrow = class_grid_layout(config.model.num_classes, tc.num_samples)
        n, cond = len(labels), {"labels": labels, "guidance_scale": DEFAULT_GUIDANCE_SCALE}
        names = config.model.class_names
        rows = [names[c] if names else str(c) for c in labels[::nrow]]
    grids = [make_grid(generate(d, n, batch_size=n, seed=seed, progress=False, **cond), nrow=nrow)
             for d in (run.ema_diffusion, run.diffusion.eval())]
    if rows:
        grids = [label_rows(grid, rows) for grid in grids]
    if board:
        for name, grid in zip(("ema", "raw"), grids):
            rgb = np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid
            board.add_image(f"samples/{name}", rgb, step, dataformats="HWC")
    return save_png(run.run_dir / "samples" / f"step-{step:07d}.png", side_by_side(grids, ["EMA", "raw"]))


def _config_markdown(config: RunConfig) -> str:
    """The run's resolved config (as in config.json) as a Markdown code block, for TensorBoard's text tab."""
    return "```json\n" + json.dumps(config.to_dict(), indent=2) + "\n```"


def _evaluator(run: _Run):
    """The metric of --eval-every, built once with its network and reference statistics (cached), or None.

    The reference is the dataset's test split in the model's size and channels (ddpm.evaluation.training).
    """
    tc = run.tc
    if not tc.eval_every:
        return None
    from .evaluation.training import TrainingEvaluator

    d, m = run.config.data, run.config.model
    metric = tc.evaluation_metric(m.channels, m.image_size)
    return TrainingEvaluator.build(metric, d.name, data_root=d.root, image_size=d.image_size, channels=d.channels,
                                   inception_weights=tc.inception_weights or None, device=str(run.device))


def _evaluate(run: _Run, log: _Log, step: int) -> None:
    """EMA samples drawn with DPM-Solver++ in 25 steps, scored; logged to metrics.jsonl, TensorBoard
    (``eval/<key>``) and one console line; with --keep-best, the checkpoint kept when it is the best so far."""
    tc = run.tc
    images = generate(run.ema_diffusion, tc.eval_samples, batch_size=min(tc.eval_samples, 256),
                      seed=derive_seed(tc.seed, 3), progress=False, sampler="dpm-solver++", steps=25)
    scores = log.evaluator(images)
    log.metrics_file.write(json.dumps({"step": step, **scores}) + "\n")
    log.metrics_file.flush()
    if log.board:
        for key, value in scores.items():
            log.board.add_scalar(f"eval/{key}", value, step)
    if log.progress:
        line = f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
        (log.bar.write(line, file=sys.stderr) if log.interactive else print(line, file=sys.stderr, flush=True))
    if tc.keep_best:
        _keep_best(run, log, step, scores)


BEST_CHECKPOINT = "best.safetensors"        # in checkpoints/; not a step-NNNNNNN file, so never pruned


def _keep_best(run: _Run, log: _Log, step: int, scores: dict) -> None:
    """Save checkpoints/best.safetensors when the headline value beats the best so far (its metadata says so)."""
    from .evaluation.training import is_better

    value = float(scores[log.evaluator.headline])
    if not is_better(log.evaluator.metric, value, log.best):
        return
    tensors, meta = _checkpoint_state(run, step)
    meta["best"] = {"metric": log.evaluator.headline, "value": value, "step": step}
    save_checkpoint(run.run_dir / "checkpoints" / BEST_CHECKPOINT, tensors, meta)
    log.best = value


def _best_so_far(run: _Run) -> float | None:
    """The value of a resumed run's best checkpoint for the same metric, else None."""
    from .checkpoint import read_metadata
    from .evaluation.training import HEADLINE

    path = run.run_dir / "checkpoints" / BEST_CHECKPOINT
    if not path.is_file():
        return None
    best = read_metadata(path).get("best") or {}
    metric = run.tc.evaluation_metric(run.config.model.channels, run.config.model.image_size)
    return best.get("value") if best.get("metric") == HEADLINE[metric][0] else None


def _finish(run: _Run, log: _Log) -> TrainResult:
    """The final checkpoint and grid (drawn when the last step did not draw one), copied to samples.png."""
    seconds = time.time() - run.start_time
    if not run.main:
        return TrainResult(run_dir=run.run_dir, checkpoint=None, grid=None, final_loss=log.loss, seconds=seconds,
                           counters=run.counters)
    last_ckpt = log.last_ckpt
    if last_ckpt is None:           # resumed a run that was already complete
        last_ckpt = list_checkpoints(run.run_dir)[-1][1]
    grid = log.grid if log.grid is not None else _sample_grid(run, run.counters.step)
    final_grid = atomic_write(run.run_dir / "samples.png", lambda tmp: shutil.copyfile(grid, tmp))
    return TrainResult(run_dir=run.run_dir, checkpoint=last_ckpt, grid=final_grid, final_loss=log.loss,
                       seconds=time.time() - run.start_time, counters=run.counters)


class _Window:
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
        q = (t * 4 // T).cpu()
        self.q_sum.index_add_(0, q, per_sample.double().cpu())
        self.q_count.index_add_(0, q, torch.ones_like(q, dtype=torch.float64))

    def flush(self, step: int, lr: float, batch_size: int, counters: Counters, start_time: float) -> dict:
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


def _log_line(step: int, total: int, metrics: dict) -> str:
    loss = "n/a" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
    return (f"step {step}/{total}  loss {loss}  grad norm {metrics['grad_norm']:.3f}  "
            f"{metrics['images_per_s']:.0f} img/s")


def _rng_states() -> dict:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) as JSON-able lists.

    The loop reseeds itself from (seed, step), so it does not need them; they are saved and
    restored so that any other randomness (a user's callback, say) also resumes where it was.
    """
    import random

    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"python": [version, list(state), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _set_rng_states(states: dict) -> None:
    import random

    if not states:
        return
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and len(states.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


def _init_from(checkpoint: str, model: nn.Module) -> None:
    """Fine-tuning: start from another run's EMA weights (the architecture must match)."""
    tensors, meta = load_checkpoint(checkpoint)
    load_weights(model, tensors, "ema", meta["path"])


def _match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Lay restored optimizer moments out like their parameters (e.g. channels-last).

    ``load_state_dict`` keeps the checkpoint's contiguous layout, but the fused Adam step reads a
    parameter and its moments element by element in memory order, so the two must agree.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _restore(run_dir: Path, config: RunConfig, model: nn.Module, optimizer, scaler, global_batch: int,
             keep_ema: bool = True, timestep_sampler: ImportanceSampler | None = None) -> tuple[Counters, EMA | None]:
    """Load weights, EMA (when ``keep_ema``), optimizer, counters (and the timestep sampler's state)
    from the newest checkpoint of ``run_dir``."""
    loaded = load_newest_verified(run_dir, warn=lambda message: None)   # the CLI has warned already
    if loaded is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from")
    tensors, meta = loaded
    saved_batch = checkpoint_global_batch(meta)
    if saved_batch != global_batch:
        tc = config.train
        raise ConfigError(f"{meta['path']} was trained with a global batch of {saved_batch} images, but this run "
                          f"would use {global_batch} (batch size {tc.batch_size} x {global_batch // tc.global_batch_size()} "
                          f"process(es) x grad_accum {tc.grad_accum}); per-process batch "
                          f"{saved_batch} / (processes x grad_accum) keeps it")
    load_weights(model, tensors, "model", meta["path"])
    ema = None
    if keep_ema:
        ema = EMA(model, config.train.ema_decay, config.train.ema_warmup)
        load_weights(ema.model, tensors, "ema", meta["path"])
        ema.num_updates = int(meta.get("ema_updates", 0))
    try:
        # Tensors stay on the CPU: load_state_dict moves moments to the parameters' device and
        # keeps Adam's step counters where the optimizer expects them.
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{meta['path']}: the optimizer state does not fit ({exc})") from None
    _match_parameter_layout(optimizer)
    if scaler and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    if timestep_sampler is not None:
        timestep_sampler.load_state_tensors(tensors, meta["path"])
    _set_rng_states(meta.get("rng"))
    return Counters(**meta.get("counters", {"step": meta["step"]})), ema
