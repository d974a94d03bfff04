"""The one way to run a sampler on a model: options resolved once into a plan, then one driver.

:func:`resolve_plan` turns :class:`~ddpm.samplers.SamplingOptions` into a :class:`SamplingPlan` for
one model: the kept timesteps it visits, the sampler's keyword options (the checkpoint's variance
filled in) and the x0 rule (clipping, the checkpoint's unless the options say; dynamic
thresholding instead). :func:`run_sampler` builds the shared denoiser (:func:`~ddpm.denoiser.make_denoiser`)
from the plan, runs the sampler (or an editing method's own loop) under the model's autocast and
inference mode with a progress bar, and returns x_0 in the model's range. :func:`image_noise` is
the per-image seeding: image k of a run draws all its noise from ``derive_seed(seed, k)``.
:func:`sample_images` is one batch of images of a run, as ``ddpm sample`` makes them.

``GaussianDiffusion.sample``, :mod:`ddpm.generate`, :mod:`ddpm.editing`, :mod:`ddpm.viz` and ``ddpm eval``
all reach the samplers through here. The model is anything with the attributes of
:class:`~ddpm.gaussian_diffusion.GaussianDiffusion` that sampling reads.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .conditions import check_condition, prepare_condition, sampling_augmentation
from .denoiser import CONDITION_KEY, make_denoiser
from .edm import EDMDenoiser
from .errors import ConfigError
from .pixels import from_model_range
from .precision import autocast
from .samplers import DEFAULT_SAMPLING, KARRAS, SAMPLERS, SamplingOptions, batch_noise
from .sigmas import SigmaDenoiser, Sigmas
from .seeding import derive_seed
from .signals import check_stop

__all__ = ["SamplingPlan", "resolve_plan", "x0_clip", "run_sampler", "image_noise", "num_classes", "check_labels",
           "label_conditioning", "sample_images"]


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """:class:`~ddpm.samplers.SamplingOptions` resolved for one model, once: what every sampling step reads.

    ``timesteps`` are the kept 0-based timesteps, descending (from ``start``: T - 1, or the t an
    edit or an interpolation starts at), or the noise levels a sigma sampler visits with the karras
    spacing (:class:`~ddpm.sigmas.Sigmas`); ``sampler_kwargs`` the sampler's own options (eta,
    variance, churn, ...); ``clip`` and ``dynamic_thresholding`` the x0 rule of the denoiser.
    """

    options: SamplingOptions
    timesteps: tuple[int, ...] | Sigmas
    sampler_kwargs: dict
    clip: bool
    dynamic_thresholding: bool
    start: int | None = None           # the timestep the steps start from (None: T - 1, all of the schedule)

    sampler = property(lambda self: self.options.sampler)
    steps = property(lambda self: len(self.timesteps), doc="the number of kept steps (network evaluations)")

    def unclipped(self) -> "SamplingPlan":
        """The same steps without x0 clipping or thresholding (DDIM inversion, whose two directions must match)."""
        return dataclasses.replace(self, clip=False, dynamic_thresholding=False)

    def run(self, denoiser, x_T: torch.Tensor, schedule, *, noise=None, callback=None) -> torch.Tensor:
        """The plan's sampler from ``x_T`` over its timesteps."""
        timesteps = self.timesteps if isinstance(self.timesteps, Sigmas) else list(self.timesteps)
        return SAMPLERS[self.sampler](denoiser, x_T, schedule, timesteps, noise=noise,
                                      callback=callback, **self.sampler_kwargs)


def x0_clip(diffusion, options: SamplingOptions | None) -> bool:
    """The clip rule: no clipping under dynamic thresholding, else the options' ``clip``, else the checkpoint's."""
    if options is not None and options.dynamic_thresholding:
        return False
    return diffusion.clip_denoised if options is None or options.clip is None else bool(options.clip)


def resolve_plan(diffusion, options: SamplingOptions | SamplingPlan = DEFAULT_SAMPLING, *,
                 start: int | None = None, start_name: str = "t") -> SamplingPlan:
    """``options`` resolved for ``diffusion`` (a plan is returned as it is, unless asked for another ``start``).

    ``start``: the steps from timestep ``start`` down to 0 (at most start + 1 of them; the spacing must
    start there: trailing or linspace), as SDEdit and interpolation take them; ``start_name`` names it
    in the errors. Steps beyond the schedule are an error, unless the options only bound them."""
    if isinstance(options, SamplingPlan):
        if start is None or options.start == start:
            return options
        options = options.options
    if getattr(diffusion, "formulation", "ddpm") == "edm":
        return _edm_plan(diffusion, options, start, start_name)
    if start is None:
        timesteps = options.timesteps(diffusion.timesteps, diffusion.schedule)
    elif options.spacing == KARRAS:
        raise ConfigError(f"the karras spacing spans the whole schedule; from {start_name} = {start} use "
                          "trailing or linspace")
    else:
        if options.steps is not None and options.steps > start + 1 and not options.steps_at_most:
            raise ConfigError(f"--steps {options.steps} is more than the {start_name} + 1 = {start + 1} steps "
                              f"left from {start_name} = {start}")
        timesteps = options.timesteps(start + 1)
        if timesteps[0] != start:
            raise ConfigError(f"spacing {options.spacing!r} does not start at {start_name} = {start}; "
                              "use trailing or linspace")
    if not isinstance(timesteps, Sigmas):
        timesteps = tuple(int(t) for t in timesteps)
    return SamplingPlan(options=options, timesteps=timesteps,
                        sampler_kwargs=options.sampler_options(diffusion.variance), clip=x0_clip(diffusion, options),
                        dynamic_thresholding=options.dynamic_thresholding, start=start)


def _edm_plan(diffusion, options: SamplingOptions, start, start_name: str) -> SamplingPlan:
    """An EDM model's plan: a sigma sampler over ``options.sigmas`` (karras) between the model's sigma_min and
    sigma_max; no x0 clipping (EDM's denoiser has none) and no start inside the schedule (it has no timesteps)."""
    if start is not None:
        raise ConfigError(f"an EDM model has no timesteps to start from ({start_name} = {start}); sample it whole")
    if options.clip or options.dynamic_thresholding:
        raise ConfigError("an EDM model is sampled without x0 clipping or dynamic thresholding")
    config = diffusion.config
    return SamplingPlan(options=options, timesteps=options.sigmas(config.sigma_min, config.sigma_max),
                        sampler_kwargs=options.sampler_options(), clip=False, dynamic_thresholding=False)


def _edm_denoiser(diffusion, conditioning: dict):
    """EDM's D(x; sigma) of ``diffusion``'s network (ddpm.edm.EDMDenoiser), with the label conditioning."""
    config = diffusion.config
    return EDMDenoiser(diffusion.model, sigma_data=config.sigma_data, sigma_min=config.sigma_min,
                       sigma_max=config.sigma_max, **conditioning)


class _StopChecked:
    """A denoiser that checks for a stop request (:func:`ddpm.signals.check_stop`) before each evaluation;
    everything else is the wrapped denoiser's."""

    def __init__(self, denoiser):
        self.wrapped = denoiser

    def __call__(self, *args, **kwargs):
        check_stop()
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name):
        if name == "wrapped":                 # not set yet (a copy in the making): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)


class _StopCheckedSigma(_StopChecked, SigmaDenoiser):
    """:class:`_StopChecked` of a denoiser in sigma space (an EDM model), still one for the sigma samplers."""

    def __init__(self, denoiser: SigmaDenoiser):
        super().__init__(denoiser)
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max


def stop_checked(denoiser):
    """``denoiser``, checking for a stop request before each network evaluation, of the same kind."""
    return _StopCheckedSigma(denoiser) if isinstance(denoiser, SigmaDenoiser) else _StopChecked(denoiser)


def run_sampler(diffusion, plan: SamplingPlan, x: torch.Tensor, *, noise: Callable | None = None,
                conditioning: dict | None = None, callback: Callable | None = None, progress: bool = False,
                run: Callable | None = None) -> torch.Tensor:
    """The sampler of ``plan`` from ``x`` (x_T, model range) on ``diffusion``'s network: x_0, model range.

    Builds the denoiser with the plan's x0 rule and ``conditioning`` (``model_kwargs``, ``guidance_scale``,
    ``uncond_kwargs`` of :func:`~ddpm.denoiser.make_denoiser`), and runs under inference mode and the
    model's autocast (``diffusion.precision``), with a progress bar over the steps when ``progress``.
    ``callback`` receives the sampler's per-step dict. ``run(denoiser, x, noise)`` replaces the plan's
    sampler (an editing method's loop over the plan's timesteps; no per-step callback). A stop signal
    (:func:`ddpm.signals.check_stop`) raises :class:`ddpm.signals.Stopped` before the next network evaluation."""
    device = diffusion.device
    edm = getattr(diffusion, "formulation", "ddpm") == "edm"
    if edm and run is not None:
        raise ConfigError("an EDM model has no timesteps for an editing method's steps; sample it whole")
    denoiser = _edm_denoiser(diffusion, conditioning or {}) if edm else make_denoiser(
        diffusion.model, diffusion.schedule_on(device), objective=diffusion.objective, clip=plan.clip,
        dynamic_thresholding=plan.dynamic_thresholding, self_condition=diffusion.self_condition,
        **(conditioning or {}))
    bar = tqdm(total=plan.steps, desc="sampling", disable=not progress, leave=False, dynamic_ncols=True)

    checked = stop_checked(denoiser)      # SIGINT / SIGTERM: stop before the next network evaluation

    def on_step(info: dict) -> None:
        bar.update(1)
        if callback is not None:
            callback(info)

    try:
        with torch.inference_mode(), autocast(device, diffusion.precision):
            if run is not None:
                x0 = run(checked, x, noise)
            else:
                x0 = plan.run(checked, x, diffusion.schedule, noise=noise, callback=on_step)
    finally:
        bar.close()                       # also when stopped: the message after it starts its own line
    return x0


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int], device) -> Callable[[], torch.Tensor]:
    """The noise source of the images with run indices ``indices``: image k's from ``derive_seed(seed, k)``."""
    generators = [torch.Generator().manual_seed(derive_seed(seed, k)) for k in indices]
    return batch_noise(generators, shape, device)


def num_classes(diffusion) -> int | None:
    """The class count of a class-conditional model, None for an unconditional one."""
    config = getattr(diffusion.model, "config", None)
    return getattr(config, "num_classes", None)


def check_labels(diffusion, labels, guidance_scale: float | None) -> None:
    """Fail early on class labels an unconditional model cannot take, or outside 0..num_classes-1."""
    classes = num_classes(diffusion)
    if labels is None:
        if guidance_scale is not None:
            raise ConfigError("a guidance scale needs class labels (--class)")
        return
    if classes is None:
        raise ConfigError("this checkpoint is an unconditional model: it takes no class labels "
                          "(train with --conditional)")
    bad = sorted({int(c) for c in labels if not 0 <= int(c) < classes})
    if bad:
        raise ConfigError(f"class {bad[0]} is out of range: this model has classes 0..{classes - 1}")
    if guidance_scale is not None and not guidance_scale >= 0:
        raise ConfigError(f"the guidance scale must be >= 0; got {guidance_scale}")


def label_conditioning(diffusion, labels=None, guidance_scale: float | None = None) -> dict:
    """The denoiser's conditioning for ``labels`` (one class per image; None: unconditional), with
    classifier-free guidance at ``guidance_scale`` w (None or 1: the conditional model alone)."""
    check_labels(diffusion, labels, guidance_scale)
    if labels is None:
        return {}
    y = torch.as_tensor(list(labels), dtype=torch.long, device=diffusion.device)
    cond: dict = {"model_kwargs": {"y": y}}
    if guidance_scale is not None and guidance_scale != 1:
        null = torch.full_like(y, num_classes(diffusion))             # the null label: the unconditional model
        cond.update(guidance_scale=float(guidance_scale), uncond_kwargs={"y": null})
    return cond


def sample_images(diffusion, indices: list[int], *, seed: int = 0,
                  sampling: SamplingOptions | SamplingPlan = DEFAULT_SAMPLING, callback: Callable | None = None,
                  progress: bool = False, labels=None, guidance_scale: float | None = None,
                  given_x_T: torch.Tensor | None = None, conditions: torch.Tensor | None = None,
                  condition_level: float = 0.0) -> torch.Tensor:
    """One batch: the images with run indices ``indices``, in [0, 1], shape [B, C, H, W].

    Image k's noise comes from a CPU generator seeded with ``derive_seed(seed, k)``: first x_T,
    then each step's noise. ``callback`` receives the sampler's per-step dict (model range).
    A class-conditional model takes one class label per image (``labels``; None: unconditional)
    and classifier-free guidance with ``guidance_scale`` w (None or 1: the conditional model alone).
    ``given_x_T`` [B, C, H, W] replaces the drawn starting noise (e.g. DDIM-inverted latents).
    An image-conditioned model takes one condition per image (``conditions``, in [0, 1], full size
    or, for super-resolution, low resolution), augmented at ``condition_level`` with image k's
    noise from ``derive_seed(seed, k, 1)``.
    """
    plan = resolve_plan(diffusion, sampling)
    shape = (diffusion.channels, *diffusion.image_size)
    noise = image_noise(seed, indices, shape, diffusion.device)
    x_T = noise()                     # drawn even when x_T is given, so each step's noise stays the same
    if given_x_T is not None:
        if tuple(given_x_T.shape) != tuple(x_T.shape):
            raise ConfigError(f"starting noise of shape {tuple(given_x_T.shape)[1:]} for a model of shape {shape}")
        x_T = given_x_T.to(device=diffusion.device, dtype=x_T.dtype)
    conditioning = label_conditioning(diffusion, labels, guidance_scale)
    image_cond = getattr(diffusion, "condition", None)
    check_condition(image_cond, conditions, "this checkpoint")
    if conditions is not None:
        if len(conditions) != len(indices):
            raise ConfigError(f"{len(conditions)} conditions for {len(indices)} images; give one per image")
        c = prepare_condition(image_cond, conditions.to(diffusion.device), diffusion.image_size)
        generators = [torch.Generator().manual_seed(derive_seed(seed, k, 1)) for k in indices]
        c = sampling_augmentation(image_cond, c, condition_level, generators)
        conditioning["model_kwargs"] = {**conditioning.get("model_kwargs", {}), CONDITION_KEY: c}
    x0 = run_sampler(diffusion, plan, x_T, noise=noise, conditioning=conditioning, callback=callback, progress=progress)
    return from_model_range(x0)
