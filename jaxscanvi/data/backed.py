"""Counts that stay on disk: a backed ``.h5ad`` or a ``.zarr`` store, read in blocks.

anndata opens a sparse matrix lazily (``anndata.read_h5ad(path, backed="r")``,
or ``anndata.io.sparse_dataset(zarr.open(path)["X"])``). `BackedRows` gives it
the little of scipy's CSR interface the models use (``shape``, ``indptr``,
``X[rows]``) and reads whole contiguous blocks of rows, keeping the last few
in memory, so a block-shuffled epoch reads each block once and host memory
stays flat however many cells the file holds.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import scipy.sparse as sp

from ..errors import InputError

DEFAULT_BLOCK = 8192


def is_backed(X) -> bool:
    """True for anndata's lazy sparse datasets (backed h5ad, zarr)."""
    return hasattr(X, "to_memory") and hasattr(X, "group") and hasattr(X, "format")


def as_csr_matrix(X) -> sp.csr_matrix:
    """``X`` itself when it is a ``csr_matrix`` (no copy), else converted to one.

    scipy has no type information: to a type checker its ``vstack``, ``astype``
    and indexing return any sparse matrix or array. This pins the type the
    callers already get at run time."""
    return X if isinstance(X, sp.csr_matrix) else sp.csr_matrix(X)


def rows_of(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The rows of runs [starts[i], stops[i]) laid end to end (int64)."""
    lengths = np.asarray(stops, np.int64) - starts
    rows = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    rows += np.arange(rows.size)
    return rows


def offsets_of(counts: np.ndarray) -> np.ndarray:
    """CSR offsets (int64, n + 1) from non-zeros per row."""
    out = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


# values one zarr read may span (16 MB of float32): ranges are read together
# while their chunks touch, up to this
SPAN_VALUES = 1 << 22


def ranges_of(array, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Values [a[i], b[i]) of a 1-D h5py or zarr array, laid end to end.

    h5py: a slice per range, its fastest read (a union of hyperslabs read at
    once was slower). zarr: ranges whose compressed chunks touch are read as
    one slice, so each chunk is decoded once per call rather than once per
    range in it (a 64-cell run is a few percent of a chunk anndata writes)."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    if a.size == 0:
        return np.zeros(0, array.dtype)
    chunk = getattr(array, "chunks", None) if hasattr(array, "get_orthogonal_selection") else None
    if not chunk or a.size == 1:
        parts = [array[i:j] for i, j in zip(a.tolist(), b.tolist())]
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
    c = int(chunk[0])
    al, bl = a.tolist(), b.tolist()
    # groups of ranges: a new one where a range starts past the chunk after
    # the last one's, or the group would span too many values
    cuts, lo = [], al[0]
    for i in range(1, len(al)):
        back = al[i] < bl[i - 1]  # not in order: its own group
        if back or al[i] // c > (bl[i - 1] - 1) // c + 1 or bl[i] - lo > SPAN_VALUES:
            cuts.append(i)
            lo = al[i]
    parts = []
    for g0, g1 in zip([0, *cuts], [*cuts, len(al)]):
        lo = al[g0]
        span = np.asarray(array[lo : bl[g1 - 1]])
        parts += [span[x - lo : y - lo] for x, y in zip(al[g0:g1], bl[g0:g1])]
    return np.concatenate(parts)


class RowRuns:
    """What every on-disk counts reader shares: several runs of rows in one call.

    A subclass provides ``read(start, stop)`` and ``shape``; a store that can
    batch the reads of many runs (one query for all of them) overrides `read_runs`.
    """

    shape: tuple[int, ...]

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError

    def read_runs(self, starts, stops) -> sp.csr_matrix:
        """Rows [starts[i], stops[i]) for each i, one run after another, as CSR."""
        parts = [self.read(int(a), int(b)) for a, b in zip(starts, stops)]
        if not parts:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        return parts[0] if len(parts) == 1 else as_csr_matrix(sp.vstack(parts, format="csr"))


class BackedRows(RowRuns):
    """Row access to an on-disk CSR matrix through a small cache of row blocks."""

    def __init__(
        self,
        dataset,
        block_size: int | None = None,
        cache_blocks: int = 4,
        rows: slice | None = None,
    ):
        if getattr(dataset, "format", "csr") != "csr":
            raise ValueError(
                "streaming needs CSR (cells x genes, row-compressed) counts; "
                "re-save the matrix as CSR"
            )
        self.dataset = dataset
        self.shape = tuple(dataset.shape)
        self.block_size = int(block_size or DEFAULT_BLOCK)
        self.cache_blocks = int(cache_blocks)
        self.indptr = np.asarray(dataset.group["indptr"][:], np.int64)
        # the only rows this reader may touch (a process's slice in a many-host run)
        self.rows = rows
        self._cache: OrderedDict[int, sp.csr_matrix] = OrderedDict()
        self._arrays = None  # the store's data and indices arrays, opened once

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def n_blocks(self) -> int:
        return -(-self.shape[0] // self.block_size)

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as float32 CSR, straight from disk.

        Slices the store's ``data`` and ``indices`` arrays (h5py or zarr)
        between offsets already in memory: anndata's own slicing reads the
        offsets again on every call, which costs more than a short run."""
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        if self._arrays is None:  # a group lookup costs as much as a short read
            group = self.dataset.group
            self._arrays = (group["data"], group["indices"])
        data = np.asarray(self._arrays[0][a:b], np.float32)
        indices = np.asarray(self._arrays[1][a:b], np.int32)
        return sp.csr_matrix(
            (data, indices, self.indptr[start : stop + 1] - a), shape=(stop - start, self.shape[1])
        )

    def read_runs(self, starts: np.ndarray, stops: np.ndarray) -> sp.csr_matrix:
        """Rows [starts[i], stops[i]) for each i, stacked in that order: the
        arrays are sliced per run and joined once (one CSR, not one per run)."""
        starts = np.asarray(starts, np.int64)
        stops = np.asarray(stops, np.int64)
        if self._arrays is None:
            group = self.dataset.group
            self._arrays = (group["data"], group["indices"])
        a, b = self.indptr[starts], self.indptr[stops]
        data = np.asarray(ranges_of(self._arrays[0], a, b), np.float32)
        indices = np.asarray(ranges_of(self._arrays[1], a, b), np.int32)
        rows = rows_of(starts, stops)
        indptr = offsets_of(self.indptr[rows + 1] - self.indptr[rows])
        return sp.csr_matrix((data, indices, indptr), shape=(indptr.size - 1, self.shape[1]))

    def _span(self, b: int) -> tuple[int, int]:
        """Rows [start, stop) of block b, clipped to ``self.rows``."""
        start, stop = b * self.block_size, min((b + 1) * self.block_size, self.shape[0])
        if self.rows is not None:
            start, stop = max(start, self.rows.start), min(stop, self.rows.stop)
        return start, stop

    def block(self, b: int) -> sp.csr_matrix:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        X = self.read(*self._span(b))
        X.sum_duplicates()
        self._cache[b] = X
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return X

    def blocks(self, start: int = 0, stop: int | None = None):
        """(start, CSR block) over rows [start, stop), in order (not cached)."""
        stop = self.shape[0] if stop is None else stop
        for a in range(start, stop, self.block_size):
            yield a, self.read(a, min(a + self.block_size, stop))

    def __getitem__(self, rows) -> sp.csr_matrix:
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1:
            raise IndexError("BackedRows takes a 1-D array of row indices")
        if rows.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        lim = self.rows
        if lim is not None and (rows.min() < lim.start or rows.max() >= lim.stop):
            raise InputError(
                "indices",
                f"[{rows.min()}, {rows.max()}]",
                "this process "
                f"reads only rows [{lim.start}, {lim.stop}) of the backed "
                "file: its slice in a run of several processes",
                "pass indices=jaxscanvi.distributed.local_indices(adata.n_obs)"
                ", or load the AnnData into memory",
            )
        which = rows // self.block_size
        parts, where = [], np.empty(rows.size, np.int64)
        offset = 0
        for b in np.unique(which):
            sel = np.flatnonzero(which == b)
            parts.append(self.block(int(b))[rows[sel] - self._span(int(b))[0]])
            where[sel] = offset + np.arange(sel.size)
            offset += sel.size
        if len(parts) == 1:
            return parts[0]
        return as_csr_matrix(sp.vstack(parts, format="csr"))[where]

    def to_memory(self) -> sp.csr_matrix:
        return self.read(0, self.shape[0])
