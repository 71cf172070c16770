"""The epoch program every source runs, and the chunks that feed it from the host.

An epoch is a jitted `lax.scan` of the train step over minibatches gathered
from CSR counts on the device (`scan_program`). The device source scans all
of an epoch's minibatches over the cells it holds. The host and stream
sources run the same scan over *chunks*: the cells of S minibatches, gathered
on the host into a small CSR (its data, indices and row offsets, plus the
per-cell columns), shipped to the device and densified there; on the CPU,
where shipping is free, the host densifies it and the device gathers rows,
as the device source does (`HostSource._dense`). A thread
builds and ships chunk i+1 while chunk i computes (`Feed`), and the next
epoch's first chunk while an epoch's last one computes; nothing synchronises
per step: per chunk, the host only dispatches.

Every chunk has the same shapes (S steps, the same row and non-zero
capacities), so an epoch compiles once; the last, shorter chunk skips its
missing steps with a traced count. With several devices (or processes) each
device gets its own CSR of the rows its part of every minibatch needs
(`jaxscanvi.data.sharded`), so no device, and no process, handles another's
cells.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from ..data.sharded import columns
from .loop import StepFns

# cells per chunk the step count aims at: large enough that a dispatch per
# chunk costs nothing, small enough that a few chunks in flight stay small
CHUNK_CELLS = 1 << 14
MAX_STEPS = 256


def chunk_steps(n_steps: int, batch_size: int, cells: int | None = None) -> int:
    """Steps per chunk: about ``cells`` cells (`CHUNK_CELLS`), at most the
    epoch's steps rounded up to a power of two (a few shapes for any epoch)."""
    cells = CHUNK_CELLS if cells is None else cells
    target = min(max(cells // max(batch_size, 1), 1), MAX_STEPS)
    need = 1 << max(int(n_steps) - 1, 0).bit_length()
    return max(min(target, need), 1)


def scan_program(step_fn: Callable, gather: Callable, *, partial: bool):
    """``run(carry, cells, rows, lab_rows[, n_valid]) -> (carry, outputs)``.

    ``step_fn`` is a scan body, or a `train.loop.StepFns`: a train step whose
    updates can wait for the next step then runs that way (its ``deferred``
    body, then ``finish``). ``gather(cells, rows)`` builds one minibatch inside
    the program. With ``partial``, steps at and past the traced ``n_valid``
    leave the carry as it is (their outputs are zeros).
    """
    deferred = step_fn.deferred if isinstance(step_fn, StepFns) else None
    finish = step_fn.finish if isinstance(step_fn, StepFns) else None
    fn = step_fn if deferred is None else deferred

    def one(c, cells, r):
        main = gather(cells, r[0])
        return fn(c, main if r[1] is None else (main, gather(cells, r[1])))

    def run(carry, cells, rows, lab_rows, n_valid=None):
        if deferred is not None:
            carry = (*carry, jnp.bool_(False))

        def body(c, x):
            i, r = x
            if not partial:
                return one(c, cells, r)
            shape = jax.eval_shape(lambda: one(c, cells, r)[1])
            skip = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
            return jax.lax.cond(i < n_valid, lambda: one(c, cells, r), lambda: (c, skip))

        steps = jnp.arange(rows.shape[0], dtype=jnp.int32)
        carry, out = jax.lax.scan(body, carry, (steps, (rows, lab_rows)))
        if deferred is not None:
            assert finish is not None  # a StepFns with deferred updates has both
            carry = finish(carry)
        return carry, out

    return run


class Layout(NamedTuple):
    """Where each minibatch row of a chunk lives in its device's chunk CSR.

    ``local`` (S, n * b) and ``local_lab``: positions in device d's chunk for
    columns d*b:(d+1)*b, -1 for padding; ``take[d]``: the global cells device
    d's chunk holds, each once, in increasing order. Computed from the rows alone, so every
    process of a many-host run lays out every device's chunk the same way.
    """

    local: np.ndarray
    local_lab: np.ndarray | None
    take: list
    n_valid: int


def layout(rows: np.ndarray, lab_rows: np.ndarray | None, n_dev: int, steps: int) -> Layout:
    """The `Layout` of one chunk: ``rows`` (s <= steps, n_dev * b)."""
    s, B = rows.shape
    b = B // n_dev
    local = np.full((steps, B), -1, np.int32)
    local_lab = None if lab_rows is None else np.full((steps, B), -1, np.int32)
    take = []
    for d in range(n_dev):
        cols = slice(d * b, (d + 1) * b)
        flat = rows[:, cols].ravel()
        if lab_rows is not None:
            flat = np.concatenate([flat, lab_rows[:, cols].ravel()])
        cells, pos = _unique_positions(flat)
        local[:s, cols] = pos[: s * b].reshape(s, b)
        if local_lab is not None:  # (None exactly when lab_rows is)
            local_lab[:s, cols] = pos[s * b :].reshape(s, b)
        take.append(cells)
    return Layout(local, local_lab, take, s)


def _unique_positions(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct cells of ``flat`` in file order (so reads and copies go run
    by run), and each entry's place among them (-1 for padding): what
    ``np.unique`` and ``searchsorted`` give, from one argsort (several times
    faster on a chunk's cells)."""
    valid = np.flatnonzero(flat >= 0)
    order = valid[np.argsort(flat[valid])]
    ranked = flat[order]
    new = np.empty(ranked.size, bool)
    new[:1] = True
    np.not_equal(ranked[1:], ranked[:-1], out=new[1:])
    pos = np.full(flat.size, -1, np.int32)
    pos[order] = np.cumsum(new) - 1  # repeats (labelled rows) share a place
    return ranked[new], pos


def chunk_nnz(
    row_nnz: np.ndarray, rows: np.ndarray, lab_rows: np.ndarray | None, steps: int, n_dev: int
) -> int:
    """The most non-zeros any device's chunk of an epoch holds."""

    def per_chunk(r):
        s, B = r.shape
        pad = -s % steps
        r = np.concatenate([r, np.full((pad, B), -1, r.dtype)]) if pad else r
        nz = np.where(r >= 0, row_nnz[np.maximum(r, 0)], 0).astype(np.int64)
        # (chunks, steps, devices, b) -> per chunk and device
        return nz.reshape(-1, steps, n_dev, B // n_dev).sum(axis=(1, 3))

    total = per_chunk(np.asarray(rows))
    if lab_rows is not None:
        total = total + per_chunk(np.asarray(lab_rows))
    return int(total.max()) if total.size else 0


def host_chunk(
    cells,
    take: np.ndarray,
    read: Callable,
    rows_cap: int,
    nnz_cap: int,
    dense: int = 0,
    zeros: Callable | None = None,
) -> list[np.ndarray]:
    """One device's chunk as host arrays, in the field order of `DeviceCells`
    (`DenseDeviceCells` with ``dense``, its number of genes).

    ``read(take, pad)`` gives the CSR (data, indices, indptr) of cells
    ``take``, data and indices padded to ``pad`` entries (built in place: no
    second copy); the offsets are padded to ``rows_cap`` rows here (empty rows
    past the end). ``zeros(shape, dtype)`` gives the dense counts' array
    (`aligned_zeros`, or a `Buffers`').
    """
    m = len(take)
    if dense:  # (rows_cap, G) counts, rows past the end zero
        zeros = aligned_zeros if zeros is None else zeros
        x = zeros((rows_cap, dense), np.float32)
        X = sp.csr_matrix(read(take, 0), shape=(m, dense))
        if X.dtype == np.float32:
            X.toarray(out=x[:m])  # adds into the zeros, duplicates summed as on the device
        else:
            x[:m] = X.toarray()
        return [x, *columns(cells, take, rows_cap)]
    data, indices, ptr = read(take, nnz_cap)
    indptr = np.empty(rows_cap + 1, np.int32)  # a chunk's offsets fit 32 bits
    indptr[: m + 1] = ptr
    indptr[m + 1 :] = ptr[-1]
    return [data, indices, indptr, *columns(cells, take, rows_cap)]


def aligned_zeros(shape, dtype) -> np.ndarray:
    """Zeros whose buffer starts on 64 bytes: the CPU client then uses it in
    place instead of copying it (`jax.device_put`), for a chunk never written again."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    buf = np.zeros(size + 64, np.uint8)
    start = -buf.ctypes.data % 64
    return buf[start : start + size].view(dtype).reshape(shape)


class Buffers:
    """Chunk arrays used again once nothing holds them: a fresh chunk's pages
    cost the kernel a fault each, as much as building it.

    A buffer the CPU client uses in place is held through its owner (the
    base array) until no program needs it; one is free when only this pool
    refers to it and to its owner. At most ``keep`` are kept.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self.held: list[tuple] = []  # (owner, array, refcounts when free)
        self.lock = threading.Lock()

    def zeros(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        with self.lock:
            for entry in self.held:
                if entry[1].shape == shape and entry[1].dtype == dtype and _refs(entry) == entry[2]:
                    entry[1].fill(0)
                    return entry[1]
            a = aligned_zeros(shape, dtype)
            if len(self.held) >= self.keep:
                return a
            owner = a
            while owner.base is not None:
                owner = owner.base
            self.held.append((owner, a, None))
            del owner, a
            refs = _refs(self.held[-1])  # before the new tuple takes its own references
            owner, a, _ = self.held[-1]
            self.held[-1] = (owner, a, refs)
            return a


def _refs(entry: tuple) -> tuple[int, int]:
    """References to a held buffer's owner and array (the same count whenever
    the buffer is free: the pool's, and this call's)."""
    owner, a = entry[0], entry[1]
    return sys.getrefcount(owner), sys.getrefcount(a)


class Feed:
    """``produce(i)`` for i < n, built ``depth`` items ahead by a thread that
    starts at once (the first chunk is built while the program compiles).

    A ``held`` feed builds its first item only, and the rest once it is first
    read: an epoch's first chunk built while the previous epoch's last one
    computes, and no more before that epoch starts. `close` (or dropping
    the feed) stops the thread; items it built are let go.
    """

    def __init__(self, produce: Callable, n: int, depth: int = 2, *, held: bool = False):
        self.n = n
        self._built = [0]  # items the thread has produced
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop, self._go = threading.Event(), threading.Event()
        self._ended = False
        if not held:
            self._go.set()
        # the thread holds no reference to the feed, so a dropped one is collected
        args = (produce, n, self._q, self._stop, self._go, self._built)
        self._thread = threading.Thread(
            target=_feed_work, args=args, daemon=True, name="jaxscanvi-feed"
        )
        self._thread.start()

    @property
    def built(self) -> int:
        """Items the thread has produced so far."""
        return self._built[0]

    def __iter__(self):
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        self._go.set()
        item = self._q.get()
        if item is _DONE:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self, *, wait: bool = True) -> None:
        """Stop the thread (and, with ``wait``, wait for the item it is building)."""
        self._ended = True
        self._stop.set()
        self._go.set()
        _drain(self._q)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()
        _drain(self._q)

    def __del__(self):
        if hasattr(self, "_thread"):  # (not when __init__ failed before it)
            self.close(wait=False)


_DONE = object()


def _feed_work(produce, n, q: queue.Queue, stop, go, built: list) -> None:
    try:
        for i in range(n):
            if i == 1:
                go.wait()  # a held feed goes on once read
            if stop.is_set():
                return
            item = produce(i)
            built[0] += 1
            q.put(item)
        if not stop.is_set():  # (after a close the queue may have no room)
            q.put(_DONE)
    except BaseException as e:  # noqa: BLE001 - surfaced in the consumer
        q.put(e)


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def prefetched(produce: Callable, n: int, depth: int = 2) -> Feed:
    """``produce(i)`` for i < n, built ``depth`` ahead (a `Feed`)."""
    return Feed(produce, n, depth)
