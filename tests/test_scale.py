"""Atlas scale: streaming from disk, the three data sources, and data
parallelism over 2 forced CPU devices (in a subprocess: the device count is
fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import jaxscanvi as js
from jaxscanvi.data import backed
from jaxscanvi.data.backed import BackedRows
from jaxscanvi.data.shuffle import buffer_order
from jaxscanvi.train import chunks, sources
from jaxscanvi.train.sources import epoch_rows

HERE = Path(__file__).resolve().parent
TRAIN = dict(
    max_epochs=3, batch_size=64, progress_bar=False, train_size=0.8, check_val_every_n_epoch=1
)


@pytest.fixture(scope="module")
def on_disk(small_atlas, tmp_path_factory):
    """The small atlas in memory, and the same cells written to .h5ad and .zarr."""
    d = tmp_path_factory.mktemp("backed")
    a = small_atlas[:400].copy()
    a.write_h5ad(d / "atlas.h5ad")
    a.write_zarr(d / "atlas.zarr")
    return a, d


def test_backed_rows_read_the_same_counts(on_disk):
    a, d = on_disk
    b = ad.read_h5ad(d / "atlas.h5ad", backed="r")
    rows = BackedRows(b.X, block_size=50, cache_blocks=2)
    pick = np.array([399, 3, 51, 50, 200, 3])
    np.testing.assert_array_equal(rows[pick].toarray(), a.X[pick].toarray())
    np.testing.assert_array_equal(rows.indptr, a.X.indptr)
    assert len(rows._cache) <= 2


def _monkey_buffer_order(monkeypatch):
    """Give every source the streaming source's buffered order (small runs and
    buffers, so this small file spans several of each)."""

    def order(self, rng, idx, batch_size, *, shuffle=True):
        if not shuffle:
            return epoch_rows(rng, idx, batch_size, shuffle=False)
        return epoch_rows(
            rng, buffer_order(rng, idx, run_cells=16, buffer_cells=128), batch_size, shuffle=False
        )

    monkeypatch.setattr(sources.Source, "order", order)
    monkeypatch.setattr(backed, "DEFAULT_BLOCK", 50)
    monkeypatch.setattr(chunks, "CHUNK_CELLS", 128)  # several chunks per epoch
    monkeypatch.setattr(sources.StreamSource, "chunk_cells", 128)


def test_three_sources_give_the_same_trajectory(on_disk, monkeypatch):
    a, d = on_disk
    _monkey_buffer_order(monkeypatch)
    histories = {}
    for source in ("device", "host", "stream"):
        adata = ad.read_h5ad(d / "atlas.h5ad", backed="r") if source == "stream" else a.copy()
        js.SCVI.setup_anndata(adata, batch_key="batch")
        m = js.SCVI(adata, n_latent=4, n_hidden=16)
        m.train(data_source=source, **TRAIN)
        histories[source] = m.history.to_frame()
        if source == "stream":
            streamed = m
    for col in ("train_loss", "elbo_validation"):
        ref = histories["host"][col].to_numpy()
        for s in ("device", "stream"):
            np.testing.assert_allclose(
                histories[s][col].to_numpy(), ref, rtol=1e-5, err_msg=f"{s} {col}"
            )
    assert histories["host"]["train_loss"].iloc[-1] < histories["host"]["train_loss"].iloc[0]
    # inference on the backed AnnData streams too, in cell order
    z = streamed.get_latent_representation()
    z_mem = streamed.get_latent_representation(adata=a)
    np.testing.assert_allclose(z, z_mem, rtol=1e-5, atol=1e-6)


def test_scanvi_streams_labelled_minibatches(on_disk):
    a, d = on_disk
    adata = ad.read_h5ad(d / "atlas.h5ad", backed="r")
    labels = a.obs["cell_type"].astype(str).to_numpy().copy()
    labels[::2] = "Unknown"
    adata.obs["label"] = labels
    js.SCANVI.setup_anndata(
        adata, labels_key="label", unlabeled_category="Unknown", batch_key="batch"
    )
    m = js.SCANVI(adata, n_latent=4, n_hidden=16)
    m.train(max_epochs=2, batch_size=64, progress_bar=False)
    assert "classification_loss_train" in m.history
    assert np.isfinite(m.history.to_frame()["train_loss"]).all()
    assert len(m.predict()) == a.n_obs


def test_zarr_store_streams(on_disk):
    """A .zarr store opened lazily (anndata.io.sparse_dataset) is read block by block,
    with the same per-cell statistics as the matrix in memory."""
    import zarr
    from anndata.io import read_elem, sparse_dataset

    from jaxscanvi.data.cells import cell_data

    a, d = on_disk
    g = zarr.open(str(d / "atlas.zarr"), mode="r")
    adata = ad.AnnData(X=sparse_dataset(g["X"]), obs=read_elem(g["obs"]), var=read_elem(g["var"]))
    js.SCVI.setup_anndata(adata, batch_key="batch")
    mem = a.copy()
    js.SCVI.setup_anndata(mem, batch_key="batch")
    reg = js.SCVI(mem, n_latent=4, n_hidden=16).registry
    lazy, full = cell_data(adata, reg), cell_data(mem, reg)
    assert isinstance(lazy.X, BackedRows)
    for k in ("log_library", "lgamma_const", "batch"):
        np.testing.assert_allclose(getattr(lazy, k), getattr(full, k), rtol=1e-6)
    pick = np.array([7, 300, 8, 150])
    np.testing.assert_array_equal(lazy.X[pick].toarray(), full.X[pick].toarray())
    assert sources.make_source("auto", lazy, 64).kind == "stream"


@pytest.mark.system
@pytest.mark.slow
def test_two_devices_match_one():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    res = subprocess.run(
        [sys.executable, str(HERE / "parallel_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and line, res.stderr[-3000:]
    out = json.loads(line[0][len("RESULT ") :])
    assert out["n_devices"] == 2
    for k, v in out.items():
        if k.endswith(("_params", "_batch_stats", "_latent")):
            assert v < 1e-4, (k, v)
    assert out["scvi_device_history"] < 1e-2 and out["scvi_host_history"] < 1e-2
    assert "elbo_validation" in out["history_columns"]
    assert out["train_state_devices"] == 2  # training ran on both
    assert out["param_devices"] == 1  # trained values come back on one device
    assert out["scanvi_predict_equal"] > 0.99


def test_rows_are_padded_to_a_multiple_of_the_devices():
    from jaxscanvi.train.parallel import DataParallel

    class FourDevices(DataParallel):
        size = 4  # padding depends only on the device count

    rows = np.arange(30, dtype=np.int32).reshape(3, 10)
    padded = FourDevices(mesh=None).pad(rows)
    assert padded.shape == (3, 12)
    np.testing.assert_array_equal(padded[:, :10], rows)
    assert (padded[:, 10:] == -1).all()
    assert FourDevices(mesh=None).pad(None) is None
