"""Downstream tasks shared by SCVI and SCANVI: posterior predictive, likelihood
parameters, gene-gene correlation, latent library size, and importance-weighted
expression samples (which DE, in `_de`, draws too).

Each is a function of the model, bound as a method by `BaseModel`. Every
kernel (`_kernels`) is jitted once per shape (see `_inference.jitted`) and
runs over chunks of cells; results come back to the host chunk by chunk, so
memory stays bounded by the chunk size.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError, check_positive_int
from . import _kernels as kernels
from ._inference import chunks, gene_positions, jitted, transform_batches
from ._posterior import marginal_ll_per_cell

# ----------------------------------------------- importance-weighted samples


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


def _logsumexp(v):
    m = np.max(v)
    return m + np.log(np.sum(np.exp(v - m)))


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

            mats.append(spearmanr(flat)[0])  # (statistic, pvalue)
    names = pd.Index(list(self.registry.var_names))
    return pd.DataFrame(np.mean(mats, 0), index=names, columns=names)


# ------------------------------------------------------------- helpers


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
