"""The old import path of scANVI's module (the README's API table names it)."""

from .module.scanvae import SCANVAE, SCANVIConfig

__all__ = ["SCANVAE", "SCANVIConfig"]
