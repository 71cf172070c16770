"""Cell-type hierarchies: labels at any depth of a tree whose leaves are the classes.

A hierarchy is a mapping child -> parent over label names with one root.
Leaves (nodes that are nobody's parent) are the cell types the model
predicts; an inner node is a label a cell may carry ("T cell" for a cell whose
subtype is not known). Codes: leaves ``0..C-1`` in the registry's
``label_categories`` order, the root (and the unlabelled category) ``C``, the
other inner nodes ``C+1..`` sorted by name. A node's row of `leaf_mask` marks
the leaves under it: a leaf's row is one-hot, the root's is all ones, which is
why a leaf label gives scANVI's L_S and no label its L_U.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from ..errors import InputError

FIELD = "label_hierarchy"


def normalise(mapping) -> dict[str, str]:
    """``mapping`` as a dict of strings, or an InputError if it is not child -> parent."""
    if isinstance(mapping, pd.Series):
        mapping = mapping.to_dict()
    if not isinstance(mapping, Mapping):
        raise InputError(
            FIELD,
            type(mapping).__name__,
            "must be a mapping child -> parent over label names",
            "pass a dict, e.g. {'CD4 T': 'T cell', 'T cell': 'cell'}",
        )
    out = {}
    for child, parent in mapping.items():
        if child is None or parent is None or pd.isna(child) or pd.isna(parent):
            raise InputError(
                FIELD,
                {child: parent},
                "names must not be missing",
                "give every child a parent name; the root is the one node that is nobody's child",
            )
        if str(child) == str(parent):
            raise InputError(
                FIELD,
                {child: parent},
                "a label is its own parent (a cycle)",
                "map it to the node above it, or leave the root out of the keys",
            )
        out[str(child)] = str(parent)
    if not out:
        raise InputError(FIELD, {}, "the hierarchy is empty", "map each label to its parent")
    return out


def _check_acyclic(parent: dict[str, str]) -> None:
    done: set[str] = set()
    for start in parent:
        path, node = [], start
        while node in parent and node not in done:
            if node in path:
                cycle = [*path[path.index(node) :], node]
                raise InputError(
                    FIELD,
                    " -> ".join(cycle),
                    "the hierarchy has a cycle",
                    "give each label a parent above it, so that walking up "
                    "from any label ends at one root",
                )
            path.append(node)
            node = parent[node]
        done.update(path)


def root_of(parent: dict[str, str]) -> str:
    """The single node with no parent (after the cycle check)."""
    _check_acyclic(parent)
    roots = sorted(set(parent.values()) - set(parent))
    if len(roots) != 1:
        raise InputError(
            FIELD,
            roots[:10],
            f"the hierarchy has {len(roots)} roots, and needs exactly one",
            "map each of them to one common parent, "
            f"e.g. {{{', '.join(repr(r) + ': ' + repr('cell') for r in roots[:2])}"
            "}",
        )
    return roots[0]


@dataclass(frozen=True)
class Hierarchy:
    """A validated tree: ``leaves`` in code order, its ``root``, the other inner nodes."""

    leaves: tuple[str, ...]
    root: str
    inner: tuple[str, ...]
    parent: tuple[tuple[str, str], ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names in code order: leaves, root, inner nodes."""
        return (*self.leaves, self.root, *self.inner)

    @property
    def parents(self) -> tuple[int, ...]:
        """Each node code's parent code; the root's is -1."""
        code = {n: i for i, n in enumerate(self.nodes)}
        up = dict(self.parent)
        return tuple(-1 if n == self.root else code[up[n]] for n in self.nodes)

    def depths(self) -> np.ndarray:
        return depths(self.parents)

    def encode(self, series: pd.Series, field: str, unlabeled: str | None) -> np.ndarray:
        """Label codes of ``series`` (any node, or the unlabelled category)."""
        if series.isna().any():
            raise InputError(
                field,
                "NaN",
                "the column has missing values",
                "fill them with the unlabelled category, or drop those cells",
            )
        lookup = {n: i for i, n in enumerate(self.nodes)}
        if unlabeled is not None:
            lookup[unlabeled] = len(self.leaves)
        values = series.astype(str).to_numpy()
        codes = np.fromiter((lookup.get(v, -1) for v in values), np.int32, len(values))
        if (codes < 0).any():
            unseen = sorted(set(values[codes < 0]))
            raise InputError(
                field,
                unseen[:10],
                "labels that are not nodes of the model's label hierarchy",
                "rename them to nodes of model.registry.label_hierarchy, or "
                "extend the hierarchy (load_query_data(label_hierarchy=...))",
            )
        return codes


def build(
    mapping,
    column: pd.Series,
    categories: tuple[str, ...],
    unlabeled: str | None,
    field: str,
    *,
    fixed_leaves: tuple[str, ...] = (),
) -> Hierarchy:
    """Validate ``mapping`` against a labels ``column`` and return the tree.

    Refused: cycles, several roots, a label of the column missing from the
    map, a leaf no cell carries (``fixed_leaves`` exempt: a reference's types
    in a query), the unlabelled category inside the tree other than as its
    root, and a reference leaf given children.
    """
    parent = normalise(mapping)
    root = root_of(parent)
    nodes = set(parent) | {root}
    if unlabeled is not None and unlabeled in nodes and unlabeled != root:
        raise InputError(
            FIELD,
            unlabeled,
            "the unlabelled category is a node of the hierarchy below its root",
            "leave it out of the map (or make it the root, which means 'any type')",
        )
    missing = [c for c in categories if c != unlabeled and c not in nodes]
    if missing:
        raise InputError(
            FIELD,
            missing[:10],
            f"labels of {field} missing from the map",
            "give each of them a parent in label_hierarchy",
        )
    inner_all = set(parent.values())
    grown = [leaf for leaf in fixed_leaves if leaf in inner_all]
    if grown:
        raise InputError(
            FIELD,
            grown[:10],
            "cell types of the reference are given "
            "children; a type the model predicts must stay a leaf",
            "add new types under an inner node instead (e.g. a sibling)",
        )
    counts = column.astype(str).value_counts()
    leaves = [n for n in nodes if n not in inner_all]
    empty = sorted(n for n in leaves if counts.get(n, 0) == 0 and n not in fixed_leaves)
    if empty:
        raise InputError(
            FIELD,
            empty[:10],
            f"leaves that no cell of {field} carries; the model could never learn them",
            "drop them from the map, or label some cells with them",
        )
    order = list(fixed_leaves) + [c for c in categories if c in leaves and c not in fixed_leaves]
    inner = tuple(sorted(inner_all - {root}))
    return Hierarchy(tuple(order), root, inner, tuple(sorted(parent.items())))


def from_registry(registry) -> Hierarchy | None:
    """The registry's hierarchy (``label_categories`` are its leaves), or None."""
    pairs = getattr(registry, "label_hierarchy", None)
    if not pairs:
        return None
    parent = dict(pairs)
    root = root_of(parent)
    return Hierarchy(
        tuple(registry.label_categories),
        root,
        tuple(sorted(set(parent.values()) - {root})),
        tuple(sorted(pairs)),
    )


def depths(parents: tuple[int, ...]) -> np.ndarray:
    """Each node's distance from the root."""
    out = np.full(len(parents), -1)
    for i in range(len(parents)):
        path, j = [], i
        while out[j] < 0 and parents[j] >= 0:
            path.append(j)
            j = parents[j]
        base = 0 if out[j] < 0 else out[j]
        out[j] = base
        for k, node in enumerate(reversed(path), 1):
            out[node] = base + k
    return out


@lru_cache(maxsize=16)
def leaf_mask(parents: tuple[int, ...], n_leaves: int) -> np.ndarray:
    """(n_nodes, n_leaves) float32: 1 where the leaf lies under (or is) the node."""
    mask = np.zeros((len(parents), n_leaves), np.float32)
    for leaf in range(n_leaves):
        node = leaf
        while node >= 0:
            mask[node, leaf] = 1.0
            node = parents[node]
    mask.setflags(write=False)
    return mask
