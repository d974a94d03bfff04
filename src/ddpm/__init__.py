"""ddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020) and their successors."""

from .gaussian_diffusion import GaussianDiffusion
from .errors import CheckpointError, ConfigError, DataError, DdpmError
from .models import PRESETS, Unet, UnetConfig
from .schedules import NoiseSchedule

__version__ = "0.1.0"

__all__ = ["GaussianDiffusion", "NoiseSchedule", "Unet", "UnetConfig", "PRESETS",
           "DdpmError", "ConfigError", "DataError", "CheckpointError", "__version__"]
