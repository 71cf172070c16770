"""User-facing model classes."""

from .scvi import SCVI
