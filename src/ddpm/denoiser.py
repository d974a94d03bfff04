"""The denoiser: the one adapter from a network's output to (eps_pred, x0_pred[, var_values]).

Whatever the network was trained to predict (``objective`` eps, x0 or v), with or without a learned
variance (2C output channels) or self-conditioning (2C input channels), and with optional
classifier-free guidance, x0 clipping or dynamic thresholding, a :class:`Denoiser` binds a network
to those options once and turns one call of it into a :class:`Prediction` (:meth:`Denoiser.predict`).
Everything that reads a network's output goes through one: the samplers (its call), the training
losses (``ddpm.losses``), the distillation teacher and student (:meth:`Denoiser.predict`), and the
bound (:meth:`Denoiser.p_mean_variance`, ``ddpm.evaluation.likelihood``).

``t`` is the 0-based timestep (``docs/notation.md``): an int shared by the batch, or a per-sample
LongTensor [B]. The network never sees the schedule; the schedule is only used here to convert
between the parameterisations (Eq. 4 solved for x0 or eps).
"""

from __future__ import annotations

from typing import Callable

import torch

from .diffusion import (LEARNED_VARIANCE, check_objective, p_mean_variance_from_prediction, predict_eps_from_x0,
                        predict_x0_from_eps, prediction_to_eps_x0)
from .errors import ConfigError
from .schedules import NoiseSchedule

__all__ = ["Prediction", "Denoiser", "DYNAMIC_THRESHOLD_PERCENTILE", "CONDITION_KEY", "dynamic_threshold",
           "timestep_batch", "model_output", "split_output", "make_denoiser", "p_mean_variance"]

DYNAMIC_THRESHOLD_PERCENTILE = 0.995
CONDITION_KEY = "condition"          # model_kwargs entry of an image condition c [B, C_c, H, W]


class Prediction(tuple):
    """A denoiser's result: the pair (eps_pred, x0_pred), which every sampler unpacks, plus
    ``var_values``, the interpolation channels of a learned-variance network (None otherwise), and
    ``output``, the network's prediction in its objective's own space before any correction (what
    the training loss compares with its target; None under guidance, which has no such output)."""

    def __new__(cls, eps_pred: torch.Tensor, x0_pred: torch.Tensor, var_values: torch.Tensor | None = None,
                output: torch.Tensor | None = None):
        self = super().__new__(cls, (eps_pred, x0_pred))
        self.var_values, self.output = var_values, output
        return self


def dynamic_threshold(x0: torch.Tensor, percentile: float = DYNAMIC_THRESHOLD_PERCENTILE) -> torch.Tensor:
    """Saharia et al. 2022, Sec. 2.3: s = max(1, p-th percentile of |x0|) per sample; x0 -> clamp(x0, -s, s) / s."""
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0)
    s = s.to(x0.dtype).reshape(-1, *((1,) * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def timestep_batch(t: int | torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """``t`` as a LongTensor [B] on x_t's device: an int is shared by the batch, a tensor is per sample."""
    if torch.is_tensor(t) and t.ndim > 0:
        if t.shape != x_t.shape[:1]:
            raise ConfigError(f"{t.shape[0]} timesteps for a batch of {x_t.shape[0]}")
        return t
    return torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)


def model_output(model: Callable, x_t: torch.Tensor, t: torch.Tensor, *, self_cond: torch.Tensor | None = None,
                 self_condition: bool = False, model_kwargs: dict | None = None) -> torch.Tensor:
    """The network's raw output at (x_t, t), in float32.

    A self-conditioned network (``self_condition``) takes [x_t, x0_prev] concatenated along the
    channels, where x0_prev is ``self_cond`` (an earlier estimate of x0) or zeros when there is none
    (Chen et al. 2023, "Analog Bits", Sec. 3.3). An image-conditioned network gets its condition c
    (``model_kwargs["condition"]``, model range, already augmented: :mod:`ddpm.conditions`) as the
    last input channels, [x_t, (x0_prev), c] (SR3, Saharia et al. 2021, Sec. 2.1): the one place
    where c reaches the network, for the losses and the samplers alike. Any other network takes x_t alone.
    """
    if self_condition:
        x0_prev = torch.zeros_like(x_t) if self_cond is None else self_cond.to(x_t.dtype)
        x_t = torch.cat([x_t, x0_prev], dim=1)
    elif self_cond is not None:
        raise ConfigError("an x0 estimate for self-conditioning was given to a network trained without it")
    kwargs = dict(model_kwargs or {})
    c = kwargs.pop(CONDITION_KEY, None)
    if c is not None:
        if c.shape[0] != x_t.shape[0] or c.shape[-2:] != x_t.shape[-2:]:
            raise ConfigError(f"a condition of shape {list(c.shape)} for x_t of shape {list(x_t.shape)}")
        x_t = torch.cat([x_t, c.to(x_t.dtype)], dim=1)
    return model(x_t, t, **kwargs).float()


def split_output(output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, var_values) from a network output for C = ``channels`` image channels.

    A learned-variance network has 2C output channels: the first C predict the objective (eps, x0
    or v), the last C the variance interpolation v of Nichol & Dhariwal 2021, Eq. 15; a C-channel
    output gives (output, None).
    """
    if output.shape[1] == channels:
        return output, None
    if output.shape[1] != 2 * channels:
        raise ConfigError(f"the network has {output.shape[1]} output channels; expected {channels} "
                          f"(fixed variance) or {2 * channels} (learned variance)")
    prediction, var_values = output.chunk(2, dim=1)
    return prediction, var_values


class Denoiser:
    """A network bound once to what it takes to read it: its schedule, its training ``objective`` (eps,
    x0 or v) and ``self_condition``, and how it is asked (``model_kwargs``, classifier-free guidance with
    ``guidance_scale`` and ``uncond_kwargs``, x0 ``clip`` or ``dynamic_thresholding``). Like
    k-diffusion's wrappers, it serves every reader of the network:

    * ``denoiser(x_t, t)``, the samplers' call: a self-conditioned network is fed the x0_pred this
      denoiser returned last (zeros at the first call), the previous step's estimate in every sampler
      (Chen et al. 2023, Sec. 3.3). That is state: build one per sampling run.
    * :meth:`predict`: one evaluation with an explicit x0_prev, holding no state (the losses, distillation).
    * :meth:`p_mean_variance`: the reverse step's Gaussian p_theta(x_{t-1} | x_t) (the bound).

    A sampler takes any callable ``(x_t, t) -> Prediction`` (e.g. the sigma-space adapters of ``ddpm.sigmas``); this is
    the one built from a network.
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule, *, objective: str = "eps",
                 self_condition: bool = False, clip: bool = False, dynamic_thresholding: bool = False,
                 model_kwargs: dict | None = None, guidance_scale: float | None = None,
                 uncond_kwargs: dict | None = None):
        check_objective(objective)
        if clip and dynamic_thresholding:
            raise ConfigError("x0 clipping and dynamic thresholding exclude each other; choose one")
        if guidance_scale is not None and uncond_kwargs is None:
            raise ConfigError("classifier-free guidance needs uncond_kwargs (the model's unconditional inputs)")
        self.model, self.schedule, self.objective, self.self_condition = model, schedule, objective, self_condition
        self.clip, self.dynamic_thresholding = clip, dynamic_thresholding
        self.model_kwargs, self.guidance_scale, self.uncond_kwargs = model_kwargs, guidance_scale, uncond_kwargs
        self.x0_prev: torch.Tensor | None = None          # self-conditioning: the last x0_pred returned

    def predict(self, x_t: torch.Tensor, t: int | torch.Tensor, *, x0_prev: torch.Tensor | None = None,
                model_kwargs: dict | None = None, clip: bool | None = None) -> Prediction:
        """One network evaluation at (x_t, t) as a :class:`Prediction`: (eps_pred, x0_pred), var_values, output.

        ``model_kwargs`` and ``clip``, when given, replace the bound ones (a batch's own labels, the
        self-conditioning pass's clipping). A self-conditioned network gets ``x0_prev`` (zeros when
        None) as its extra input channels.

        With ``guidance_scale`` w, classifier-free guidance (Ho & Salimans 2022, Eq. 6, written with
        w = 1 + their w): eps_pred = eps_uncond + w (eps_cond - eps_uncond), where eps_cond uses
        ``model_kwargs`` (e.g. ``{"y": labels}``) and eps_uncond ``uncond_kwargs`` (e.g. the null label),
        both from one batched pass. x0- or v-outputs are converted to eps first and combined there;
        x0_pred is then recomputed from the guided eps (Eq. 4); var_values are the conditional half's.

        With ``clip`` x0_pred is clipped to [-1, 1], with ``dynamic_thresholding`` it is thresholded
        (:func:`dynamic_threshold`); either way eps_pred is then re-derived from the corrected x0_pred
        (Eq. 4 solved for eps), so every consumer sees a consistent pair.
        """
        clip = self.clip if clip is None else clip
        if clip and self.dynamic_thresholding:
            raise ConfigError("x0 clipping and dynamic thresholding exclude each other; choose one")
        model_kwargs = self.model_kwargs if model_kwargs is None else model_kwargs
        t = timestep_batch(t, x_t)
        if self.guidance_scale is None:
            output = model_output(self.model, x_t, t, self_cond=x0_prev, self_condition=self.self_condition,
                                  model_kwargs=model_kwargs)
            prediction, var_values = split_output(output, x_t.shape[1])
            pred = Prediction(*prediction_to_eps_x0(self.schedule, x_t, t, prediction, self.objective), var_values,
                              prediction)
        else:
            pred = self._guided(x_t, t, x0_prev, model_kwargs or {})
        if not (clip or self.dynamic_thresholding):
            return pred
        x0_pred = pred[1].clamp(-1.0, 1.0) if clip else dynamic_threshold(pred[1])
        return Prediction(predict_eps_from_x0(self.schedule, x_t, t, x0_pred), x0_pred, pred.var_values, pred.output)

    def _guided(self, x_t: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None, kwargs: dict) -> Prediction:
        """Classifier-free guidance from ONE forward pass over the batch concatenated with itself."""
        both = {k: torch.cat([kwargs[k], self.uncond_kwargs[k]]) for k in kwargs}
        x_2, t_2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        prev_2 = None if x0_prev is None else torch.cat([x0_prev, x0_prev])
        output = model_output(self.model, x_2, t_2, self_cond=prev_2, self_condition=self.self_condition,
                              model_kwargs=both)
        prediction, var_values = split_output(output, x_t.shape[1])
        eps_2, _ = prediction_to_eps_x0(self.schedule, x_2, t_2, prediction, self.objective)
        eps_cond, eps_uncond = eps_2.chunk(2)
        eps_pred = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)             # Ho & Salimans, Eq. 6
        return Prediction(eps_pred, predict_x0_from_eps(self.schedule, x_t, t, eps_pred),
                          None if var_values is None else var_values.chunk(2)[0])

    def __call__(self, x_t: torch.Tensor, t: int | torch.Tensor) -> Prediction:
        x0_prev = self.x0_prev
        if x0_prev is not None and x0_prev.shape != x_t.shape:
            x0_prev = None
        pred = self.predict(x_t, t, x0_prev=x0_prev)
        if self.self_condition:
            self.x0_prev = pred[1]
        return pred

    def p_mean_variance(self, x_t: torch.Tensor, t: torch.Tensor, *, variance: str = "posterior",
                        x0_prev: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Parameters of p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)  (Ho et al. 2020, Eq. 1).

        The mean is the posterior mean (Eq. 7) evaluated at the model's x0 estimate (clipped to [-1, 1]
        first when the denoiser clips, as in the paper's code), which for an eps model equals Eq. 11.
        The variance is that of :func:`ddpm.diffusion.p_mean_variance_from_prediction`.
        """
        pred = self.predict(x_t, t, x0_prev=x0_prev)
        if variance == LEARNED_VARIANCE and pred.var_values is None:
            raise ConfigError("variance 'learned-range' needs a network trained with learned variances "
                              "(2C output channels); this one has C")
        out = p_mean_variance_from_prediction(self.schedule, x_t, t, pred[1], pred.var_values, variance=variance)
        return {**out, "eps_pred": pred[0], "x0_pred": pred[1]}


def make_denoiser(model: Callable, schedule: NoiseSchedule, *, objective: str = "eps", clip: bool = False,
                  dynamic_thresholding: bool = False, model_kwargs: dict | None = None,
                  guidance_scale: float | None = None, uncond_kwargs: dict | None = None,
                  self_condition: bool = False) -> Denoiser:
    """A :class:`Denoiser` for one sampling run: ``denoiser(x_t, t) -> Prediction(eps_pred, x0_pred,
    var_values)`` from ``model(x_t, t_batch, **model_kwargs)`` trained with ``objective``."""
    return Denoiser(model, schedule, objective=objective, self_condition=self_condition, clip=clip,
                    dynamic_thresholding=dynamic_thresholding, model_kwargs=model_kwargs,
                    guidance_scale=guidance_scale, uncond_kwargs=uncond_kwargs)


def p_mean_variance(model: Callable, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, *,
                    objective: str = "eps", variance: str = "posterior", clip_denoised: bool = True,
                    model_kwargs: dict | None = None, self_condition: bool = False,
                    self_cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Parameters of p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)  (Ho et al. 2020, Eq. 1).

    The mean is the posterior mean (Eq. 7) evaluated at the model's x0 estimate, which for an eps
    model equals Eq. 11; with ``clip_denoised`` the x0 estimate is clipped to [-1, 1] first (as in
    the paper's code). The variance is that of :func:`ddpm.diffusion.p_mean_variance_from_prediction`.
    A self-conditioned network gets ``self_cond`` as its x0_prev.
    """
    return Denoiser(model, schedule, objective=objective, self_condition=self_condition, model_kwargs=model_kwargs,
                    clip=clip_denoised).p_mean_variance(x_t, t, variance=variance, x0_prev=self_cond)
