"""Replay: the reference's cell types, as latent moments, for a query that adds types.

A query that learns new cell types has labelled cells of the new types
only; classifier points drawn from the reference types' latent moments are
the negatives that keep the new classes from taking the old ones' cells
(`losses.replay_loss`).
"""

from __future__ import annotations

import numpy as np

from ._query import QueryInfo


def replay_of(query_info: QueryInfo | None, reference_stats: dict | None):
    """(codes, means, sds) of the reference types to replay, or None."""
    stats = reference_stats or {}
    if query_info is None or not query_info.new_labels or "latent_means" not in stats:
        return None
    return (
        np.asarray(stats["latent_codes"], np.int32),
        np.asarray(stats["latent_means"], np.float32),
        np.asarray(stats["latent_sds"], np.float32),
    )


def replay_spec(replay) -> tuple | None:
    """A hashable stand-in for ``replay``: part of the compiled step's cache key."""
    return None if replay is None else tuple(a.tobytes() for a in replay)
