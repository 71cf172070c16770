"""``import jaxscanvi`` loads JAX and little else; every public name still resolves.

The heavy libraries load on first use of a name that needs them (PEP 562
``__getattr__`` in ``jaxscanvi/__init__.py``). Each check runs in a fresh
interpreter, since this one has imported everything already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFERRED = (
    "flax",
    "pandas",
    "anndata",
    "scipy",
    "matplotlib",
    "optax",
    "numpyro",
    "h5py",
    "sklearn",
    "torch",
    "jaxscanvi.model",
    "jaxscanvi.torchfile",
    "jaxscanvi.distributed",
    "jaxscanvi.pl",
)


def _fresh(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAXSCANVI_COMPILATION_CACHE="0")
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_defers_heavy_modules():
    out = _fresh(
        "import sys, json, jaxscanvi\n"
        f"print(json.dumps([m for m in {list(DEFERRED)!r} if m in sys.modules]))"
    )
    assert out == []


def test_lazy_names_resolve_to_the_real_objects():
    out = _fresh(
        "import json, sys, jaxscanvi as scvi\n"
        "from jaxscanvi.model.scvi import SCVI\n"
        "from jaxscanvi import SCANVI, synthetic_atlas, losses, sweep\n"
        "ok = [scvi.model.SCVI is SCVI, scvi.SCVI is SCVI, scvi.SCANVI is SCANVI,\n"
        "      callable(synthetic_atlas), hasattr(losses, 'scvi_elbo'),\n"
        "      hasattr(sweep, 'train_many'), scvi.REGISTRY_KEYS is not None,\n"
        "      'SCVI' in dir(scvi), 'pl' in dir(scvi), 'flax' in sys.modules]\n"
        "try:\n"
        "    scvi.no_such_name\n"
        "    ok.append(False)\n"
        "except AttributeError:\n"
        "    ok.append(True)\n"
        "print(json.dumps(ok))"
    )
    assert out == [True] * 11
