"""Plots: training history, confusion matrix, DE volcano (matplotlib, optional extra).

Each function returns the matplotlib Figure and, given ``save=path``, writes
a PNG there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .errors import InputError
from .train.history import History


def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("jaxscanvi.pl needs matplotlib: pip install 'jaxscanvi[plot]'") from err
    return plt


def _finish(fig, save):
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=120)
    return fig


def history(model_or_df, terms: Sequence[str] | None = None, save=None):
    """Train (and validation, where recorded) loss and its terms by epoch; takes a
    model, its ``history`` or ``history.to_frame()``."""
    df = model_or_df if isinstance(model_or_df, (pd.DataFrame, History)) else model_or_df.history
    if isinstance(df, History):
        df = df.to_frame()
    if df.empty:
        raise InputError(
            "history", "empty", "the model has not been trained", "call model.train() first"
        )
    if terms is None:
        # (kl_global is scvi-tools' name for a term these models do not have)
        terms = sorted(
            {
                c[: -len("_train")]
                for c in df.columns
                if c.endswith("_train") and c != "kl_global_train"
            }
        )
    plt = _plt()
    n = len(terms)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    for ax, t in zip(axes[0], terms):
        for split, style in (("train", "-"), ("validation", "--")):
            col = f"{t}_{split}"
            s = df[col].dropna() if col in df else None
            if s is not None and len(s):
                ax.plot(s.index + 1, s.values, style, label=split)
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    return _finish(fig, save)


def confusion_matrix(y_true, y_pred, labels: Sequence[str] | None = None, save=None):
    """Row-normalised confusion matrix: each row (a true type) sums to 1."""
    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    if y_true.shape != y_pred.shape:
        raise InputError(
            "y_pred",
            f"length {len(y_pred)}",
            f"differs from y_true ({len(y_true)})",
            "pass one prediction per cell",
        )
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    pos = {l: i for i, l in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)))
    for t, p in zip(y_true, y_pred):
        if t in pos and p in pos:
            m[pos[t], pos[p]] += 1
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    plt = _plt()
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * k, 0.8 + 0.4 * k))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if m[i, j] >= 0.01:
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if m[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    # the matrix rides on the figure for callers (matplotlib's Figure does not declare it)
    fig.matrix = m  # pyright: ignore[reportAttributeAccessIssue]
    return _finish(fig, save)


def de_volcano(de_result: pd.DataFrame, n_labels: int = 10, save=None, title=None):
    """LFC against evidence for each gene of one comparison; top genes labelled.

    ``mode="change"`` results use lfc_mean and proba_de; vanilla results use
    log2(scale1 / scale2) and the Bayes factor.
    """
    df = de_result
    if "comparison" in df and df["comparison"].nunique() > 1:
        raise InputError(
            "de_result",
            sorted(df["comparison"].unique())[:3],
            "holds several comparisons",
            "pass the rows of one comparison, e.g. de[de.comparison == '...']",
        )
    if "lfc_mean" in df:
        x, y, ylab = df["lfc_mean"], df["proba_de"], "P(|LFC| > delta)"
    else:
        ratio = df["scale1"].to_numpy() / df["scale2"].to_numpy()
        x = pd.Series(np.log2(ratio), index=df.index)
        y, ylab = df["bayes_factor"], "Bayes factor"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    ax.scatter(x, y, s=5, c="0.6", linewidths=0)
    top_idx = (y + 1e-3 * x.abs()).sort_values(ascending=False).index[:n_labels]
    ax.scatter(x[top_idx], y[top_idx], s=10, c="C3")
    # top genes often share the same evidence (e.g. P = 1): fan their labels
    # out below the points, per side, so they stay readable
    span = float(y.max() - y.min()) or 1.0
    for side in (x[top_idx] >= 0, x[top_idx] < 0):
        genes = x.loc[top_idx][side].abs().sort_values(ascending=False).index
        for i, g in enumerate(genes):
            ty = y[g] - span * (0.07 + 0.06 * i)
            ax.annotate(
                str(g),
                (x[g], y[g]),
                xytext=(x[g], ty),
                fontsize=7,
                ha="right" if x[g] >= 0 else "left",
                arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.4"},
            )
    ax.set_xlabel("log2 fold change")
    ax.set_ylabel(ylab)
    if title or "comparison" in df:
        ax.set_title(title or str(df["comparison"].iloc[0]))
    return _finish(fig, save)
