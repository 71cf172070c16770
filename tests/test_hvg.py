"""Gene selection (jaxscanvi.data.hvg). The genes themselves are checked against
scanpy in tests/test_parity_hvg.py (CI's parity step); these tests need no scanpy."""

from __future__ import annotations

import numpy as np
import pytest

import jaxscanvi as js
from jaxscanvi.data.hvg import _kd_vertices, _split_point, highly_variable_genes, loess


@pytest.mark.parametrize("surface", ["interpolate", "direct"])
def test_loess_reproduces_a_quadratic(surface):
    # a local quadratic fits a quadratic exactly, and cubic Hermite
    # interpolation of exact values and slopes is exact for it too
    x = np.random.default_rng(0).normal(size=3000)
    y = 1.5 - 0.7 * x + 0.3 * x**2
    np.testing.assert_allclose(loess(x, y, 0.3, surface=surface), y, atol=1e-8)


def test_interpolated_loess_is_close_to_the_direct_fit():
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, 3, 4000)
    y = np.sin(x) + 0.2 * rng.normal(size=x.size)
    direct, interp = loess(x, y, 0.3, surface="direct"), loess(x, y, 0.3)
    assert np.abs(direct - interp).max() < 0.01
    assert np.abs(interp - np.sin(x)).mean() < 0.05  # and it found the curve


def test_kd_tree_cells_and_ties():
    xs = np.sort(np.random.default_rng(2).normal(size=1000))
    verts = _kd_vertices(xs, fc=60)
    counts = np.histogram(xs, verts)[0]
    assert counts.max() <= 60 and counts.sum() == 1000
    assert verts[0] < xs[0] and verts[-1] > xs[-1]
    tied = np.array([0.0, 1, 2, 2, 2, 2, 3, 4])
    m = _split_point(tied, 0, 7)  # the median is inside the run of 2s
    assert tied[m] != tied[m + 1]


def _counts(n_cells=400, n_genes=300, seed=0):
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    mu = rng.lognormal(0, 1.2, n_genes)
    theta = rng.uniform(0.2, 5, n_genes)  # some genes far more variable than others
    X = rng.negative_binomial(theta, theta / (theta + mu), size=(n_cells, n_genes))
    a = anndata.AnnData(X.astype(np.float32))
    a.var_names = [f"g{i}" for i in range(n_genes)]
    a.obs["batch"] = pd.Categorical(np.repeat(["a", "b"], n_cells // 2))
    a.obs["one"] = pd.Categorical(["x"] * n_cells)
    return a, theta


@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat", "variance"])
def test_each_flavor_picks_n_genes_and_prefers_overdispersed(flavor):
    a, theta = _counts()
    if flavor == "seurat":
        a.X = np.log1p(a.X / a.X.sum(1, keepdims=True) * 1e4)
    mask = highly_variable_genes(a, 60, flavor=flavor)
    assert mask.dtype == bool and mask.sum() == 60
    # the chosen genes are the over-dispersed ones (small NB theta)
    assert np.median(theta[mask]) < 0.6 * np.median(theta[~mask])


def test_one_batch_key_equals_no_batch_key():
    a, _ = _counts()
    np.testing.assert_array_equal(
        highly_variable_genes(a, 50, batch_key="one"), highly_variable_genes(a, 50)
    )


def test_bad_flavor_and_batch_key_are_named():
    a, _ = _counts(50, 20)
    with pytest.raises(js.InputError, match="flavor"):
        highly_variable_genes(a, 10, flavor="cell_ranger")
    with pytest.raises(js.InputError, match="batch_key"):
        highly_variable_genes(a, 10, batch_key="donor")
