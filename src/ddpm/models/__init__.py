"""Networks: the paper's U-Net and its named presets."""

from .presets import PRESETS
from .unet import Unet, UnetConfig, preset_config, timestep_embedding

__all__ = ["Unet", "UnetConfig", "PRESETS", "preset_config", "timestep_embedding"]
