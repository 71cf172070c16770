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

import itertools
from collections import OrderedDict

import numpy as np
import scipy.sparse as sp

from .backed import as_csr_matrix

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


def gather_rows(X: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """``X[rows]`` for increasing ``rows``, copied run by run where rows are
    consecutive (a buffer's cells sorted back into their runs): a few large
    copies instead of scipy's row-by-row gather. Falls back to scipy when
    runs are short."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return X[rows]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    if breaks.size * 8 > rows.size:  # runs shorter than 8 rows: scipy is faster
        return X[rows]
    first = rows[np.r_[0, breaks]]
    last = rows[np.r_[breaks - 1, rows.size - 1]] + 1
    a, b = X.indptr[first], X.indptr[last]
    data = np.concatenate([X.data[i:j] for i, j in zip(a, b)])
    indices = np.concatenate([X.indices[i:j] for i, j in zip(a, b)])
    counts = np.diff(X.indptr)[rows]
    indptr = np.zeros(rows.size + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    n_genes = X.shape[1]  # pyright: ignore[reportOptionalSubscript]  # scipy is untyped: shape reads as None
    return sp.csr_matrix((data, indices, indptr), shape=(rows.size, n_genes))


class RunCache:
    """Rows of an on-disk matrix read run by run, the last few buffers kept.

    ``reader`` has ``read(start, stop) -> CSR`` (rows [start, stop)) and
    ``shape``. `rows(take)` returns CSR rows in the order asked, reading each
    missing aligned run of ``run_cells`` rows once (adjacent ones in one
    read). The runs one call reads are joined into one segment, so the chunks
    that follow index one matrix per buffer, not one per run. Segments are
    dropped, least recently used first, past ``max_cells`` cells.
    """

    def __init__(self, reader, run_cells: int = RUN_CELLS, max_cells: int = 3 * BUFFER_CELLS):
        self.reader = reader
        self.run_cells = int(run_cells)
        self.max_cells = int(max_cells)
        # a process of a many-host run reads only its slice: runs are clipped to it
        lim = getattr(reader, "rows", None)
        n = reader.shape[0]
        self.lo, self.hi = (0, n) if lim is None else (lim.start, min(lim.stop, n))
        self._segments: OrderedDict[int, sp.csr_matrix] = OrderedDict()
        self._where: dict[int, tuple[int, int]] = {}  # run -> (segment, its first row there)
        self._next = 0
        self.reads = 0  # calls to reader.read (for tests and benchmarks)

    def _span(self, first: int, last: int) -> tuple[int, int]:
        L = self.run_cells
        return max(first * L, self.lo), min((last + 1) * L, self.hi)

    def _load(self, missing: np.ndarray) -> None:
        cuts = np.r_[0, np.flatnonzero(np.diff(missing) != 1) + 1, missing.size]
        spans, offset, seg = [], 0, self._next
        self._next += 1
        for a, b in itertools.pairwise(cuts):  # adjacent missing runs: one read
            first, last = int(missing[a]), int(missing[b - 1])
            lo, hi = self._span(first, last)
            spans.append((lo, hi))
            for r in range(first, last + 1):
                self._where[r] = (seg, offset + self._span(r, r)[0] - lo)
            offset += hi - lo
        self.reads += len(spans)
        lo, hi = np.asarray(spans, np.int64).T
        if hasattr(self.reader, "read_runs"):  # one CSR for all the runs
            self._segments[seg] = self.reader.read_runs(lo, hi)
        else:
            parts = [self.reader.read(a, b) for a, b in spans]
            self._segments[seg] = (
                as_csr_matrix(sp.vstack(parts, format="csr")) if len(parts) > 1 else parts[0]
            )

    def _evict(self, keep: set) -> None:
        # rows of each segment (scipy is untyped: pyright reads csr_matrix.shape as None)
        total = sum(m.shape[0] for m in self._segments.values())  # pyright: ignore[reportOptionalSubscript]
        for seg in list(self._segments):
            if total <= self.max_cells:
                break
            if seg in keep:
                continue
            total -= self._segments.pop(seg).shape[0]  # pyright: ignore[reportOptionalSubscript]
            self._where = {r: w for r, w in self._where.items() if w[0] != seg}

    @staticmethod
    def _gather(X: sp.csr_matrix, row: np.ndarray) -> sp.csr_matrix:
        if row.size > 1 and np.all(np.diff(row) > 0):
            return gather_rows(X, row)
        return as_csr_matrix(X[row])

    def rows(self, take: np.ndarray) -> sp.csr_matrix:
        """CSR rows ``take`` (global row numbers), in that order; increasing
        ``take`` is read run by run (`gather_rows`)."""
        take = np.asarray(take, np.int64)
        if take.size == 0:
            return sp.csr_matrix((0, self.reader.shape[1]), dtype=np.float32)
        run = take // self.run_cells
        needed = np.unique(run)
        missing = np.asarray([r for r in needed.tolist() if r not in self._where], np.int64)
        if missing.size:
            self._load(missing)
        info = np.asarray([self._where[r] for r in needed.tolist()], np.int64)
        k = np.searchsorted(needed, run)
        seg = info[k, 0]
        row = info[k, 1] + take - np.maximum(run * self.run_cells, self.lo)
        segs = np.unique(seg)
        for s_ in segs:
            self._segments.move_to_end(int(s_))
        if segs.size == 1:
            X = self._segments[int(segs[0])]
            # a chunk that is exactly the buffer it loaded: nothing to gather
            whole = row.size == X.shape[0] and np.array_equal(row, np.arange(row.size))  # pyright: ignore[reportOptionalSubscript]  # scipy: as in _evict
            out = X if whole else self._gather(X, row)
        else:  # rows of each segment, then back into the order asked
            pos = [np.flatnonzero(seg == s_) for s_ in segs]
            stacked = as_csr_matrix(
                sp.vstack(
                    [self._gather(self._segments[int(s_)], row[p]) for s_, p in zip(segs, pos)],
                    format="csr",
                )
            )
            inverse = np.empty(take.size, np.int64)
            inverse[np.concatenate(pos)] = np.arange(take.size)
            out = stacked[inverse]
        self._evict(set(segs.tolist()))
        return out
