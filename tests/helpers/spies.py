"""Spies at the stable boundaries of training and sampling, shared by the effect tests.

* :func:`spy_network` records what the U-Net receives (x_t, t, keyword inputs such as y) and the
  gradient of the loss with respect to its output, for every forward pass in training mode.
* :func:`spy_optimizer` records, at every ``optimizer.step()``, the learning rate and the
  parameters' ``.grad`` the step is about to use, and the parameters after it.
* :func:`no_sample_grids` is the one patch of a training-loop internal: the sample grids drawn
  at the end of a run are not under test and cost most of a tiny run.

A test observes a feature through these, so a redesign of the loop's internals changes
nothing here as long as the network and the optimizer are still called.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ddpm.models import Unet


@dataclass
class NetworkCall:
    """One forward pass of the network in training mode."""

    x: torch.Tensor                     # the network's input (x_t, with x0_prev appended when self-conditioned)
    t: torch.Tensor
    kwargs: dict
    output: torch.Tensor
    grad_enabled: bool                  # False for self-conditioning's first, no-gradient pass
    grad_output: torch.Tensor | None = None   # d loss / d output, filled in by the backward pass


@contextlib.contextmanager
def spy_network():
    """Yield the list of :class:`NetworkCall` of every U-Net forward pass in training mode."""
    calls: list[NetworkCall] = []
    original = Unet.forward

    def forward(self, x, t, *args, **kwargs):
        out = original(self, x, t, *args, **kwargs)
        if self.training:
            call = NetworkCall(x.detach().clone(), t.detach().clone(),
                               {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                               out.detach().clone(), torch.is_grad_enabled())
            if out.requires_grad:
                def keep(grad, call=call):
                    call.grad_output = grad.detach().clone()
                out.register_hook(keep)
            calls.append(call)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Unet, "forward", forward)
        yield calls


@dataclass
class OptimizerStep:
    lr: list[float]
    grads: list[torch.Tensor | None]
    params_before: list[torch.Tensor]
    params_after: list[torch.Tensor] = field(default_factory=list)

    def grad_norm(self) -> float:
        return float(torch.sqrt(sum(g.double().pow(2).sum() for g in self.grads if g is not None)))


@contextlib.contextmanager
def spy_optimizer():
    """Yield the list of :class:`OptimizerStep` of every ``torch.optim`` step taken meanwhile."""
    steps: list[OptimizerStep] = []

    def params(optimizer):
        return [p for group in optimizer.param_groups for p in group["params"]]

    def before(optimizer, args, kwargs):
        steps.append(OptimizerStep([group["lr"] for group in optimizer.param_groups],
                                   [None if p.grad is None else p.grad.detach().clone() for p in params(optimizer)],
                                   [p.detach().clone() for p in params(optimizer)]))

    def after(optimizer, args, kwargs):
        steps[-1].params_after = [p.detach().clone() for p in params(optimizer)]

    pre = register_optimizer_step_pre_hook(before)
    post = register_optimizer_step_post_hook(after)
    try:
        yield steps
    finally:
        pre.remove()
        post.remove()


def blank_samples(diffusion, n: int, **kwargs) -> np.ndarray:
    """Stands in for ``generate`` in the training loop's sample grids."""
    return np.zeros((n, *diffusion.image_size, diffusion.channels), np.uint8)


@contextlib.contextmanager
def no_sample_grids():
    """Training without drawing its sample grids (the loop's one patched internal, kept here)."""
    import ddpm.train_eval

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpm.train_eval, "generate", blank_samples)
        yield

