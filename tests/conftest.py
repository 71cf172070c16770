"""Shared fixtures. Models are small and compiled functions are reused across tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The suite never writes into the user's compilation cache: jaxscanvi's
# persistent cache is off here (and in every subprocess a test starts).
# tests/test_compile_cache.py turns it on, in temporary folders, where it
# tests it. Set before anything imports jaxscanvi.
os.environ["JAXSCANVI_COMPILATION_CACHE"] = "0"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# Tests marked ``system`` start other processes (forced devices, several hosts,
# kills, whole scripts): minutes of CPU between them. The main suite leaves
# them out; ``--system`` adds them, ``-m system`` runs only them (CI's second
# step). Deselected, not skipped, so a skip still means something is missing.
def pytest_addoption(parser):
    parser.addoption(
        "--system",
        action="store_true",
        help="also run the tests marked system (they start other processes)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--system") or "system" in (config.getoption("markexpr") or ""):
        return
    keep = [i for i in items if i.get_closest_marker("system") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
        config._jaxscanvi_system_left = True


def pytest_terminal_summary(terminalreporter, config):
    if getattr(config, "_jaxscanvi_system_left", False):
        terminalreporter.write_line(
            "tests marked system were deselected; run them with "
            "-m system (or everything with --system)"
        )


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

    return synthetic_atlas(
        n_cells=600,
        n_genes=200,
        n_batches=2,
        n_lineages=2,
        types_per_lineage=2,
        seed=0,
        markers_per_type=10,
    )


@pytest.fixture
def atlas(small_atlas):
    """A fresh copy of the small atlas that a test may modify."""
    return small_atlas.copy()


def hvg(adata, n_top: int = 2000):
    """The n_top genes by variance of log-normalised counts (what the data README
    suggests; the tests' thresholds were set on these genes)."""
    from jaxscanvi.data.hvg import highly_variable_genes

    return adata[:, highly_variable_genes(adata, n_top, flavor="variance")].copy()


# ---------------------------------------------------------- embedding metrics
# scikit-learn finds the neighbours and the principal components; the scores
# on top are the usual few lines (leave-one-out kNN vote, batch entropy).
def _neighbours(z, k: int):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)
    return nn[:, 1:]  # drop each cell itself


def knn_accuracy(z, labels, k: int = 15, mask=None) -> float:
    """Leave-one-out k-NN accuracy (majority vote) among the cells of ``mask``."""
    labels = np.asarray(labels)
    idx = np.arange(len(labels)) if mask is None else np.flatnonzero(mask)
    cats, y = np.unique(labels[idx], return_inverse=True)
    votes = y[_neighbours(np.asarray(z)[idx], k)]
    pred = np.array([np.bincount(v, minlength=len(cats)).argmax() for v in votes])
    return float((pred == y).mean())


def batch_entropy(z, batches, k: int = 15) -> float:
    """Mean entropy of batch labels among each cell's k neighbours, each batch's
    share divided by its global share, normalised by log(#batches): 1 = mixed."""
    cats, codes = np.unique(np.asarray(batches), return_inverse=True)
    if len(cats) < 2:
        return 1.0
    counts = np.stack(
        [(codes[_neighbours(np.asarray(z), k)] == c).sum(1) for c in range(len(cats))], 1
    ).astype(float)
    p = counts / (np.bincount(codes) / len(codes))
    p /= p.sum(1, keepdims=True)
    ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(1)
    return float(ent.mean() / np.log(len(cats)))


def pca_log_normalized(X, n_components: int = 10):
    """PCA of log1p(counts / library * 1e4): the uncorrected baseline."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    X = X.toarray() if sp.issparse(X) else np.asarray(X, float)
    lib = X.sum(1, keepdims=True)
    return PCA(n_components, random_state=0).fit_transform(
        np.log1p(X / np.where(lib > 0, lib, 1) * 1e4)
    )
