"""How many bytes a sweep of K members needs, and how many the device has.

The estimate is made before anything compiles, from the shapes alone:

* per member: parameters, gradients, the Adam moments, the update and the
  copies a step's select keeps (6 x the parameters), the mutable state twice;
* per member: the activations of one step, forward and backward: the
  likelihood's (B, G) temporaries (about 12 arrays) and, per dense layer,
  about 8 arrays of (B, width);
* once: the cells resident on the device, and the gathered minibatches
  (one per member when each has its own order).

`tests/test_sweep.py` checks it against XLA's own account of the compiled
epoch (`memory_analysis`): it must not under-count.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from ..errors import InputError

_LIKELIHOOD_ARRAYS = 12
_LAYER_ARRAYS = 8


def tree_bytes(tree) -> int:
    return int(
        sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))
    )


def _widths(params) -> int:
    """Sum of the output widths of every matrix in the parameters."""
    return int(sum(np.shape(x)[-1] for x in jax.tree_util.tree_leaves(params) if np.ndim(x) >= 2))


def estimate(
    params,
    state,
    *,
    n_members: int,
    batch_size: int,
    n_genes: int,
    data_bytes: int,
    shared: bool,
    paired: bool,
) -> int:
    """Bytes a sweep of ``n_members`` needs on the device (see the module docstring)."""
    per_member = 6 * tree_bytes(params) + 2 * tree_bytes(state)
    minibatches = 2 if paired else 1
    act = (
        4
        * batch_size
        * minibatches
        * (_LIKELIHOOD_ARRAYS * n_genes + _LAYER_ARRAYS * _widths(params))
    )
    gathered = 4 * batch_size * n_genes * minibatches * (1 if shared else n_members)
    return int(data_bytes + gathered + n_members * (per_member + act))


def available_bytes(device=None) -> int:
    """Free memory of ``device``: its allocator's limit less what is in use, or on
    the CPU the host's available physical memory."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices report no statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no refusal
        return 1 << 62


def check_fits(n_members: int, budget: int, need) -> None:
    """Refuse ``n_members`` when ``need(k)`` bytes exceed ``budget``, naming the
    largest k that fits."""
    total = need(n_members)
    if total <= budget:
        return
    fits = 0
    lo, hi = 1, n_members
    while lo <= hi:  # need(k) grows with k
        mid = (lo + hi) // 2
        if need(mid) <= budget:
            fits, lo = mid, mid + 1
        else:
            hi = mid - 1
    gib = 1 << 30
    fix = (
        f"sweep at most {fits} members at a time (split seeds/grid into several "
        "sweeps), or lower batch_size"
        if fits
        else "not even one member fits: lower batch_size or the network size"
    )
    raise InputError(
        "members",
        n_members,
        f"{n_members} members need about "
        f"{total / gib:.2f} GiB on the device, which has "
        f"{budget / gib:.2f} GiB free",
        fix,
    )
