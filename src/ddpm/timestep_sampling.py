"""Importance sampling of training timesteps (Nichol & Dhariwal 2021, Sec. 3.3).

The L_vlb estimate of a batch is noisy because its terms differ by orders of magnitude across t.
Drawing t with probability p_t proportional to sqrt(E[L_t^2]) and weighting each sample's loss by
1 / (T p_t) keeps the estimator unbiased, E_{t~p}[L_t / (T p_t)] = (1/T) sum_t L_t, and lowers
its variance. E[L_t^2] is estimated from the last :data:`HISTORY` losses seen at each t; until
every t has that many, t is drawn uniformly (weights 1). A small uniform floor keeps every p_t > 0.

The sampler's state (the histories) is part of a run's checkpoint, so a resumed run draws the
same timesteps. :meth:`ImportanceSampler.update` takes the (t, loss) pairs of the whole global
batch in one call: under data parallelism they are gathered from every rank first.
"""

from __future__ import annotations

import torch

from .errors import CheckpointError

__all__ = ["TIMESTEP_SAMPLINGS", "HISTORY", "UNIFORM_FLOOR", "ImportanceSampler"]

TIMESTEP_SAMPLINGS = ("uniform", "importance")
HISTORY = 10             # losses kept per timestep (improved-diffusion's history_per_term)
UNIFORM_FLOOR = 0.001    # probability mass spread uniformly over all t (improved-diffusion's uniform_prob)


class ImportanceSampler:
    """p_t proportional to sqrt(E[L_t^2]) over the last ``history`` losses per t, mixed with a uniform floor."""

    def __init__(self, timesteps: int, history: int = HISTORY, uniform_floor: float = UNIFORM_FLOOR):
        self.timesteps, self.history, self.uniform_floor = timesteps, history, uniform_floor
        self.losses = torch.zeros(timesteps, history, dtype=torch.float64)   # a ring buffer per t
        self.counts = torch.zeros(timesteps, dtype=torch.int64)              # losses seen per t, in total

    @property
    def warmed_up(self) -> bool:
        """Every t has a full history: from now on t is importance-sampled."""
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t [T] (float64): uniform before warm-up; else (1 - floor) sqrt(E[L_t^2]) / sum + floor / T."""
        T = self.timesteps
        if not self.warmed_up:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        rms = self.losses.pow(2).mean(dim=1).sqrt()
        return (1.0 - self.uniform_floor) * rms / rms.sum() + self.uniform_floor / T

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """1 / (T p_t) for each drawn timestep, float32 on t's device: the unbiasing loss weights."""
        p = self.probabilities().to(t.device)[t]
        return (1.0 / (self.timesteps * p)).float()

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weights) for a batch: t drawn from p with ``generator`` (on its device), weights 1 / (T p_t)."""
        if not self.warmed_up:
            t = torch.randint(0, self.timesteps, (batch_size,), generator=generator, device=generator.device)
        else:
            p = self.probabilities().to(device=generator.device, dtype=torch.float32)
            t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        t = t.to(device)
        return t, self.weights(t)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the per-sample losses of one (global) batch at their timesteps, in batch order."""
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            self.losses[ti, self.counts[ti] % self.history] = loss
            self.counts[ti] += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The state as checkpoint tensors (exact float64 losses)."""
        return {"timestep_sampler.losses": self.losses.clone(), "timestep_sampler.counts": self.counts.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: str = "checkpoint") -> None:
        try:
            losses, counts = tensors["timestep_sampler.losses"], tensors["timestep_sampler.counts"]
        except KeyError:
            raise CheckpointError(f"{path} has no timestep-sampler state, which importance sampling needs") from None
        if tuple(losses.shape) != tuple(self.losses.shape) or tuple(counts.shape) != tuple(self.counts.shape):
            raise CheckpointError(f"{path}: the timestep-sampler state has shape {tuple(losses.shape)}, "
                                  f"expected {tuple(self.losses.shape)}")
        self.losses = losses.to(torch.float64).cpu().clone()
        self.counts = counts.to(torch.int64).cpu().clone()
