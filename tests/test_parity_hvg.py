"""Highly variable genes: jaxscanvi's scanpy flavours against scanpy itself.

Runs where scanpy and scikit-misc are installed (CI's parity step: scvi-tools
brings both); skips elsewhere.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.scvi_tools  # CI's parity step runs every test so marked

if importlib.util.find_spec("scanpy") is None or importlib.util.find_spec("skmisc") is None:
    pytest.skip(
        "scanpy and scikit-misc are not installed (CI's parity step has them)",
        allow_module_level=True,
    )

import scanpy as sc
from conftest import shared_file

from jaxscanvi.data.hvg import highly_variable_genes, loess, mean_var


@pytest.fixture(scope="module")
def pbmc():
    import anndata

    a = anndata.read_h5ad(shared_file("pbmc_3k_4k.h5ad"))
    a = a[:, np.asarray((a.X > 0).sum(0)).ravel() >= 3].copy()  # as a user filters
    a.obs["batch"] = a.obs["batch"].astype("category")
    return a


def test_loess_equals_scikit_misc(pbmc):
    from skmisc.loess import loess as netlib

    m, v = mean_var(pbmc.X)
    x, y = np.log10(m[v > 0]), np.log10(v[v > 0])
    model = netlib(x, y, span=0.3, degree=2)
    model.fit()
    np.testing.assert_allclose(loess(x, y, 0.3), model.outputs.fitted_values, rtol=0, atol=1e-9)


@pytest.mark.parametrize("batch_key", [None, "batch"])
def test_seurat_v3_genes_are_scanpys(pbmc, batch_key):
    ref = sc.pp.highly_variable_genes(
        pbmc, n_top_genes=2000, flavor="seurat_v3", batch_key=batch_key, inplace=False
    )
    ours = highly_variable_genes(pbmc, 2000, batch_key=batch_key, flavor="seurat_v3")
    assert ours.sum() == 2000
    np.testing.assert_array_equal(ours, ref["highly_variable"].to_numpy())


@pytest.mark.parametrize("batch_key", [None, "batch"])
def test_seurat_genes_are_scanpys(pbmc, batch_key):
    a = pbmc.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    ref = sc.pp.highly_variable_genes(
        a, n_top_genes=2000, flavor="seurat", batch_key=batch_key, inplace=False
    )
    ours = highly_variable_genes(a, 2000, batch_key=batch_key, flavor="seurat")
    np.testing.assert_array_equal(ours, ref["highly_variable"].to_numpy())
