"""ddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020) and their successors.

The names below are imported on first use (PEP 562), so that ``import ddpm.cli`` does not import
torch: the command line installs its Ctrl-C handling before the heavy imports start.
"""

from .errors import CheckpointError, ConfigError, DataError, DdpmError

__version__ = "0.1.0"

__all__ = ["GaussianDiffusion", "NoiseSchedule", "Unet", "UnetConfig", "PRESETS",
           "DdpmError", "ConfigError", "DataError", "CheckpointError", "__version__"]

# Each lazily imported name and the module that defines it.
_LAZY = {"GaussianDiffusion": "gaussian_diffusion", "NoiseSchedule": "schedules",
         "Unet": "models", "UnetConfig": "models", "PRESETS": "models"}


def __getattr__(name: str):
    import importlib            # lazy attributes: torch loads with the first model or diffusion used

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    try:                        # a submodule (ddpm.samplers, ...), as when import ddpm imported them all
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
