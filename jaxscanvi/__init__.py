"""jaxscanvi: scVI and scANVI in JAX/Flax.

``import jaxscanvi`` loads only JAX, the settings and the compilation cache
setup; the models, data and plotting modules (flax, pandas, anndata, scipy,
matplotlib) load the first time one of their names is used (PEP 562), so
``jaxscanvi.SCVI``, ``jaxscanvi.model.SCVI`` and ``from jaxscanvi import
SCANVI`` work as before, only later.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._settings import settings
from ._version import FORMAT_VERSION, __version__
from .compile_cache import clear_caches, set_compilation_cache
from .compile_cache import configure_at_import as _configure_cache
from .errors import FolderLockedError, InputError, ModelFormatError, NonFiniteLossError

_configure_cache()  # before anything compiles; see compile_cache.py

# public name -> (module, attribute); None: the module itself
_LAZY = {
    "SCVI": (".model.scvi", "SCVI"),
    "SCANVI": (".model.scanvi", "SCANVI"),
    "Registry": (".data.registry", "Registry"),
    "synthetic_atlas": (".data.synthetic", "synthetic_atlas"),
    "REGISTRY_KEYS": (".model._setup_view", "REGISTRY_KEYS"),
}
_SUBMODULES = (
    "annotate",
    "backend",
    "cli",
    "contrib",
    "data",
    "de",
    "distributed",
    "distributions",
    "io",
    "lock",
    "losses",
    "model",
    "module",
    "module_scanvi",
    "nn",
    "pl",
    "surgery",
    "sweep",
    "torchfile",
    "train",
)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import de, model, pl
    from .data.registry import Registry
    from .data.synthetic import synthetic_atlas
    from .model._setup_view import REGISTRY_KEYS
    from .model.scanvi import SCANVI
    from .model.scvi import SCVI


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = [
    "FORMAT_VERSION",
    "REGISTRY_KEYS",
    "SCANVI",
    "SCVI",
    "FolderLockedError",
    "InputError",
    "ModelFormatError",
    "NonFiniteLossError",
    "Registry",
    "__version__",
    "clear_caches",
    "model",
    "set_compilation_cache",
    "settings",
    "synthetic_atlas",
]
