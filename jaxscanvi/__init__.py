"""jaxscanvi: scVI and scANVI in JAX/Flax."""

from ._version import FORMAT_VERSION, __version__
from ._settings import settings
from .compile_cache import clear_caches, set_compilation_cache
from .compile_cache import configure_at_import as _configure_cache

_configure_cache()  # before anything compiles; see compile_cache.py

from .data.registry import Registry
from .data.synthetic import synthetic_atlas
from .errors import FolderLockedError, InputError, ModelFormatError, NonFiniteLossError
from .model.scanvi import SCANVI
from .model.scvi import SCVI
from .model._setup_view import REGISTRY_KEYS
from . import de, model, pl

__all__ = ["SCVI", "SCANVI", "Registry", "synthetic_atlas", "InputError", "ModelFormatError",
           "NonFiniteLossError", "FolderLockedError", "__version__", "FORMAT_VERSION",
           "set_compilation_cache", "clear_caches", "settings", "model", "REGISTRY_KEYS"]
