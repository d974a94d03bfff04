"""The APIs of other diffusion libraries and tutorials, on this project's machinery.

* :mod:`ddpm.compat.lucidrains`: lucidrains' denoising-diffusion-pytorch (``Unet``,
  ``GaussianDiffusion``, ``Trainer``, the 1D family, ``XMWrapper``, ``LearnedGaussianDiffusion``;
  its other classes refuse in one line naming the nearest call).
* :mod:`ddpm.compat.labml`: labml's annotated ``DenoiseDiffusion``.
* :mod:`ddpm.compat.tutorial`: the ``NoiseSchedule``, ``DDPM``, ``UNet``, ``ResBlock``, EMA and
  autocast that DDPM tutorials build by hand.

Code written against them runs with only its import changed; ``docs/coming-from.md`` maps the
names of these and other libraries to this project's.
"""
