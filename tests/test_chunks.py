"""The chunked epoch program, the shuffle buffer, and 64-bit-safe offsets."""

from __future__ import annotations

import gc

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxscanvi.data.batch import (
    MAX_OFFSET,
    Batch,
    DenseDeviceCells,
    DeviceCells,
    check_offsets,
)
from jaxscanvi.data.cells import CellData, cell_data
from jaxscanvi.data.sharded import slice_nnz
from jaxscanvi.data.shuffle import RunCache, buffer_order
from jaxscanvi.errors import InputError
from jaxscanvi.train import chunks, sources
from jaxscanvi.train.sources import DeviceSource, HostSource, epoch_rows, labelled_rows


def _cells(n=60, g=7, seed=0, X=None):
    rng = np.random.default_rng(seed)
    if X is None:
        dense = rng.poisson(0.7, (n, g)).astype(np.float32)
        dense[::5] = 0  # empty rows
        X = sp.csr_matrix(dense)
    n = X.shape[0]
    return CellData(
        X=X,
        batch=rng.integers(0, 3, n).astype(np.int32),
        labels=rng.integers(0, 4, n).astype(np.int32),
        cat_covs=np.zeros((n, 0), np.int32),
        cont_covs=np.zeros((n, 0), np.float32),
        log_size_factor=None,
        log_library=rng.random(n).astype(np.float32),
        lgamma_const=rng.random(n).astype(np.float32),
        obs_names=pd.Index([str(i) for i in range(n)]),
    )


def _collect(carry, b):
    main, lab = (b, None) if isinstance(b, Batch) else b
    out = {"x": main.x, "w": main.weight, "batch": main.batch, "lib": main.log_library}
    if lab is not None:
        out["lab_x"] = lab.x
    return carry + 1, out


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("labelled", [False, True])
def test_chunks_give_the_device_sources_epoch(monkeypatch, labelled, dense):
    """Several chunks, the last one short, give the very minibatches the
    resident source gathers, and count exactly the epoch's steps; dense
    chunks (the CPU's) and CSR ones (accelerators', big chunks) alike."""
    monkeypatch.setattr(chunks, "CHUNK_CELLS", 16)  # 2 steps of 8 per chunk
    cells = _cells()
    B = 8
    rng = np.random.default_rng(1)
    rows = epoch_rows(rng, np.arange(cells.n_obs), B)  # 8 steps, the last short
    lab = labelled_rows(rng, np.arange(0, 60, 3), rows.shape[0], B) if labelled else None
    rows, lab = rows[:7], None if lab is None else lab[:7]  # 7 steps: 4 chunks, last half
    assert chunks.chunk_steps(7, B) == 2
    host = HostSource(cells, B)
    if not dense:
        host.dense_chunk_bytes = 0
    # dense on the CPU with the dense likelihood only
    dense = dense and jax.default_backend() == "cpu" and not host.sparse
    first = next(host.chunks(rows, lab))[0]
    assert isinstance(first, DenseDeviceCells if dense else DeviceCells)
    c_host, out_host = host.run_epoch(_collect, jnp.asarray(0), rows, lab)
    c_dev, out_dev = DeviceSource(cells, B, dense_max_bytes=0).run_epoch(
        _collect, jnp.asarray(0), rows, lab
    )
    assert int(c_host) == int(c_dev) == 7
    for k in out_dev:
        a, b = np.asarray(out_host[k]), np.asarray(out_dev[k])
        assert a.shape == b.shape, k
        if k == "batch":  # padding rows read any cell; their weight is 0
            np.testing.assert_array_equal(a[rows >= 0], b[rows >= 0])
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
    dense = cells.X.toarray()
    np.testing.assert_array_equal(np.asarray(out_host["x"])[2, :], dense[rows[2]])


def test_layout_is_computed_from_rows_alone():
    rows = np.array([[5, 2, -1, 9], [2, 7, 3, -1]])
    lab = np.array([[1, 1, 8, 8], [4, -1, 4, 4]])
    lay = chunks.layout(rows, lab, n_dev=2, steps=3)
    assert lay.local.shape == (3, 4) and lay.n_valid == 2
    for d in range(2):
        cols = slice(2 * d, 2 * d + 2)
        for r, loc in ((rows, lay.local), (lab, lay.local_lab)):
            got = np.where(loc[:2, cols] >= 0, lay.take[d][np.maximum(loc[:2, cols], 0)], -1)
            np.testing.assert_array_equal(got, r[:, cols])
        assert (lay.local[2] == -1).all()


def test_chunk_nnz_counts_each_device_chunk():
    row_nnz = np.array([3, 0, 5, 7, 1], np.int64)
    rows = np.array([[0, 1], [2, 3], [4, -1]])
    # steps=2: chunk 0 = steps 0-1, chunk 1 = step 2; one device
    assert chunks.chunk_nnz(row_nnz, rows, None, 2, 1) == 3 + 0 + 5 + 7
    # two devices: device 0 holds column 0 (cells 0, 2 | 4), device 1 column 1
    assert chunks.chunk_nnz(row_nnz, rows, None, 2, 2) == 3 + 5
    # non-zeros past 2^31 are summed in 64 bits
    big = np.full(5, 2**30, np.int64)
    assert chunks.chunk_nnz(big, rows, None, 2, 1) == 4 * 2**30


def test_buffer_order_mixes_a_sorted_file():
    """Every cell once; on a file sorted by batch each minibatch holds many."""
    n, n_batches = 24_000, 6
    batch = np.repeat(np.arange(n_batches), n // n_batches)  # sorted by dataset
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(n, 20_000, replace=False))
    order = buffer_order(rng, idx, run_cells=64, buffer_cells=8192)
    assert sorted(order.tolist()) == idx.tolist()
    rows = epoch_rows(rng, order, 128, shuffle=False)
    held = [len(np.unique(batch[r[r >= 0]])) for r in rows]
    assert np.mean(held) > 5.5  # a global shuffle gives 6.0
    # a buffer's cells come from many runs of the file
    first = order[:8192]
    assert len(np.unique(first // 64)) > 100


def test_run_cache_reads_each_run_once_and_stays_in_its_slice():
    rng = np.random.default_rng(2)
    X = sp.random(2000, 30, density=0.1, format="csr", dtype=np.float32, random_state=3)
    reads = []

    class Reader:
        shape = X.shape
        rows = slice(300, 1700)  # this process's slice

        def read(self, a, b):
            assert self.rows.start <= a < b <= self.rows.stop, (a, b)
            reads.append((a, b))
            return X[a:b]

    cache = RunCache(Reader(), run_cells=32, max_cells=4096)
    idx = np.arange(300, 1700)
    order = buffer_order(rng, idx, run_cells=32, buffer_cells=512)
    for part in np.array_split(order, 20):  # chunks that share runs
        np.testing.assert_array_equal(cache.rows(part).toarray(), X[part].toarray())
    read_rows = np.concatenate([np.arange(a, b) for a, b in reads])
    assert len(read_rows) == len(np.unique(read_rows)) == len(idx)  # each row read once


def test_offsets_past_32_bits_are_refused_or_chunked():
    """A matrix past 2^31 non-zeros never reaches an int32 device CSR: 'auto'
    trains it in chunks, 'device' is refused before any copy. Small arrays,
    large offsets."""
    check_offsets(MAX_OFFSET, "x")
    with pytest.raises(InputError, match="data_source"):
        check_offsets(MAX_OFFSET + 1, "x")

    class Huge:  # a CSR's offsets only: 4 rows of 2^30 non-zeros each
        shape = (4, 2**27)  # too wide to hold dense
        indptr = np.arange(5, dtype=np.int64) * 2**30

    cells = _cells(n=4, X=Huge())
    assert np.array_equal(cells.row_nnz(), np.full(4, 2**30))
    src = sources.make_source("auto", cells, 2, device_budget_bytes=1 << 62)
    assert src.kind == "host"
    with pytest.raises(InputError, match="32-bit offsets"):
        DeviceCells.from_cells(cells)
    with pytest.raises(InputError, match="data_source='host' or 'stream'"):
        sources.make_source("device", cells, 2)
    # per-device slices: each below 2^31, so a device holds its own offsets
    np.testing.assert_array_equal(
        slice_nnz(Huge.indptr, np.array([0, 1, 2, 4])), [2**30, 2**30, 2**31]
    )
    assert sources.resident_nnz(Huge.indptr, np.array([0, 1, 2, 4])) == 2**31
    # the minibatch cap sums in 64 bits too
    assert sources.rows_nnz(cells.row_nnz(), np.array([[0, 1, 2, 3]])) == 2**32


def test_stream_source_trains_from_a_sorted_file(tmp_path):
    """A backed file sorted by batch: every streamed minibatch mixes batches,
    and training runs through the chunked program."""
    import jaxscanvi as js

    a = js.synthetic_atlas(n_cells=600, n_genes=200, n_batches=3, seed=0)
    a = a[np.argsort(a.obs["batch"].to_numpy(), kind="stable")].copy()
    a.write_h5ad(tmp_path / "sorted.h5ad")
    b = ad.read_h5ad(tmp_path / "sorted.h5ad", backed="r")
    js.SCVI.setup_anndata(b, batch_key="batch")
    m = js.SCVI(b, n_latent=4, n_hidden=16)
    src = sources.make_source("stream", cell_data(b, m.registry), 64)
    rows = src.order(np.random.default_rng(0), np.arange(600), 64)
    codes = a.obs["batch"].cat.codes.to_numpy()
    held = [len(np.unique(codes[r[r >= 0]])) for r in rows[:-1]]
    assert min(held) == 3
    m.train(max_epochs=2, batch_size=64, progress_bar=False, data_source="stream")
    loss = m.history.to_frame()["train_loss"].to_numpy()
    assert np.isfinite(loss).all() and loss[-1] < loss[0]


def test_chunked_program_compiles_once_per_shape(monkeypatch):
    """Chunks of one epoch share one program, the short last one included."""
    monkeypatch.setattr(chunks, "CHUNK_CELLS", 16)
    cells = _cells(seed=4)
    src = HostSource(cells, 8)
    rows = epoch_rows(np.random.default_rng(0), np.arange(cells.n_obs), 8)
    traces = []

    def step(carry, b):
        traces.append(1)  # runs at trace time only
        return carry + 1, b.weight.sum()

    carry, out = src.run_epoch(step, jnp.asarray(0), rows)
    jax.block_until_ready(out)
    assert int(carry) == rows.shape[0]
    # one trace for the scan body (the skip branch reuses its shapes)
    assert len(traces) <= 2
    np.testing.assert_allclose(np.asarray(out).sum(), cells.n_obs)


@pytest.mark.system
def test_atlas_benchmark_smoke(tmp_path):
    """benchmarks/atlas.py runs every part end to end on tiny sizes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "atlas.json"
    p = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "atlas.py"),
            "--smoke",
            "--parts",
            "loader",
            "overhead",
            "mixing",
            "memory",
            "--out",
            str(out),
            "--tmp",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=root,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    loaded = doc["loader"]["stores"]
    assert "memory (host source)" in loaded and "one .h5ad (BackedRows)" in loaded
    assert "memory (host source), dense chunks" in loaded
    assert all(s["cells_per_s"] > 0 for s in loaded.values())
    for net in ("tiny", "default"):
        assert doc["overhead"][net]["host_vs_device"] > 0
        assert doc["overhead"][net]["stream_vs_device"] > 0
    assert {r["source"] for r in doc["mixing"]["runs"]} == {"device", "stream"}
    assert all(0 < r["batch_entropy"] <= 1 for r in doc["mixing"]["runs"])
    assert doc["memory"]["nnz"] == 20_000 * 100


def test_host_chunks_feed_the_sparse_likelihood():
    """With the sparse likelihood on (accelerators' default), chunks carry the
    list of non-zeros into the loss, and training matches the dense likelihood."""
    import jaxscanvi as js
    from jaxscanvi import backend

    a = js.synthetic_atlas(
        n_cells=300,
        n_genes=60,
        n_batches=2,
        n_lineages=2,
        types_per_lineage=2,
        seed=1,
        markers_per_type=5,
    )
    js.SCVI.setup_anndata(a, batch_key="batch")
    seen, histories = {}, {}
    for sparse in (False, True):
        with backend.use(f"sparse_likelihood={int(sparse)},fused_likelihood=0"):
            src = HostSource(cell_data(a, js.SCVI(a).registry), 32)
            seen[sparse] = src.sparse
            m = js.SCVI(a, n_latent=4, n_hidden=16)
            m.train(max_epochs=2, batch_size=32, progress_bar=False, data_source="host")
            histories[sparse] = m.history.to_frame()["train_loss"].to_numpy()
    assert seen == {False: False, True: True}
    np.testing.assert_allclose(histories[True], histories[False], rtol=2e-5)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_backed_rows_read_runs(tmp_path, fmt):
    """read_runs on a backed file gives the runs' rows, stacked in the order asked,
    and a RunCache over it the rows asked for."""
    from jaxscanvi.data.backed import BackedRows

    X = sp.random(500, 40, density=0.2, format="csr", dtype=np.float32, random_state=5)
    X.data = np.ceil(X.data * 5)
    a = ad.AnnData(X=X)
    if fmt == "h5ad":
        a.write_h5ad(tmp_path / "x.h5ad")
        rows = BackedRows(ad.read_h5ad(tmp_path / "x.h5ad", backed="r").X)
    else:
        import zarr
        from anndata.io import sparse_dataset

        a.write_zarr(tmp_path / "x.zarr")
        rows = BackedRows(sparse_dataset(zarr.open(str(tmp_path / "x.zarr"), mode="r")["X"]))
    starts, stops = np.array([300, 0, 64, 499]), np.array([364, 10, 65, 500])
    want = np.concatenate([X[a:b].toarray() for a, b in zip(starts, stops)])
    np.testing.assert_array_equal(rows.read_runs(starts, stops).toarray(), want)
    np.testing.assert_array_equal(rows.read(10, 20).toarray(), X[10:20].toarray())
    cache = RunCache(rows, run_cells=16, max_cells=128)
    take = np.random.default_rng(0).integers(0, 500, 200)
    np.testing.assert_array_equal(cache.rows(take).toarray(), X[take].toarray())


def test_ranges_of_reads_zarr_ranges_together(tmp_path, monkeypatch):
    """zarr ranges whose chunks touch are read as one slice, and every range
    comes back in the order asked (out of order, empty, past the span limit)."""
    import zarr

    from jaxscanvi.data import backed

    values = np.arange(1000, dtype=np.float32)
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=(1000,), chunks=(50,), dtype="f4")
    z[:] = values
    reads = []

    class Counted:  # the zarr array, its slices counted
        chunks = z.chunks
        dtype = z.dtype
        get_orthogonal_selection = z.get_orthogonal_selection

        def __getitem__(self, key):
            reads.append(key)
            return z[key]

    a = np.array([0, 60, 70, 120, 400, 420, 10, 990, 500])
    b = np.array([5, 65, 100, 130, 410, 420, 20, 1000, 900])
    want = np.concatenate([values[i:j] for i, j in zip(a, b)])
    np.testing.assert_array_equal(backed.ranges_of(Counted(), a, b), want)
    # [0, 130) in one read; 400-420; 10-20 (back); 990-1000; 500-900
    assert len(reads) == 5
    monkeypatch.setattr(backed, "SPAN_VALUES", 30)
    reads.clear()
    np.testing.assert_array_equal(backed.ranges_of(Counted(), a, b), want)
    assert len(reads) == 8  # [0, 130) is now four reads


def test_copy_rows_pads_in_place_from_several_sources():
    """copy_rows fills a chunk's capacity in place: rows from several sources in
    the order asked, slices where consecutive, one value at a time where not."""
    from jaxscanvi.data.shuffle import as_matrix, copy_rows, gather_rows

    A = sp.random(50, 7, density=0.4, format="csr", dtype=np.float32, random_state=1)
    B = sp.random(30, 7, density=0.4, format="csr", dtype=np.float32, random_state=2)
    sources = [(M.data, M.indices, M.indptr.astype(np.int64)) for M in (A, B)]
    for seg, row in [
        (np.r_[np.zeros(20, int), np.ones(10, int)], np.r_[np.arange(5, 25), np.arange(10)]),
        (np.array([1, 0, 1, 0, 0]), np.array([3, 40, 0, 2, 2])),  # short pieces, repeats
    ]:
        want = sp.vstack([(A, B)[s][[r]] for s, r in zip(seg, row)]).toarray()
        parts = copy_rows(sources, seg, row, pad=2000)
        assert parts[0].size == parts[1].size == 2000
        assert not parts[0][int(parts[2][-1]) :].any()
        np.testing.assert_array_equal(as_matrix(parts, 7).toarray(), want)
    take = np.array([4, 9, 10, 11, 30])
    got = gather_rows(A, take, 500, indptr=A.indptr.astype(np.int32))
    np.testing.assert_array_equal(as_matrix(got, 7).toarray(), A[take].toarray())
    with pytest.raises(ValueError, match="capacity"):
        gather_rows(A, take, 1)


def test_chunk_buffers_are_used_again_only_once_free():
    """A pooled buffer comes back zeroed, and never while an array or a device
    copy that uses it in place still holds it."""
    pool = chunks.Buffers(keep=4)
    shape = (1000, 100)
    a = pool.zeros(shape, np.float32)
    a[:] = 1
    b = pool.zeros(shape, np.float32)
    assert b is not a
    del a
    c = pool.zeros(shape, np.float32)
    reused, zeroed = c is pool.held[0][1], not c.any()
    assert reused and zeroed  # a's buffer, zeroed
    d = jax.device_put(c)
    del c
    e = pool.zeros(shape, np.float32)
    fresh = e is not pool.held[0][1] and e is not b
    assert fresh  # d may still read c's buffer
    del d
    gc.collect()  # the device array lets go of the buffer once collected
    again = pool.zeros(shape, np.float32) is pool.held[0][1]
    assert again
