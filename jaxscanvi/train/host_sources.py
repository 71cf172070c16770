"""The host and stream minibatch sources: cells fed to the device in chunks.

* `HostSource`: CSR in host memory; the device source's scan runs over
  chunks of S minibatches, each shipped as a small CSR while the last one
  computes (`jaxscanvi.train.chunks`).
* `StreamSource`: counts on disk (a backed .h5ad or .zarr, or a store of
  `jaxscanvi.data`), read in runs into a shuffle buffer
  (`jaxscanvi.data.shuffle`) and fed as the host source's chunks.

`sources.make_source` picks among them and the device source.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..compile_cache import ChunkEpochKey
from ..compile_cache import functions as _COMPILED
from ..data.backed import BackedRows
from ..data.batch import (
    DenseDeviceCells,
    DeviceCells,
    dense_device_batch,
    device_batch,
)
from ..data.cells import CellData
from ..data.sharded import (
    per_device,
    sharded_batch,
    stack_on_devices,
)
from ..data.shuffle import BUFFER_CELLS, RunCache, buffer_order, gather_rows
from ..distributions import sparse_pays
from .chunks import (
    Buffers,
    Feed,
    chunk_nnz,
    chunk_steps,
    host_chunk,
    layout,
    scan_program,
)
from .orders import Source, epoch_rows, grown_cap, labelled_rows


class HostSource(Source):
    """CSR in host memory, fed to the device in chunks of S minibatches.

    Each chunk holds the cells of S minibatches as CSR, built by a thread and
    shipped while the previous chunk computes; the device runs the device
    source's scan over it (`jaxscanvi.train.chunks`). With several devices
    each gets a chunk of its own rows; in a run of several processes
    (``process``) each builds only its own devices' chunks.
    """

    kind = "host"
    chunk_cells: int | None = None  # `chunks.CHUNK_CELLS`
    # the most bytes of dense counts a chunk may hold (a few are in flight)
    dense_chunk_bytes = 1 << 28

    def __init__(
        self,
        cells: CellData,
        batch_size: int,
        prefetch: int = 2,
        parallel=None,
        process: int | None = None,
    ):
        self.parallel = parallel
        self.process = process
        # the list of non-zeros goes to the likelihood where it pays (`backend`)
        self.sparse = sparse_pays()
        self.host = cells
        self.n_genes = cells.n_vars
        self.batch_size = batch_size
        self.row_nnz = cells.row_nnz()
        self.k_cap = 0  # grown to what each epoch's minibatches hold (`grown_cap`)
        self.nnz_cap = 0  # grown to what each epoch's chunks hold
        self.prefetch = prefetch
        self._indptr = None  # the counts' offsets for `read` (made when first read)
        # the dense chunks in flight: used again, not faulted in (`Buffers`)
        self.buffers = Buffers(3 * (prefetch + 2))
        self._ahead: _Ahead | None = None  # the next epoch's first chunk (`prepare`)

    def read(self, take: np.ndarray, pad: int):
        """CSR rows ``take`` (increasing) of the counts, data and indices padded
        to ``pad`` entries (`gather_rows`)."""
        X = self.host.X
        assert not isinstance(X, BackedRows)  # check_source: on-disk counts stream
        if self._indptr is None:
            # offsets in the indices' type: scipy's one-type C++ gather then
            # copies each row straight into the chunk (built once, n + 1 entries)
            ptr, ix = X.indptr, X.indices
            fits = ix.dtype == np.int32 and int(ptr[-1]) <= np.iinfo(np.int32).max
            self._indptr = ptr.astype(ix.dtype, copy=False) if fits else ptr
        return gather_rows(X, take, pad, indptr=self._indptr)

    def _epoch_fn(self, step_fn: Callable):
        par, G, K, sparse = self.parallel, self.n_genes, self.k_cap, self.sparse
        key = ChunkEpochKey(step_fn, G, K, sparse, par)

        def build():
            def gather(cells, r):
                if par is None and isinstance(cells, DenseDeviceCells):
                    b = dense_device_batch(cells, r)
                elif par is None:
                    b = device_batch(cells, r, G, K)
                else:
                    b = par.constrain(sharded_batch(cells, r, par.mesh, G, K))
                return b if sparse else b._replace(nz=None)

            run = scan_program(step_fn, gather, partial=True)
            return jax.jit(run) if par is None else jax.jit(run, out_shardings=par.replicated)

        return _COMPILED.get(key, build)

    def _put(self, parts: dict, kind: type):
        """Device d's chunk arrays ``parts[d]`` onto device d (as ``kind``, a
        `DeviceCells` or `DenseDeviceCells`)."""
        if self.parallel is None:
            return kind(*jax.device_put(parts[0]))
        return kind(*stack_on_devices(parts, self.parallel.mesh))

    def _dense(self, rows_cap: int) -> bool:
        """Whether chunks go dense: on the CPU, with the dense likelihood, when a
        chunk's dense counts stay small. There the host densifies with numpy
        and the device gathers rows, as the device source does; an accelerator
        would pay the dense copy over its link, so it gets the CSR."""
        return (
            jax.default_backend() == "cpu"
            and not self.sparse
            and rows_cap * self.n_genes * 4 <= self.dense_chunk_bytes
        )

    def _plan(self, rows, lab_rows, *, commit: bool = True) -> _Plan:
        """An epoch's chunk shapes; with ``commit``, its caps grown into the source's."""
        par = self.parallel
        rows = np.asarray(rows)
        lab_rows = None if lab_rows is None else np.asarray(lab_rows)
        if par is not None and self.process is None:
            rows, lab_rows = par.pad(rows), par.pad(lab_rows)
        n_dev = 1 if par is None else par.size
        n_steps, B = rows.shape
        S = chunk_steps(n_steps, B, self.chunk_cells)
        rows_cap = S * (B // n_dev) * (1 if lab_rows is None else 2)
        dense = self.n_genes if self._dense(rows_cap) else 0
        nnz_cap = self.nnz_cap
        if commit or not dense:  # (a dense chunk holds no list of non-zeros)
            need = chunk_nnz(self.row_nnz, rows, lab_rows, S, n_dev)
            if need > nnz_cap:  # 1/8 headroom: a new shape (compile) is rare
                nnz_cap = max(need + need // 8, 1)
        if commit:
            self.nnz_cap = nnz_cap
            self.k_cap = grown_cap(
                self.k_cap, self.row_nnz, per_device(rows, n_dev), per_device(lab_rows, n_dev)
            )
        return _Plan(rows, lab_rows, S, rows_cap, 0 if dense else nnz_cap, dense)

    def _feed(self, plan: _Plan, *, held: bool = False) -> Feed:
        """The chunks of ``plan``, built ``prefetch`` ahead by a thread."""
        par = self.parallel
        rows, lab_rows, S, rows_cap, nnz_cap, dense = plan
        n_dev = 1 if par is None else par.size
        mine = (
            range(n_dev)
            if par is None
            else [
                d
                for d, dev in enumerate(par.mesh.devices.flat)
                if dev.process_index == jax.process_index()
            ]
        )
        put = jax.device_put if par is None else par.local_replica
        cells, zeros = self.host, self.buffers.zeros
        kind = DenseDeviceCells if dense else DeviceCells

        def produce(i):
            sl = slice(i * S, (i + 1) * S)
            lay = layout(rows[sl], None if lab_rows is None else lab_rows[sl], n_dev, S)
            parts = {
                d: host_chunk(cells, lay.take[d], self.read, rows_cap, nnz_cap, dense, zeros)
                for d in mine
            }
            lab = None if lay.local_lab is None else put(lay.local_lab)
            return self._put(parts, kind), put(lay.local), lab, put(np.int32(lay.n_valid))

        return Feed(produce, -(-rows.shape[0] // S), self.prefetch, held=held)

    def chunks(self, rows, lab_rows=None) -> Feed:
        """An epoch's chunks on the device, built ``prefetch`` ahead by a thread:
        (cells, local rows, local labelled rows, steps used) each. The next
        epoch's, when `run_epoch` was told them, are already under way."""
        plan = self._plan(rows, lab_rows)
        ahead = self._ahead
        if ahead is not None and _same(ahead.given, (rows, lab_rows)):
            self._ahead = None
            if ahead.plan[2:] == plan[2:]:  # built to the shapes this epoch takes
                return ahead.feed
            ahead.feed.close()
        return self._feed(plan)

    def prepare(self, rows, lab_rows=None) -> None:
        """Start building the first chunk of an epoch of ``rows`` (taken up by
        the `chunks` call given them); any earlier one not taken up is dropped.
        Its caps are not the source's until then: an epoch in between (a
        validation) grows them as it would have."""
        self.close()
        plan = self._plan(rows, lab_rows, commit=False)
        self._ahead = _Ahead((rows, lab_rows), plan, self._feed(plan, held=True))

    def close(self) -> None:
        """Drop a prepared epoch's chunks and stop its thread."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.feed.close()

    def run_epoch(self, step_fn, carry, rows, lab_rows=None, then=None):
        """``then``: the next epoch's (rows, labelled rows), its first chunk
        built while this epoch's last one computes (`prepare`)."""
        par = self.parallel
        n_steps = np.shape(rows)[0]
        stream = self.chunks(rows, lab_rows)  # sets the caps the program is built for
        fn = self._epoch_fn(step_fn)
        if par is not None:
            carry = par.replicate(carry)
        outs = []
        for i, (chunk, local, local_lab, n_valid) in enumerate(stream):
            if then is not None and i == stream.n - 1:
                # before the dispatch, which may wait for the chunk's steps
                self.prepare(*then)
            carry, out = fn(carry, chunk, local, local_lab, n_valid)
            if par is not None and jax.default_backend() == "cpu":
                # sharded programs queued back to back can stall XLA's CPU
                # collectives: there one chunk is in flight at a time
                jax.block_until_ready(carry)
            outs.append(out)
        out = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a)[:n_steps], *outs)
        return carry, out


class _Plan(NamedTuple):
    """An epoch's rows (padded for the devices) and its chunks' shapes."""

    rows: np.ndarray
    lab_rows: np.ndarray | None
    steps: int
    rows_cap: int
    nnz_cap: int  # 0 for dense chunks
    dense: int  # genes, or 0 for CSR chunks


class _Ahead(NamedTuple):
    """A prepared epoch: the rows it was given, its plan, its chunks."""

    given: tuple
    plan: _Plan
    feed: Feed


def _same(a: tuple, b: tuple) -> bool:
    """Whether two (rows, labelled rows) pairs hold the same rows."""
    return all(
        x is y or (x is not None and y is not None and np.array_equal(x, y)) for x, y in zip(a, b)
    )


class StreamSource(HostSource):
    """Counts on disk (`BackedRows`): read in runs into a shuffle buffer.

    An epoch's order is `jaxscanvi.data.shuffle.buffer_order`: runs of
    consecutive cells from all over the file, shuffled inside buffers of
    about 65,536 cells, so no minibatch comes from one place in the file.
    The chunk builder reads each run once (`RunCache`) and keeps about two
    buffers in memory, however many cells the file holds.
    """

    kind = "stream"
    chunk_cells = BUFFER_CELLS  # one shuffle buffer per chunk

    def __init__(self, cells: CellData, batch_size: int, **kwargs):
        super().__init__(cells, batch_size, **kwargs)
        self.runs = RunCache(cells.X)
        # a prepared epoch's first chunk may be read while a validation's are
        self._reading = threading.Lock()

    def read(self, take: np.ndarray, pad: int):
        with self._reading:
            return self.runs.rows(take, pad)

    def _buffer(self, n_cells: int, batch_size: int) -> int:
        """Cells per buffer: exactly one chunk of the epoch."""
        steps = -(-n_cells // batch_size)
        return chunk_steps(steps, batch_size, self.chunk_cells) * batch_size

    def _order(self, rng, idx, batch_size, *, shuffle):
        if not shuffle:
            return epoch_rows(rng, idx, batch_size, shuffle=False)
        order = buffer_order(rng, idx, buffer_cells=self._buffer(len(idx), batch_size))
        return epoch_rows(rng, order, batch_size, shuffle=False)

    def _labelled(self, rng, lab_idx, n_steps, batch_size):
        cells = self._buffer(n_steps * batch_size, batch_size)
        return labelled_rows(
            rng,
            lab_idx,
            n_steps,
            batch_size,
            shuffle=lambda r, idx: buffer_order(r, idx, buffer_cells=cells),
        )
