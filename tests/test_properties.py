"""Property-based tests (hypothesis) of setup, cell reading and minibatch sources.

* setup_anndata / build_registry on random AnnDatas (1-9 cells, 1-6 genes; CSR,
  CSC, sparse arrays, dense; float32/float64/int32/int64; non-canonical CSR with
  duplicates, explicit zeros and unsorted indices; categorical (with unused
  categories), string, integer, bool and mixed-type obs columns; with and
  without batch, labels, covariates and size factors; sometimes a bad value).
  Either setup succeeds, the registry round-trips through JSON and
  `cell_data` reproduces the counts exactly and every per-cell code maps back
  to the cell's original value, or it raises `jaxscanvi.InputError` -- the
  only exception setup documents for bad input -- exactly when the input has
  one of the problems the catalogue lists (a cell without counts, a
  non-integer, negative or non-finite count, a missing value in a used obs
  column, categories that collide as text, duplicated gene names, a
  non-positive size factor, a non-numeric or bool continuous covariate, no
  labelled cell).
* `epoch_rows` / `labelled_rows`: every training cell exactly once per epoch,
  padding (-1) only at the end; labelled rows cycle through every labelled
  cell.
* `host_batch` against scipy densification, and host vs device gathers
  (`device_batch`, `dense_device_batch`) from the same rows: identical dense
  x, identical per-cell arrays on real rows, identical non-zero lists. The
  device comparison uses one fixed shape (compiled once); the sources'
  `run_epoch` are compared on a few fixed datasets.
"""

from __future__ import annotations

import json
import warnings

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy.special import gammaln

from jaxscanvi import SCVI, InputError, Registry
from jaxscanvi.data.batch import (
    Batch,
    DenseDeviceCells,
    DeviceCells,
    dense_device_batch,
    device_batch,
    host_batch,
)
from jaxscanvi.data.cells import cell_data, to_csr
from jaxscanvi.data.registry import UNS_KEY, build_registry, registry_of, setup_anndata
from jaxscanvi.train.sources import DeviceSource, HostSource, epoch_rows, labelled_rows

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

DTYPES = [np.float32, np.float64, np.int32, np.int64]
FORMATS = [
    "csr",
    "csc",
    "csr_array",
    "csc_array",
    "dense",
    "messy_csr",
    "messy_csc",
    "messy_csr_array",
]
# obs column kinds: name -> pool of values
POOLS = {
    "categorical": ["b", "a", "c"],
    "string": ["x", "é", "Unknown", "10", "9"],
    "int": [0, 5, 10, -1],
    "bool": [True, False],
    "mixed": [1, "y", 2.5],
    "colliding": [1, "1", "z"],  # 1 and "1" collide once written as text
}
KINDS = [
    None,
    None,
    None,
    "categorical",
    "categorical",
    "categorical",
    "string",
    "int",
    "bool",
    "mixed",
    "colliding",
]
UNUSED = ["zz", "unused"]


# ------------------------------------------------------------------ strategies
def _messy(dense: np.ndarray, rng: np.random.Generator, fmt: str):
    """A non-canonical CSR/CSC of ``dense``: split values, explicit zeros, shuffled."""
    M = dense.T if fmt == "messy_csc" else dense
    data, indices, indptr = [], [], [0]
    for row in M:
        entries = []
        for j, v in enumerate(row):
            if np.isfinite(v) and v > 1 and rng.random() < 0.4:  # a duplicate entry
                a = int(rng.integers(1, int(v)))
                entries += [(j, a), (j, v - a)]
            elif v != 0:
                entries.append((j, v))
            elif rng.random() < 0.3:  # an explicitly stored zero
                entries.append((j, 0))
        rng.shuffle(entries)
        indices += [j for j, _ in entries]
        data += [v for _, v in entries]
        indptr.append(len(indices))
    args = (
        np.asarray(data, dense.dtype),
        np.asarray(indices, np.int32),
        np.asarray(indptr, np.int32),
    )
    cls = {"messy_csr": sp.csr_matrix, "messy_csc": sp.csc_matrix, "messy_csr_array": sp.csr_array}[
        fmt
    ]
    return cls(args, shape=dense.shape)


def _as_format(dense: np.ndarray, fmt: str, rng):
    if fmt == "dense":
        return dense.copy()
    if fmt.startswith("messy"):
        return _messy(dense, rng, fmt)
    return {
        "csr": sp.csr_matrix,
        "csc": sp.csc_matrix,
        "csr_array": sp.csr_array,
        "csc_array": sp.csc_array,
    }[fmt](dense)


def _column(draw, n: int, kind: str, allow_nan: bool):
    """(column for adata.obs, python values per cell, category order if categorical,
    has missing value)."""
    pool = POOLS[kind]
    idx = draw(st.lists(st.integers(0, len(pool) - 1), min_size=n, max_size=n))
    values = [pool[i] for i in idx]
    missing = allow_nan and draw(st.integers(0, 19)) == 0
    if missing:
        values[draw(st.integers(0, n - 1))] = None
    if kind == "categorical":
        cats = list(pool) + UNUSED[: draw(st.integers(0, 2))]
        order = draw(st.permutations(cats))
        col = pd.Categorical(values, categories=list(order))
        return col, values, list(order), missing
    if kind in ("int", "bool") and not missing:
        return np.asarray(values), values, None, missing
    return np.asarray(values, dtype=object), values, None, missing


@st.composite
def anndata_cases(draw, fmt: str, dtype):
    n = draw(st.integers(1, 9))
    g = draw(st.integers(1, 6))
    counts = np.asarray(
        draw(
            st.lists(st.sampled_from([0, 0, 0, 1, 2, 3, 7, 1000]), min_size=n * g, max_size=n * g)
        ),
        np.float64,
    ).reshape(n, g)
    if draw(st.integers(0, 7)):  # mostly: every cell has a count somewhere
        cols = draw(st.lists(st.integers(0, g - 1), min_size=n, max_size=n))
        counts[np.arange(n), cols] += 1
    problems = []
    if (counts.sum(1) == 0).any():
        problems.append("cell without counts")
    bad = draw(st.sampled_from([None] * 8 + ["half", "negative", "nan", "inf"]))
    if bad in ("half", "nan", "inf") and not np.issubdtype(dtype, np.floating):
        bad = None
    if bad is not None:
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, g - 1))
        counts[i, j] = {"half": 2.5, "negative": -3.0, "nan": np.nan, "inf": np.inf}[bad]
        problems.append(f"{bad} count")
    dense = counts.astype(dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    X = _as_format(dense, fmt, rng)
    layer = draw(st.sampled_from([None, "counts"]))
    var_names = [f"g{j}" for j in range(g)]
    if g >= 2 and draw(st.integers(0, 19)) == 0:
        var_names[1] = var_names[0]
        problems.append("duplicated gene names")
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    kwargs, expect = {}, {}

    for key, arg in (("bt", "batch_key"), ("lb", "labels_key"), ("cv", "cat_cov")):
        kind = draw(st.sampled_from(KINDS))
        if kind is None:
            continue
        col, values, order, missing = _column(draw, n, kind, allow_nan=True)
        obs[key] = col
        if arg == "cat_cov":
            kwargs["categorical_covariate_keys"] = [key]
        else:
            kwargs[arg] = key
        expect[key] = (values, order)
        if missing:
            problems.append(f"missing value in {key}")
        present = [v for v in values if v is not None]
        texts = {str(v) for v in present}
        if len(texts) != len(set(map(repr, present))) and not missing:
            problems.append(f"colliding categories in {key}")
    if "labels_key" in kwargs and draw(st.booleans()):
        values = [v for v in expect["lb"][0] if v is not None]
        if values:
            unl = str(draw(st.sampled_from(values)))
            kwargs["unlabeled_category"] = unl
            if all(str(v) == unl for v in values) and len(values) == n:
                problems.append("no labelled cell")
    if draw(st.booleans()):
        kind = draw(
            st.sampled_from(["float", "float", "float", "int", "int", "bool", "string", "nan"])
        )
        vals = {
            "float": np.linspace(-1.5, 2.0, n),
            "int": np.arange(n) - 2,
            "bool": np.arange(n) % 2 == 0,
            "string": np.asarray(["1.5"] * n, object),
            "nan": np.where(np.arange(n) == 0, np.nan, 1.0),
        }[kind]
        obs["cont"] = vals
        kwargs["continuous_covariate_keys"] = ["cont"]
        expect["cont"] = vals
        if kind in ("bool", "string", "nan"):
            problems.append(f"continuous covariate is {kind}")
    if draw(st.booleans()):
        sf = np.linspace(0.5, 3.0, n)
        if draw(st.integers(0, 4)) == 0:
            sf[-1] = draw(st.sampled_from([0.0, -1.0, np.nan]))
            problems.append("bad size factor")
        obs["sf"] = sf
        kwargs["size_factor_key"] = "sf"
        expect["sf"] = sf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: non-unique var names etc.
        a = ad.AnnData(
            X=X if layer is None else sp.csr_matrix((n, g), dtype=np.float32),
            obs=obs,
            var=pd.DataFrame(index=var_names),
        )
    if layer is not None:
        a.layers[layer] = X
    kwargs["layer"] = layer
    return a, dense, kwargs, expect, problems


def _snapshot(X):
    if sp.issparse(X):
        return (type(X), X.data.copy(), X.indices.copy(), X.indptr.copy(), X.shape)
    return (type(X), np.array(X, copy=True))


def _same(a, b) -> bool:
    return a[0] is b[0] and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a[1:], b[1:]))


def _setup(a, kwargs):
    if "unlabeled_category" in kwargs:
        return setup_anndata(a, **kwargs)
    SCVI.setup_anndata(a, **kwargs)
    return registry_of(a)


def _expected_order(values, order) -> list[str]:
    present = [v for v in values if v is not None]
    if order is not None:
        return [str(c) for c in order if c in set(present)]
    uniq = list(dict.fromkeys(present))
    if len({type(v) for v in uniq}) == 1:
        return [str(v) for v in sorted(uniq)]
    return sorted(map(str, uniq))  # mixed types: only the set is checked


# --------------------------------------------------- setup + cell_data property
# every storage format and dtype, each with its own random cases
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_setup_and_cell_data_roundtrip_or_input_error(fmt, dtype, data):
    a, dense, kwargs, expect, problems = data.draw(anndata_cases(fmt, dtype))
    X = a.X if kwargs["layer"] is None else a.layers[kwargs["layer"]]
    event(f"{'refused' if problems else 'accepted'}: {type(X).__name__} {X.dtype}")
    for p in problems:
        event(p.split(" in ")[0])
    before = _snapshot(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-cell batches, all-zero genes
        try:
            reg = _setup(a, kwargs)
        except InputError as e:
            assert problems, f"refused a valid input: {e}"
            assert UNS_KEY not in a.uns
            assert ". Fix: " in str(e)
            return
    assert not problems, f"accepted an input with {problems}"
    assert _same(before, _snapshot(X)), "setup changed the caller's matrix"

    # the registry round-trips through JSON, and is what adata.uns holds
    assert Registry.from_json(reg.to_json()) == reg
    assert json.loads(reg.to_json()) == json.loads(json.dumps(reg.to_dict()))
    assert registry_of(a) == reg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert build_registry(a, **kwargs) == reg
    assert reg.var_names == tuple(a.var_names)

    cells = cell_data(a, Registry.from_json(reg.to_json()))
    assert _same(before, _snapshot(X)), "cell_data changed the caller's matrix"
    n, g = dense.shape
    assert isinstance(cells.X, sp.csr_matrix) and cells.X.dtype == np.float32
    assert cells.X.shape == (n, g) and cells.X.has_canonical_format
    assert (cells.X.data != 0).all()
    assert np.array_equal(cells.X.toarray(), dense.astype(np.float32))
    totals = dense.astype(np.float64).sum(1)
    assert np.array_equal(cells.log_library, np.log(totals).astype(np.float32))
    lg = gammaln(dense.astype(np.float64) + 1).sum(1)
    np.testing.assert_allclose(cells.lgamma_const, lg, rtol=1e-6, atol=1e-6)

    def check_codes(key, codes, categories, extra=None):
        values, order = expect[key]
        texts = [str(v) for v in values]
        want = _expected_order(values, order)
        if extra is not None:
            want = [c for c in want if c != extra]
        assert set(categories) == set(want)
        if order is not None or len({type(v) for v in values}) == 1:
            assert list(categories) == want
        decoded = [categories[c] if c < len(categories) else extra for c in codes]
        assert decoded == texts

    if "batch_key" in kwargs:
        check_codes("bt", cells.batch, reg.batch_categories)
    else:
        assert reg.batch_categories == ("0",) and (cells.batch == 0).all()
    if "labels_key" in kwargs:
        check_codes("lb", cells.labels, reg.label_categories, kwargs.get("unlabeled_category"))
    else:
        assert (cells.labels == 0).all()
    if "categorical_covariate_keys" in kwargs:
        assert cells.cat_covs.shape == (n, 1)
        check_codes("cv", cells.cat_covs[:, 0], reg.categorical_covariate_categories[0])
    else:
        assert cells.cat_covs.shape == (n, 0)
    if "continuous_covariate_keys" in kwargs:
        assert np.array_equal(cells.cont_covs[:, 0], expect["cont"].astype(np.float32))
    else:
        assert cells.cont_covs.shape == (n, 0)
    if "size_factor_key" in kwargs:
        assert np.array_equal(cells.log_size_factor, np.log(expect["sf"]).astype(np.float32))
    else:
        assert cells.log_size_factor is None


def test_coo_counts_are_refused_by_anndata_but_read_by_to_csr():
    # AnnData itself only stores CSR/CSC (or dense) matrices; jaxscanvi's reader
    # still accepts any scipy sparse format, COO with duplicates included
    dense = np.array([[0, 3, 1], [2, 0, 0]], np.float64)
    coo = sp.coo_matrix(
        (
            np.array([1.0, 2.0, 1.0, 2.0, 0.0]),
            (np.array([0, 0, 0, 1, 1]), np.array([1, 1, 2, 0, 2])),
        ),
        shape=(2, 3),
    )
    with pytest.raises(ValueError):
        ad.AnnData(X=coo)
    X = to_csr(coo)
    assert np.array_equal(X.toarray(), dense) and X.has_canonical_format
    assert X.nnz == 3 and coo.nnz == 5  # the caller's matrix keeps its entries


# ------------------------------------------------------------- epoch and label rows
@settings(max_examples=200, **SETTINGS)
@given(st.integers(0, 40), st.integers(1, 12), st.booleans(), st.integers(0, 2**16), st.data())
def test_epoch_rows_cover_every_cell_once_padding_last(n_total, B, shuffle, seed, data):
    idx = np.asarray(
        data.draw(st.lists(st.integers(0, max(n_total - 1, 0)), unique=True, max_size=n_total)),
        np.int64,
    )
    rows = epoch_rows(np.random.default_rng(seed), idx, B, shuffle=shuffle)
    n_steps = max(-(-len(idx) // B), 1)
    assert rows.shape == (n_steps, B) and rows.dtype == np.int32
    flat = rows.ravel()
    real = flat[flat >= 0]
    assert np.array_equal(np.sort(real), np.sort(idx))  # each cell exactly once
    assert (flat[: len(idx)] >= 0).all() and (flat[len(idx) :] == -1).all()  # -1 only at end
    assert (flat >= -1).all()
    assert n_steps * B - len(idx) < B or len(idx) == 0
    if not shuffle:
        assert np.array_equal(real, idx)
    again = epoch_rows(np.random.default_rng(seed), idx, B, shuffle=shuffle)
    assert np.array_equal(rows, again)  # the same seed gives the same epoch


@settings(max_examples=200, **SETTINGS)
@given(
    st.lists(st.integers(0, 50), unique=True, min_size=1, max_size=20),
    st.integers(1, 6),
    st.integers(1, 12),
    st.integers(0, 2**16),
)
def test_labelled_rows_cycle_through_every_labelled_cell(lab, n_steps, B, seed):
    lab = np.asarray(lab)
    rows = labelled_rows(np.random.default_rng(seed), lab, n_steps, B)
    assert rows.shape == (n_steps, B) and rows.dtype == np.int32
    flat = rows.ravel()
    assert np.isin(flat, lab).all()
    L = len(lab)
    for s in range(0, len(flat) - L + 1, L):  # every full pass is a permutation
        assert np.array_equal(np.sort(flat[s : s + L]), np.sort(lab))
    counts = np.bincount(np.searchsorted(np.sort(lab), flat), minlength=L)
    assert counts.max() - counts.min() <= 1


def test_labelled_rows_without_labelled_cells_raise_instead_of_hanging():
    with pytest.raises(ValueError, match="no labelled"):
        labelled_rows(np.random.default_rng(0), np.zeros(0, np.int64), 2, 4)


# ------------------------------------------------------------- minibatch gathers
N_FIX, G_FIX, B_FIX = 10, 5, 4
K_FIX = B_FIX * G_FIX  # room for any B rows, repeated rows included


@st.composite
def cell_cases(draw, n=None, g=None):
    n = n or draw(st.integers(1, 9))
    g = g or draw(st.integers(1, 6))
    counts = np.asarray(
        draw(st.lists(st.sampled_from([0, 0, 0, 1, 2, 5, 300]), min_size=n * g, max_size=n * g)),
        np.float64,
    ).reshape(n, g)
    counts[np.arange(n), draw(st.lists(st.integers(0, g - 1), min_size=n, max_size=n))] += (
        1  # no empty cell
    )
    fmt = draw(st.sampled_from(FORMATS))
    dtype = draw(st.sampled_from(DTYPES))
    X = _as_format(counts.astype(dtype), fmt, np.random.default_rng(draw(st.integers(0, 99))))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    labels = rng.choice(["u", "v", "?"], n)
    labels[0] = "u"  # at least one labelled cell
    obs = pd.DataFrame(
        {
            "b": rng.choice(["p", "q", "r"], n),
            "l": pd.Categorical(labels, categories=["v", "u", "?", "never"]),
            "d": rng.choice([3, 1, 2], n),
            "c": rng.normal(size=n),
            "sf": rng.uniform(0.5, 2, n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    use_sf = draw(st.booleans())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = setup_anndata(
            a,
            batch_key="b",
            labels_key="l",
            unlabeled_category="?",
            categorical_covariate_keys=["d"],
            continuous_covariate_keys=["c"],
            size_factor_key="sf" if use_sf else None,
        )
    return cell_data(a, reg), counts.astype(np.float32)


def _rows(draw, n, B, allow_repeats=True):
    k = draw(st.integers(0, B))
    if allow_repeats and draw(st.booleans()):
        return np.asarray(draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k)), np.int64)
    return np.asarray(draw(st.permutations(range(n)))[:k], np.int64)


def _per_cell(cells):
    lsf = (
        cells.log_size_factor
        if cells.log_size_factor is not None
        else np.zeros(cells.n_obs, np.float32)
    )
    return {
        "batch": cells.batch,
        "labels": cells.labels,
        "cat_covs": cells.cat_covs,
        "cont_covs": cells.cont_covs,
        "log_size_factor": lsf,
        "log_library": cells.log_library,
        "lgamma_const": cells.lgamma_const,
    }


@settings(max_examples=120, **SETTINGS)
@given(st.data())
def test_host_batch_matches_scipy_densification(data):
    cells, dense = data.draw(cell_cases())
    B = data.draw(st.integers(1, 8))
    rows = _rows(data.draw, cells.n_obs, B)
    exact_cap = int(np.diff(cells.X.indptr)[rows].sum()) if len(rows) else 0
    K = data.draw(st.integers(max(exact_cap, 1), exact_cap + 6))
    b = host_batch(cells, rows, B, K)
    n = len(rows)
    assert b.x.shape == (B, cells.n_vars) and b.x.dtype == np.float32
    assert np.array_equal(b.x[:n], dense[rows]) and not b.x[n:].any()
    assert np.array_equal(b.x[:n], cells.X[rows].toarray())
    assert np.array_equal(b.weight, (np.arange(B) < n).astype(np.float32))
    for name, arr in _per_cell(cells).items():
        got = getattr(b, name)
        assert got.shape == (B, *arr.shape[1:]) and got.dtype == arr.dtype, name
        assert np.array_equal(got[:n], arr[rows]) and not got[n:].any(), name
    # the non-zero list holds exactly the non-zeros of x, padded with zeros
    assert b.nz.row.shape == b.nz.col.shape == b.nz.val.shape == (K,)
    rebuilt = np.zeros_like(b.x)
    np.add.at(rebuilt, (b.nz.row, b.nz.col), b.nz.val)
    assert np.array_equal(rebuilt, b.x)
    assert (b.nz.val[:exact_cap] > 0).all() and not b.nz.val[exact_cap:].any()
    if exact_cap > 1:
        with pytest.raises(ValueError, match="cap"):
            host_batch(cells, rows, B, exact_cap - 1)


def _pad_device_cells(cells) -> DeviceCells:
    """DeviceCells with data/indices padded to N_FIX * G_FIX: one shape for all cases."""
    dc = DeviceCells.from_cells(cells)
    X = cells.X
    # from_cells puts exactly the CSR arrays and per-cell columns on the device
    assert np.array_equal(np.asarray(dc.data), X.data)
    assert np.array_equal(np.asarray(dc.indices), X.indices)
    assert np.array_equal(np.asarray(dc.indptr), X.indptr)
    cap = N_FIX * G_FIX
    pad = lambda a, dt: jnp.asarray(np.pad(np.asarray(a, dt), (0, cap - len(a))))  # noqa
    return dc._replace(data=pad(X.data, np.float32), indices=pad(X.indices, np.int32))


@jax.jit
def _gather_both(dc, ddc, rows):
    return (device_batch(dc, rows, G_FIX, K_FIX), dense_device_batch(ddc, rows))


@settings(max_examples=60, **SETTINGS)
@given(st.data())
def test_host_and_device_batches_agree(data):
    cells, dense = data.draw(cell_cases(n=N_FIX, g=G_FIX))
    rows = _rows(data.draw, N_FIX, B_FIX)
    n = len(rows)
    padded = np.full(B_FIX, -1, np.int32)
    padded[:n] = rows
    host = host_batch(cells, rows, B_FIX, K_FIX)
    ddc = DenseDeviceCells.from_cells(cells)
    assert np.array_equal(np.asarray(ddc.X), dense)
    dev, dense_dev = jax.device_get(
        _gather_both(_pad_device_cells(cells), ddc, jnp.asarray(padded))
    )
    for other in (dev, dense_dev):
        assert np.array_equal(np.asarray(other.x), host.x)
        assert np.array_equal(np.asarray(other.weight), host.weight)
        assert np.array_equal(np.asarray(other.lgamma_const), host.lgamma_const)
        for name in _per_cell(cells):
            got, want = np.asarray(getattr(other, name)), getattr(host, name)
            assert got.shape == want.shape and got.dtype == want.dtype, name
            # padding rows are masked by weight 0; the device reads row 0 there
            assert np.array_equal(got[:n], want[:n]), name
    assert dense_dev.nz is None
    m = int(np.diff(cells.X.indptr)[rows].sum()) if n else 0
    assert np.array_equal(np.asarray(dev.nz.row)[:m], host.nz.row[:m])
    assert np.array_equal(np.asarray(dev.nz.col), host.nz.col)
    assert np.array_equal(np.asarray(dev.nz.val), host.nz.val)


# ------------------------------------------------------------- sources, whole epochs
def _collect(carry, b):
    """A step function that returns what it was given (and counts the steps)."""
    main, lab = (b, None) if isinstance(b, Batch) else b
    out = {
        "x": main.x,
        "w": main.weight,
        "batch": main.batch,
        "labels": main.labels,
        "lib": main.log_library,
        "lg": main.lgamma_const,
        "cat": main.cat_covs,
        "cont": main.cont_covs,
        "lsf": main.log_size_factor,
    }
    if lab is not None:
        out.update(lab_x=lab.x, lab_w=lab.weight, lab_labels=lab.labels)
    return carry + 1, out


@pytest.mark.parametrize("few_labelled", [False, True])
def test_sources_give_identical_epochs(few_labelled):
    # fixed shapes (a few compiles): 11 cells, 5 genes, batch size 4, 3 steps.
    # Labelled minibatches repeat cells when there are fewer labelled cells than
    # the batch size; with one labelled cell, the densest, every labelled
    # minibatch holds it 4 times: more non-zeros than any 4 distinct cells.
    cells, dense, n_labels = _fixed_cells(few_labelled)
    B = 4
    rng = np.random.default_rng(0)
    rows = epoch_rows(rng, np.arange(cells.n_obs), B)
    lab_idx = np.flatnonzero(cells.labels < n_labels)
    assert len(lab_idx) == (1 if few_labelled else 4)
    lab = labelled_rows(rng, lab_idx, rows.shape[0], B)
    sources = [
        DeviceSource(cells, B),
        DeviceSource(cells, B, dense_max_bytes=0),
        HostSource(cells, B),
    ]
    assert sources[0].dense and not sources[1].dense
    outs = []
    for s in sources:
        carry, out = s.run_epoch(_collect, jnp.asarray(0), rows, lab)
        assert int(carry) == rows.shape[0]
        outs.append(jax.device_get(out))
    ref = outs[-1]  # the host source
    valid = rows >= 0
    for step in range(rows.shape[0]):
        r = rows[step][valid[step]]
        assert np.array_equal(ref["x"][step][: len(r)], dense[r])
        assert np.array_equal(ref["lab_x"][step], dense[lab[step]])
    for out in outs[:-1]:
        for k in ref:
            a, b = np.asarray(out[k]), np.asarray(ref[k])
            assert a.shape == b.shape, k
            if k in ("batch", "labels", "lib", "cat", "cont", "lsf"):
                assert np.array_equal(a[valid], b[valid]), k
            else:
                assert np.array_equal(a, b), k


def _fixed_cells(few_labelled: bool):
    rng = np.random.default_rng(0)
    n, g = 11, 5
    counts = np.zeros((n, g), np.float32)
    counts[:, 0] = rng.integers(1, 4, n)
    counts[rng.random(n) < 0.5, 2] = 2
    counts[3] = 40  # the densest cell
    labels = np.full(n, "?", object)
    labels[3] = "u"
    if not few_labelled:
        labels[[0, 1, 6]] = ["u", "v", "v"]
    a = ad.AnnData(
        X=sp.csr_matrix(counts),
        var=pd.DataFrame(index=[f"g{j}" for j in range(g)]),
        obs=pd.DataFrame(
            {"b": rng.choice(["p", "q"], n), "l": labels, "c": rng.normal(size=n)},
            index=[f"c{i}" for i in range(n)],
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = setup_anndata(
            a,
            batch_key="b",
            labels_key="l",
            unlabeled_category="?",
            continuous_covariate_keys=["c"],
        )
    return cell_data(a, reg), counts, reg.n_labels
