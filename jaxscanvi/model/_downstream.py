"""Downstream tasks shared by SCVI and SCANVI: DE, posterior predictive, likelihood
parameters, gene-gene correlation, latent library size.

Each is a function of the model, bound as a method by `BaseModel`. Every
kernel (`_kernels`) is jitted once per shape (see `_inference.jitted`) and
runs over chunks of cells; results come back to the host chunk by chunk, so
memory stays bounded by the chunk size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import de
from ..errors import InputError, check_positive_int
from . import _kernels as kernels
from ._inference import chunks, gene_positions, jitted, transform_batches
from ._posterior import marginal_ll_per_cell

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
    if n_samples_overall is not None:
        n_samples = n_samples_overall
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
    if (batchid1 is not None or batchid2 is not None) and not batch_correction:
        raise InputError(
            "batchid1",
            batchid1,
            "batch ids only apply with batch_correction=True",
            "pass batch_correction=True",
        )
    adata = self.adata if adata is None else adata
    cells = self._cells_for(adata)
    reg = self.registry
    all_batches = list(reg.batch_categories)
    codes1 = (
        [None]
        if not batch_correction
        else transform_batches(reg.batch_categories, all_batches if batchid1 is None else batchid1)
    )
    codes2 = (
        [None]
        if not batch_correction
        else transform_batches(reg.batch_categories, all_batches if batchid2 is None else batchid2)
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
        a, b = _pair(s1, s2, same_batches=batch_correction and set(codes1) == set(codes2))
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
        res = pd.DataFrame(info, index=pd.Index(reg.var_names))
        key = "proba_de" if mode == "change" else "bayes_factor"
        res = res.sort_values(by=key, ascending=False, kind="stable")
        if mode == "change":
            res[f"is_de_fdr_{fdr_target}"] = de.fdr_de_prediction(res["proba_de"], fdr_target)
        if g1 is not None:
            res["comparison"] = f"{g1} vs {g2}"
            res["group1"] = g1
            res["group2"] = g2
        results.append(res)
    return pd.concat(results, axis=0)


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


def _importance_options(options: dict | None) -> dict:
    iw = dict(options or {})
    unknown = set(iw) - {"max_cells", "n_mc_samples", "truncation"}
    if unknown:
        raise InputError(
            "importance_weighting_kwargs",
            sorted(unknown),
            "are not options",
            "use max_cells, n_mc_samples, truncation",
        )
    return iw


def importance_weighted_expression(
    self, cells, rows, n, code, batch_size, options: dict | None
) -> np.ndarray:
    """(n, G) normalized expression resampled by importance weights over ``rows``
    (`get_normalized_expression(weights="importance", n_samples_overall=n)`)."""
    check_positive_int("n_samples_overall", n)
    return _importance_samples(
        self, cells, rows, int(n), code, 0, batch_size, **_importance_options(options)
    )


def _importance_samples(
    self,
    cells,
    rows,
    n,
    code,
    seed,
    batch_size,
    *,
    max_cells: int = 1024,
    n_mc_samples: int = 500,
    truncation: bool = False,
) -> np.ndarray:
    """Scale samples resampled towards latent codes that explain many cells of the group.

    scvi-tools' get_importance_weights: for a sample z_s, over anchor cells a
    of the group, w_s = sum_a p(z_s) p(x_a | z_s) / (p(x_a) sum_a' q(z_s | x_a')),
    with p(x_a | z_s) the sample's likelihood rescaled to a's library and
    log p(x_a) importance-sampled.
    """
    rng = np.random.default_rng(seed)
    anchors = rows if len(rows) <= max_cells else rng.choice(rows, max_cells, False)
    picks = rng.choice(rows, n)
    fn = jitted(partial(kernels.sample_fn, self.module))
    smp = self._map(lambda v, b, k: fn(v, b, k, code), cells, picks, batch_size, seed=seed)
    enc = self._map(jitted(partial(kernels.encode_fn, self.module)), cells, anchors, batch_size)
    qz = {"m": enc["qz_m"], "v": enc["qz_v"]}
    log_px = marginal_ll_per_cell(self, cells, anchors, n_mc_samples, batch_size)
    xa = cells.X[anchors].toarray()
    lib = np.log(np.maximum(xa.sum(1), 1.0))
    kernel = jitted(partial(kernels.anchor_terms, self.module.config.gene_likelihood))
    chunk = max(1, (1 << 24) // (len(anchors) * xa.shape[1]))  # ~64 MiB per temporary
    pad = -n % chunk
    arrays = [
        smp["z"],
        smp["log_scale"],
        smp.get("log_theta", smp["z"]),
        smp.get("zi_logits", smp["z"]),
    ]
    arrays = [np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in arrays]
    logw = []
    for s0 in range(0, n + pad, chunk):
        sl = slice(s0, s0 + chunk)
        logw.append(np.asarray(kernel(*(a[sl] for a in arrays), qz["m"], qz["v"], xa, lib, log_px)))
    logw = np.concatenate(logw)[:n].astype(np.float64)
    if truncation:
        tau = _logsumexp(logw) - np.log(len(logw))
        logw = np.maximum(logw, tau)
    p = np.exp(logw - _logsumexp(logw))
    return smp["scale"][rng.choice(n, n, p=p / p.sum())]


# ------------------------------------------------------------ predictive


def posterior_predictive_sample(
    self,
    adata=None,
    indices=None,
    n_samples: int = 1,
    gene_list: Sequence[str] | None = None,
    batch_size: int | None = None,
    transform_batch=None,
    seed: int = 0,
):
    """Counts drawn from p(x_hat | x): z ~ q(z|x), then x_hat ~ p(x | z, l).

    Returns a scipy sparse CSR matrix (cells, genes) when ``n_samples == 1``,
    else a 3-D ``scipy.sparse.coo_array`` (cells, genes, samples), the
    shapes scvi-tools returns. Draws use numpyro's distributions.
    """
    check_positive_int("n_samples", n_samples)
    genes = gene_positions(self.registry.var_names, gene_list)
    code = transform_batches(self.registry.batch_categories, transform_batch)
    if len(code) != 1:
        raise InputError(
            "transform_batch", transform_batch, "takes one batch here", "pass a single batch name"
        )
    fn = jitted(partial(kernels.predictive_fn, self.module, n_samples=int(n_samples)))
    cells = self._cells_for(adata)
    parts = []
    key = jax.random.PRNGKey(seed)
    for i, (n, b) in enumerate(chunks(cells, indices, batch_size, self._n_devices)):
        x = np.asarray(fn(self.variables, b, jax.random.fold_in(key, i), code[0]))[:n]
        if genes is not None:
            x = x[:, genes]
        parts.append(sp.coo_array(x) if n_samples > 1 else sp.csr_matrix(x))
    if n_samples == 1:
        return sp.vstack(parts, format="csr")
    return sp.coo_array(_concat_coo(parts))


def get_likelihood_parameters(
    self,
    adata=None,
    indices=None,
    n_samples: int = 1,
    give_mean: bool = False,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Parameters of p(x | z): ``mean``, ``dispersions`` (NB/ZINB), ``dropout`` (ZINB).

    ``dropout`` is the zero-inflation probability. Shapes (cells, genes), or
    (n_samples, cells, genes) when n_samples > 1 and not give_mean.
    """
    check_positive_int("n_samples", n_samples)
    fn = jitted(partial(kernels.likelihood_fn, self.module, n_samples=int(n_samples)))
    out = self._map(fn, self._cells_for(adata), indices, batch_size)
    if n_samples > 1:
        out = {k: np.swapaxes(v, 0, 1) for k, v in out.items()}
        if give_mean:
            out = {k: v.mean(0) for k, v in out.items()}
    return out


def get_latent_library_size(
    self, adata=None, indices=None, give_mean: bool = True, batch_size: int | None = None
) -> np.ndarray:
    """Library size of each cell, shape (cells, 1).

    With a learned library, the log-normal posterior mean (give_mean) or a
    sample; with the observed library, the observed total counts.
    """
    fn = jitted(partial(kernels.library_fn, self.module, give_mean=give_mean))
    return self._map(fn, self._cells_for(adata), indices, batch_size)[:, None]


def get_feature_correlation_matrix(
    self,
    adata=None,
    indices=None,
    n_samples: int = 10,
    batch_size: int = 64,
    rna_size_factor: float = 1000,
    transform_batch=None,
    correlation_type: Literal["spearman", "pearson"] = "spearman",
    seed: int = 0,
) -> pd.DataFrame:
    """Gene-gene correlation of denoised samples, averaged over ``transform_batch``.

    As scvi-tools: rate = rna_size_factor * scale, one Gamma(theta, rate/theta)
    draw per posterior sample, correlation across cells and samples.
    """
    if correlation_type not in ("spearman", "pearson"):
        raise InputError(
            "correlation_type", correlation_type, "is not supported", "use 'spearman' or 'pearson'"
        )
    check_positive_int("n_samples", n_samples)
    fn = jitted(partial(kernels.denoised_fn, self.module, n_samples=int(n_samples)))
    mats = []
    cells = self._cells_for(adata)
    for j, code in enumerate(transform_batches(self.registry.batch_categories, transform_batch)):
        data = self._map(
            lambda v, b, k, c=code: fn(v, b, k, c, float(rna_size_factor)),
            cells,
            indices,
            batch_size,
            seed=seed + j,
        )
        flat = data.reshape(-1, data.shape[-1])  # (cells * samples, genes)
        if correlation_type == "pearson":
            mats.append(np.corrcoef(flat, rowvar=False))
        else:
            from scipy.stats import spearmanr

            mats.append(spearmanr(flat).statistic)
    names = list(self.registry.var_names)
    return pd.DataFrame(np.mean(mats, 0), index=names, columns=names)


# ------------------------------------------------------------- helpers


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


def _logsumexp(v):
    m = np.max(v)
    return m + np.log(np.sum(np.exp(v - m)))


def _concat_coo(parts):
    rows, offs = [], 0
    for p in parts:
        c = p.coords
        rows.append((c[0] + offs, c[1], c[2], p.data))
        offs += p.shape[0]
    shape = (offs, *parts[0].shape[1:])
    r, g, s, d = (np.concatenate(a) for a in zip(*rows))
    return sp.coo_array((d, (r, g, s)), shape=shape)


# ----------------------------------------------------------- jitted kernels
