"""The vocabulary of a saved folder's checks (`_validate`): one damaged field is
a `Bad`, which `check` turns into a `ModelFormatError` naming the folder."""

from __future__ import annotations

import math

MAX_DIM = 2**31 - 1  # any one declared size (genes, units, categories)
MAX_CELLS = 2**40  # a cell index
SEED_RANGE = (-(2**63), 2**63)  # what jax.random.PRNGKey accepts


class Bad(Exception):
    """One damaged field: becomes a ModelFormatError naming the folder."""


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def want(ok, field: str, value, need: str) -> None:
    if not ok:
        shown = repr(value)
        raise Bad(f"{field}={shown[:80] + ('...' if len(shown) > 80 else '')} ({need})")


def str_list(v, field: str, *, non_empty: bool = False, unique: bool = False) -> None:
    want(
        isinstance(v, list)
        and all(isinstance(x, str) for x in v)
        and (len(v) > 0 or not non_empty),
        field,
        v,
        "must be a " + ("non-empty " if non_empty else "") + "list of strings",
    )
    if unique:
        want(len(set(v)) == len(v), field, v, "must not repeat a name")


def int_in(v, field: str, lo: int, hi: int) -> None:
    want(is_int(v) and lo <= v <= hi, field, v, f"must be an integer in [{lo}, {hi}]")
