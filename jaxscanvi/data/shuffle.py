"""The order of cells read from disk: short runs from many places, shuffled in a buffer.

Atlases ship dataset by dataset, so any run of consecutive cells in a file
holds one dataset. Reading whole contiguous blocks (one minibatch per block)
would train on one dataset at a time. Instead an epoch:

1. cuts the cells into aligned runs of ``run_cells`` consecutive cells (the
   unit of reading: one read per run, adjacent runs merged);
2. visits the runs in a random order, gathering ``buffer_cells`` cells' worth
   of them (about ``buffer_cells / run_cells`` places in the file) into a
   shuffle buffer;
3. shuffles the cells inside each buffer, and takes minibatches from it in
   that order.

The stream source makes each buffer one chunk of its epoch program (65,536
cells, or 256 minibatches when they are smaller: 32,768 cells at batch 128).
Each minibatch then draws from hundreds of places in the file, so a file
sorted by dataset trains like a shuffled one, while each run is read once per
epoch, copied whole, and memory holds a few chunks (`RunCache`). This is
annbatch's rule (chunks gathered into a preloaded, shuffled buffer).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import scipy.sparse as sp

from .backed import as_csr_matrix, offsets_of

RUN_CELLS = 64
BUFFER_CELLS = 1 << 16


def buffer_order(
    rng: np.random.Generator,
    idx: np.ndarray,
    run_cells: int = RUN_CELLS,
    buffer_cells: int = BUFFER_CELLS,
) -> np.ndarray:
    """``idx`` in the buffered order above: every cell once, runs shuffled, then
    cells shuffled within each buffer of about ``buffer_cells`` cells."""
    idx = np.asarray(idx)
    if idx.size == 0:
        return idx
    idx = np.sort(idx)
    run = idx // run_cells
    starts = np.r_[0, np.flatnonzero(np.diff(run)) + 1]
    ends = np.r_[starts[1:], idx.size]
    order = rng.permutation(starts.size)
    lengths = (ends - starts)[order]
    # the runs' cells laid end to end in their new order, then cut into buffers
    # of exactly buffer_cells cells (a chunk of the host source is one buffer)
    first = np.cumsum(lengths) - lengths
    cells = idx[np.repeat(starts[order] - first, lengths) + np.arange(idx.size)]
    step = max(int(buffer_cells), 1)
    out = np.empty_like(cells)
    for a in range(0, cells.size, step):
        out[a : a + step] = rng.permutation(cells[a : a + step])
    return out


def padded_empty(nnz: int, pad: int, dtype) -> np.ndarray:
    """An array of max(nnz, pad) entries, zeros past ``nnz`` (a chunk's fixed capacity)."""
    if pad and nnz > pad:
        raise ValueError(f"chunk holds {nnz} non-zeros, more than its capacity {pad}")
    out = np.empty(max(nnz, pad), dtype)
    out[nnz:] = 0
    return out


def _row_index(indptr, src, rows: np.ndarray, data: np.ndarray, indices: np.ndarray) -> bool:
    """scipy's C++ row gather (what ``X[rows]`` runs) straight into ``data`` and
    ``indices``: no intermediate CSR. False where the types differ from what
    it takes (one index type throughout)."""
    try:
        from scipy.sparse._sparsetools import csr_row_index  # a private module
    except ImportError:
        return False
    s_data, s_indices = src
    if not (indptr.dtype == s_indices.dtype == indices.dtype and s_data.dtype == data.dtype):
        return False
    csr_row_index(rows.size, rows.astype(indptr.dtype), indptr, s_indices, s_data, indices, data)
    return True


def copy_rows(sources: list, seg: np.ndarray, row: np.ndarray, pad: int = 0):
    """Rows ``row[i]`` of CSR ``sources[seg[i]]`` (each (data, indices, indptr)),
    in that order, as (data, indices, indptr): data and indices hold
    max(nnz, pad) entries, zeros past nnz (a chunk's capacity, filled in
    place). Rows consecutive in one source are copied as one slice."""
    m = row.size
    counts = np.empty(m, np.int64)
    for s, (_, _, ptr) in enumerate(sources):
        here = slice(None) if len(sources) == 1 else seg == s
        r = row[here]
        counts[here] = ptr[r + 1] - ptr[r]
    out_ptr = offsets_of(counts)
    nnz = int(out_ptr[-1])
    data = padded_empty(nnz, pad, np.float32)
    indices = padded_empty(nnz, pad, np.int32)
    # pieces: rows consecutive in one source
    brk = np.flatnonzero((np.diff(seg) != 0) | (np.diff(row) != 1)) + 1
    first = np.r_[0, brk]
    if first.size * 8 > m and len(sources) == 1:  # short pieces: one C++ gather
        d, ix, ptr = sources[0]
        if _row_index(ptr, (d, ix), row, data[:nnz], indices[:nnz]):
            return data, indices, out_ptr
    if first.size * 8 > m:  # short pieces, several sources: element by element
        _copy_elements(sources, seg, row, counts, out_ptr, data, indices)
        return data, indices, out_ptr
    starts = np.empty(first.size, np.int64)
    seg_first = seg[first]
    for s, (_, _, ptr) in enumerate(sources):
        here = seg_first == s
        starts[here] = ptr[row[first[here]]]
    dst, size = out_ptr[first], np.diff(np.r_[out_ptr[first], nnz])
    for s, (d, ix, _) in enumerate(sources):
        here = np.flatnonzero(seg_first == s)
        for a, o, k in zip(starts[here].tolist(), dst[here].tolist(), size[here].tolist()):
            data[o : o + k] = d[a : a + k]
            indices[o : o + k] = ix[a : a + k]
    return data, indices, out_ptr


def _copy_elements(sources, seg, row, counts, out_ptr, data, indices) -> None:
    """`copy_rows` one value at a time (vectorised): for rows in short pieces."""
    for s, (d, ix, ptr) in enumerate(sources):
        p = np.flatnonzero(seg == s)
        c = counts[p]
        local = np.arange(int(c.sum())) - np.repeat(offsets_of(c)[:-1], c)
        dst = np.repeat(out_ptr[p], c) + local
        src = np.repeat(ptr[row[p]], c) + local
        data[dst] = d[src]
        indices[dst] = ix[src]


def gather_rows(X: sp.csr_matrix, rows: np.ndarray, pad: int = 0, indptr=None):
    """``X[rows]`` as (data, indices, indptr), padded as `copy_rows` says.
    ``indptr``: X's offsets in the type of its indices (scipy's fast gather
    takes one index type), where the caller keeps such a copy."""
    rows = np.asarray(rows, np.int64)
    ptr = X.indptr if indptr is None else indptr
    return copy_rows([(X.data, X.indices, ptr)], np.zeros(rows.size, np.int8), rows, pad)


def as_matrix(parts, n_genes: int) -> sp.csr_matrix:
    """(data, indices, indptr) with padded data and indices as CSR (its first nnz)."""
    data, indices, indptr = parts
    nnz = int(indptr[-1])
    return sp.csr_matrix((data[:nnz], indices[:nnz], indptr), shape=(indptr.size - 1, n_genes))


class RunCache:
    """Rows of an on-disk matrix read run by run, the last few buffers kept.

    ``reader`` has ``read(start, stop) -> CSR`` (rows [start, stop)) and
    ``shape``. `rows(take)` returns CSR rows in the order asked, reading each
    missing aligned run of ``run_cells`` rows once (adjacent ones in one
    read). The runs one call reads are joined into one segment, so the chunks
    that follow index one matrix per buffer, not one per run. Segments are
    dropped, least recently used first, past ``max_cells`` cells. Where each
    run lies is kept in two arrays (one entry per run of the file), so a
    chunk's bookkeeping is a few numpy calls, not a loop over its runs.
    """

    def __init__(self, reader, run_cells: int = RUN_CELLS, max_cells: int = 3 * BUFFER_CELLS):
        self.reader = reader
        self.run_cells = int(run_cells)
        self.max_cells = int(max_cells)
        # a process of a many-host run reads only its slice: runs are clipped to it
        lim = getattr(reader, "rows", None)
        n = reader.shape[0]
        self.lo, self.hi = (0, n) if lim is None else (lim.start, min(lim.stop, n))
        # segment -> ((data, indices, indptr), the runs it holds)
        self._segments: OrderedDict[int, tuple] = OrderedDict()
        n_runs = -(-n // self.run_cells)
        self._seg = np.full(n_runs, -1, np.int64)  # run -> its segment, -1: not held
        self._first = np.zeros(n_runs, np.int64)  # run -> its first row in the segment
        self._next = 0
        self.reads = 0  # calls to reader.read (for tests and benchmarks)

    def _load(self, missing: np.ndarray) -> None:
        """Read runs ``missing`` (increasing) into a new segment, adjacent ones together."""
        L = self.run_cells
        cuts = np.r_[0, np.flatnonzero(np.diff(missing) != 1) + 1]
        lo = np.maximum(missing[cuts] * L, self.lo)
        hi = np.minimum((np.r_[missing[cuts[1:] - 1], missing[-1]] + 1) * L, self.hi)
        self.reads += lo.size
        # each run's first row in the segment: its span's place plus its own
        span_at = np.cumsum(hi - lo) - (hi - lo)
        flag = np.zeros(missing.size, np.int64)
        flag[cuts] = 1
        which = np.cumsum(flag) - 1  # each run's span
        run_lo = np.maximum(missing * L, self.lo)
        seg = self._next
        self._next += 1
        self._seg[missing] = seg
        self._first[missing] = span_at[which] + run_lo - lo[which]
        if hasattr(self.reader, "read_runs"):  # one CSR for all the runs
            X = self.reader.read_runs(lo, hi)
        else:
            parts = [self.reader.read(int(a), int(b)) for a, b in zip(lo, hi)]
            X = as_csr_matrix(sp.vstack(parts, format="csr")) if len(parts) > 1 else parts[0]
        self._segments[seg] = ((X.data, X.indices, X.indptr), missing)

    def _evict(self, keep: set) -> None:
        total = sum(p[2].size - 1 for p, _ in self._segments.values())
        for seg in list(self._segments):
            if total <= self.max_cells:
                break
            if seg in keep:
                continue
            parts, runs = self._segments.pop(seg)
            total -= parts[2].size - 1
            self._seg[runs] = -1

    def rows(self, take: np.ndarray, pad: int | None = None):
        """Rows ``take`` (global row numbers), in that order, as CSR; with
        ``pad``, as (data, indices, indptr) padded to ``pad`` non-zeros
        (`copy_rows`): what a chunk ships."""
        take = np.asarray(take, np.int64)
        n_genes = self.reader.shape[1]
        if take.size == 0:
            parts = (
                np.zeros(pad or 0, np.float32),
                np.zeros(pad or 0, np.int32),
                np.zeros(1, np.int64),
            )
            return parts if pad is not None else as_matrix(parts, n_genes)
        run = take // self.run_cells
        sorted_ = bool(np.all(run[1:] >= run[:-1]))
        needed = run[np.r_[True, run[1:] != run[:-1]]] if sorted_ else np.unique(run)
        missing = needed[self._seg[needed] < 0]
        if missing.size:
            self._load(missing)
        seg = self._seg[run]
        row = self._first[run] + take - np.maximum(run * self.run_cells, self.lo)
        segs = np.unique(seg)
        for s_ in segs.tolist():
            self._segments.move_to_end(s_)
        sources = [self._segments[s_][0] for s_ in segs.tolist()]
        local = np.searchsorted(segs, seg) if segs.size > 1 else np.zeros(take.size, np.int8)
        out = copy_rows(sources, local, row, pad or 0)
        self._evict(set(segs.tolist()))
        return out if pad is not None else as_matrix(out, n_genes)
