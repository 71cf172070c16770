"""Cells split by rows over the devices of a mesh: each device holds its slice only.

Slice d (cells ``bounds[d]:bounds[d + 1]``) lives on mesh device d as row d
of arrays stacked on a leading device axis that is sharded over the mesh
axis "data": the slice's CSR (data and indices padded to the largest
slice's non-zeros, indptr to its rows) or its dense counts when they are
small, and its per-cell columns. A minibatch is built inside
`jax.shard_map`: each device densifies its own rows, so the global
minibatch comes out already split by rows, as the sharded step wants.

The list of non-zeros is built per device too, its row indices shifted to
the device's place in the global minibatch; the step's layout
(`DataParallel.batch_shardings`) then gathers it onto every device, as it
does for one device's list. Dense slices give none (dense likelihood).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .batch import (
    Batch,
    DenseDeviceCells,
    DeviceCells,
    check_offsets,
    dense_device_batch,
    device_batch,
)
from .cells import CellData

AXIS = "data"


def columns(cells: CellData, which, rows: int) -> list[np.ndarray]:
    """The per-cell columns of cells ``which`` (a slice or indices), zero-padded
    to ``rows`` cells, in the field order of (Dense)DeviceCells after the counts."""
    lsf = (
        cells.log_size_factor
        if cells.log_size_factor is not None
        else np.zeros(cells.n_obs, np.float32)
    )
    out = []
    for a in (
        cells.batch,
        cells.labels,
        cells.cat_covs,
        cells.cont_covs,
        lsf,
        cells.log_library,
        cells.lgamma_const,
    ):
        part = a[which]
        p = np.zeros((rows, *a.shape[1:]), a.dtype)
        p[: len(part)] = part
        out.append(p)
    return out


def _slice_arrays(
    cells: CellData, lo: int, hi: int, rows: int, nnz: int, *, dense: bool
) -> list[np.ndarray]:
    """One device's arrays, in the field order of (Dense)DeviceCells."""
    X = cells.X[lo:hi]
    if dense:
        x = np.zeros((rows, cells.n_vars), np.float32)
        x[: hi - lo] = X.toarray()
        return [x, *columns(cells, slice(lo, hi), rows)]
    data = np.zeros(nnz, np.float32)
    indices = np.zeros(nnz, np.int32)
    data[: X.nnz], indices[: X.nnz] = X.data, X.indices
    # rows past the slice's end are empty: indptr stays at its last value
    indptr = np.full(rows + 1, X.nnz, np.int32)
    indptr[: hi - lo + 1] = X.indptr
    return [data, indices, indptr, *columns(cells, slice(lo, hi), rows)]


def shard_cells(
    cells: CellData, bounds: np.ndarray, mesh: Mesh, *, dense: bool
) -> DeviceCells | DenseDeviceCells:
    """Slice d of ``bounds`` onto mesh device d; no device gets another's cells.

    Each slice is built on the host and copied to its own device alone, so
    no host or device buffer ever holds the stacked whole.
    """
    bounds = np.asarray(bounds)
    n = len(bounds) - 1
    if n != mesh.size:
        raise ValueError(f"{n} slices for {mesh.size} devices")
    rows = int(np.diff(bounds).max())
    indptr = cells.X.indptr
    nnz = max(int(slice_nnz(indptr, bounds).max()), 1)
    if not dense:
        check_offsets(nnz, "the largest device's slice")
    parts = {
        d: _slice_arrays(cells, int(bounds[d]), int(bounds[d + 1]), rows, nnz, dense=dense)
        for d in range(n)
    }
    fields = stack_on_devices(parts, mesh)
    return (DenseDeviceCells if dense else DeviceCells)(*fields)


def slice_nnz(indptr: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Non-zeros of each slice ``bounds[d]:bounds[d + 1]``, in 64-bit arithmetic."""
    indptr = np.asarray(indptr)
    bounds = np.asarray(bounds, np.int64)
    return indptr[bounds[1:]].astype(np.int64) - indptr[bounds[:-1]].astype(np.int64)


def stack_on_devices(parts: dict, mesh: Mesh) -> list[jax.Array]:
    """Arrays stacked on a leading axis sharded over the mesh: ``parts[d]`` (a
    list of same-shaped host arrays for mesh device d) becomes row d, copied
    to device d alone. In a run of several processes each passes only its own
    devices' parts."""
    devices = list(mesh.devices.flat)
    n = len(devices)
    sharding = NamedSharding(mesh, P(AXIS))
    placed = {
        d: jax.device_put([a[None] for a in arrays], devices[d]) for d, arrays in parts.items()
    }
    first = next(iter(parts.values()))
    return [
        jax.make_array_from_single_device_arrays(
            (n, *a.shape), sharding, [placed[d][i] for d in sorted(placed)]
        )
        for i, a in enumerate(first)
    ]


def local_rows(rows: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Global cell indices (n_steps, n * b) as positions in their device's slice.

    Columns d*b:(d+1)*b are device d's rows; -1 (padding) stays -1.
    """
    rows = np.asarray(rows)
    n = len(bounds) - 1
    b = rows.shape[-1] // n
    lo = np.repeat(np.asarray(bounds[:-1], np.int64), b)
    return np.where(rows >= 0, rows - lo, -1).astype(np.int32)


def per_device(rows, n: int) -> np.ndarray | None:
    """``rows`` (n_steps, n * b) as (n_steps * n, b): each device's own minibatches."""
    if rows is None:
        return None
    rows = np.asarray(rows)
    return rows.reshape(-1, rows.shape[-1] // n)


def sharded_batch(cells, rows: jax.Array, mesh: Mesh, n_genes: int, k_cap: int) -> Batch:
    """Inside jit: the global minibatch of local ``rows`` (n * b,), split by rows.

    Device d densifies rows d*b:(d+1)*b from its own slice. CSR slices also
    give their non-zeros, listed device after device (k_cap per device).
    """
    dense = isinstance(cells, DenseDeviceCells)

    def local(c, r):
        c = jax.tree_util.tree_map(lambda a: a[0], c)  # this device's slice
        if dense:
            return dense_device_batch(c, r)
        b = device_batch(c, r, n_genes, k_cap)
        assert b.nz is not None  # device_batch always lists the non-zeros
        # rows of the global minibatch: this device's block starts at d * b
        start = jax.lax.axis_index(AXIS) * r.shape[0]
        return b._replace(nz=b.nz._replace(row=b.nz.row + start))

    return jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS))(
        cells, rows
    )


def resident_bytes(arrays) -> int:
    """The most bytes any one device holds of ``arrays`` (a pytree of jax Arrays)."""
    per: dict = {}
    for a in jax.tree_util.tree_leaves(arrays):
        for s in a.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return max(per.values(), default=0)
