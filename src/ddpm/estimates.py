"""Estimates of what a run costs before it runs: its memory and its time.

:func:`check_training_memory` refuses a run whose lower-bound memory
(:func:`training_bytes_at_least`) exceeds the device's, before anything is built;
:func:`estimate_seconds_per_step` times the run's own optimizer step (its batch, gradient accumulation,
model flags and precision) on the device, a median of repeats after a warm-up, for the line printed with an
automatic choice (:func:`choice_line`, :func:`ddpm.recipes.choose`), which describes the run after every
override, for the warning before a run estimated to last over a day (:func:`long_run_warning`), and for the
warning before a time limit cuts a decaying learning rate short (:func:`decay_cut_short_warning`).
``benchmarks/estimates.py`` records these estimates against measured training times.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from .build import build_diffusion, model_bytes
from .config import RunConfig
from .device import check_fits
from .lr_schedules import schedule_from_train_config
from .precision import autocast, channels_last, resolve_precision
from .training_state import EMA

__all__ = ["training_bytes_at_least", "check_training_memory", "estimate_seconds_per_step", "format_duration",
           "choice_line", "run_words", "median_seconds", "training_step", "LONG_RUN_SECONDS", "MIN_TIMED_IMAGES",
           "worth_timing", "long_run_warning", "decay_cut_short_warning", "duration_lines"]

# A run estimated to last longer than this says so before it starts: a warning, not a refusal (long
# runs are legitimate; the user may have meant fewer steps or a smaller model, or may want --time-limit).
LONG_RUN_SECONDS = 24 * 3600
# The share of a cosine or linear decay a time limit may leave undone before a run says so before it starts.
DECAY_LEFT_WARNED = 0.1
# Runs of fewer images x steps than this are not timed: to last a day, each image would need more than
# 8.6 s per step, which no model that passes the memory check takes.
MIN_TIMED_IMAGES = 10_000


def training_bytes_at_least(config: RunConfig) -> int:
    """A lower bound on training memory: weights, gradients, Adam's two moments and the EMA (5 copies
    of the parameters), plus the activations of the top level's residual blocks kept for the backward pass."""
    m, tc = config.model, config.train
    positions = math.prod(m.image_size)            # H x W, or L for sequences
    blocks = 1 if tc.grad_checkpointing else 2 * m.num_res_blocks + 1
    activations = 4 * tc.batch_size * m.dim * m.dim_mults[0] * positions * blocks
    return 5 * model_bytes(config) + activations


def check_training_memory(config: RunConfig, device) -> None:
    """Refuse, before anything is built, a run whose lower-bound memory exceeds the device's."""
    check_fits(training_bytes_at_least(config), device, "training this model takes")


def estimate_seconds_per_step(config: RunConfig, device: torch.device, *, timer: Callable[[], float] = time.perf_counter,
                              budget_s: float = 20.0, make_step: Callable | None = None) -> float:
    """Seconds per optimizer step of the run ``config`` describes, on ``device``: its micro-batch, its
    gradient accumulation, its model flags and precision, timed by :func:`median_seconds`.

    ``make_step(config, device)`` builds the step to time (default :func:`training_step`; a test passes a
    fake one with a fake ``timer``)."""
    step = (make_step or training_step)(config, device)
    return median_seconds(step, timer=timer, budget_s=budget_s)


def median_seconds(step: Callable[[], None], *, timer: Callable[[], float] = time.perf_counter,
                   budget_s: float = 20.0, max_repeats: int = 7) -> float:
    """The median time of ``step`` after one untimed warm-up (allocations, kernel choice): repeated until
    two consecutive timings agree within 10 %, ``max_repeats`` are taken or ``budget_s`` seconds are spent
    (at least two timings, one when a single step takes half the budget, none when the warm-up alone
    exceeds it: then the warm-up's time is the estimate)."""
    began = timer()
    step()                                            # warm-up
    if timer() - began >= budget_s:                   # a step longer than the budget: its one-off costs are small
        return timer() - began
    times: list[float] = []
    while len(times) < max_repeats:
        start = timer()
        step()
        times.append(timer() - start)
        if len(times) >= 2 and abs(times[-1] - times[-2]) <= 0.1 * max(times[-1], times[-2]):
            break
        if timer() - began >= budget_s and len(times) >= (1 if times[0] >= budget_s / 2 else 2):
            break
    return statistics.median(times)


def training_step(config: RunConfig, device: torch.device) -> Callable[[], None]:
    """One optimizer step as the run takes it: ``grad_accum`` forward and backward passes of ``batch_size``
    random images under the run's precision (autocast, channels-last, fp16 loss scaling), gradient
    checkpointing as configured, then the gradient clipping, the fused Adam update and the EMA update."""
    tc = config.train
    precision = resolve_precision(tc.precision, device).precision if tc.precision == "auto" else tc.precision
    diffusion = build_diffusion(config).to(device).train()
    model = diffusion.model
    model.gradient_checkpointing = tc.grad_checkpointing
    if channels_last(device, precision, training=True):
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    x = torch.rand(tc.batch_size, config.model.channels, *config.model.image_size, device=device)
    kwargs = {"model_kwargs": {"y": torch.zeros(tc.batch_size, dtype=torch.long, device=device)}} \
        if config.conditional else {}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(tc.grad_accum):
            with autocast(device, precision):
                loss = diffusion(x, **kwargs) / tc.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        ema.update(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def format_duration(seconds: float) -> str:
    """``"about 3 min"``, ``"about 2.5 h"``, ``"about 4 days"``."""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"about {seconds / 3600:.1f} h"
    return f"about {seconds / 86400:.0f} days"


def run_words(config: RunConfig, device: torch.device | None = None) -> str:
    """The run in words, after every override: ``"10 steps at batch 50 (x2 accumulated), precision fp32"``."""
    tc = config.train
    precision = tc.precision
    if precision == "auto" and device is not None:
        precision = resolve_precision(precision, device).precision
    accum = f" (x{tc.grad_accum} accumulated)" if tc.grad_accum > 1 else ""
    return f"{tc.steps:,} steps at batch {tc.batch_size}{accum}, precision {precision}"


def choice_line(reason: str, config: RunConfig, seconds_per_step: float | None, device: torch.device | str) -> str:
    """The one line that says what was chosen (``reason``, :attr:`ddpm.recipes.AutoChoice.reason`), the run
    that will happen (``config``: the choice after every override), about how long it takes on ``device``
    (``seconds_per_step`` x its steps), and how to override it."""
    device = torch.device(device)
    estimate = (f", {format_duration(seconds_per_step * config.train.steps)} on {device.type}"
                if seconds_per_step is not None else "")
    return (f"ddpm: no --preset given: chose for {reason}; this run: {run_words(config, device)}{estimate} "
            f"(override with --preset, --steps, --batch-size or a model flag such as --dim)")


def worth_timing(config: RunConfig) -> bool:
    """Whether a run is long enough in images x steps that it could last a day (:data:`MIN_TIMED_IMAGES`)."""
    tc = config.train
    return tc.steps * tc.batch_size * tc.grad_accum >= MIN_TIMED_IMAGES


def long_run_warning(config: RunConfig, seconds_per_step: float, device: str) -> str | None:
    """A warning line when ``config.train.steps`` steps take over :data:`LONG_RUN_SECONDS`, unless a time
    limit of at most a day stops the run first; else None."""
    total = seconds_per_step * config.train.steps
    limit = config.train.time_limit * 60
    if total <= LONG_RUN_SECONDS or 0 < limit <= LONG_RUN_SECONDS:
        return None
    return (f"ddpm: warning: this run is estimated to take {format_duration(total)} on {device} "
            f"({config.train.steps:,} steps of about {seconds_per_step:.3g} s); --time-limit MINUTES stops it in "
            "time, or choose fewer --steps, a smaller --batch-size or a smaller model")


def decays_within_time_limit(config: RunConfig) -> bool:
    """Whether the run's learning rate decays over ``--steps`` (cosine, linear) and a time limit may stop it first."""
    return config.train.lr_schedule in ("cosine", "linear") and config.train.time_limit > 0


def decay_cut_short_warning(config: RunConfig, seconds_per_step: float, device: str) -> str | None:
    """A warning line when ``--time-limit`` is estimated to stop the run with more than :data:`DECAY_LEFT_WARNED`
    of its cosine or linear decay undone (the decay spans ``--steps``, which the time limit does not change);
    else None. The line names the ``--steps`` that would decay within the limit."""
    tc = config.train
    if not decays_within_time_limit(config):
        return None
    reached = int(60 * tc.time_limit / seconds_per_step)       # steps done when the limit stops the run
    if reached >= tc.steps:
        return None
    rate = schedule_from_train_config(tc)(max(reached - 1, 0))          # the last step's
    left = (rate - tc.lr_min) / (tc.lr - tc.lr_min) if tc.lr > tc.lr_min else 0.0
    if left <= DECAY_LEFT_WARNED:
        return None
    fits = f"give --steps {reached:,} to decay within the limit" if reached > tc.warmup_steps else \
        "the limit ends within the warm-up: give a longer --time-limit"
    return (f"ddpm: warning: --time-limit {tc.time_limit:g} is estimated to stop this run at about step {reached:,} "
            f"of {tc.steps:,} (about {seconds_per_step:.3g} s a step on {device}), with the {tc.lr_schedule} learning "
            f"rate still at {100 * rate / tc.lr:.0f}% of its peak: it decays over --steps; "
            f"{fits}")


def duration_lines(config: RunConfig, device: torch.device, *, dry_run: bool = False) -> list[str]:
    """The lines ``ddpm train`` prints before a new run: the automatic choice's (with its estimate), the
    warning of a run estimated at over a day and that of a decay a time limit cuts short, each ending in a
    newline. The run is timed on the device only when it could be that long (:func:`worth_timing`) or
    its time limit could cut a decay short (:func:`decays_within_time_limit`), and not for a dry run
    without a choice."""
    timed = config.choice or ((worth_timing(config) or decays_within_time_limit(config)) and not dry_run)
    seconds_per_step = estimate_seconds_per_step(config, device) if timed else None
    lines = [choice_line(config.choice, config, seconds_per_step, device.type)] if config.choice else []
    if seconds_per_step is not None:
        lines += [warning for warning in (long_run_warning(config, seconds_per_step, device.type),
                                          decay_cut_short_warning(config, seconds_per_step, device.type)) if warning]
    return [line + "\n" for line in lines]
