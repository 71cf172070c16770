"""User-facing model classes."""

from .scvi import SCVI
from .scanvi import SCANVI
