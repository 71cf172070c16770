"""Minibatch sources behind one interface.

A source runs one epoch of a step function over given rows (an int array of
shape (n_steps, B), -1 for padding), and an evaluation pass. The order of
cells comes from the caller, so every source sees the same cells in the same
order and gives the same loss trajectory.

* `DeviceSource`: CSR counts resident on the device; each epoch is one jitted
  `lax.scan` that gathers and densifies minibatches inside the step. On
  several devices each holds only its own slice of the cells.
* `HostSource`: CSR in host memory; the same scan runs over chunks of S
  minibatches, each shipped as a small CSR while the last one computes
  (`jaxscanvi.train.chunks`).
* `StreamSource`: counts on disk (a backed .h5ad or .zarr, or a store of
  `jaxscanvi.data`), read in runs into a shuffle buffer
  (`jaxscanvi.data.shuffle`) and fed as the host source's chunks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..compile_cache import ChunkEpochKey, DeviceEpochKey
from ..compile_cache import functions as _COMPILED
from ..data.backed import BackedRows
from ..data.batch import (
    MAX_OFFSET,
    DenseDeviceCells,
    DeviceCells,
    check_offsets,
    dense_device_batch,
    device_batch,
)
from ..data.cells import CellData
from ..data.sharded import (
    local_rows,
    per_device,
    resident_bytes,
    shard_cells,
    sharded_batch,
    slice_nnz,
    stack_on_devices,
)
from ..data.shuffle import BUFFER_CELLS, RunCache, buffer_order, gather_rows
from ..distributed import shard_bounds
from ..distributions import sparse_pays
from ..errors import InputError
from .chunks import chunk_nnz, chunk_steps, host_chunk, layout, prefetched, scan_program


def epoch_rows(
    rng: np.random.Generator, idx: np.ndarray, batch_size: int, *, shuffle: bool = True
) -> np.ndarray:
    """Rows of one epoch as (n_steps, B); the short last minibatch is padded with -1."""
    order = rng.permutation(idx) if shuffle else np.asarray(idx)
    n_steps = max(-(-len(order) // batch_size), 1)
    rows = np.full(n_steps * batch_size, -1, np.int32)
    rows[: len(order)] = order
    return rows.reshape(n_steps, batch_size)


def labelled_rows(
    rng: np.random.Generator, lab_idx: np.ndarray, n_steps: int, batch_size: int, shuffle=None
) -> np.ndarray:
    """Labelled rows for every step: shuffled passes over lab_idx, cycled as needed.

    ``shuffle(rng, idx)`` orders one pass (default: a random permutation).
    """
    need = n_steps * batch_size
    if need > 0 and len(lab_idx) == 0:  # would cycle through nothing forever
        raise ValueError("labelled_rows: no labelled cells to draw minibatches from")
    chunks, have = [], 0
    while have < need:
        chunks.append(rng.permutation(lab_idx) if shuffle is None else shuffle(rng, lab_idx))
        have += len(lab_idx)
    return np.concatenate(chunks)[:need].astype(np.int32).reshape(n_steps, batch_size)


def rows_nnz(row_nnz: np.ndarray, rows) -> int:
    """Most non-zeros any minibatch of ``rows`` (n_steps, B; -1 padding) holds."""
    r = np.asarray(rows)
    if r.size == 0:
        return 0
    return int(np.where(r >= 0, row_nnz[np.maximum(r, 0)], 0).sum(axis=-1).max())


def grown_cap(k_cap: int, row_nnz: np.ndarray, *rows) -> int:
    """The length of the padded non-zero lists for minibatches ``rows`` (None skipped).

    ``k_cap``, or 25% more than the fullest minibatch when it holds more:
    the list stays close to what minibatches hold (the sparse likelihood's
    work is proportional to it), and it grows, with one recompilation,
    rarely: the fullest of an epoch's minibatches varies little from epoch
    to epoch.
    """
    need = max((rows_nnz(row_nnz, r) for r in rows if r is not None), default=0)
    return k_cap if need <= k_cap else max(need + need // 4, k_cap, 1)


def _side_by_side(parts: list[np.ndarray]) -> np.ndarray:
    """(n_i, b) row blocks padded with -1 steps to the longest, then joined by columns."""
    n = max(p.shape[0] for p in parts)
    return np.concatenate(
        [np.pad(p, ((0, n - p.shape[0]), (0, 0)), constant_values=-1) for p in parts], axis=1
    ).astype(np.int32)


class Source:
    """What every source shares: the order of an epoch's cells.

    With ``shards`` (boundaries of contiguous slices of the cells, one per
    process), global minibatch i is the concatenation of each slice's own
    minibatch i, drawn from that slice's cells only, so each process of a
    many-host run reads only its slice. One process given the same shards
    sees the same global minibatches.
    """

    shards: np.ndarray | None = None

    def device_bytes(self) -> int:
        """Bytes of cells resident on the fullest device (none: fed per step)."""
        return 0

    def _order(self, rng, idx, batch_size: int, *, shuffle: bool) -> np.ndarray:
        return epoch_rows(rng, idx, batch_size, shuffle=shuffle)

    def _labelled(self, rng, lab_idx, n_steps: int, batch_size: int) -> np.ndarray:
        return labelled_rows(rng, lab_idx, n_steps, batch_size)

    def _split(self, rng, idx, batch_size: int):
        n = len(self.shards) - 1
        idx = np.asarray(idx)
        seeds = rng.integers(0, 2**63 - 1, size=n)
        parts = [idx[(idx >= lo) & (idx < hi)] for lo, hi in zip(self.shards[:-1], self.shards[1:])]
        return [np.random.default_rng(int(s)) for s in seeds], parts, batch_size // n

    def order(
        self, rng: np.random.Generator, idx: np.ndarray, batch_size: int, *, shuffle: bool = True
    ) -> np.ndarray:
        if self.shards is None:
            return self._order(rng, idx, batch_size, shuffle=shuffle)
        rngs, parts, b = self._split(rng, idx, batch_size)
        return _side_by_side([self._order(r, p, b, shuffle=shuffle) for r, p in zip(rngs, parts)])

    def labelled_order(self, rng, lab_idx, n_steps: int, batch_size: int) -> np.ndarray:
        if self.shards is None:
            return self._labelled(rng, lab_idx, n_steps, batch_size)
        rngs, parts, b = self._split(rng, lab_idx, batch_size)
        # a slice without labelled cells contributes padding (weight 0)
        return _side_by_side(
            [
                self._labelled(r, p, n_steps, b) if len(p) else np.full((n_steps, b), -1, np.int32)
                for r, p in zip(rngs, parts)
            ]
        )


class DeviceSource(Source):
    """All cells on the device; an epoch is one jitted scan.

    Counts are kept dense when they take at most ``dense_max_bytes`` (a row
    gather is then the cheapest minibatch), otherwise as CSR, densified per
    minibatch inside the step with the non-zeros kept for the likelihood.

    With ``parallel`` and ``bounds`` (one contiguous slice of the cells per
    device), device d holds slice d only (`jaxscanvi.data.sharded`), dense
    when the largest slice fits ``dense_max_bytes``, and builds its own rows
    of each minibatch; ``shards`` must then draw global minibatches whose
    columns d*b:(d+1)*b come from slice d (see `Source`). With ``parallel``
    alone every device holds every cell.
    """

    kind = "device"

    def __init__(
        self,
        cells: CellData,
        batch_size: int,
        device=None,
        dense_max_bytes: int = 1 << 30,
        parallel=None,
        bounds=None,
    ):
        self.n_genes = cells.n_vars
        self.batch_size = batch_size
        self.parallel = parallel
        self.bounds = None if parallel is None or bounds is None else np.asarray(bounds)
        if parallel is not None and self.bounds is None:  # every device holds the cells
            device = parallel.replicated
        rows = cells.n_obs if self.bounds is None else int(np.diff(self.bounds).max())
        self.dense = rows * cells.n_vars * 4 <= dense_max_bytes
        self.row_nnz = cells.row_nnz()
        self.k_cap = 0  # grown to what each epoch's minibatches hold (`grown_cap`)
        if not self.dense:  # refused before any copy, never wrapped
            check_offsets(resident_nnz(cells.X.indptr, self.bounds), "the fullest device")
        if self.bounds is not None:
            self.cells = shard_cells(cells, self.bounds, parallel.mesh, dense=self.dense)
        elif self.dense:
            self.cells = DenseDeviceCells.from_cells(cells, device)
        else:
            self.cells = DeviceCells.from_cells(cells, device)
        # the copy to the device belongs to set-up, not to the first epoch's time
        jax.block_until_ready(self.cells)

    def device_bytes(self) -> int:
        """Bytes of cells resident on the fullest device."""
        return resident_bytes(self.cells)

    def _epoch_fn(self, step_fn: Callable):
        par = self.parallel
        sharded = self.bounds is not None
        dense = self.dense
        key = DeviceEpochKey(step_fn, self.n_genes, self.k_cap, dense, par, sharded)

        # the closure holds no reference to self: a cached program must not keep
        # a finished model's device data alive
        def build():
            G, K = self.n_genes, self.k_cap

            def gather(cells, r):
                if sharded:  # each device densifies its own rows
                    return par.constrain(sharded_batch(cells, r, par.mesh, G, K))
                b = dense_device_batch(cells, r) if dense else device_batch(cells, r, G, K)
                return b if par is None else par.constrain(b)

            run = scan_program(step_fn, gather, partial=False)
            return jax.jit(run)

        return _COMPILED.get(key, build)

    def run_epoch(self, step_fn, carry, rows, lab_rows=None):
        sharded = self.bounds is not None
        if not self.dense:  # dense counts need no list of non-zeros
            if sharded:  # each device lists the non-zeros of its own rows
                n = len(self.bounds) - 1
                self.k_cap = grown_cap(
                    self.k_cap, self.row_nnz, per_device(rows, n), per_device(lab_rows, n)
                )
            else:
                self.k_cap = grown_cap(self.k_cap, self.row_nnz, rows, lab_rows)
        if self.parallel is not None:
            rows, lab_rows = self.parallel.pad(rows), self.parallel.pad(lab_rows)
            carry = self.parallel.replicate(carry)
        if sharded:  # cells are indexed within their device's slice
            rows = local_rows(rows, self.bounds)
            lab_rows = None if lab_rows is None else local_rows(lab_rows, self.bounds)
        fn = self._epoch_fn(step_fn)
        lab = None if lab_rows is None else jnp.asarray(lab_rows)
        return fn(carry, self.cells, jnp.asarray(rows), lab)


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

    def read(self, take: np.ndarray):
        """CSR rows ``take`` (increasing) of the counts."""
        return gather_rows(self.host.X, take)

    def _epoch_fn(self, step_fn: Callable):
        par, G, K, sparse = self.parallel, self.n_genes, self.k_cap, self.sparse
        key = ChunkEpochKey(step_fn, G, K, sparse, par)

        def build():
            def gather(cells, r):
                if par is None:
                    b = device_batch(cells, r, G, K)
                else:
                    b = par.constrain(sharded_batch(cells, r, par.mesh, G, K))
                return b if sparse else b._replace(nz=None)

            run = scan_program(step_fn, gather, partial=True)
            return jax.jit(run) if par is None else jax.jit(run, out_shardings=par.replicated)

        return _COMPILED.get(key, build)

    def _put(self, parts: dict):
        """Device d's chunk arrays ``parts[d]`` onto device d (as DeviceCells)."""
        if self.parallel is None:
            return DeviceCells(*jax.device_put(parts[0]))
        return DeviceCells(*stack_on_devices(parts, self.parallel.mesh))

    def chunks(self, rows, lab_rows=None):
        """An epoch's chunks on the device, built ``prefetch`` ahead by a thread:
        (cells, local rows, local labelled rows, steps used) each."""
        par = self.parallel
        rows = np.asarray(rows)
        lab_rows = None if lab_rows is None else np.asarray(lab_rows)
        if par is not None and self.process is None:
            rows, lab_rows = par.pad(rows), par.pad(lab_rows)
        n_dev = 1 if par is None else par.size
        n_steps, B = rows.shape
        S = chunk_steps(n_steps, B, self.chunk_cells)
        self.k_cap = grown_cap(
            self.k_cap, self.row_nnz, per_device(rows, n_dev), per_device(lab_rows, n_dev)
        )
        need = chunk_nnz(self.row_nnz, rows, lab_rows, S, n_dev)
        if need > self.nnz_cap:  # 1/8 headroom: a new shape (compile) is rare
            self.nnz_cap = max(need + need // 8, 1)
        rows_cap = S * (B // n_dev) * (1 if lab_rows is None else 2)
        mine = (
            range(n_dev)
            if par is None
            else [
                d
                for d, dev in enumerate(par.mesh.devices.flat)
                if dev.process_index == jax.process_index()
            ]
        )
        put = jnp.asarray if par is None else par.local_replica
        cells, nnz_cap = self.host, self.nnz_cap

        def produce(i):
            sl = slice(i * S, (i + 1) * S)
            lay = layout(rows[sl], None if lab_rows is None else lab_rows[sl], n_dev, S)
            parts = {d: host_chunk(cells, lay.take[d], self.read, rows_cap, nnz_cap) for d in mine}
            lab = None if lay.local_lab is None else put(lay.local_lab)
            return self._put(parts), put(lay.local), lab, put(np.int32(lay.n_valid))

        return prefetched(produce, -(-n_steps // S), self.prefetch)

    def run_epoch(self, step_fn, carry, rows, lab_rows=None):
        par = self.parallel
        n_steps = np.shape(rows)[0]
        stream = self.chunks(rows, lab_rows)  # sets the caps the program is built for
        fn = self._epoch_fn(step_fn)
        if par is not None:
            carry = par.replicate(carry)
        outs = []
        for chunk, local, local_lab, n_valid in stream:
            carry, out = fn(carry, chunk, local, local_lab, n_valid)
            if par is not None and jax.default_backend() == "cpu":
                # sharded programs queued back to back can stall XLA's CPU
                # collectives: there one chunk is in flight at a time
                jax.block_until_ready(carry)
            outs.append(out)
        out = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a)[:n_steps], *outs)
        return carry, out


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

    def read(self, take: np.ndarray):
        return self.runs.rows(take)

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


def check_source(kind: str, cells: CellData) -> None:
    """Refuse a source that cannot serve where the counts are."""
    backed = isinstance(cells.X, BackedRows)
    if kind in ("device", "host") and backed:
        raise InputError(
            "data_source",
            kind,
            "the counts are on disk (a backed AnnData)",
            "pass data_source='stream' (or 'auto'), or load the AnnData "
            "into memory with adata.to_memory()",
        )
    if kind == "stream" and not backed:
        raise InputError(
            "data_source",
            kind,
            "the counts are in memory",
            "stream from a backed AnnData (anndata.read_h5ad(path, "
            "backed='r')), or pass data_source='auto'",
        )


def device_bounds(
    shards, n_devices: int, n_obs: int, batch_size: int, *, spread: bool
) -> np.ndarray | None:
    """Each device's contiguous slice of the cells for the device source, or None.

    With ``shards`` (k slices per device), device d takes slices
    d*k..(d+1)*k-1, whose minibatch columns fall on it. Without, and when
    ``spread``, one slice per device, if the global batch splits evenly.
    None (every device holds every cell) otherwise.
    """
    if shards is None:
        if spread and batch_size % n_devices == 0:
            return shard_bounds(n_obs, n_devices)
        return None
    k, rest = divmod(len(shards) - 1, n_devices)
    return np.asarray(shards)[::k] if rest == 0 else None


def make_source(
    kind: str,
    cells: CellData,
    batch_size: int,
    *,
    device_budget_bytes: int | None = None,
    dense_max_bytes: int = 1 << 30,
    parallel=None,
    shards: np.ndarray | None = None,
    spread: bool = False,
):
    """Pick a source: 'device', 'host', or 'auto' (device when it fits the budget).

    With ``parallel`` (a `DataParallel`), minibatches are split across its
    devices; with ``shards``, drawn slice by slice (see `Source`). The device
    source on several devices gives each device its own slice of the cells
    (`device_bounds`; ``spread``: one slice per device when ``shards`` is
    None, which then draws minibatches slice by slice too).
    """
    check_source(kind, cells)
    if kind == "auto" and isinstance(cells.X, BackedRows):
        kind = "stream"
    if jax.process_count() > 1:  # each process feeds its slice from the host
        if kind == "device":
            raise InputError(
                "data_source",
                kind,
                f"this run has {jax.process_count()} "
                "processes, and each feeds its own cells from the host",
                "pass data_source='auto', 'host' or 'stream'",
            )
        kind = "host" if kind == "auto" else kind
        src = (StreamSource if kind == "stream" else HostSource)(
            cells, batch_size, parallel=parallel, process=jax.process_index()
        )
        src.shards = shards
        return src
    bounds = None
    if parallel is not None and kind in ("auto", "device"):
        bounds = device_bounds(shards, parallel.size, cells.n_obs, batch_size, spread=spread)
    if kind == "auto":
        nnz = int(cells.X.indptr[-1])
        nbytes = nnz * 8 + (cells.n_obs + 1) * 8 + cells.n_obs * 64
        if bounds is not None:  # each device holds about its share
            nbytes = nbytes // parallel.size
        budget = device_budget_bytes if device_budget_bytes is not None else _device_budget()
        # past 32-bit offsets on a device the chunked host path trains it
        fits = resident_nnz(cells.X.indptr, bounds) <= MAX_OFFSET
        kind = "device" if nbytes <= budget and fits else "host"
    if kind == "device":
        src = DeviceSource(
            cells, batch_size, dense_max_bytes=dense_max_bytes, parallel=parallel, bounds=bounds
        )
        if bounds is not None and shards is None:  # minibatches drawn device by device
            shards = bounds
    elif kind == "host":
        src = HostSource(cells, batch_size, parallel=parallel)
    elif kind == "stream":
        src = StreamSource(cells, batch_size, parallel=parallel)
    else:
        raise ValueError(f"data_source={kind!r}: use 'auto', 'device' or 'host'")
    src.shards = shards
    return src


def resident_nnz(indptr, bounds) -> int:
    """Non-zeros the fullest device would hold resident (64-bit arithmetic)."""
    if bounds is None:
        return int(indptr[-1])
    return int(slice_nnz(indptr, bounds).max())


def _device_budget() -> int:
    """Bytes of counts "auto" puts on the device: half an accelerator's memory.

    On the CPU the "device" is host memory, so a device copy doubles the
    data's footprint; it is worth it (one scan per epoch, no Python per step)
    only for data up to 1 GiB.
    """
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit:
            return int(limit * 0.5)
    except Exception:  # noqa: BLE001 - CPU devices report no memory stats
        pass
    return 1 << 30
