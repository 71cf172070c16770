"""The minibatch every step consumes, and how to build it on the host or device.

A `Batch` is a pytree of fixed shapes: B cells (padded rows have weight 0)
and a padded COO list of at most K non-zero counts, so one compiled step
serves every minibatch of an epoch, including the short last one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from .backed import BackedRows
from .cells import CellData

# device CSR offsets are int32 (what gathers index with on every backend)
MAX_OFFSET = 2**31 - 1


def check_offsets(nnz: int, where: str) -> None:
    """Refuse CSR offsets past int32 before any cast could wrap them."""
    if int(nnz) > MAX_OFFSET:
        raise InputError(
            "data_source",
            "device",
            f"{where} holds {int(nnz):,} non-zeros, "
            f"more than a device CSR's 32-bit offsets address ({MAX_OFFSET:,})",
            "pass data_source='host' or 'stream' (each chunk has its own "
            "offsets), or train on more devices (devices=..., each holds "
            "its own slice)",
        )


# a host batch holds numpy arrays, a device batch JAX arrays (same fields)
HostOrDevice = jax.Array | np.ndarray


class NonZeros(NamedTuple):
    """The non-zero entries of a (B, G) count matrix as padded COO.

    Padding entries have ``val == 0`` and contribute exactly zero.
    """

    row: HostOrDevice  # (K,) int32 in [0, B)
    col: HostOrDevice  # (K,) int32 in [0, G)
    val: HostOrDevice  # (K,) float32


class Batch(NamedTuple):
    x: HostOrDevice  # (B, G) float32 counts
    nz: NonZeros | None  # non-zero entries of x padded to K (None: use x densely)
    weight: HostOrDevice  # (B,) 1 for real cells, 0 for padding
    batch: HostOrDevice  # (B,) int32
    labels: HostOrDevice  # (B,) int32
    cat_covs: HostOrDevice  # (B, k) int32
    cont_covs: HostOrDevice  # (B, m) float32
    log_size_factor: HostOrDevice  # (B,) float32 (zeros when unused)
    log_library: HostOrDevice  # (B,) float32
    lgamma_const: HostOrDevice  # (B,) float32


def nnz_cap(row_nnz: np.ndarray, batch_size: int) -> int:
    """Most non-zeros any `batch_size` rows can hold: the sum of the largest."""
    if row_nnz.size == 0:
        return 1
    k = min(batch_size, row_nnz.size)
    top = np.partition(row_nnz, row_nnz.size - k)[row_nnz.size - k :]
    return max(int(top.sum()), 1)


def host_batch(cells: CellData, rows: np.ndarray, batch_size: int, k_cap: int | None) -> Batch:
    """Build a Batch in numpy from CSR rows. ``rows`` may be shorter than B and
    may hold -1 (padding); each cell keeps its position. ``k_cap=None`` leaves
    out the list of non-zeros (dense likelihood)."""
    rows = np.asarray(rows)
    pos = np.flatnonzero(rows >= 0)
    rows = rows[pos]
    X = cells.X[rows]
    G = cells.n_vars
    x = np.zeros((batch_size, G), np.float32)
    if len(rows):
        x[pos] = X.toarray()
    nz = None
    if k_cap is not None:
        coo_row = np.repeat(pos.astype(np.int32), np.diff(X.indptr))
        nnz = X.nnz
        if nnz > k_cap:
            raise ValueError(f"minibatch has {nnz} non-zeros, more than the cap {k_cap}")
        row = np.zeros(k_cap, np.int32)
        col = np.zeros(k_cap, np.int32)
        val = np.zeros(k_cap, np.float32)
        row[:nnz], col[:nnz], val[:nnz] = coo_row, X.indices, X.data
        nz = NonZeros(row, col, val)

    def pad(a, fill=0):
        out = np.full((batch_size, *a.shape[1:]), fill, a.dtype)
        out[pos] = a[rows]
        return out

    weight = np.zeros(batch_size, np.float32)
    weight[pos] = 1.0
    lsf = (
        cells.log_size_factor
        if cells.log_size_factor is not None
        else np.zeros(cells.n_obs, np.float32)
    )
    return Batch(
        x=x,
        nz=nz,
        weight=weight,
        batch=pad(cells.batch),
        labels=pad(cells.labels),
        cat_covs=pad(cells.cat_covs),
        cont_covs=pad(cells.cont_covs),
        log_size_factor=pad(lsf),
        log_library=pad(cells.log_library),
        lgamma_const=pad(cells.lgamma_const),
    )


class DeviceCells(NamedTuple):
    """A whole CellData as device arrays: CSR counts plus per-cell columns."""

    data: jax.Array
    indices: jax.Array
    indptr: jax.Array
    batch: jax.Array
    labels: jax.Array
    cat_covs: jax.Array
    cont_covs: jax.Array
    log_size_factor: jax.Array
    log_library: jax.Array
    lgamma_const: jax.Array

    @staticmethod
    def from_cells(cells: CellData, device=None) -> DeviceCells:
        X = cells.X
        assert not isinstance(X, BackedRows)  # sources refuse on-disk counts for the device
        check_offsets(X.indptr[-1], "the count matrix")
        lsf = (
            cells.log_size_factor
            if cells.log_size_factor is not None
            else np.zeros(cells.n_obs, np.float32)
        )
        # asarray, not astype: no host copy when the dtype is already right
        arrays = (
            np.asarray(X.data, np.float32),
            np.asarray(X.indices, np.int32),
            np.asarray(X.indptr, np.int32),
            cells.batch,
            cells.labels,
            cells.cat_covs,
            cells.cont_covs,
            lsf,
            cells.log_library,
            cells.lgamma_const,
        )
        return DeviceCells(*jax.device_put(arrays, device))

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self)


class DenseDeviceCells(NamedTuple):
    """A whole CellData on the device with dense counts (when they fit)."""

    X: jax.Array
    batch: jax.Array
    labels: jax.Array
    cat_covs: jax.Array
    cont_covs: jax.Array
    log_size_factor: jax.Array
    log_library: jax.Array
    lgamma_const: jax.Array

    @staticmethod
    def from_cells(cells: CellData, device=None) -> DenseDeviceCells:
        lsf = (
            cells.log_size_factor
            if cells.log_size_factor is not None
            else np.zeros(cells.n_obs, np.float32)
        )
        assert not isinstance(cells.X, BackedRows)  # as in DeviceCells.from_cells
        arrays = (
            cells.X.toarray(),
            cells.batch,
            cells.labels,
            cells.cat_covs,
            cells.cont_covs,
            lsf,
            cells.log_library,
            cells.lgamma_const,
        )
        return DenseDeviceCells(*jax.device_put(arrays, device))


def dense_device_batch(cells: DenseDeviceCells, rows: jax.Array) -> Batch:
    """Gather rows of dense device counts into a Batch (no COO: dense likelihood)."""
    valid = rows >= 0
    r = jnp.where(valid, rows, 0)
    w = valid.astype(jnp.float32)
    return Batch(
        x=cells.X[r] * w[:, None],
        nz=None,
        weight=w,
        batch=cells.batch[r],
        labels=cells.labels[r],
        cat_covs=cells.cat_covs[r],
        cont_covs=cells.cont_covs[r],
        log_size_factor=cells.log_size_factor[r],
        log_library=cells.log_library[r],
        lgamma_const=cells.lgamma_const[r] * w,
    )


def device_batch(cells: DeviceCells, rows: jax.Array, n_genes: int, k_cap: int) -> Batch:
    """Gather rows of device CSR into a Batch inside jit. ``rows < 0`` is padding."""
    B = rows.shape[0]
    valid = rows >= 0
    r = jnp.where(valid, rows, 0)
    start = cells.indptr[r]
    length = jnp.where(valid, cells.indptr[r + 1] - start, 0)
    ends = jnp.cumsum(length)
    begins = ends - length
    pos = jnp.arange(k_cap, dtype=jnp.int32)
    slot = jnp.minimum(jnp.searchsorted(ends, pos, side="right"), B - 1).astype(jnp.int32)
    inside = pos < ends[-1]
    src = jnp.where(inside, start[slot] + pos - begins[slot], 0)
    val = jnp.where(inside, cells.data[src], 0.0)
    col = jnp.where(inside, cells.indices[src], 0)
    x = jnp.zeros((B, n_genes), jnp.float32).at[slot, col].add(val)
    w = valid.astype(jnp.float32)
    return Batch(
        x=x,
        nz=NonZeros(slot, col, val),
        weight=w,
        batch=cells.batch[r],
        labels=cells.labels[r],
        cat_covs=cells.cat_covs[r],
        cont_covs=cells.cont_covs[r],
        log_size_factor=cells.log_size_factor[r],
        log_library=cells.log_library[r],
        lgamma_const=cells.lgamma_const[r] * w,
    )
