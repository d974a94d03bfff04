"""Several exponential moving averages of the weights at once, one per decay, and choosing among them.

Each average follows the rule of :class:`ddpm.train.EMA` (Ho et al. 2020 keep one with decay 0.9999;
improved-diffusion's ``ema_rate`` keeps a list):

    shadow <- d_n shadow + (1 - d_n) param,   d_n = min(decay, (1 + n) / (10 + n)) after n updates
                                              (d_n = decay without warm-up);

buffers are copied as they are. With one decay an :class:`EMABank` is bit for bit that class.

In a checkpoint the first decay's tensors keep their old names ``ema.<name>`` (so every earlier
checkpoint loads, and the first decay is the default weights); each further decay D is stored as
``ema@D.<name>``, D written as Python's shortest round-trip float (``ema@0.999.<name>``).
:func:`select_weights` turns ``raw``, ``ema`` or ``ema:D`` into the prefix to load.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence

import torch
from torch import nn

from .checkpoint import split_prefix
from .checkpoint_schema import ema_decay_of_key
from .errors import CheckpointError, ConfigError

__all__ = ["EMABank", "check_decays", "ema_prefix", "decays_in", "first_decay", "select_weights", "parse_weights"]


def check_decays(decays: Iterable[float]) -> tuple[float, ...]:
    """The decays as floats, each in [0, 1] (0: the raw weights; 1: the initial weights, kept), none twice;
    otherwise one line naming the bad value."""
    if isinstance(decays, (int, float)):
        decays = (decays,)
    out = []
    for d in decays:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or not 0.0 <= d <= 1.0:
            raise ConfigError(f"EMA decay must be a number in [0, 1]; got {d!r}")
        if float(d) in out:
            raise ConfigError(f"EMA decay {float(d)!r} is given twice")
        out.append(float(d))
    if not out:
        raise ConfigError("give at least one EMA decay")
    return tuple(out)


def ema_prefix(decay: float, first: bool) -> str:
    """The checkpoint prefix of a decay's tensors: ``ema`` for the first, ``ema@D`` for the others."""
    return "ema" if first else f"ema@{float(decay)!r}"


class EMABank:
    """One exponential moving average per decay, all updated together; ``models[i]`` follows ``decays[i]``.

    ``model`` is the first decay's average, the default weights.
    """

    def __init__(self, model: nn.Module, decays: Sequence[float] | float = (0.9999,), warmup: bool = True):
        self.decays, self.warmup, self.num_updates = check_decays(decays), warmup, 0
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.decays]

    @property
    def model(self) -> nn.Module:
        return self.models[0]

    def current_decay(self, decay: float) -> float:
        """d_n for this decay after ``num_updates`` updates (the warm-up of :class:`ddpm.train.EMA`)."""
        if not self.warmup:
            return decay
        return min(decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        names = list(params)
        sources = [params[n].detach() for n in names]
        for decay, average in zip(self.decays, self.models):
            ema_params, ema_buffers = dict(average.named_parameters()), dict(average.named_buffers())
            if ema_params.keys() != params.keys() or ema_buffers.keys() != buffers.keys():
                raise ValueError("EMA and model have different parameter or buffer names")
            torch._foreach_lerp_([ema_params[n] for n in names], sources, 1.0 - self.current_decay(decay))
            for name, b in buffers.items():
                ema_buffers[name].copy_(b)
        self.num_updates += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every average's state dict under its prefix (``ema.*``, ``ema@D.*``), for a checkpoint."""
        return {f"{ema_prefix(d, i == 0)}.{k}": v for i, (d, m) in enumerate(zip(self.decays, self.models))
                for k, v in m.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: str) -> None:
        """Load every average from a checkpoint's tensors, strictly: a decay missing from the file, a decay
        in the file that this bank does not keep, or names or shapes that differ are one-line errors."""
        first = self.decays[0] if _has_prefix(tensors, "ema") else None
        stored = decays_in(tensors, first)
        extra = [d for d in stored if d != first and d not in self.decays[1:]]
        missing = [d for i, d in enumerate(self.decays) if not _has_prefix(tensors, ema_prefix(d, i == 0))]
        if missing or extra:
            held = ", ".join(map(repr, stored)) or "none"
            wanted = ", ".join(map(repr, self.decays))
            raise CheckpointError(f"{path} holds EMA weights for decay(s) {held}; this run keeps {wanted}")
        for i, (d, m) in enumerate(zip(self.decays, self.models)):
            prefix = ema_prefix(d, i == 0)
            try:
                m.load_state_dict(split_prefix(tensors, prefix), strict=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise CheckpointError(f"{path}: the {prefix}.* weights do not match the model's "
                                      f"architecture ({first})") from None


def _has_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> bool:
    p = prefix + "."
    return any(k.startswith(p) for k in tensors)


def decays_in(tensors: dict[str, torch.Tensor], first: float | None) -> list[float]:
    """The decays whose averages a checkpoint holds: ``first`` (the decay of ``ema.*``, from the metadata;
    None when unknown or absent) followed by those of the ``ema@D.*`` tensors, in sorted key order."""
    found = [first] if first is not None and _has_prefix(tensors, "ema") else []
    for key in sorted(tensors):
        if key.startswith("ema@") and (d := ema_decay_of_key(key)) is not None and d not in found:
            found.append(d)
    return found


def parse_weights(selection: str) -> tuple[str, float | None]:
    """``raw`` -> ("raw", None); ``ema`` -> ("ema", None), the default average; ``ema:D`` -> ("ema", D)."""
    kind, sep, value = selection.partition(":")
    if kind == "raw" and not sep:
        return "raw", None
    if kind == "ema" and not sep:
        return "ema", None
    if kind == "ema" and value:
        try:
            return "ema", check_decays([float(value)])[0]
        except ValueError:
            pass
    raise ConfigError(f"--weights must be raw, ema or ema:DECAY (a decay in [0, 1], e.g. ema:0.9999); got {selection!r}")


def first_decay(meta: dict) -> float | None:
    """The decay of a checkpoint's ``ema.*`` tensors: ``ema_decays[0]`` of its metadata, else the run
    configuration's ``train.ema_decay``; None when neither says (an imported model)."""
    decays = meta.get("ema_decays")
    if isinstance(decays, list) and decays and isinstance(decays[0], (int, float)):
        return float(decays[0])
    train = meta.get("config", {}).get("train", {}) if isinstance(meta.get("config"), dict) else {}
    d = train.get("ema_decay") if isinstance(train, dict) else None
    if isinstance(d, (list, tuple)) and d:
        d = d[0]
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def select_weights(tensors: dict[str, torch.Tensor], meta: dict, selection: str) -> str:
    """The checkpoint prefix that ``--weights selection`` names: ``model`` (raw), ``ema`` or ``ema@D``.

    ``ema:D`` names the first average when D is its decay, else the ``ema@D.*`` tensors; a decay the
    checkpoint does not hold is one line naming those it does.
    """
    kind, decay = parse_weights(selection)
    if kind == "raw":
        return "model"
    first = first_decay(meta)
    if decay is None or (decay == first and _has_prefix(tensors, "ema")):
        if not _has_prefix(tensors, "ema"):
            raise CheckpointError(f"{meta.get('path', 'the checkpoint')} holds no EMA weights; use --weights raw")
        return "ema"
    if _has_prefix(tensors, ema_prefix(decay, first=False)):
        return ema_prefix(decay, first=False)
    held = ", ".join(map(repr, decays_in(tensors, first))) or "none"
    raise ConfigError(f"{meta.get('path', 'the checkpoint')} holds no EMA weights for decay {decay!r} "
                      f"(decays present: {held})")
