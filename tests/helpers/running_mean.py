"""A tiny module with a moving float buffer, for the tests of moving averages of weights."""

import torch
from torch import nn


class RunningMean(nn.Module):
    """A float buffer that moves in training, like BatchNorm's running mean (ddpm checkpoints hold no integer
    tensors, so BatchNorm's num_batches_tracked would be refused by the checkpoint checks)."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * x.mean(dim=0))
        return x - self.running_mean
