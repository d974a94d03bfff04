"""What a training run changes from step to step, and how a checkpoint gives it back.

The fixed set-up (configuration, model, optimizer, data) is built once by :mod:`ddpm.train`; the
state here is what moves: the :class:`Counters` saved in every checkpoint, the moving averages of the
weights (rank 0: an :class:`ddpm.ema.EMABank`, one average per decay, and with snapshots on a
:class:`ddpm.posthoc_ema.PowerEMA`), the global RNG states, and the best evaluation score so far.
:func:`restore` loads the newest checkpoint of a run directory into the model, optimizer and state.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed
from .checkpoint import load_checkpoint, load_newest_verified, load_weights, read_metadata, unflatten_optimizer_state
from .config import RunConfig
from .ema import EMABank
from .posthoc_ema import PowerEMA, list_snapshots, sigma_rel_to_gamma
from .resolve import checkpoint_global_batch
from .errors import CheckpointError, ConfigError
from .gaussian_diffusion import GaussianDiffusion
from .timestep_sampling import ImportanceSampler

__all__ = ["EMA", "Counters", "State", "restore", "restore_or_start", "init_from", "match_parameter_layout",
           "rng_states", "set_rng_states", "BEST_CHECKPOINT", "best_so_far", "averages", "drop_snapshots_after"]


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


@dataclass
class Counters:
    """Run state beyond the weights, saved in every checkpoint."""

    step: int = 0                 # optimizer steps done
    bad_steps: int = 0            # steps skipped for a non-finite loss or gradient, in total
    bad_in_row: int = 0           # ... and consecutively, up to now
    scaler_skips: int = 0         # fp16 steps the gradient scaler skipped (overflow while finding its scale)


@dataclass
class State:
    """What the loop changes: counters, the averages (rank 0 alone keeps them), and what the run has produced."""

    counters: Counters
    ema: EMABank | None                              # ema_decay's average first (the default weights), then the others
    power_ema: PowerEMA | None = None                # the post-hoc EMA profiles (--ema-snapshot-every)
    ema_diffusion: GaussianDiffusion | None = None   # around the EMA weights (sample grids, evaluation)
    best: float | None = None                        # the best evaluation value so far (--keep-best)
    loss: float = float("nan")                       # the last step's global mean loss
    last_checkpoint: Path | None = None
    grid: Path | None = None                         # the last sample grid drawn


def rng_states() -> dict:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) as JSON-able lists.

    The loop reseeds itself from (seed, step), so it does not need them; they are saved and
    restored so that any other randomness (a user's callback, say) also resumes where it was.
    """
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"python": [version, list(state), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` saved (nothing when ``states`` is empty)."""
    if not states:
        return
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and len(states.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


def init_from(checkpoint: str, model: nn.Module) -> None:
    """Fine-tuning: start from another run's EMA weights (the architecture must match)."""
    tensors, meta = load_checkpoint(checkpoint)
    load_weights(model, tensors, "ema", meta["path"])


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
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


def _check_global_batch(meta: dict, config: RunConfig, global_batch: int) -> None:
    """Refuse a checkpoint trained with another global batch (its data position would not fit)."""
    saved_batch = checkpoint_global_batch(meta)
    if saved_batch != global_batch:
        tc = config.train
        raise ConfigError(f"{meta['path']} was trained with a global batch of {saved_batch} images, but this run "
                          f"would use {global_batch} (batch size {tc.batch_size} x {global_batch // tc.global_batch_size()} "
                          f"process(es) x grad_accum {tc.grad_accum}); per-process batch "
                          f"{saved_batch} / (processes x grad_accum) keeps it")


def averages(config: RunConfig, model: nn.Module) -> tuple[EMABank, PowerEMA | None]:
    """The run's moving averages of ``model``, fresh: one per EMA decay, and the post-hoc profiles when
    snapshots are on."""
    tc = config.train
    bank = EMABank(model, (tc.ema_decay, *tc.ema_extra_decays), tc.ema_warmup)
    if not tc.ema_snapshot_every:
        return bank, None
    return bank, PowerEMA(model, [sigma_rel_to_gamma(s) for s in tc.ema_profiles])


def drop_snapshots_after(run_dir: Path, step: int) -> None:
    """Delete the post-hoc EMA snapshots newer than ``step`` (the run continues from there and writes them again)."""
    for s, path in list_snapshots(run_dir):
        if s > step:
            path.unlink(missing_ok=True)


def restore(run_dir: Path, config: RunConfig, model: nn.Module, optimizer, scaler, global_batch: int,
            keep_ema: bool = True, timestep_sampler: ImportanceSampler | None = None) -> State:
    """Load weights, averages (when ``keep_ema``), optimizer, counters (and the timestep sampler's state)
    from the newest checkpoint of ``run_dir``; snapshots newer than it are deleted."""
    loaded = load_newest_verified(run_dir, warn=lambda message: None)   # the CLI has warned already
    if loaded is None:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from")
    tensors, meta = loaded
    _check_global_batch(meta, config, global_batch)
    load_weights(model, tensors, "model", meta["path"])
    bank = power = None
    if keep_ema:
        bank, power = averages(config, model)
        bank.load_state_tensors(tensors, meta["path"])
        bank.num_updates = int(meta.get("ema_updates", 0))
        if power is not None:
            power.load_state_tensors(tensors, meta["path"])
            drop_snapshots_after(run_dir, meta["step"])
    try:
        # Tensors stay on the CPU: load_state_dict moves moments to the parameters' device and
        # keeps Adam's step counters where the optimizer expects them.
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{meta['path']}: the optimizer state does not fit ({exc})") from None
    match_parameter_layout(optimizer)
    if scaler and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    if timestep_sampler is not None:
        timestep_sampler.load_state_tensors(tensors, meta["path"])
    set_rng_states(meta.get("rng"))
    return State(Counters(**meta.get("counters", {"step": meta["step"]})), bank, power)


def restore_or_start(run_dir: Path, config: RunConfig, model: nn.Module, optimizer, scaler, global_batch: int,
                     resume: bool, main: bool, timestep_sampler: ImportanceSampler | None) -> State:
    """The run state: restored from the newest checkpoint, or fresh (from ``init`` weights when given)."""
    tc = config.train
    with distributed.agree("loading the checkpoint"):
        if resume:
            return restore(run_dir, config, model, optimizer, scaler, global_batch, keep_ema=main,
                           timestep_sampler=timestep_sampler)
        if tc.init:
            init_from(tc.init, model)
        if not main:
            return State(Counters(), None)
        drop_snapshots_after(run_dir, 0)               # a run started again from step 0 snapshots anew
        return State(Counters(), *averages(config, model))


BEST_CHECKPOINT = "best.safetensors"        # in checkpoints/; not a step-NNNNNNN file, so never pruned


def best_so_far(run_dir: Path, headline: str) -> float | None:
    """The value of a resumed run's best checkpoint for the same ``headline`` metric, else None."""
    path = run_dir / "checkpoints" / BEST_CHECKPOINT
    if not path.is_file():
        return None
    best = read_metadata(path).get("best") or {}
    return best.get("value") if best.get("metric") == headline else None
