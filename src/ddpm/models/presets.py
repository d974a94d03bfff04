"""Named U-Net presets: the paper's models and small ones that train on a CPU.

``PRESETS`` is the registry the CLI offers as ``--preset`` choices. A preset is a network
shape, held as the plain fields of a :class:`~ddpm.models.unet.UnetConfig`: its attention sits at
levels counted from the top (0 = the full image size), so it builds at any image size it can
downsample and with any channel count. Its ``image_size`` and ``channels`` are the ones it was
made for, the defaults when none are given. :func:`preset_fields` applies overrides to them;
:func:`ddpm.models.unet.preset_config` builds the ``UnetConfig``.
"""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["PRESETS", "preset_fields"]

PRESETS: dict[str, dict] = {
    # Ho et al. 2020, Appendix B: the CIFAR-10 model, 35,746,307 parameters; attention at 16x16 of 32x32.
    "cifar10": dict(image_size=32, channels=3, dim=128, dim_mults=(1, 2, 2, 2), num_res_blocks=2,
                    attention_levels=(1,), dropout=0.1),
    # Ho et al. 2020, Appendix B: the 256x256 model (CelebA-HQ, LSUN), about 114M parameters;
    # attention at 16x16 of 256x256.
    "celebahq256": dict(image_size=256, channels=3, dim=128, dim_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attention_levels=(4,), dropout=0.0),
    # scikit-learn's 8x8 digits: recognisable digits after 2,000 steps (about 5 minutes on 2 CPU cores);
    # attention at 4x4.
    "digits": dict(image_size=8, channels=1, dim=32, dim_mults=(1, 2), num_res_blocks=2,
                   attention_levels=(1,), dropout=0.0, norm_groups=8),
    # MNIST / Fashion-MNIST, 28x28 grey: levels 28, 14, 7 with attention at 7 only. No dropout: it
    # slowed learning on CPU budgets (benchmarks/RESULTS.md, "Time to quality"); runs from before
    # keep their 0.1, which their checkpoints record.
    "mnist": dict(image_size=28, channels=1, dim=32, dim_mults=(1, 2, 2), num_res_blocks=2,
                  attention_levels=(2,), dropout=0.0, norm_groups=8),
}

_ATTENTION_KEYS = ("attention_levels", "attention_resolutions")


def preset_fields(name: str, **overrides) -> dict:
    """The ``UnetConfig`` fields of preset ``name``, with fields replaced by ``overrides``.

    Attention given either way (``attention_levels`` or ``attention_resolutions``) replaces
    the preset's placement. Other ``dim_mults`` without attention keep the preset's attention
    levels that still exist, or, when none does, put attention at the innermost level.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    base = dict(PRESETS[name])
    if any(overrides.get(key) is not None for key in _ATTENTION_KEYS):
        for key in _ATTENTION_KEYS:
            base.pop(key, None)
    elif overrides.get("dim_mults") is not None:
        count = len(tuple(overrides["dim_mults"]))
        kept = tuple(level for level in base["attention_levels"] if level < count)
        base["attention_levels"] = kept or (count - 1,)
    return {**base, **overrides}
