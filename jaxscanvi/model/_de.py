"""Differential expression (`differential_expression`, bound as a method by
`BaseModel`): groups of cells, posterior samples of their normalized
expression (uniform or importance weighted), and scvi-tools' statistics
from `jaxscanvi.de`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd

from .. import de
from ..errors import InputError, check_positive_int
from . import _kernels as kernels
from ._downstream import _importance_options, _importance_samples
from ._inference import jitted, transform_batches

# ------------------------------------------------------------ helpers


def _scale_samples(
    self, cells, rows: np.ndarray, n: int, batch_code, seed: int, batch_size
) -> np.ndarray:
    """(n, G) posterior samples of normalized expression, cells drawn uniformly from rows.

    scvi-tools samples every cell ``n // len(rows) + 1`` times and keeps n of
    those draws at random; drawing n cells first gives the same distribution
    at O(n) instead of O(len(rows)) decoder passes.
    """
    picks = np.random.default_rng(seed).choice(rows, n)
    fn = jitted(partial(kernels.expression_fn, self.module, n_samples=1, latent_library=False))
    return self._map(lambda v, b, k: fn(v, b, k, batch_code), cells, picks, batch_size, seed=seed)


def _de_masks(self, adata, groupby, group1, group2, idx1, idx2):
    """[(mask1, mask2, name1, name2)], names None when idx1/idx2 define the groups."""
    n = adata.n_obs

    def as_mask(idx, field):
        if isinstance(idx, str):
            return adata.obs.index.isin(adata.obs.query(idx).index)
        a = np.asarray(idx).ravel()
        if a.dtype == bool:
            if a.size != n:
                raise InputError(
                    field,
                    f"boolean mask of length {a.size}",
                    f"must have one entry per cell ({n})",
                    "pass a mask over adata.obs",
                )
            return a
        m = np.zeros(n, bool)
        m[a.astype(np.int64)] = True
        return m

    if idx1 is not None:
        m1 = as_mask(idx1, "idx1")
        m2 = ~m1 if idx2 is None else as_mask(idx2, "idx2")
        out = [(m1, m2, None, None)]
    else:
        if groupby is None or groupby not in adata.obs:
            raise InputError(
                "groupby",
                groupby,
                "is not a column of adata.obs",
                "pass groupby= an obs column, or idx1= (and idx2=)",
            )
        col = adata.obs[groupby].astype(str).to_numpy()
        if group1 is None:
            group1 = list(
                pd.unique(adata.obs[groupby].astype("category").cat.categories.astype(str))
            )
            if len(group1) == 1:
                raise InputError(
                    "groupby",
                    groupby,
                    "has a single group, so there is nothing to compare",
                    "group by a column with >= 2 values",
                )
        elif isinstance(group1, str) or not isinstance(group1, Sequence):
            group1 = [group1]
        out = []
        for g in group1:
            m1 = col == str(g)
            m2 = ~m1 if group2 is None else col == str(group2)
            out.append((m1, m2, str(g), "Rest" if group2 is None else str(group2)))
    for m1, m2, g1, g2 in out:
        for m, g in ((m1, g1 or "idx1"), (m2, g2 or "idx2")):
            if not m.any():
                raise InputError(
                    "group1" if m is m1 else "group2",
                    g,
                    "selects no cells",
                    f"pick values present in adata.obs[{groupby!r}]"
                    if groupby
                    else "pass non-empty idx1/idx2",
                )
    return out


# ------------------------------------------------------------ DE


def differential_expression(
    self,
    adata=None,
    groupby: str | None = None,
    group1=None,
    group2: str | None = None,
    idx1=None,
    idx2=None,
    mode: Literal["vanilla", "change"] = "vanilla",
    delta: float | None = 0.25,
    batch_size: int | None = None,
    all_stats: bool = True,
    batch_correction: bool = False,
    batchid1: Sequence[str] | None = None,
    batchid2: Sequence[str] | None = None,
    fdr_target: float = 0.05,
    silent: bool = True,
    weights: Literal["uniform", "importance"] | None = "uniform",
    filter_outlier_cells: bool = False,
    importance_weighting_kwargs: dict | None = None,
    n_samples: int = 5000,
    pseudocounts: float | None = None,
    test_mode: Literal["two", "three"] = "three",
    seed: int = 0,
    *,
    n_samples_overall: int | None = None,
) -> pd.DataFrame:
    """Bayesian differential expression, one-vs-rest when ``group2`` is None.

    Same arguments, columns and ordering as scvi-tools: ``mode="vanilla"``
    gives proba_m1, proba_m2 and bayes_factor, sorted by Bayes factor;
    ``mode="change"`` gives proba_de, proba_not_de, bayes_factor, the LFC
    summaries and ``is_de_fdr_<fdr_target>``, sorted by proba_de. With
    ``batch_correction`` every cell is decoded in every batch (or those of
    ``batchid1``/``batchid2``) and samples are paired within a batch.
    ``n_samples_overall`` (scvi-tools' name) is ``n_samples``, the posterior
    samples per group. ``delta=None`` estimates the LFC threshold from the
    data (`de.estimate_delta`). ``filter_outlier_cells`` leaves out, in each
    group, the 10% of cells farthest from the rest in the latent space
    (`de.robust_inliers`, scikit-learn's EllipticEnvelope).
    """
    n_samples = n_samples if n_samples_overall is None else n_samples_overall
    iw = _de_options(mode, weights, importance_weighting_kwargs, n_samples, fdr_target)
    _check_batch_ids(batch_correction, batchid1, batchid2)
    adata = self.adata if adata is None else adata
    cells = self._cells_for(adata)
    codes1, codes2 = (
        _batch_codes(self.registry, batch_correction, b) for b in (batchid1, batchid2)
    )
    results = []
    for t, (m1, m2, g1, g2) in enumerate(
        _de_masks(self, adata, groupby, group1, group2, idx1, idx2)
    ):
        rows1, rows2 = np.flatnonzero(m1), np.flatnonzero(m2)
        if filter_outlier_cells:
            rows1, rows2 = _inliers(self, adata, rows1), _inliers(self, adata, rows2)
        s1 = _group_samples(self, cells, rows1, n_samples, codes1, 2 * t, batch_size, iw)
        s2 = _group_samples(self, cells, rows2, n_samples, codes2, 2 * t + 1, batch_size, iw)
        res = _comparison(
            cells,
            (rows1, rows2),
            (s1, s2),
            same_batches=batch_correction and set(codes1) == set(codes2),
            mode=mode,
            delta=delta,
            pseudocounts=pseudocounts,
            test_mode=test_mode,
            all_stats=all_stats,
            fdr_target=fdr_target,
            var_names=self.registry.var_names,
        )
        if g1 is not None:
            res["comparison"], res["group1"], res["group2"] = f"{g1} vs {g2}", g1, g2
        results.append(res)
    return pd.concat(results, axis=0)


def _de_options(mode, weights, importance_weighting_kwargs, n_samples, fdr_target):
    """`differential_expression`'s data-free checks, in order (`_check_batch_ids`
    is the last); the importance weighting options (None unless
    ``weights="importance"``)."""
    if mode not in ("vanilla", "change"):
        raise InputError("mode", mode, "is not a DE mode", "use 'vanilla' or 'change'")
    if weights not in (None, "uniform", "importance"):
        raise InputError(
            "weights",
            weights,
            "is not a weighting of posterior samples",
            "pass weights='uniform' (default) or 'importance'",
        )
    iw = _importance_options(importance_weighting_kwargs) if weights == "importance" else None
    check_positive_int("n_samples", n_samples)
    if not (0 < fdr_target < 1):
        raise InputError("fdr_target", fdr_target, "must lie in (0, 1)", "e.g. 0.05")
    return iw


def _check_batch_ids(batch_correction, batchid1, batchid2) -> None:
    if (batchid1 is not None or batchid2 is not None) and not batch_correction:
        raise InputError(
            "batchid1",
            batchid1,
            "batch ids only apply with batch_correction=True",
            "pass batch_correction=True",
        )


def _batch_codes(reg, batch_correction: bool, batchid) -> list:
    """The batches a group's cells are decoded in: [None] (their own) without
    batch correction, else ``batchid``'s codes (default: every batch)."""
    if not batch_correction:
        return [None]
    return transform_batches(
        reg.batch_categories, list(reg.batch_categories) if batchid is None else batchid
    )


def _comparison(
    cells,
    rows: tuple,
    samples: tuple,
    *,
    same_batches: bool,
    mode,
    delta,
    pseudocounts,
    test_mode,
    all_stats,
    fdr_target,
    var_names,
) -> pd.DataFrame:
    """One comparison's table from its two groups' rows and posterior samples."""
    (rows1, rows2), (s1, s2) = rows, samples
    a, b = _pair(s1, s2, same_batches=same_batches)
    if mode == "vanilla":
        info = de.vanilla(a, b)
    else:
        if pseudocounts is None:
            zero1 = np.asarray(cells.X[rows1].mean(0)).ravel() < 0.01
            zero2 = np.asarray(cells.X[rows2].mean(0)).ravel() < 0.01
            pc = de.pseudocounts_offset(a, b, zero1, zero2)
        else:
            pc = float(pseudocounts)
        info = de.change(a, b, delta=delta, pseudocounts=pc, test_mode=test_mode)
    info = {
        **{k: info.pop(k) for k in list(info)[:3]},
        "scale1": np.concatenate([s for s, _ in s1]).mean(0),
        "scale2": np.concatenate([s for s, _ in s2]).mean(0),
        **info,
    }
    if all_stats:
        info.update(de.raw_counts_properties(cells.X, rows1, rows2))
    res = pd.DataFrame(info, index=pd.Index(var_names))
    key = "proba_de" if mode == "change" else "bayes_factor"
    res = res.sort_values(by=key, ascending=False, kind="stable")
    if mode == "change":
        proba = res["proba_de"]
        assert isinstance(proba, pd.Series)  # one column of that name
        res[f"is_de_fdr_{fdr_target}"] = de.fdr_de_prediction(proba, fdr_target)
    return res


def _inliers(self, adata, rows: np.ndarray) -> np.ndarray:
    """``rows`` without their latent outliers (all of them if no fit is possible)."""
    keep = de.robust_inliers(self.get_latent_representation(adata, indices=rows))
    if keep is None:
        warnings.warn(
            "filter_outlier_cells: could not estimate the latent covariance "
            f"of a group of {len(rows)} cells; using all of them",
            UserWarning,
            stacklevel=3,
        )
        return rows
    return rows[keep]


def _group_samples(self, cells, rows, n_samples, codes, seed, batch_size, iw=None):
    """[(samples (n_b, G), batch code)] for each batch code (None: observed batch)."""
    n_b = max(int(n_samples / len(codes)), 2)
    out = []
    for j, code in enumerate(codes):
        s = 1000 * seed + j
        if iw is None:
            out.append((_scale_samples(self, cells, rows, n_b, code, s, batch_size), code))
        else:
            out.append(
                (_importance_samples(self, cells, rows, n_b, code, s, batch_size, **iw), code)
            )
    return out


def _pair(s1, s2, *, same_batches: bool):
    """Paired (S, G) sample stacks; within-batch pairs when both groups share batches."""
    if same_batches:
        d2 = {c: s for s, c in s2}
        a, b = [], []
        for s, c in s1:
            k = min(len(s), len(d2[c]))
            a.append(s[:k])
            b.append(d2[c][:k])
        return np.concatenate(a), np.concatenate(b)
    a = np.concatenate([s for s, _ in s1])
    b = np.concatenate([s for s, _ in s2])
    k = min(len(a), len(b))
    return a[:k], b[:k]
