"""Resource limits: a run that cannot fit in memory is refused before anything is
allocated or compiled, with the size and the remedy (jaxscanvi/train/budget.py)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxscanvi import SCANVI, SCVI, InputError, synthetic_atlas
from jaxscanvi.train import budget


@pytest.fixture(scope="module")
def adata():
    a = synthetic_atlas(
        n_cells=300,
        n_genes=50,
        n_batches=2,
        n_lineages=1,
        types_per_lineage=2,
        seed=0,
        markers_per_type=5,
    )
    SCVI.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    return a


def _memory(monkeypatch, n_bytes: int):
    monkeypatch.setattr(budget, "device_memory_bytes", lambda: (n_bytes, "the test device"))


def test_device_copy_larger_than_memory_is_refused(adata, monkeypatch):
    m = SCVI(adata, n_hidden=8, n_latent=2)
    before = [np.asarray(v).copy() for v in m.params["decoder"].values() if hasattr(v, "shape")]
    _memory(monkeypatch, 1024)
    with pytest.raises(
        InputError,
        match=r"data_source='device': the counts need \d+\.\d "
        r"GiB on the device \(300 cells, \d+ non-zeros\), more than the test "
        r"device has.*Fix: pass data_source='host'.*'stream'.*fewer genes",
    ):
        m.train(max_epochs=1, data_source="device", progress_bar=False)
    assert not m.is_trained and len(m.history) == 0
    assert all(
        np.array_equal(a, np.asarray(b))
        for a, b in zip(before, [v for v in m.params["decoder"].values() if hasattr(v, "shape")])
    )


def test_training_step_larger_than_memory_is_refused(adata, monkeypatch):
    m = SCVI(adata, n_hidden=8, n_latent=2)
    need = 128 * 50 * budget.STEP_BYTES_PER_ENTRY
    _memory(monkeypatch, need - 1)
    with pytest.raises(
        InputError,
        match=r"batch_size=128: one training step needs at least "
        r"0\.0 GiB \(128 cells x 50 genes x 16 bytes\).*Fix: pass a smaller "
        r"batch_size, keep fewer genes",
    ):
        m.train(max_epochs=1, data_source="host", progress_bar=False)
    _memory(monkeypatch, need)  # exactly enough: not refused by the estimate
    budget.check(
        type("C", (), {"data_source": "host", "batch_size": 128})(),
        m._train_cells(),
        m.module.config,
    )


def test_scanvi_step_counts_the_enumerated_cell_types(adata, monkeypatch):
    a = adata.copy()
    SCANVI.setup_anndata(a, batch_key="batch", labels_key="cell_type", unlabeled_category="Unknown")
    m = SCANVI(a, n_hidden=8, n_latent=2)
    assert m.module.config.n_labels == 2
    _memory(monkeypatch, 64 * 50 * 2 * budget.STEP_BYTES_PER_ENTRY - 1)
    with pytest.raises(
        InputError,
        match=r"\(64 cells x 50 genes x 2 cell types enumerated "
        r"at once x 16 bytes\).*or a smaller class_chunk_size",
    ):
        m.train(max_epochs=1, batch_size=64, data_source="host", progress_bar=False)


def test_memory_figures_are_real():
    mem, where = budget.device_memory_bytes()
    assert budget.host_memory_bytes() > 0 and 1 << 26 < mem < 1 << 50, (mem, where)
