"""User-facing model classes."""

from .scanvi import SCANVI
from .scvi import SCVI
