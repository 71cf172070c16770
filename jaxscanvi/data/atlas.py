"""Counts of an atlas that spans many files or lives in a store.

`AtlasRows` is what the three stores share (`collection.FileCollection`:
many ``.h5ad``/``.zarr`` files; `annbatch_store.AnnbatchRows`: an annbatch
collection; `soma.SomaRows`: a TileDB-SOMA experiment). It is a
`BackedRows`, so training streams it and inference reads it block by block
exactly as for one backed file, and an ``anndata.abc.CSRDataset``, so an
AnnData can hold it as ``X``: ``read_collection``/``read_annbatch``/
``read_soma`` return such an AnnData (obs and var in memory, counts on disk),
which ``setup_anndata`` and the models take like any other.

A subclass provides ``read(start, stop)`` (canonical float32 CSR of rows
[start, stop)) and, where the store has CSR offsets of its own, the global
``indptr``; otherwise it is counted in the first pass over the counts.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import backed
from .backed import BackedRows


def canonical(X) -> sp.csr_matrix:
    """``X`` as float32 CSR with sorted, unique column indices (in place when it can)."""
    X = backed.as_csr_matrix(X)
    if X.dtype != np.float32:
        X = backed.as_csr_matrix(X.astype(np.float32))
    if not X.has_canonical_format:
        X.sum_duplicates()
    return X


def offsets(row_nnz: np.ndarray) -> np.ndarray:
    """CSR offsets (int64, n + 1) from non-zeros per row."""
    out = np.zeros(len(row_nnz) + 1, np.int64)
    np.cumsum(row_nnz, out=out[1:])
    return out


class AtlasRows(BackedRows, anndata.abc.CSRDataset):
    """On-disk counts read through a library (abstract: see the module notes)."""

    # anndata's CSRDataset lists only its own backends ("zarr", "hdf5"); a store
    # here names its library
    backend = "atlas"  # pyright: ignore[reportAssignmentType]
    dtype = np.dtype(np.float32)
    # > 1: `read_runs` reads its runs on that many threads (for libraries that
    # read concurrently: TileDB, zarr; h5py serialises every call)
    read_threads = 0

    def _init_rows(self, shape, indptr, block_size, cache_blocks) -> None:
        """The fields `BackedRows.__init__` sets, with no anndata dataset behind them."""
        self.dataset = None
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_size = int(block_size or backed.DEFAULT_BLOCK)
        self.cache_blocks = int(cache_blocks)
        self.rows = None
        self._cache: OrderedDict[int, sp.csr_matrix] = OrderedDict()
        self._indptr = None if indptr is None else np.asarray(indptr, np.int64)
        self._stats: dict | None = None
        self._pool: ThreadPoolExecutor | None = None  # made when first needed

    def read_runs(self, starts, stops) -> sp.csr_matrix:
        """Several runs, one after another; read together on ``read_threads`` threads."""
        runs = [(int(a), int(b)) for a, b in zip(starts, stops)]
        if self.read_threads < 2 or len(runs) < 2:
            return backed.RowRuns.read_runs(self, starts, stops)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.read_threads, thread_name_prefix=f"{self.backend}-read"
            )
        parts = list(self._pool.map(lambda r: self.read(*r), runs))
        return backed.as_csr_matrix(sp.vstack(parts, format="csr"))

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError

    @property
    def indptr(self) -> np.ndarray:
        """Global CSR offsets (int64, n_obs + 1); a store without offsets of its own
        counts them in one pass (set-up's pass fills them first)."""
        if self._indptr is None:
            self._indptr = offsets(
                np.concatenate(
                    [np.diff(b.indptr) for _, b in self.blocks()] or [np.zeros(0, np.int64)]
                )
            )
        return self._indptr

    # ------------------------------------------------ per-cell columns, once
    def remember(self, *, totals, lgamma, row_nnz, allow_noninteger: bool) -> None:
        """Keep what set-up's checked pass computed, so building the model's cell
        columns does not read the whole atlas again."""
        self._stats = {
            "totals": np.asarray(totals, np.float64),
            "lgamma": np.asarray(lgamma, np.float64),
            "allow_noninteger": bool(allow_noninteger),
        }
        if self._indptr is None:
            self._indptr = offsets(row_nnz)

    def remembered(self, *, allow_noninteger: bool):
        """(totals, sum of lgamma(x + 1)) from a pass whose checks were at least as
        strict as ``allow_noninteger`` asks, else None."""
        s = self._stats
        if s is None or (s["allow_noninteger"] and not allow_noninteger):
            return None
        return s["totals"], s["lgamma"]

    # ------------------------------------------------ what anndata calls
    def __getitem__(self, index) -> sp.csr_matrix:
        """Rows by int array (in that order), slice or boolean mask; an AnnData view
        passes (rows, columns)."""
        cols = slice(None)
        if isinstance(index, tuple):
            index, cols = (*index, slice(None))[:2]
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            out = (
                self.read(start, stop)
                if step == 1
                else BackedRows.__getitem__(self, np.arange(start, stop, step))
            )
        else:
            rows = np.atleast_1d(np.asarray(index))
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            out = BackedRows.__getitem__(self, rows)
        if isinstance(cols, slice) and cols == slice(None):
            return out
        return out[:, cols]

    def copy(self) -> AtlasRows:
        """The same store: the counts are read-only on disk (``AnnData.copy`` calls this)."""
        return self

    def limited(self, rows: slice) -> AtlasRows:
        """This store reading only ``rows`` (a process's slice in a many-host run)."""
        out = copy.copy(self)
        out.rows, out._cache = rows, OrderedDict()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shape[0]} cells x {self.shape[1]} genes)"


def atlas_anndata(store: AtlasRows, obs: pd.DataFrame, var: pd.DataFrame) -> anndata.AnnData:
    """An AnnData whose X is ``store`` (counts on disk) and obs/var in memory."""
    obs, var = obs.copy(), var.copy()
    obs.index = obs.index.astype(str)
    var.index = var.index.astype(str)
    return anndata.AnnData(X=store, obs=obs, var=var)
