"""The APIs of other diffusion libraries, on this project's machinery.

* :mod:`ddpm.compat.lucidrains`: ``Unet`` (and, with the diffusion and training options,
  ``GaussianDiffusion`` and ``Trainer``) under the names of lucidrains'
  denoising-diffusion-pytorch, for code written against it.

``docs/coming-from.md`` maps the names of these and other libraries to this project's.
"""
