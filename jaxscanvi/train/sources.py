"""Minibatch sources behind one interface.

A source runs one epoch of a step function over given rows (an int array of
shape (n_steps, B), -1 for padding), and an evaluation pass. The order of
cells comes from the caller, so every source sees the same cells in the same
order and gives the same loss trajectory.

* `DeviceSource`: CSR counts resident on the device; each epoch is one jitted
  `lax.scan` that gathers and densifies minibatches inside the step. On
  several devices each holds only its own slice of the cells.
* `HostSource`, `StreamSource` (in `host_sources`): CSR in host memory, or
  counts read from disk through a shuffle buffer, fed to the same scan in
  chunks of S minibatches.

The order of each epoch's rows is `orders`' (`Source`, `epoch_rows`); this
module also picks a source (`make_source`) and re-exports the others.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from .._export_cache import CarryProgram
from ..compile_cache import DeviceEpochKey
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
)
from ..distributed import shard_bounds
from ..distributions import sparse_pays
from ..errors import InputError
from .chunks import scan_program
from .host_sources import HostSource, StreamSource
from .orders import Source, epoch_rows, grown_cap, labelled_rows, rows_nnz
from .parallel import DataParallel

__all__ = [
    "DeviceSource",
    "HostSource",
    "Source",
    "StreamSource",
    "check_source",
    "device_bounds",
    "epoch_rows",
    "grown_cap",
    "labelled_rows",
    "make_source",
    "resident_nnz",
    "rows_nnz",
    "sparse_pays",
]


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
        parallel: DataParallel | None = None,
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
            assert parallel is not None  # bounds are kept only with parallel
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
                    assert par is not None  # bounds are kept only with parallel
                    return par.constrain(sharded_batch(cells, r, par.mesh, G, K))
                b = dense_device_batch(cells, r) if dense else device_batch(cells, r, G, K)
                return b if par is None else par.constrain(b)

            run = scan_program(step_fn, gather, partial=False)
            name = getattr(step_fn, "key", None)
            if par is not None or name is None:  # (exported programs are one device's)
                return jax.jit(run)
            # a warm process loads the epoch instead of tracing it
            return CarryProgram(("device-epoch", name, G, K, dense), run)

        return _COMPILED.get(key, build)

    def run_epoch(self, step_fn, carry, rows, lab_rows=None, then=None):
        """``then`` (the next epoch's rows) is for the host sources: here every
        cell is on the device already."""
        bounds = self.bounds
        sharded = bounds is not None
        if not self.dense:  # dense counts need no list of non-zeros
            if sharded:  # each device lists the non-zeros of its own rows
                n = len(bounds) - 1
                self.k_cap = grown_cap(
                    self.k_cap, self.row_nnz, per_device(rows, n), per_device(lab_rows, n)
                )
            else:
                self.k_cap = grown_cap(self.k_cap, self.row_nnz, rows, lab_rows)
        if self.parallel is not None:
            rows, lab_rows = self.parallel.pad(rows), self.parallel.pad(lab_rows)
            carry = self.parallel.replicate(carry)
        if sharded:  # cells are indexed within their device's slice
            rows = local_rows(rows, bounds)
            lab_rows = None if lab_rows is None else local_rows(lab_rows, bounds)
        fn = self._epoch_fn(step_fn)
        # device_put, not jnp.asarray: that compiles a copy program per shape
        lab = None if lab_rows is None else jax.device_put(lab_rows)
        return fn(carry, self.cells, jax.device_put(rows), lab)


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
    parallel: DataParallel | None = None,
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
            assert parallel is not None  # bounds come only with parallel
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
