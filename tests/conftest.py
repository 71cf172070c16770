"""Shared fixtures. Models are small and compiled functions are reused across tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """Path to a file of ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (shared data is only on developer/CI machines)")
    return path


@pytest.fixture(scope="session")
def small_atlas():
    """A small synthetic atlas: 600 cells, 200 genes, 2 batches, 4 types (read-only)."""
    from jaxscanvi import synthetic_atlas
    return synthetic_atlas(n_cells=600, n_genes=200, n_batches=2, n_lineages=2,
                           types_per_lineage=2, seed=0, markers_per_type=10)


@pytest.fixture
def atlas(small_atlas):
    """A fresh copy of the small atlas that a test may modify."""
    return small_atlas.copy()


def hvg(adata, n_top: int = 2000):
    """Top genes by variance of log-normalised counts (what the data README suggests)."""
    import scipy.sparse as sp
    X = adata.X
    lib = np.asarray(X.sum(1)).ravel()
    norm = sp.diags(1e4 / lib) @ X if sp.issparse(X) else X * (1e4 / lib)[:, None]
    norm = sp.csr_matrix(norm)
    norm.data = np.log1p(norm.data)
    mean = np.asarray(norm.mean(0)).ravel()
    sq = np.asarray(norm.multiply(norm).mean(0)).ravel()
    var = sq - mean ** 2
    top = np.argsort(-var)[:n_top]
    return adata[:, np.sort(top)].copy()
