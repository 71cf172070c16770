"""SCANVI with a label hierarchy: prediction down the tree, and query labels.

The classifier predicts leaves. A node's probability is the sum of its
leaves' (`leaf_mask`), so the root's is 1 and probabilities never rise going
down: the deepest node above a threshold is well defined.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..data import hierarchy
from ..errors import InputError

LEVELS = ("leaf", "deepest", "all")


def parents_of(registry) -> tuple[int, ...] | None:
    """The config's ``label_parents`` for a registry: None for flat labels, and
    for a flat hierarchy (the root the only inner node), whose bound and
    classification loss are flat scANVI's (a leaf label is L_S, the root L_U),
    so it trains flat scANVI's program. Prediction by level reads the
    registry's hierarchy, not this."""
    tree = hierarchy.from_registry(registry)
    return None if tree is None or not tree.inner else tree.parents


def check_level(model, level, threshold, soft, unassigned_threshold) -> None:
    """Refuse a bad ``level``/``threshold`` pair before anything runs."""
    is_depth = isinstance(level, (int, np.integer)) and not isinstance(level, bool)
    if not is_depth and level not in LEVELS:
        raise InputError(
            "level",
            level,
            "unknown prediction level",
            f"pass one of {list(LEVELS)} or a depth (1 = the root's children)",
        )
    if is_depth and model.registry.label_hierarchy:
        assert isinstance(level, int | np.integer)  # (is_depth)
        if level < 1:
            raise InputError(
                "level",
                level,
                "depths start at 1 (the root's children)",
                "pass level=1 for the coarsest types",
            )
        if soft or threshold is not None:
            raise InputError(
                "level", level, "a depth gives hard predictions", "pass soft=False and no threshold"
            )
    if level == "leaf":
        if threshold is not None:
            raise InputError(
                "threshold",
                threshold,
                "applies to level='deepest' only",
                "pass level='deepest', or unassigned_threshold for leaves",
            )
        return
    if not model.registry.label_hierarchy:
        raise InputError(
            "level",
            level,
            "the model has no label hierarchy",
            "set up with SCANVI.setup_anndata(..., label_hierarchy=...), or "
            "use unassigned_threshold for flat labels",
        )
    if unassigned_threshold is not None:
        raise InputError(
            "unassigned_threshold",
            unassigned_threshold,
            f"does not apply with level={level!r}",
            "leave it None",
        )
    if level == "all" and not soft:
        raise InputError(
            "level",
            level,
            "every node's probability is a soft output",
            "pass soft=True with level='all'",
        )
    if level == "deepest":
        if soft:
            raise InputError(
                "soft",
                soft,
                "level='deepest' is a hard prediction",
                "pass soft=False, or level='all' for every node's probability",
            )
        if not (
            isinstance(threshold, (int, float))
            and not isinstance(threshold, bool)
            and 0 < threshold <= 1
        ):
            raise InputError(
                "threshold",
                threshold,
                "level='deepest' needs a probability in (0, 1]",
                "pass e.g. threshold=0.9",
            )


def _tree(registry) -> hierarchy.Hierarchy:
    """The registry's hierarchy, where the caller has one."""
    tree = hierarchy.from_registry(registry)
    assert tree is not None  # callers run only for models set up with label_hierarchy
    return tree


def node_probabilities(registry, probs: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """(N, n_nodes) summed leaf probabilities and the node names, in code order."""
    tree = _tree(registry)
    mask = hierarchy.leaf_mask(tree.parents, len(tree.leaves))
    return probs @ mask.T.astype(probs.dtype), tree.nodes


def deepest(node_probs: np.ndarray, depths: np.ndarray, threshold: float) -> np.ndarray:
    """Per cell, the code of the deepest node with probability >= threshold (ties at
    one depth: the most probable). The root (probability 1) always qualifies."""
    # 1e-9: a root whose summed leaves round to just under 1 still qualifies
    ok = node_probs >= threshold - 1e-9
    key = np.where(ok, depths[None, :] + 0.5 * node_probs, -np.inf)
    return key.argmax(1)


def predict_level(registry, probs: np.ndarray, level: str, threshold, index) -> pd.DataFrame:
    """`SCANVI.predict` for ``level="deepest"`` or ``"all"``."""
    node_probs, names = node_probabilities(registry, probs)
    if level == "all":
        return pd.DataFrame(node_probs, index=index, columns=pd.Index(list(names)))
    tree = _tree(registry)
    depths = tree.depths()
    if not isinstance(level, str):  # a depth: nodes there, and shallower leaves
        C = len(tree.leaves)
        at = (depths == level) | ((np.arange(len(depths)) < C) & (depths < level))
        pick = np.where(at[None, :], node_probs, -1.0).argmax(1)
        return np.asarray(names, dtype=object)[pick]
    pick = deepest(node_probs, depths, float(threshold))
    names = np.asarray(names, dtype=object)
    return pd.DataFrame(
        {
            "prediction": names[pick],
            "probability": node_probs[np.arange(len(pick)), pick],
            "depth": depths[pick],
        },
        index=index,
    )


def query_labels(adata, ref, extension, field: str):
    """The query's leaves (the reference's, then new ones) and the grown hierarchy.

    ``extension`` maps new labels to their parents (existing nodes or other
    new labels); query labels may be any node of the tree. Returns
    ``(label_categories, pairs, new_leaves)``.
    """
    from ..data.registry import categories_of

    ref_tree = _tree(ref)
    merged = dict(ref_tree.parent)
    clash = sorted(set(hierarchy.normalise(extension)) & set(merged)) if extension else []
    if clash:
        raise InputError(
            "label_hierarchy",
            clash[:10],
            "these labels already have a parent in the reference's hierarchy",
            "extend the tree with new labels only",
        )
    merged.update(hierarchy.normalise(extension) if extension else {})
    column = adata.obs[ref.labels_key]
    cats = categories_of(column, field)
    tree = hierarchy.build(
        merged, column, cats, ref.unlabeled_category, field, fixed_leaves=ref_tree.leaves
    )
    return tree.leaves, tree.parent, list(tree.leaves[len(ref_tree.leaves) :])
