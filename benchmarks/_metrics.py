"""The scores the benchmark scripts share: accuracy and its per-class forms,
k-NN label transfer and batch mixing, mean and sd over seeds, and the paired
95 % t interval."""

from __future__ import annotations

import numpy as np


# scikit-learn's definitions (the bench extra installs it); labels compared as strings
def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import recall_score

    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    classes = np.unique(y_true)
    rec = recall_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    return {str(c): float(r) for c, r in zip(classes, rec)}


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    from sklearn.metrics import balanced_accuracy_score

    if not len(y_true):
        return float("nan")
    return float(
        balanced_accuracy_score(np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str))
    )


def accuracy(y_true, y_pred) -> float:
    from sklearn.metrics import accuracy_score

    if not len(y_true):
        return float("nan")
    return float(accuracy_score(np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)))


def macro_f1(y_true, y_pred) -> float:
    """Macro F1 over the classes present in ``y_true``."""
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    return float(
        f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)
    )


def knn_predict(z, labels, k: int = 15, reference=None, query=None) -> np.ndarray:
    """Majority label among each query cell's k nearest reference cells (itself
    excluded); ``reference``/``query``: boolean masks (default all cells)."""
    from sklearn.neighbors import NearestNeighbors

    z, labels = np.asarray(z), np.asarray(labels)
    n = len(labels)
    ref_idx = np.arange(n) if reference is None else np.flatnonzero(reference)
    qry_idx = np.arange(n) if query is None else np.flatnonzero(query)
    cats, codes = np.unique(labels[ref_idx], return_inverse=True)
    ind = (
        NearestNeighbors(n_neighbors=k + 1)
        .fit(z[ref_idx])
        .kneighbors(z[qry_idx], return_distance=False)
    )
    own = ref_idx[ind] == qry_idx[:, None]  # a query cell that is also a reference
    keep = np.argsort(own, axis=1, kind="stable")[:, :k]  # drop it, else the (k+1)-th
    votes = codes[np.take_along_axis(ind, keep, 1)]
    return cats[[np.bincount(v, minlength=len(cats)).argmax() for v in votes]]


def knn_accuracy(z, labels, k: int = 15) -> float:
    """Leave-one-out k-NN accuracy."""
    return accuracy(labels, knn_predict(np.asarray(z), labels, k))


def batch_entropy(z, batches, k: int = 15) -> float:
    """Mean entropy of batch labels among each cell's k neighbours, each batch's
    share divided by its global share, over log(#batches): 1 = fully mixed."""
    from sklearn.neighbors import NearestNeighbors

    cats, codes = np.unique(np.asarray(batches), return_inverse=True)
    if len(cats) < 2:
        return 1.0
    ind = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)
    counts = np.stack([(codes[ind[:, 1:]] == c).sum(1) for c in range(len(cats))], 1)
    p = counts / (np.bincount(codes) / len(codes))
    p /= p.sum(1, keepdims=True)
    ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(1)
    return float(ent.mean() / np.log(len(cats)))


def mean_sd(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else None,
        "n": int(v.size),
    }


def t_interval(differences) -> list[float] | None:
    """Two-sided 95 % t interval of the mean of paired differences (None below 2)."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return None
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return [float(d.mean()) - half, float(d.mean()) + half]
