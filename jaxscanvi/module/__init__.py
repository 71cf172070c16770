"""The linen modules: scVI's `VAE` and scANVI's `SCANVAE`, with their configs."""

from .scanvae import SCANVAE, SCANVIConfig
from .vae import VAE, VAEConfig

__all__ = ["SCANVAE", "VAE", "SCANVIConfig", "VAEConfig"]
