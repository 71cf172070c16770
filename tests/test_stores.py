"""Atlas stores: many .h5ad/.zarr files as one dataset, annbatch collections and
TileDB-SOMA experiments, each built here on a small atlas and read through the
interface the streaming source uses (`BackedRows`: read, indptr, rows by index)."""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import jaxscanvi as js
from jaxscanvi.data import backed, read_collection
from jaxscanvi.data.backed import BackedRows
from jaxscanvi.data.cells import cell_data
from jaxscanvi.errors import InputError
from jaxscanvi.train import sources

TRAIN = dict(
    max_epochs=1, batch_size=64, progress_bar=False, train_size=0.8, check_val_every_n_epoch=1
)
SPLITS = (0, 130, 260, 400)  # three files of unequal sizes
RUNS = [(0, 1), (0, 400), (125, 135), (129, 261), (259, 260), (399, 400), (40, 40)]


@pytest.fixture(scope="module")
def atlas400(small_atlas):
    a = small_atlas[:400].copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return a


@pytest.fixture(scope="module")
def files(atlas400, tmp_path_factory):
    """The atlas cut into .h5ad, .zarr, .h5ad files, and written whole as one .h5ad."""
    d = tmp_path_factory.mktemp("stores")
    paths = []
    for i, (lo, hi) in enumerate(itertools.pairwise(SPLITS)):
        p = d / (f"part{i}.zarr" if i == 1 else f"part{i}.h5ad")
        part = atlas400[lo:hi].copy()
        part.write_zarr(p) if i == 1 else part.write_h5ad(p)
        paths.append(p)
    atlas400.write_h5ad(d / "whole.h5ad")
    return paths, d / "whole.h5ad"


def check_reads(X, M: sp.csr_matrix) -> None:
    """Every read path of a store equals the in-memory rows."""
    assert isinstance(X, BackedRows) and X.shape == M.shape
    for a, b in RUNS:
        got = X.read(a, b)
        assert isinstance(got, sp.csr_matrix) and got.dtype == np.float32
        assert got.has_canonical_format, (a, b)
        np.testing.assert_array_equal(got.toarray(), M[a:b].toarray(), err_msg=f"{a}:{b}")
    starts, stops = [300, 5, 128], [340, 9, 262]
    want = sp.vstack([M[a:b] for a, b in zip(starts, stops)])
    np.testing.assert_array_equal(X.read_runs(starts, stops).toarray(), want.toarray())
    pick = np.array([399, 3, 131, 130, 260, 3])
    np.testing.assert_array_equal(X[pick].toarray(), M[pick].toarray())
    np.testing.assert_array_equal(X.indptr, M.indptr)
    assert X.nnz == M.nnz


def setup_cells(adata):
    js.SCVI.setup_anndata(adata, batch_key="batch")
    return cell_data(adata, js.data.registry_of(adata))


# ---------------------------------------------------------------- collections
def test_collection_reads_rows_across_files(files, atlas400):
    paths, _ = files
    adata = read_collection(paths)
    assert adata.shape == atlas400.shape
    assert list(adata.obs_names) == list(atlas400.obs_names)
    assert list(adata.obs["batch"]) == list(atlas400.obs["batch"])
    check_reads(adata.X, atlas400.X)
    # a view of the AnnData reads through the store too
    np.testing.assert_array_equal(adata[128:133].X.toarray(), atlas400.X[128:133].toarray())
    mask = np.zeros(400, bool)
    mask[[7, 300]] = True
    np.testing.assert_array_equal(adata.X[mask, 5:9].toarray(), atlas400.X[mask][:, 5:9].toarray())
    # a process's slice in a many-host run reads only its rows
    mine = adata.X.limited(slice(100, 200))
    np.testing.assert_array_equal(
        mine[np.array([150, 100])].toarray(), atlas400.X[[150, 100]].toarray()
    )
    with pytest.raises(InputError, match="reads only rows"):
        mine[np.array([50])]


def test_collection_cell_columns_equal_the_concatenation(files, atlas400):
    paths, _ = files
    store = read_collection(paths)
    lazy, mem = setup_cells(store), setup_cells(atlas400.copy())
    assert isinstance(lazy.X, BackedRows)
    for k in ("log_library", "lgamma_const", "batch", "labels"):
        np.testing.assert_array_equal(getattr(lazy, k), getattr(mem, k), err_msg=k)
    np.testing.assert_array_equal(lazy.row_nnz(), mem.row_nnz())
    assert sources.make_source("auto", lazy, 64).kind == "stream"


def test_collection_trains_like_one_backed_file(files, atlas400, monkeypatch):
    """Same seed, same block-shuffled order: the collection of three files and the
    whole file give the same first-epoch losses; inference reads the collection."""
    paths, whole = files
    monkeypatch.setattr(backed, "DEFAULT_BLOCK", 50)  # blocks that straddle files
    runs = {}
    for name, adata in (
        ("collection", read_collection(paths)),
        ("file", ad.read_h5ad(whole, backed="r")),
    ):
        js.SCVI.setup_anndata(adata, batch_key="batch")
        m = js.SCVI(adata, n_latent=4, n_hidden=16)
        m.train(data_source="stream", **TRAIN)
        runs[name] = m
    h = {k: m.history.to_frame() for k, m in runs.items()}
    for col in ("train_loss", "elbo_validation"):
        np.testing.assert_array_equal(
            h["collection"][col].to_numpy(), h["file"][col].to_numpy(), err_msg=col
        )
    z = runs["collection"].get_latent_representation()
    np.testing.assert_allclose(z, runs["file"].get_latent_representation(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        z, runs["collection"].get_latent_representation(adata=atlas400), rtol=1e-5, atol=1e-6
    )


def test_collection_auto_source_and_save_load(files, tmp_path):
    paths, _ = files
    adata = read_collection(paths)
    js.SCVI.setup_anndata(adata, batch_key="batch")
    m = js.SCVI(adata, n_latent=4, n_hidden=16)
    m.train(data_source="auto", **TRAIN)
    m.save(tmp_path / "model")
    saved = sum(f.stat().st_size for f in (tmp_path / "model").rglob("*") if f.is_file())
    assert saved < 2_000_000  # parameters and metadata, no copy of the counts
    back = js.SCVI.load(tmp_path / "model", adata=read_collection(paths))
    np.testing.assert_allclose(
        back.get_latent_representation(), m.get_latent_representation(), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(InputError, match="save_anndata"):
        m.save(tmp_path / "with_data", save_anndata=True)


def test_collection_of_backed_anndatas(files, atlas400):
    paths, _ = files
    parts = [
        ad.read_h5ad(paths[0], backed="r"),
        ad.read_zarr(paths[1]),
        ad.read_h5ad(paths[2], backed="r"),
    ]
    adata = read_collection(parts, label="file", keys=["a", "b", "c"])
    assert list(adata.obs["file"].value_counts(sort=False)) == [130, 130, 140]
    check_reads(adata.X, atlas400.X)


def test_collection_genes_must_match(files, atlas400, tmp_path):
    paths, _ = files
    swapped = atlas400[:50, [*list(range(1, atlas400.n_vars)), 0]].copy()
    swapped.write_h5ad(tmp_path / "swapped.h5ad")
    with pytest.raises(InputError, match=r"paths\[2\].*swapped\.h5ad.*genes differ.*paths\[0\]"):
        read_collection([paths[0], paths[1], tmp_path / "swapped.h5ad"])
    fewer = atlas400[:50, :-3].copy()
    fewer.write_h5ad(tmp_path / "fewer.h5ad")
    with pytest.raises(InputError, match=r"paths\[1\].*197 genes vs 200"):
        read_collection([paths[0], tmp_path / "fewer.h5ad"])
    with pytest.raises(InputError, match="no such file"):
        read_collection([paths[0], tmp_path / "missing.h5ad"])
    with pytest.raises(InputError, match="no files"):
        read_collection([])


def test_collection_counts_are_checked(files, atlas400, tmp_path):
    paths, _ = files
    bad = atlas400[:20].copy()
    bad.X = bad.X.copy()
    bad.X.data[3] = 0.5
    bad.write_h5ad(tmp_path / "fractional.h5ad")
    adata = read_collection([paths[0], tmp_path / "fractional.h5ad"], index_unique="-")
    with pytest.raises(InputError, match="non-integer"):
        js.SCVI.setup_anndata(adata)


# ---------------------------------------------------------------- TileDB-SOMA
@pytest.fixture(scope="module")
def soma_experiment(atlas400, tmp_path_factory):
    soma_io = pytest.importorskip("tiledbsoma.io")
    uri = str(tmp_path_factory.mktemp("soma") / "experiment")
    soma_io.from_anndata(uri, atlas400, measurement_name="RNA", X_layer_name="raw")
    return uri


def test_soma_reads_the_selected_rows(soma_experiment, atlas400):
    from jaxscanvi.data import read_soma

    adata = read_soma(soma_experiment)
    check_reads(adata.X, atlas400.X)
    genes = np.flatnonzero(atlas400.var["marker_of"] != "")
    sub = read_soma(
        soma_experiment, var_value_filter="marker_of != ''", obs_coords=slice(100, 299)
    )  # SOMA slices include both ends
    assert list(sub.var_names) == list(atlas400.var_names[genes])
    assert list(sub.obs_names) == list(atlas400.obs_names[100:300])
    np.testing.assert_array_equal(
        sub.X.read(0, 200).toarray(), atlas400.X[100:300][:, genes].toarray()
    )


def test_soma_obs_filter_trains_on_exactly_the_filtered_cells(soma_experiment, atlas400):
    from jaxscanvi.data import read_soma

    adata = read_soma(
        soma_experiment,
        obs_value_filter="cell_type in ['L0_T0', 'L1_T1']",
        obs_column_names=["batch", "cell_type"],
    )
    keep = atlas400.obs["cell_type"].isin(["L0_T0", "L1_T1"]).to_numpy()
    want = atlas400[keep].copy()
    assert 0 < adata.n_obs < atlas400.n_obs
    assert list(adata.obs_names) == list(want.obs_names)
    assert set(adata.obs.columns) == {"soma_joinid", "batch", "cell_type"}
    lazy, mem = setup_cells(adata), setup_cells(want.copy())
    for k in ("log_library", "lgamma_const", "batch"):
        np.testing.assert_array_equal(getattr(lazy, k), getattr(mem, k), err_msg=k)
    np.testing.assert_array_equal(lazy.row_nnz(), mem.row_nnz())
    m = js.SCVI(adata, n_latent=4, n_hidden=16)
    m.train(data_source="stream", **TRAIN)
    assert len(m.train_indices) + len(m.validation_indices) == want.n_obs
    z = m.get_latent_representation()
    np.testing.assert_allclose(z, m.get_latent_representation(adata=want), rtol=1e-5, atol=1e-6)


def test_soma_bad_queries_are_clear(soma_experiment):
    from jaxscanvi.data import read_soma

    with pytest.raises(InputError, match=r"obs_value_filter.*Column nope does not exist"):
        read_soma(soma_experiment, obs_value_filter="nope == 1")
    with pytest.raises(InputError, match="selects no cells"):
        read_soma(soma_experiment, obs_value_filter="batch == 'no such batch'")
    with pytest.raises(InputError, match=r"X_name.*no such X layer.*'raw'"):
        read_soma(soma_experiment, X_name="data")
    with pytest.raises(InputError, match="measurement"):
        read_soma(soma_experiment, measurement="ATAC")
    with pytest.raises(InputError, match="not a TileDB-SOMA experiment"):
        read_soma(soma_experiment + "-missing")


# ---------------------------------------------------------------- annbatch
@pytest.fixture(scope="module")
def annbatch_collection(files, tmp_path_factory):
    annbatch = pytest.importorskip("annbatch")
    paths, _ = files
    path = tmp_path_factory.mktemp("annbatch") / "collection.zarr"
    annbatch.DatasetCollection(path).add_adatas(
        [str(p) for p in paths],
        dataset_size=150,
        shuffle_chunk_size=25,
        rng=np.random.default_rng(0),
    )
    return path


def test_annbatch_collection_reads_its_shuffled_rows(annbatch_collection, atlas400):
    from jaxscanvi.data import read_annbatch

    adata = read_annbatch(annbatch_collection)
    assert adata.n_obs == atlas400.n_obs
    pos = atlas400.obs_names.get_indexer(adata.obs_names)
    assert (pos >= 0).all() and not (np.diff(pos) > 0).all()  # every cell, shuffled
    assert list(adata.obs["batch"].astype(str)) == list(atlas400.obs["batch"].iloc[pos])
    check_reads(adata.X, atlas400.X[pos])


def test_annbatch_collection_trains(annbatch_collection, atlas400):
    from jaxscanvi.data import read_annbatch

    adata = read_annbatch(annbatch_collection, obs_columns=["batch", "cell_type"])
    want = atlas400[atlas400.obs_names.get_indexer(adata.obs_names)].copy()
    lazy, mem = setup_cells(adata), setup_cells(want)
    for k in ("log_library", "lgamma_const"):
        np.testing.assert_array_equal(getattr(lazy, k), getattr(mem, k), err_msg=k)
    m = js.SCVI(adata, n_latent=4, n_hidden=16)
    m.train(data_source="auto", **TRAIN)
    loss = m.history.to_frame()["train_loss"].to_numpy()
    assert loss.shape == (1,) and np.isfinite(loss).all()
    z = m.get_latent_representation()
    np.testing.assert_allclose(z, m.get_latent_representation(adata=want), rtol=1e-5, atol=1e-6)


def test_annbatch_missing_collection_is_clear(tmp_path):
    pytest.importorskip("annbatch")
    from jaxscanvi.data import read_annbatch

    with pytest.raises(InputError, match="no such folder"):
        read_annbatch(tmp_path / "nothing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match="not an annbatch collection"):
        read_annbatch(tmp_path / "empty.zarr")
    import zarr

    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(InputError, match="holds no annbatch datasets"):
        read_annbatch(tmp_path / "plain.zarr")


# ---------------------------------------------------------------- the benchmark
@pytest.mark.system
def test_stores_benchmark_smoke(tmp_path):
    """benchmarks/stores.py writes every store it can build here, reads the same
    runs from each and writes the JSON."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "stores.json"
    p = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "stores.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(root)),
        cwd=root,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert {
        "scipy CSR in memory",
        "one .h5ad (BackedRows)",
        "4 files, .h5ad + .zarr (read_collection)",
    } <= set(res)
    for name, r in res.items():
        assert len(r["read_per_round"]) == 2 and r["read_cells_per_s"] > 0, name
    assert res["scipy CSR in memory"]["read_vs_memory"] == 1.0
    assert doc["matrix"]["genes"] == 200 and doc["bytes_warmed"] > 0


# ---------------------------------------------------------------- the guide's code
def test_scale_guide_atlas_code_runs(atlas400, tmp_path, monkeypatch):
    """The python blocks of docs/guide/scale.md's atlas section run as written, on three
    small files (the CELLxGENE Census block needs the network and is left out; the
    annbatch block runs where annbatch is installed)."""
    import re
    from importlib.util import find_spec
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "scale.md").read_text()
    section = page.split("## Atlases in many files, annbatch and TileDB-SOMA")[1]
    section = section.split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    atlas400[:150].write_h5ad("donor1.h5ad")
    atlas400[150:260].write_zarr("donor2.zarr")
    atlas400[260:].write_h5ad("donor3.h5ad")
    env: dict = {}
    ran = []
    for code in blocks:
        if "cellxgene_census" in code or ("annbatch" in code and not find_spec("annbatch")):
            continue
        if "tiledbsoma" in code and not find_spec("tiledbsoma"):
            continue
        # TileDB resolves a relative URI against the directory its context was made
        # in (an earlier test's), not the one chdir moved to
        code = code.replace('"atlas_soma"', repr(str(tmp_path / "atlas_soma")))
        exec(compile(code, "scale.md", "exec"), env)
        ran.append(code)
        assert env["model"].is_trained and env["adata"].n_obs > 0
    assert "read_collection" in ran[0] and env["adata"].X.shape[1] == atlas400.n_vars
    if "tiledbsoma" in ran[-1]:  # the SOMA example trains on exactly the filtered cells
        keep = atlas400.obs["cell_type"].isin(["L0_T0", "L1_T1"])
        assert list(env["adata"].obs_names) == list(atlas400.obs_names[keep])
