"""An epoch's rows: the order of cells every minibatch source draws.

`epoch_rows` and `labelled_rows` lay an epoch out as (n_steps, B) rows (-1
for padding); `Source` is what every source shares: that order, split by
slice of the cells in a many-host run. `rows_nnz` and `grown_cap` size the
padded non-zero lists of the minibatches. The sources themselves are in
`sources` (device) and `host_sources` (host and stream). `epoch_orders`
and `validation_orders` draw a training loop's epoch from its seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .loop import FitConfig


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

    def close(self) -> None:
        """Let go of what was prepared for an epoch that will not run (`HostSource`)."""

    def _order(self, rng, idx, batch_size: int, *, shuffle: bool) -> np.ndarray:
        return epoch_rows(rng, idx, batch_size, shuffle=shuffle)

    def _labelled(self, rng, lab_idx, n_steps: int, batch_size: int) -> np.ndarray:
        return labelled_rows(rng, lab_idx, n_steps, batch_size)

    def _split(self, rng, idx, batch_size: int):
        shards = self.shards
        assert shards is not None  # called only when drawing slice by slice
        n = len(shards) - 1
        idx = np.asarray(idx)
        seeds = rng.integers(0, 2**63 - 1, size=n)
        parts = [idx[(idx >= lo) & (idx < hi)] for lo, hi in itertools.pairwise(shards)]
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


def epoch_orders(
    source, cfg: FitConfig, epoch: int, train_idx: np.ndarray, labelled_idx: Callable | None
):
    """(rng, rows, labelled rows or None) of epoch ``epoch``, drawn from
    ``default_rng([seed, epoch])``; the rng goes on to `validation_orders`."""
    rng = np.random.default_rng([cfg.seed, epoch])
    rows = source.order(rng, train_idx, cfg.batch_size)
    lab_rows = None
    if labelled_idx is not None:
        lab_rows = source.labelled_order(rng, labelled_idx(rng), rows.shape[0], cfg.batch_size)
    return rng, rows, lab_rows


def validation_orders(
    source, cfg: FitConfig, epoch: int, rng, val_idx: np.ndarray, val_labelled: Callable | None
):
    """(rows, labelled rows or None) of a validation pass, in cell order."""
    vrows = source.order(rng, val_idx, cfg.batch_size, shuffle=False)
    vlab = None
    if val_labelled is not None:
        vl = val_labelled()
        vlab = source.labelled_order(
            np.random.default_rng([cfg.seed, epoch, 1]),
            vl if len(vl) else val_idx,
            vrows.shape[0],
            cfg.batch_size,
        )
    return vrows, vlab
