"""Shared fixtures. Models are small and compiled functions are reused across tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite never writes into the user's compilation cache: jaxscanvi's
# persistent cache is off here (and in every subprocess a test starts).
# tests/test_compile_cache.py turns it on, in temporary folders, where it
# tests it. Set before anything imports jaxscanvi.
os.environ["JAXSCANVI_COMPILATION_CACHE"] = "0"

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
    """The n_top genes by variance of log-normalised counts (what the data README
    suggests; the tests' thresholds were set on these genes)."""
    from jaxscanvi.data.hvg import highly_variable_genes
    return adata[:, highly_variable_genes(adata, n_top, flavor="variance")].copy()
