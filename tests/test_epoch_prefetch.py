"""The host and stream sources build an epoch's first chunk while the
previous epoch's last one computes, and train exactly as without it."""

from __future__ import annotations

import dataclasses
import threading

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import jaxscanvi as js
from jaxscanvi.data.batch import Batch
from jaxscanvi.data.cells import CellData
from jaxscanvi.train import chunks, host_sources
from jaxscanvi.train import loop as train_loop
from jaxscanvi.train.sources import HostSource, epoch_rows, labelled_rows

B = 8


def _cells(n=60, g=7):
    rng = np.random.default_rng(0)
    return CellData(
        X=sp.csr_matrix(rng.poisson(0.7, (n, g)).astype(np.float32)),
        batch=rng.integers(0, 3, n).astype(np.int32),
        labels=rng.integers(0, 4, n).astype(np.int32),
        cat_covs=np.zeros((n, 0), np.int32),
        cont_covs=np.zeros((n, 0), np.float32),
        log_size_factor=None,
        log_library=rng.random(n).astype(np.float32),
        lgamma_const=rng.random(n).astype(np.float32),
        obs_names=pd.Index([str(i) for i in range(n)]),
    )


def _orders(epoch: int, n: int, labelled: bool):
    rng = np.random.default_rng([0, epoch])
    rows = epoch_rows(rng, np.arange(n), B)
    lab = labelled_rows(rng, np.arange(0, n, 3), rows.shape[0], B) if labelled else None
    return rows, lab


def _counting(src: HostSource) -> list:
    """Each chunk read's cell count, in order (the source reads one per chunk)."""
    reads, real = [], src.read

    def read(take, pad):
        reads.append(len(take))
        return real(take, pad)

    src.read = read
    return reads


def _collecting(on_step=None):
    """A scan body emitting each minibatch's counts; ``on_step(step)`` runs
    on the host inside the scan."""

    def step(carry, b):
        if on_step is not None:
            jax.debug.callback(on_step, carry)
        main, lab = (b, None) if isinstance(b, Batch) else b
        out = {"x": main.x, "w": main.weight}
        if lab is not None:
            out["lab_x"] = lab.x
        return carry + 1, out

    return step


@pytest.mark.parametrize("labelled", [False, True])
def test_next_epochs_first_chunk_is_built_during_the_last_chunks_scan(monkeypatch, labelled):
    """The scan of epoch 0's last step waits, inside the program, until the
    feeder reads epoch 1's first chunk: that happens only if it is built
    while epoch 0 computes. Epoch 1 then takes that chunk up (no second
    read) and sees the very minibatches a source without it builds."""
    monkeypatch.setattr(chunks, "CHUNK_CELLS", 16)  # 2 steps per chunk
    cells = _cells()
    (r0, l0), (r1, l1) = _orders(0, 60, labelled), _orders(1, 60, labelled)
    n0 = -(-r0.shape[0] // chunks.chunk_steps(r0.shape[0], B))
    src = HostSource(cells, B)
    reads = _counting(src)
    started, waited = threading.Event(), []

    def on_step(step):
        if int(step) == r0.shape[0] - 1:  # epoch 0's last step
            waited.append(started.wait(timeout=120))

    counted = src.read

    def read(take, pad):
        out = counted(take, pad)
        if len(reads) > n0:  # a read past epoch 0's chunks: epoch 1's first
            started.set()
        return out

    src.read = read
    c0, _ = src.run_epoch(_collecting(on_step), jnp.asarray(0), r0, l0, then=(r1, l1))
    assert waited == [True]
    assert len(reads) == n0 + 1  # epoch 1's first chunk only: the rest waits
    c1, out = src.run_epoch(_collecting(), c0, r1, l1)
    n1 = -(-r1.shape[0] // chunks.chunk_steps(r1.shape[0], B))
    assert len(reads) == n0 + n1  # taken up, not built again
    assert src._ahead is None
    _, ref = HostSource(cells, B).run_epoch(_collecting(), jnp.asarray(0), r1, l1)
    assert int(c1) == r0.shape[0] + r1.shape[0]
    for k in ref:
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]), err_msg=k)


def test_a_prepared_epoch_with_outgrown_shapes_is_built_again(monkeypatch):
    """CSR chunks: a pass in between (a validation) whose chunks hold more
    non-zeros grows the cap, so the prepared chunk is dropped and rebuilt at
    the cap the epoch would have had without it."""
    monkeypatch.setattr(chunks, "CHUNK_CELLS", 16)
    X = sp.csr_matrix((np.random.default_rng(0).random((60, 7)) < 0.3).astype(np.float32))
    X = sp.vstack([X, sp.csr_matrix(np.ones((20, 7), np.float32))], format="csr")
    cells = dataclasses.replace(_cells(80), X=X)
    src = HostSource(cells, B)
    src.dense_chunk_bytes = 0  # CSR chunks
    reads = _counting(src)
    r0 = epoch_rows(np.random.default_rng(0), np.arange(60), B)
    r1 = epoch_rows(np.random.default_rng(1), np.arange(60), B)
    full = epoch_rows(np.random.default_rng(2), np.arange(60, 80), B, shuffle=False)
    src.run_epoch(_collecting(), jnp.asarray(0), r0, then=(r1, None))
    assert src._ahead is not None
    feed = src._ahead.feed
    cap = src.nnz_cap
    src.run_epoch(_collecting(), jnp.asarray(0), full)  # leaves the prepared epoch be
    assert src._ahead is not None and src.nnz_cap > cap
    before = len(reads)
    _, out = src.run_epoch(_collecting(), jnp.asarray(0), r1)
    assert not feed._thread.is_alive()
    n1 = -(-r1.shape[0] // chunks.chunk_steps(r1.shape[0], B))
    assert len(reads) - before == n1  # every chunk built for this epoch's shapes
    _, ref = HostSource(cells, B).run_epoch(_collecting(), jnp.asarray(0), r1)
    np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(ref["x"]))


@pytest.fixture(scope="module")
def backed_file(tmp_path_factory):
    a = js.synthetic_atlas(
        n_cells=400,
        n_genes=60,
        n_batches=2,
        n_lineages=2,
        types_per_lineage=2,
        markers_per_type=5,
        seed=3,
    )
    labels = a.obs["cell_type"].astype(str).to_numpy().copy()
    labels[::2] = "Unknown"
    a.obs["label"] = labels
    path = tmp_path_factory.mktemp("prefetch") / "a.h5ad"
    a.write_h5ad(path)
    return path


def _train(path, model: str, **train):
    adata = ad.read_h5ad(path, backed="r")
    if model == "scanvi":
        js.SCANVI.setup_anndata(
            adata, labels_key="label", unlabeled_category="Unknown", batch_key="batch"
        )
        m = js.SCANVI(adata, n_latent=4, n_hidden=16)
    else:
        js.SCVI.setup_anndata(adata, batch_key="batch")
        m = js.SCVI(adata, n_latent=4, n_hidden=16)
    m.train(data_source="stream", batch_size=32, progress_bar=False, **train)
    return m


def _spy_prepare(monkeypatch) -> list:
    """Each feed `HostSource.prepare` starts, with the source."""
    started, real = [], host_sources.HostSource.prepare

    def prepare(self, rows, lab_rows=None):
        real(self, rows, lab_rows)
        started.append((self, self._ahead.feed))

    monkeypatch.setattr(host_sources.HostSource, "prepare", prepare)
    return started


@pytest.mark.parametrize("model", ["scvi", "scanvi"])
def test_streamed_training_is_the_same_with_epochs_prepared(backed_file, monkeypatch, model):
    """Several chunks per epoch, a validation after each: the history and
    the parameters are bit-identical to training with nothing prepared."""
    monkeypatch.setattr(host_sources.StreamSource, "chunk_cells", 128)
    train = dict(max_epochs=3, check_val_every_n_epoch=1, train_size=0.8)
    with monkeypatch.context() as off:
        off.setattr(host_sources.HostSource, "prepare", lambda self, rows, lab_rows=None: None)
        before = _train(backed_file, model, **train)
    started = _spy_prepare(monkeypatch)
    after = _train(backed_file, model, **train)
    assert len(started) == 2  # epochs 1 and 2, while 0 and 1 end
    assert all(feed.built > 0 for _, feed in started)
    cols = [c for c in before.history.to_frame().columns if c != "epoch_seconds"]
    pd.testing.assert_frame_equal(after.history.to_frame()[cols], before.history.to_frame()[cols])
    for a, b in zip(
        jax.tree_util.tree_leaves(after.params), jax.tree_util.tree_leaves(before.params)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_unused_prepared_epoch_is_dropped(backed_file, monkeypatch):
    """Early stopping after epoch 1 of 5, and an interrupt: the epoch prepared
    next is let go and its thread ends before `train` returns."""
    started = _spy_prepare(monkeypatch)
    m = _train(
        backed_file,
        "scvi",
        max_epochs=5,
        early_stopping=True,
        early_stopping_patience=1,
        early_stopping_min_delta=1e9,  # no epoch after the first improves
    )
    assert len(m.history.to_frame()) == 2 and len(started) == 2
    src, feed = started[-1]  # epoch 2's, never run
    assert src._ahead is None and not feed._thread.is_alive()

    calls = []

    def interrupt(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_loop, "after_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _train(backed_file, "scvi", max_epochs=5)
    src, feed = started[-1]
    assert calls == [1] and len(started) == 3
    assert src._ahead is None and not feed._thread.is_alive()
