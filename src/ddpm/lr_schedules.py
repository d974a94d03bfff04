"""Learning-rate schedules: a linear warm-up, then constant, cosine, linear or inverse-square-root decay.

The learning rate of optimizer step ``step`` (0-based, like the training loop's counter) is a pure
function of the step, so a resumed run continues with exactly the rates an uninterrupted one uses.

* warm-up (steps ``0 .. W-1``, W = ``warmup_steps``): lr (step + 1) / W, the same float operations
  as the loop always used, so ``constant`` keeps earlier runs bit for bit;
* then, with p = (step - W) / (S - W) the fraction of the post-warm-up steps done (S = ``total_steps``):

  - ``constant``: lr;
  - ``cosine`` (Loshchilov & Hutter 2017, SGDR Eq. 5 without restarts): lr_min + (lr - lr_min) (1 + cos(pi p)) / 2;
  - ``linear``: lr - (lr - lr_min) p;
  - ``inverse-sqrt`` (the learning-rate decay of Karras et al. 2024, EDM2): lr / sqrt(max(step / t_ref, 1)), t_ref =
    ``ref_steps``; by default t_ref = W, which is the schedule of Vaswani et al. 2017 (Eq. 3).

p reaches 1 at ``step = S``, one past the last step, so the last step's rate is just above ``lr_min``
rather than a wasted step at it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["LR_SCHEDULES", "LRSchedule", "lr_at", "schedule_from_train_config"]

LR_SCHEDULES = ("constant", "cosine", "linear", "inverse-sqrt")


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule, validated when built; ``schedule(step)`` is the rate of 0-based ``step``."""

    lr: float                       # peak learning rate (reached at the end of warm-up)
    warmup_steps: int = 0           # linear warm-up from lr / W to lr over the first W steps
    name: str = "constant"          # constant | cosine | linear | inverse-sqrt
    total_steps: int | None = None  # S: cosine and linear reach lr_min at step S (needed by those two)
    lr_min: float = 0.0             # floor of cosine and linear
    ref_steps: int | None = None    # t_ref of inverse-sqrt (default: warmup_steps, at least 1)

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ConfigError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.name!r}")
        if not _is_number(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"learning rate must be a finite number > 0; got {self.lr!r}")
        if not _is_count(self.warmup_steps):
            raise ConfigError(f"warmup steps must be an integer >= 0; got {self.warmup_steps!r}")
        if not _is_number(self.lr_min) or not math.isfinite(self.lr_min) or not 0 <= self.lr_min <= self.lr:
            raise ConfigError(f"lr min must be a finite number in [0, lr = {self.lr:g}]; got {self.lr_min!r}")
        if self.name in ("cosine", "linear"):
            if not _is_count(self.total_steps) or self.total_steps <= self.warmup_steps:
                raise ConfigError(f"the {self.name} lr schedule needs total steps > warmup steps "
                                  f"({self.warmup_steps}); got {self.total_steps!r}")
        if self.ref_steps is not None and (not _is_count(self.ref_steps) or self.ref_steps < 1):
            raise ConfigError(f"lr reference steps must be an integer >= 1; got {self.ref_steps!r}")

    def __call__(self, step: int) -> float:
        return lr_at(step, self.lr, warmup_steps=self.warmup_steps, name=self.name, total_steps=self.total_steps,
                     lr_min=self.lr_min, ref_steps=self.ref_steps)


def lr_at(step: int, lr: float, *, warmup_steps: int = 0, name: str = "constant", total_steps: int | None = None,
          lr_min: float = 0.0, ref_steps: int | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based); see the module docstring for the formulas.

    Unvalidated: build an :class:`LRSchedule` to check the arguments once.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps           # linear warm-up, as the loop has always computed it
    if name == "constant":
        return lr
    if name == "inverse-sqrt":
        t_ref = ref_steps if ref_steps is not None else max(warmup_steps, 1)
        return lr / math.sqrt(max(step / t_ref, 1.0))    # EDM2's inverse square-root decay
    p = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    if name == "cosine":
        return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))   # SGDR Eq. 5
    if name == "linear":
        return lr - (lr - lr_min) * p
    raise ValueError(f"unknown lr schedule {name!r}")


def schedule_from_train_config(tc) -> LRSchedule:
    """The schedule a :class:`ddpm.config.TrainConfig` asks for (fields it lacks take the constant schedule's
    defaults, so a configuration without them trains as before)."""
    return LRSchedule(lr=tc.lr, warmup_steps=tc.warmup_steps, name=getattr(tc, "lr_schedule", "constant"),
                      total_steps=tc.steps, lr_min=getattr(tc, "lr_min", 0.0),
                      ref_steps=getattr(tc, "lr_ref_steps", 0) or None)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
