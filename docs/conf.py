"""Sphinx configuration: MyST pages, MyST-NB tutorials executed at build time,
API pages from the docstrings. Build: ``sphinx-build -W --keep-going docs docs/_build/html``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxscanvi  # noqa: E402

project = "jaxscanvi"
author = "the jaxscanvi developers"
release = version = jaxscanvi.__version__
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "jupyter_execute", "README.md"]
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath"]
myst_heading_anchors = 3

# tutorials run at every build, so one that breaks fails the build
nb_execution_mode = os.environ.get("JAXSCANVI_DOCS_EXECUTE", "force")
nb_execution_raise_on_error = True
nb_execution_timeout = 900
nb_execution_show_tb = True
nb_merge_streams = True

autosummary_generate = True
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True
napoleon_google_docstring = False

html_theme = "furo"
html_title = f"jaxscanvi {version}"
html_static_path: list[str] = []
