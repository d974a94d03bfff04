"""Conversion to and from other libraries' formats (diffusers: :mod:`ddpm.interop.diffusers`)."""

from .diffusers import export_diffusers, import_diffusers, require_diffusers

__all__ = ["export_diffusers", "import_diffusers", "require_diffusers"]
