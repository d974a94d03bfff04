"""The facade: a model and a noise schedule, with the paper's training loss and sampler.

:class:`GaussianDiffusion` holds the network, its :class:`~ddpm.config.DiffusionConfig` and the
schedule, and does no maths of its own: ``diffusion(images)`` is the configured loss of
``ddpm.losses`` and ``diffusion.sample(...)`` a sampler of ``ddpm.samplers.SAMPLERS`` (run by the one
sampling driver, :func:`ddpm.sampling.run_sampler`), both reading the network through ``ddpm.denoiser``.
:func:`ddpm.build.build_diffusion` builds one from a run's configuration.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .conditions import ImageCondition, check_condition, prepare_condition, sampling_augmentation, training_condition
from .config import DiffusionConfig
from .denoiser import CONDITION_KEY
from .diffusion import SampleTrajectory, randn
from .errors import ConfigError
from .losses import make_loss
from .pixels import from_model_range, to_model_range
from .samplers import SamplingOptions
from .sampling import resolve_plan, run_sampler
from .schedules import NoiseSchedule

__all__ = ["GaussianDiffusion"]


SIGMA_OPTIONS = ("churn", "s_tmin", "s_tmax", "s_noise", "rho")      # SamplingOptions' fields of the sigma samplers
# EDM's sampler (Karras et al. 2022, Algorithm 1): Heun over 18 karras levels, 35 network evaluations.
EDM_SAMPLING = SamplingOptions(sampler="heun", steps=18, spacing="karras", steps_at_most=True)


class GaussianDiffusion(nn.Module):
    """A model and a noise schedule, with the paper's training loss and sampler.

    A thin facade in the spirit of the paper's reference code; the work is done by the losses
    (``ddpm.losses``) and the samplers (``ddpm.samplers``), which it calls::

        model = ddpm.Unet.from_preset("digits")
        diffusion = ddpm.GaussianDiffusion(model, image_size=8, channels=1, timesteps=1000)
        loss = diffusion(images)              # images in [0, 1], shape [B, C, H, W]
        images = diffusion.sample(batch_size=16)   # in [0, 1]

    The diffusion options (``timesteps``, ``schedule``, ``objective``, ``variance``, ``loss``, ...) are
    the fields of :class:`~ddpm.config.DiffusionConfig`, given as keywords or as ``config=``, and are
    validated as the command line validates them. ``sampling`` (the sampler a checkpoint asks for,
    :class:`~ddpm.samplers.SamplingOptions`; None: the library's) and ``precision`` (the network's
    autocast while sampling, :mod:`ddpm.precision`) are fixed when it is built; nothing is set
    from outside afterwards.

    An image-conditioned model (SR3, Palette; :mod:`ddpm.conditions`) takes ``condition=``, an
    :class:`~ddpm.conditions.ImageCondition` (or a dict of its fields); its U-Net has the condition's
    extra input channels (``Unet(UnetConfig(..., in_channels=C + condition.input_channels))``).
    ``diffusion(images, condition=c)`` trains on c (for super-resolution and colorize c may be left
    out: it is then the one the targets imply) and ``diffusion.sample(condition=c)`` samples one
    image per condition; c is in [0, 1], at full size or (super-resolution) the low resolution.
    """

    def __init__(self, model: nn.Module, *, config=None, image_size: int | Sequence[int] | None = None,
                 channels: int | None = None, sampling=None, precision: str = "fp32",
                 condition: ImageCondition | dict | None = None, **options):
        super().__init__()
        if config is not None and options:
            raise ConfigError("pass config= or the diffusion options as keywords, not both")
        try:
            config = config if config is not None else DiffusionConfig(**options)
        except TypeError as exc:
            raise ConfigError(f"unknown diffusion option: {exc}") from None
        self.model, self.config = model, config
        self.schedule = NoiseSchedule(config.schedule, config.timesteps)
        size = image_size if image_size is not None else getattr(model, "image_size", None)
        if size is None:
            raise ConfigError("image_size is required when the model does not define one")
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        channels = channels if channels is not None else getattr(model, "channels", None)
        if channels is None:
            raise ConfigError("channels is required when the model does not define it")
        self.channels = channels
        model_size = getattr(model, "image_size", None)
        if model_size is not None and tuple(model_size) != self.image_size:
            raise ConfigError(f"image_size {self.image_size} differs from the model's {tuple(model_size)}")
        self._sampling, self._precision = sampling, precision
        self.condition = ImageCondition(**condition) if isinstance(condition, dict) else condition
        if self.condition is not None:
            if not isinstance(self.condition, ImageCondition):
                raise ConfigError(f"condition must be an ImageCondition or a dict of its fields; got {condition!r}")
            self.condition.check_image_size(self.image_size)
        self._schedules: dict[torch.device, NoiseSchedule] = {}

    # What the samplers, the bound and the sample record read; all from the configuration.
    timesteps = property(lambda self: self.config.timesteps)
    objective = property(lambda self: self.config.objective)
    variance = property(lambda self: self.config.variance)
    clip_denoised = property(lambda self: self.config.clip_denoised)
    self_condition = property(lambda self: self.config.self_condition)
    formulation = property(lambda self: self.config.formulation)

    @property
    def default_sampling(self) -> SamplingOptions | None:
        """The checkpoint's sampler (None: the library's); an EDM model's is EDM's Heun over 18 karras levels."""
        if self._sampling is None and self.formulation == "edm":
            return EDM_SAMPLING
        return self._sampling

    precision = property(lambda self: self._precision, doc="the network's autocast while sampling")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def schedule_on(self, device: torch.device) -> NoiseSchedule:
        """The schedule with its tables on ``device`` (cached)."""
        if device not in self._schedules:
            self._schedules[device] = self.schedule.to(device)
        return self._schedules[device]

    def forward(self, images: torch.Tensor, *, generator: torch.Generator | None = None,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                model_kwargs: dict | None = None, reduction: str = "mean",
                self_cond_mask: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss for a batch of images in [0, 1] (Algorithm 1), from the configuration's loss.

        t and eps ~ N(0, I) are drawn from ``generator`` (default: one seeded from the global RNG)
        unless given, as the training loop draws
        them (``ddpm.losses``: the loss's timestep draw, then the noise, then its extras: offset
        noise, the self-conditioning coins); a given ``noise`` is used as it is (no offset added).
        """
        if tuple(images.shape[1:]) != (self.channels, *self.image_size) or images.ndim < 3:
            raise ConfigError(f"expected images of shape [B, {', '.join(map(str, (self.channels, *self.image_size)))}]"
                              f", got {list(images.shape)}")
        x0 = to_model_range(images.float())
        loss = make_loss(self.config, self.schedule_on(x0.device))
        if generator is None:           # the global RNG seeds one, so torch.manual_seed reproduces the draws
            generator = torch.Generator(x0.device).manual_seed(int(torch.randint(2 ** 62, (1,))))
        weights = None
        if t is None:
            t, weights = loss.draw_timesteps(x0.shape[0], generator, x0.device)
        if noise is None:
            noise, extras = loss.draw_extras(randn(x0.shape, generator=generator, device=x0.device), generator)
        else:
            _, extras = loss.draw_extras(noise, generator)          # the given noise as it is; the coins drawn
        if self_cond_mask is not None:
            extras["self_cond_mask"] = self_cond_mask
        if self.condition is not None:           # c, then its augmentation, drawn after everything else
            if condition is None and self.condition.task == "paired":
                check_condition(self.condition, None)
            paired = None if condition is None else prepare_condition(self.condition, condition.to(x0.device),
                                                                      self.image_size)
            c = training_condition(self.condition, x0, paired, generator)
            model_kwargs = {**(model_kwargs or {}), CONDITION_KEY: c}
        else:
            check_condition(None, condition)
        losses = loss.losses(self.model, x0, t, noise, model_kwargs=model_kwargs, **extras)
        losses = losses if weights is None else losses * weights
        return losses.mean() if reduction == "mean" else losses

    @torch.inference_mode()
    def sample(self, batch_size: int = 16, *, sampler: str | None = None, steps: int | None = None,
               spacing: str | None = None, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               progress: bool = True, return_intermediates: bool = False, record_every: int = 1,
               clip_denoised: bool | None = None, model_kwargs: dict | None = None,
               condition: torch.Tensor | None = None, condition_level: float = 0.0, **options):
        """Images in [0, 1], shape [B, C, H, W], from the sampler registry (``ddpm.samplers.SAMPLERS``).

        The default is the paper's ancestral sampler over all T steps (Algorithm 2), or for an EDM model
        EDM's Heun sampler over 18 karras levels (Algorithm 1); ``sampler`` and ``steps`` (with ``spacing``,
        default trailing, karras for an EDM model) choose another, ``options`` are the sampler's own (``eta``,
        ``variance``) and the denoiser's (``dynamic_thresholding``, ``guidance_scale``,
        ``uncond_kwargs``). x_T is ``noise`` or drawn from ``generator``, as is every later noise.
        With ``return_intermediates`` a :class:`SampleTrajectory` is returned, its tensors (x_t after
        every ``record_every``-th step, and the last) mapped to [0, 1] too. An image-conditioned model
        takes ``condition`` (one image per sample, in [0, 1]; ``batch_size`` is then its length),
        augmented at ``condition_level`` when it was trained with conditioning augmentation.
        """
        conditioning = {k: options.pop(k) for k in ("guidance_scale", "uncond_kwargs") if k in options}
        if model_kwargs is not None:
            conditioning["model_kwargs"] = model_kwargs
        plan = resolve_plan(self, self._sampling_options(sampler, steps, spacing, clip_denoised, options))
        device = self.device
        check_condition(self.condition, condition)
        batch_size = batch_size if condition is None else condition.shape[0]
        shape = (batch_size, self.channels, *self.image_size)
        x_T = randn(shape, generator=generator, device=device) if noise is None else noise.to(device, torch.float32)
        if condition is not None:          # c, augmented with noise drawn after x_T
            c = prepare_condition(self.condition, condition.to(device), self.image_size)
            c = sampling_augmentation(self.condition, c, condition_level, generator)
            conditioning["model_kwargs"] = {**conditioning.get("model_kwargs", {}), CONDITION_KEY: c}
        traj = SampleTrajectory(x0=x_T, timesteps=[], x_t=[], x0_pred=[])

        def on_step(info: dict) -> None:
            if return_intermediates and (info["t"] % record_every == 0 or info["i"] + 1 == plan.steps):
                traj.timesteps.append(info["t"])
                traj.x_t.append(from_model_range(info["x"]).cpu())
                traj.x0_pred.append(from_model_range(info["x0_pred"]).cpu())

        x0 = run_sampler(self, plan, x_T, noise=lambda: randn(shape, generator=generator, device=device),
                         conditioning=conditioning, callback=on_step, progress=progress)
        traj.x0 = from_model_range(x0)
        return traj if return_intermediates else traj.x0

    def _sampling_options(self, sampler: str | None, steps: int | None, spacing: str | None,
                          clip_denoised: bool | None, options: dict) -> SamplingOptions:
        """:meth:`sample`'s keywords as :class:`~ddpm.samplers.SamplingOptions` (all T steps unless ``steps``;
        ``clip_denoised`` gives way to dynamic thresholding)."""
        for name in ("image_size", "channels", "device"):
            if name in options:
                raise ConfigError(f"sample() got {name}=: the image size and channels are fixed when the diffusion "
                                  f"is built, and the device is the model's; call GaussianDiffusion(model, "
                                  f"image_size=..., channels=...).to(device).sample(batch_size)")
        unknown = sorted(set(options) - {"eta", "variance", "dynamic_thresholding", *SIGMA_OPTIONS})
        if unknown:
            raise ConfigError(f"sample() got an unexpected argument {unknown[0]!r}; the sampler's own are eta "
                              f"(ddim), variance (ddpm) and {', '.join(SIGMA_OPTIONS)} (the sigma samplers), the "
                              "denoiser's dynamic_thresholding, guidance_scale and uncond_kwargs")
        edm = self.formulation == "edm"
        if sampler is None:
            sampler, steps = (EDM_SAMPLING.sampler, steps or EDM_SAMPLING.steps) if edm else ("ddpm", steps)
        spacing = spacing if spacing is not None else EDM_SAMPLING.spacing if edm else "trailing"
        dynamic = bool(options.get("dynamic_thresholding", False))
        return SamplingOptions(sampler=sampler, steps=steps, spacing=spacing, eta=options.get("eta"),
                               variance=options.get("variance"), dynamic_thresholding=dynamic,
                               clip=None if dynamic or clip_denoised is None else bool(clip_denoised),
                               **{name: options[name] for name in SIGMA_OPTIONS if name in options})


