"""Inference: map a jitted ``fn(variables, batch, key)`` over cells, chunk by chunk.

The variables are an argument, never read from a model, so the same code
serves a trained model, a train state during validation and a candidate
set of parameters.
"""

from __future__ import annotations

import zlib
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from .. import backend, distributed
from .._settings import settings
from ..compile_cache import KernelKey, exported, functions
from ..data.batch import host_batch
from ..data.cells import CellData
from ..errors import InputError, check_positive_int
from ..nn import prng

DEFAULT_CHUNK = 1024  # cells per inference chunk when neither call nor settings say


def jitted(fn: partial):
    """``fn`` jitted under the current backend's numerics, once per spec; where
    its spec has a stable text, through `compile_cache.exported`, so a warm
    process loads the traced program instead of tracing it."""
    numerics = backend.current()
    spec = KernelKey(fn.func, fn.args, tuple(sorted(fn.keywords.items())), numerics)
    return functions.get(
        spec, lambda: Kernel(backend.traced(fn, numerics), stable_key(fn, numerics))
    )


def stable_key(fn: partial, numerics) -> str | None:
    """A text naming ``fn`` that every process writes alike, or None."""
    parts = [f"{fn.func.__module__}.{fn.func.__qualname__}", repr(numerics)]
    for a in (*fn.args, *sorted(fn.keywords.items())):
        text = repr(a)
        # flax modules print their fields; a default repr (an address) is no key
        if " at 0x" in text or (
            not isinstance(a, (str, int, float, bool, tuple, type(None)))
            and not isinstance(a, nn.Module)
        ):
            return None
        parts.append(text)
    return "\n".join(parts)


class Kernel:
    """A jitted inference kernel: one exported program per argument signature,
    plain jit for arguments spread over several devices (or no stable key)."""

    def __init__(self, fn, key: str | None):
        self._fn, self._key, self._jit = fn, key, jax.jit(fn)
        self._programs: dict = {}

    def __call__(self, *args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        if self._key is None or any(
            len(x.sharding.device_set) > 1 for x in leaves if isinstance(x, jax.Array)
        ):
            return self._jit(*args)
        sig = (
            tree,
            tuple((np.shape(x), getattr(x, "dtype", None) or np.result_type(x)) for x in leaves),
        )
        if sig not in self._programs:
            self._programs[sig] = exported(self._key, self._fn, *args)
        return self._programs[sig](*args)


def row_positions(n_obs: int, indices) -> np.ndarray:
    """Row positions from ``indices`` (None: all; a bool mask; or positions), checked."""
    idx = np.arange(n_obs) if indices is None else np.asarray(indices)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n_obs):
        raise InputError(
            "indices",
            f"[{idx.min()}, {idx.max()}]",
            f"out of range for {n_obs} cells",
            "pass indices in [0, n_obs)",
        )
    return idx


def nnz_bucket(cells: CellData, rows) -> int:
    # round the non-zero cap up to a power of two so chunks reuse one compile
    indptr = cells.X.indptr
    nnz = int((indptr[np.asarray(rows) + 1] - indptr[rows]).sum())
    return 1 << max(nnz - 1, 1).bit_length()


def chunks(cells: CellData, indices, batch_size: int | None, n_devices: int = 1):
    """(number of real rows, padded `Batch`) for each chunk of the selected cells."""
    idx = row_positions(cells.n_obs, indices)
    if batch_size is None:
        batch_size = settings.batch_size
    if batch_size is None:
        # one chunk size for every request, so each kernel of a model is one
        # program: padding a small request costs milliseconds, a new shape a compile
        B = DEFAULT_CHUNK
    else:
        check_positive_int("batch_size", batch_size)
        B = int(batch_size)
    B = -(-B // n_devices) * n_devices  # whole rows per device
    for s in range(0, len(idx), B):
        rows = idx[s : s + B]
        # no list of non-zeros: no inference kernel reads one, and its length
        # (a short last chunk's is smaller) would compile each kernel again
        yield len(rows), host_batch(cells, rows, B, None)


def map_cells(
    fn, variables: dict, cells: CellData, indices, batch_size, *, parallel=None, seed: int = 0
) -> Any:
    """``fn(variables, batch, key)`` over the selected cells, results in their order.

    ``fn`` returns arrays with the cell axis first. With ``parallel`` (the
    training devices) each chunk's rows are split across its devices. When
    each process of a many-host run reads only its slice of a backed file,
    each maps its own cells and every process gets all the results.
    """
    if getattr(cells.X, "rows", None) is not None and jax.process_count() > 1:
        return _map_slices(fn, variables, cells, indices, batch_size, parallel, seed)
    return _map_here(fn, variables, cells, indices, batch_size, parallel, seed)


def _map_here(fn, variables, cells, indices, batch_size, parallel, seed):
    outs = []
    # keys from numpy where they are JAX's words: no eager program per call
    host = prng.host_keys_ok()
    key = prng.host_key(seed) if host else jax.random.PRNGKey(seed)
    if parallel is not None:
        variables = parallel.replicate(variables)
    n_devices = 1 if parallel is None else parallel.size
    for i, (n, b) in enumerate(chunks(cells, indices, batch_size, n_devices)):
        if parallel is not None:  # rows split across the training devices
            b = parallel.put(b)
        res = fn(variables, b, prng.host_fold_in(key, i) if host else jax.random.fold_in(key, i))
        outs.append(jax.tree_util.tree_map(lambda a, n=n: np.asarray(a)[:n], res))
    if not outs:
        raise InputError("indices", [], "selects no cells", "pass at least one index")
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=0), *outs)


def _map_slices(fn, variables, cells, indices, batch_size, parallel, seed):
    idx = row_positions(cells.n_obs, indices)
    if idx.size == 0:
        raise InputError("indices", [], "selects no cells", "pass at least one index")
    # a collective: every process must ask for the same cells
    # an ndarray is a buffer; numpy's stubs declare `__buffer__` only from Python 3.12
    crc = zlib.crc32(np.ascontiguousarray(idx, np.int64))  # pyright: ignore[reportArgumentType]
    sig = np.array([[idx.size, crc]], np.int64)
    if (distributed.gather_rows(sig) != sig).any():
        raise InputError(
            "indices",
            f"{idx.size} cells here",
            "the processes asked "
            "for different cells; inference over a backed AnnData is "
            "shared by all processes",
            "pass the same indices on every "
            "process (default: all cells) and take your own rows with "
            "distributed.local_slice(n_obs)",
        )
    bounds = distributed.shard_bounds(cells.n_obs, jax.process_count())
    owner = np.searchsorted(bounds, idx, side="right") - 1
    p = jax.process_index()
    mine = idx[owner == p]
    # a process none of whose cells were asked for still joins the gather
    out = _map_here(
        fn,
        variables,
        cells,
        mine if mine.size else bounds[p : p + 1],
        batch_size,
        parallel,
        seed + 7919 * p,
    )
    if not mine.size:
        out = jax.tree_util.tree_map(lambda a: a[:0], out)
    where = np.concatenate([np.flatnonzero(owner == q) for q in range(len(bounds) - 1)])

    def place(a):
        a = distributed.gather_rows(a)
        res = np.empty_like(a)
        res[where] = a
        return res

    return jax.tree_util.tree_map(place, out)


def transform_batches(batch_categories, transform_batch) -> list:
    """Batch codes to decode as (``[None]``: each cell's own batch)."""
    if transform_batch is None:
        return [None]
    names = (
        [transform_batch]
        if isinstance(transform_batch, (str, int, np.integer))
        else list(transform_batch)
    )
    codes = []
    for n in names:
        s = str(n)
        if s not in batch_categories:
            raise InputError(
                "transform_batch",
                n,
                f"not a batch the model knows ({list(batch_categories)[:10]})",
                "pass one of model.registry.batch_categories",
            )
        codes.append(batch_categories.index(s))
    return codes


def gene_positions(var_names, gene_list) -> np.ndarray | None:
    """Positions of ``gene_list`` among the model's genes (None: all genes)."""
    if gene_list is None:
        return None
    pos = {g: i for i, g in enumerate(var_names)}
    missing = [g for g in gene_list if g not in pos]
    if missing:
        raise InputError(
            "gene_list",
            missing[:5],
            "genes the model does not have",
            "pass names from model.registry.var_names",
        )
    return np.asarray([pos[g] for g in gene_list])
