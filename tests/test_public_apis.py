"""Other libraries are used through their public APIs; each exception is one
documented wrapper, and these tests pin what it does.

* `jaxscanvi.model._align._become`: an AnnData takes another's contents in
  place (anndata has no public way to change the gene axis of an object).
* `jaxscanvi.distributed._client`: JAX's key-value store (no public API).

The optimiser state is read and written through `optax.tree_utils`
(`train.state.hyperparams`, `with_hyperparams`, `adam_state`), pinned in
tests/test_optimizer.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxscanvi import distributed
from jaxscanvi.model._align import _become

PACKAGE = Path(__file__).resolve().parents[1] / "jaxscanvi"

# (pattern, the one file allowed to hold it)
PRIVATE = [
    (r"jax\._src", "distributed.py"),
    (r"_init_as_actual\(", None),
    (r"\binner_state\b", None),
    (r"\.hyperparams\b", None),
]


@pytest.mark.parametrize("pattern,allowed", PRIVATE)
def test_private_apis_only_inside_their_wrapper(pattern, allowed):
    hits = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code) and f.name != allowed:
                hits.append(f"{f.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def _adata(n_obs=6, n_vars=4, seed=0):
    r = np.random.default_rng(seed)
    X = sp.csr_matrix(r.poisson(1.0, (n_obs, n_vars)).astype(np.float32))
    obs = pd.DataFrame({"batch": list("ab") * (n_obs // 2)}, index=[f"c{i}" for i in range(n_obs)])
    var = pd.DataFrame(
        {"score": np.arange(n_vars, dtype=float)}, index=[f"g{i}" for i in range(n_vars)]
    )
    a = ad.AnnData(
        X=X,
        obs=obs,
        var=var,
        uns={"note": "old"},
        obsm={"emb": r.normal(size=(n_obs, 2))},
        obsp={"conn": sp.identity(n_obs, format="csr")},
        varm={"loadings": r.normal(size=(n_vars, 3))},
        layers={"counts": X.copy()},
    )
    a.raw = a.copy()
    return a


def _assert_holds(a: ad.AnnData, new: ad.AnnData):
    assert a.shape == new.shape and not a.is_view and not a.isbacked
    assert a.X is new.X or (a.X != new.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, new.obs)
    pd.testing.assert_frame_equal(a.var, new.var)
    assert dict(a.uns) == dict(new.uns)
    assert set(a.obsm) == set(new.obsm) and set(a.obsp) == set(new.obsp)
    for k in new.obsm:
        np.testing.assert_array_equal(a.obsm[k], new.obsm[k])
    assert set(a.layers) == set(new.layers)
    for k in new.layers:
        assert (a.layers[k] != new.layers[k]).nnz == 0
    # what does not fit the new gene axis is gone
    assert len(a.varm) == 0 and len(a.varp) == 0 and a.raw is None


@pytest.mark.parametrize("view", [False, True])
def test_become_replaces_an_anndata_in_place(view):
    base = _adata()
    a = base[:4] if view else base
    n = a.n_obs
    new = ad.AnnData(
        X=sp.csr_matrix(np.ones((n, 3), np.float32)),
        obs=a.obs.copy(),
        var=pd.DataFrame(index=["g2", "g0", "new"]),
        uns={"note": "new"},
        obsm=dict(a.obsm),
        obsp=dict(a.obsp),
        layers={"counts": sp.csr_matrix(np.full((n, 3), 2.0, np.float32))},
    )
    before = id(a)
    assert _become(a, new) is None
    assert id(a) == before
    _assert_holds(a, new)
    assert list(a.var_names) == ["g2", "g0", "new"]
    a.obs["x"] = 1  # an actual object: writable, and a view's parent is untouched
    if view:
        assert base.shape == (6, 4) and "x" not in base.obs


def test_client_is_none_outside_a_run():
    """One process that never joined a run has no store: every caller treats
    None as "unknown" (a lost process is then named by its index)."""
    assert distributed._client() is None
    assert distributed.lost_processes() == []
