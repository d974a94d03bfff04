"""The image conditions of a training run (:mod:`ddpm.conditions`): the paired rows, checked and held
on the device beside the images, and the conditions the sample grids show."""

from __future__ import annotations

import numpy as np
import torch

from .conditions import ImageCondition, given_condition
from .config import RunConfig
from .data import ImageData
from .errors import DataError
from .pixels import uint8_to_unit

__all__ = ["check_condition_data", "paired_conditions", "grid_conditions"]


def check_condition_data(config: RunConfig, data: ImageData) -> None:
    """Paired conditions present for --task paired, with the condition's channels."""
    cond = config.condition
    if cond is None or cond.task != "paired":
        return
    if data.conditions is None:
        raise DataError(f"--task paired needs the conditions of {data.name!r} (--condition-data)")
    if data.conditions.shape[3] != cond.channels:
        raise DataError(f"the paired conditions have {data.conditions.shape[3]} channel(s); the model takes "
                        f"{cond.channels}")


def paired_conditions(config: RunConfig, data: ImageData, device: torch.device) -> torch.Tensor | None:
    """The paired conditions (``--task paired``), uint8 [N, H, W, C_c] on the device, row k for image k."""
    if config.condition is None or config.condition.task != "paired":
        return None
    return torch.from_numpy(np.ascontiguousarray(data.conditions)).to(device)


def grid_conditions(condition: ImageCondition, data: ImageData, paired: torch.Tensor | None, n: int) -> torch.Tensor:
    """The conditions, in [0, 1] on the CPU, of the first ``n`` training images (paired rows, or implied
    by the targets)."""
    rows = np.arange(min(n, data.num_images))
    if paired is not None:
        return uint8_to_unit(paired[torch.from_numpy(rows).to(paired.device)]).cpu()
    return given_condition(condition, uint8_to_unit(torch.from_numpy(np.asarray(data.images[rows]))))
