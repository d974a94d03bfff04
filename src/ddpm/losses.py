"""The training losses behind one small interface, which the training loop calls.

A loss takes the network as an argument and never owns it (EDM's loss, k-diffusion's ``loss``):

* ``draw_timesteps(batch_size, generator, device) -> (t, weights)``: the step's timesteps, and
  per-sample loss weights (None: all 1), drawn from ``generator``;
* ``draw_extras(noise, generator) -> (noise, extras)``: what else the step draws after the noise and
  the class labels (offset noise; the self-conditioning coins), ``extras`` a dict of per-sample
  tensors that the loop cuts into micro-batches like ``t``;
* ``losses(net, x0, t, noise, *, model_kwargs=None, **extras) -> [B]``: the per-sample losses of
  data x0 (in [-1, 1]) noised to x_t with ``noise`` at ``t``;
* ``observe(t, losses)``: the unweighted losses of a whole (global) batch after an optimizer step,
  which importance sampling of t learns from (a no-op otherwise).

The losses: :class:`SimpleLoss`, L_simple (Ho et al. 2020, Eq. 14) with its weightings;
:class:`VlbLoss`, the hybrid L_simple + lambda L_vlb and the pure L_vlb (Nichol & Dhariwal 2021);
and :class:`ddpm.distill.DistillationLoss` (Salimans & Ho 2022). :func:`make_loss` builds the first
two from a :class:`~ddpm.config.DiffusionConfig`. Every one reads the network through a
:class:`ddpm.denoiser.Denoiser` bound to its objective. The draws happen in a fixed order that no
option reorders: an option that is off draws nothing, so other runs keep their random stream.
"""

from __future__ import annotations

from typing import Callable

import torch

from .denoiser import Denoiser, Prediction
from .diffusion import (LOSSES, check_objective, loss_weight, offset_noise, p_mean_variance_from_prediction,
                        prediction_to_eps_x0, q_sample, v_target, vb_terms_from_mean_variance)
from .errors import ConfigError
from .schedules import NoiseSchedule
from .timestep_sampling import ImportanceSampler

__all__ = ["Loss", "SimpleLoss", "VlbLoss", "make_loss", "FORMULATION_LOSSES", "self_condition_estimate", "training_losses"]


def _mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=tuple(range(1, x.ndim)))


class Loss:
    """The interface (module docstring) with its plain defaults: t ~ Uniform({0, ..., T-1}), no extras."""

    timestep_sampler: ImportanceSampler | None = None

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def draw_timesteps(self, batch_size: int, generator: torch.Generator,
                       device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """t ~ Uniform({0, ..., T-1}) (Algorithm 1, line 3), with no loss weights."""
        t = torch.randint(0, self.schedule.timesteps, (batch_size,), generator=generator, device=generator.device)
        return t.to(device), None

    def draw_extras(self, noise: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        return noise, {}

    def losses(self, net: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
               model_kwargs: dict | None = None, **extras) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        if self.timestep_sampler is not None:
            self.timestep_sampler.update(t, losses)


@torch.no_grad()
def self_condition_estimate(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, *,
                            model_kwargs: dict | None = None) -> torch.Tensor:
    """x0_prev for self-conditioned training (Chen et al. 2023, Sec. 3.3): where ``mask`` [B] is set, the
    self-conditioned ``denoiser``'s own x0 estimate from a first pass with x0_prev = 0, without gradient
    and clipped to the data range [-1, 1]; zeros elsewhere."""
    x0_prev = torch.zeros_like(x_t)
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x0_prev
    kwargs = {k: v[idx] if torch.is_tensor(v) and v.shape[:1] == mask.shape else v
              for k, v in (model_kwargs or {}).items()}
    pred = denoiser.predict(x_t[idx], t[idx], model_kwargs=kwargs, clip=True)
    x0_prev[idx] = pred[1].to(x0_prev.dtype)
    return x0_prev


class SimpleLoss(Loss):
    """L_simple (Ho et al. 2020, Eq. 14, Algorithm 1): the weighted MSE of the prediction, per sample.

    With ``objective="eps"`` and uniform weighting this is
    || eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2, averaged over pixels;
    x0- and v-objectives compare with their own targets, and ``weighting="min-snr"`` weights each
    sample (:func:`ddpm.diffusion.loss_weight`, Hang et al. 2023). Offset noise (``offset_noise`` > 0)
    and self-conditioning (``self_condition``) are options of the forward process and of the input.
    """

    def __init__(self, schedule: NoiseSchedule, *, objective: str = "eps", weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, self_condition: bool = False, offset_noise: float = 0.0):
        super().__init__(schedule)
        check_objective(objective)
        loss_weight(schedule, torch.zeros(1, dtype=torch.long), objective, weighting, min_snr_gamma)   # validates
        self.objective, self.weighting, self.min_snr_gamma = objective, weighting, min_snr_gamma
        self.self_condition, self.offset_noise = self_condition, offset_noise

    def draw_extras(self, noise: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Offset noise, then (self-conditioning) which samples get the first, no-grad pass (probability 1/2)."""
        if self.offset_noise > 0:
            noise = noise + offset_noise(noise.shape, self.offset_noise, generator=generator, device=noise.device)
        if not self.self_condition:
            return noise, {}
        mask = torch.rand(noise.shape[0], generator=generator, device=generator.device) < 0.5
        return noise, {"self_cond_mask": mask.to(noise.device)}

    def predict(self, net: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
                model_kwargs: dict | None = None,
                self_cond_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Prediction]:
        """x_t ~ q(x_t | x0) (Eq. 4) and the network's prediction there."""
        x_t = q_sample(self.schedule, x0, t, noise)
        denoiser = Denoiser(net, self.schedule, objective=self.objective, self_condition=self.self_condition)
        x0_prev = None
        if self.self_condition and self_cond_mask is not None:
            x0_prev = self_condition_estimate(denoiser, x_t, t, self_cond_mask, model_kwargs=model_kwargs)
        return x_t, denoiser.predict(x_t, t, x0_prev=x0_prev, model_kwargs=model_kwargs)

    def weighted_mse(self, pred: Prediction, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        target = {"eps": noise, "x0": x0}.get(self.objective)
        if target is None:
            target = v_target(self.schedule, x0, t, noise)
        mse = _mean_over_pixels(pred.output - target)
        return mse * loss_weight(self.schedule, t, self.objective, self.weighting, self.min_snr_gamma)

    def losses(self, net: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
               model_kwargs: dict | None = None, self_cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        _, pred = self.predict(net, x0, t, noise, model_kwargs=model_kwargs, self_cond_mask=self_cond_mask)
        return self.weighted_mse(pred, x0, t, noise)


class VlbLoss(SimpleLoss):
    """The bound as a training loss (Nichol & Dhariwal 2021): ``kind="hybrid"`` or ``"vlb"``.

    The L_vlb estimate of a sample is T L_{t-1} at its timestep, in bits/dim
    (:func:`ddpm.diffusion.vb_terms_from_mean_variance`; its mean over uniform t is the bound without
    the prior term). ``hybrid``: L_simple + lambda L_vlb with lambda = ``vlb_weight`` (their Eq. 16),
    the mean under a stop-gradient in L_vlb so that only the variance learns from it (Sec. 3.1).
    ``vlb``: L_vlb alone, which trains mean and variance. With ``importance`` t is drawn from the
    :class:`~ddpm.timestep_sampling.ImportanceSampler` and the losses weighted by 1 / (T p_t) (Sec. 3.3).
    """

    def __init__(self, schedule: NoiseSchedule, *, kind: str = "hybrid", variance: str = "learned-range",
                 vlb_weight: float = 0.001, importance: bool = False, **options):
        super().__init__(schedule, **options)
        if kind not in ("hybrid", "vlb"):
            raise ConfigError(f"unknown bound loss {kind!r}; choose hybrid or vlb")
        self.kind, self.variance, self.vlb_weight = kind, variance, vlb_weight
        self.timestep_sampler = ImportanceSampler(schedule.timesteps) if importance else None

    def draw_timesteps(self, batch_size: int, generator: torch.Generator,
                       device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Uniform t, or t ~ p_t with weights 1 / (T p_t) under importance sampling."""
        if self.timestep_sampler is None:
            return super().draw_timesteps(batch_size, generator, device)
        return self.timestep_sampler.sample(batch_size, generator, device)

    def losses(self, net: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
               model_kwargs: dict | None = None, self_cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        x_t, pred = self.predict(net, x0, t, noise, model_kwargs=model_kwargs, self_cond_mask=self_cond_mask)
        mean_part = pred.output.detach() if self.kind == "hybrid" else pred.output     # the stop-gradient of Sec. 3.1
        _, x0_pred = prediction_to_eps_x0(self.schedule, x_t, t, mean_part, self.objective)
        out = p_mean_variance_from_prediction(self.schedule, x_t, t, x0_pred, pred.var_values, variance=self.variance)
        vlb = self.schedule.timesteps * vb_terms_from_mean_variance(self.schedule, x0, x_t, t, out["mean"],
                                                                    out["log_variance"])
        if self.kind == "vlb":
            return vlb
        return self.weighted_mse(pred, x0, t, noise) + self.vlb_weight * vlb


# The losses of the other formulations, by name, each built from a DiffusionConfig: ddpm.edm adds
# "edm" (it builds on Loss, so it registers itself; ddpm.config imports it with the formulation names).
FORMULATION_LOSSES: dict[str, Callable] = {}


def make_loss(config, schedule: NoiseSchedule) -> Loss:
    """The loss a :class:`~ddpm.config.DiffusionConfig` trains with, on ``schedule`` (unused by EDM's)."""
    formulation = FORMULATION_LOSSES.get(getattr(config, "formulation", "ddpm"))
    if formulation is not None:
        return formulation(config)
    options = dict(objective=config.objective, weighting=config.loss_weighting, min_snr_gamma=config.min_snr_gamma,
                   self_condition=config.self_condition, offset_noise=config.offset_noise)
    if config.loss == "simple":
        return SimpleLoss(schedule, **options)
    if config.loss not in LOSSES:
        raise ConfigError(f"unknown loss {config.loss!r}; choose from {', '.join(LOSSES)}")
    return VlbLoss(schedule, kind=config.loss, variance=config.variance, vlb_weight=config.vlb_weight,
                   importance=config.timestep_sampling == "importance", **options)


def training_losses(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, *, objective: str = "eps", weighting: str = "uniform",
                    min_snr_gamma: float = 5.0, model_kwargs: dict | None = None, variance: str = "posterior",
                    loss: str = "simple", vlb_weight: float = 0.001, self_condition: bool = False,
                    self_cond_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample training loss (shape [B]) of :class:`SimpleLoss` (``loss="simple"``) or :class:`VlbLoss`
    (``"hybrid"``, ``"vlb"``), for given t and noise; samples where ``self_cond_mask`` is set get the
    network's own x0 estimate as x0_prev (:func:`self_condition_estimate`), the others zeros."""
    options = dict(objective=objective, weighting=weighting, min_snr_gamma=min_snr_gamma,
                   self_condition=self_condition)
    if loss == "simple":
        fn = SimpleLoss(schedule, **options)
    elif loss in LOSSES:
        fn = VlbLoss(schedule, kind=loss, variance=variance, vlb_weight=vlb_weight, **options)
    else:
        raise ConfigError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    return fn.losses(model, x0, t, noise, model_kwargs=model_kwargs, self_cond_mask=self_cond_mask)
