"""Named U-Net presets: the paper's models and small ones that train on a CPU.

``PRESETS`` is the registry the CLI offers as ``--preset`` choices.
"""

from __future__ import annotations

from ..errors import ConfigError
from .unet import UnetConfig

__all__ = ["PRESETS", "preset_config"]

PRESETS: dict[str, dict] = {
    # Ho et al. 2020, Appendix B: the CIFAR-10 model, 35,746,307 parameters.
    "cifar10": dict(image_size=32, channels=3, dim=128, dim_mults=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), dropout=0.1),
    # Ho et al. 2020, Appendix B: the 256x256 model (CelebA-HQ, LSUN), about 114M parameters.
    "celebahq256": dict(image_size=256, channels=3, dim=128, dim_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attention_resolutions=(16,), dropout=0.0),
    # scikit-learn's 8x8 digits: recognisable digits after 2,000 steps (about 5 minutes on 2 CPU cores).
    "digits": dict(image_size=8, channels=1, dim=32, dim_mults=(1, 2), num_res_blocks=2,
                   attention_resolutions=(4,), dropout=0.0, norm_groups=8),
    # MNIST / Fashion-MNIST, 28x28 grey: levels 28, 14, 7 with attention at 7 only. No dropout: it
    # slowed learning on CPU budgets (benchmarks/RESULTS.md, "Time to quality"); runs from before
    # keep their 0.1, which their checkpoints record.
    "mnist": dict(image_size=28, channels=1, dim=32, dim_mults=(1, 2, 2), num_res_blocks=2,
                  attention_resolutions=(7,), dropout=0.0, norm_groups=8),
}


def preset_config(name: str, **overrides) -> UnetConfig:
    """The :class:`UnetConfig` of preset ``name``, with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return UnetConfig(**{**PRESETS[name], **overrides})
