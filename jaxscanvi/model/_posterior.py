"""The posterior's summaries that SCVI and SCANVI share: latent representation,
normalized expression, ELBO, reconstruction error, marginal likelihood.

Each is a function of the model, bound as a method by `BaseModel`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial
from typing import cast

import numpy as np
import pandas as pd

from .._settings import settings
from ..errors import InputError, check_positive_int
from ..losses import (
    elbo_terms,
    log_importance_weights,
    scanvi_elbo_terms,
    scanvi_log_importance_weights,
)
from ..module import SCANVAE
from . import _kernels as kernels
from ._inference import gene_positions, jitted, row_positions, transform_batches


def get_latent_representation(
    self,
    adata=None,
    indices=None,
    give_mean: bool = True,
    mc_samples: int = 5000,
    batch_size: int | None = None,
    return_dist: bool = False,
):
    """Latent representation of each cell: the posterior mean (or a sample).

    With ``return_dist=True`` returns ``(qz_mean, qz_var)``. For
    latent_distribution="ln" and give_mean, the mean of softmax(z) is
    estimated from ``mc_samples`` draws, as scvi-tools does.
    """
    cells = self._cells_for(adata)
    if self.module.config.latent_distribution == "ln" and give_mean:  # a Monte Carlo mean
        fn = partial(kernels.latent_fn, self.module, give_mean=True, mc_samples=int(mc_samples))
        out = self._map(jitted(fn), cells, indices, batch_size)
        return (out["qz_m"], out["qz_v"]) if return_dist else out["z"]
    out = self._map(jitted(partial(kernels.encode_fn, self.module)), cells, indices, batch_size)
    if return_dist:
        return out["qz_m"], out["qz_v"]
    return out["qz_m"] if give_mean else out["z"]


def get_normalized_expression(
    self,
    adata=None,
    indices=None,
    transform_batch=None,
    gene_list: Sequence[str] | None = None,
    library_size: float | str = 1,
    n_samples: int = 1,
    n_samples_overall: int | None = None,
    weights: str | None = None,
    batch_size: int | None = None,
    return_mean: bool = True,
    return_numpy: bool | None = None,
    silent: bool = True,
    **importance_weighting_kwargs,
):
    """Denoised expression rho (times ``library_size``), scvi-tools' semantics.

    ``transform_batch`` (a batch name or list of names) decodes every cell
    as if from that batch; with several, the result is their average.
    ``library_size="latent"`` uses each cell's (observed or inferred) library.
    ``n_samples_overall``: that many cells drawn from ``indices``, one
    sample each. With ``weights="importance"`` (as scvi-tools, only with
    ``n_samples_overall``) the draws are resampled by importance weights
    that favour latent codes explaining many of the selected cells (see
    `differential_expression`; ``importance_weighting_kwargs``:
    ``max_cells``, ``n_mc_samples``, ``truncation``); the result is then an
    array (n_samples_overall, genes), not tied to cells. ``silent`` is
    accepted (there is no per-batch progress bar).
    """
    del silent
    return normalized_expression(
        self,
        kernels.expression_fn,
        {},
        dict(
            adata=adata,
            indices=indices,
            transform_batch=transform_batch,
            gene_list=gene_list,
            library_size=library_size,
            n_samples=n_samples,
            n_samples_overall=n_samples_overall,
            batch_size=batch_size,
            return_mean=return_mean,
            return_numpy=return_numpy,
            weights=weights,
            importance_weighting_kwargs=importance_weighting_kwargs,
        ),
    )


def normalized_expression(self, kernel, kernel_kw: dict, args: dict):
    """`get_normalized_expression` with ``kernel(module, variables, batch, key,
    batch_code, **kernel_kw, n_samples=..., latent_library=...)`` decoding."""
    cells = self._cells_for(args["adata"])
    indices, n_samples = args["indices"], args["n_samples"]
    library_size = args["library_size"]
    check_positive_int("n_samples", n_samples)
    if args["n_samples_overall"] is not None:
        check_positive_int("n_samples_overall", args["n_samples_overall"])
        pool = np.arange(cells.n_obs) if indices is None else np.asarray(indices)
        indices = np.random.default_rng(0).choice(pool, args["n_samples_overall"])
        n_samples = 1
    batches = transform_batches(self.registry.batch_categories, args["transform_batch"])
    gene_mask = gene_positions(self.registry.var_names, args["gene_list"])
    if not (
        library_size == "latent" or (isinstance(library_size, (int, float)) and library_size > 0)
    ):
        raise InputError(
            "library_size",
            library_size,
            "must be a positive number or 'latent'",
            "pass e.g. library_size=1e4",
        )
    if _importance_weighted(args, kernel, batches):
        from ._downstream import importance_weighted_expression

        pool = (
            np.arange(cells.n_obs)
            if args["indices"] is None
            else row_positions(cells.n_obs, args["indices"])
        )
        expr = importance_weighted_expression(
            self,
            cells,
            pool,
            args["n_samples_overall"],
            batches[0],
            args["batch_size"],
            args["importance_weighting_kwargs"],
        ) * float(library_size)
        expr = expr if gene_mask is None else expr[:, gene_mask]
        if args["return_numpy"] is False:
            names = (
                self.registry.var_names if args["gene_list"] is None else list(args["gene_list"])
            )
            return pd.DataFrame(expr, columns=pd.Index(list(names)))
        return expr
    jfn = jitted(
        partial(
            kernel,
            self.module,
            **kernel_kw,
            n_samples=int(n_samples),
            latent_library=library_size == "latent",
        )
    )
    # the sum of one (cells[, samples], genes) array per batch code (not the int 0)
    total = sum(
        self._map(partial(_with_batch, jfn, code), cells, indices, args["batch_size"])
        for code in batches
    )
    expr = cast(np.ndarray, total) / len(batches)
    if library_size != "latent":
        expr = expr * float(library_size)
    if gene_mask is not None:
        expr = expr[..., gene_mask]
    if n_samples > 1:  # kernels give (cells, samples, genes)
        expr = expr.mean(1) if args["return_mean"] else np.swapaxes(expr, 0, 1)
    return_numpy = args["return_numpy"]
    if return_numpy is None:
        return_numpy = n_samples > 1 and not args["return_mean"]
    if return_numpy:
        return expr
    gene_list = args["gene_list"]
    names = self.registry.var_names if gene_list is None else list(gene_list)
    idx = np.arange(cells.n_obs) if indices is None else np.asarray(indices)
    return pd.DataFrame(expr, index=cells.obs_names[idx], columns=pd.Index(list(names)))


def _importance_weighted(args: dict, kernel, batches) -> bool:
    """Whether `normalized_expression` resamples by importance weights (checked)."""
    weights = args.get("weights")
    if weights not in (None, "uniform", "importance"):
        raise InputError(
            "weights",
            weights,
            "is not a weighting of posterior samples",
            "pass None / 'uniform' (default) or 'importance'",
        )
    if weights != "importance":
        return False
    if args["n_samples_overall"] is None:
        warnings.warn(
            "get_normalized_expression: weights='importance' applies only with "
            "n_samples_overall=..., as in scvi-tools; ignored",
            UserWarning,
            stacklevel=4,
        )
        return False
    for bad, name, fix in (
        (len(batches) > 1, "transform_batch", "pass one batch"),
        (args["library_size"] == "latent", "library_size", "pass a number, e.g. library_size=1e4"),
        (kernel is not kernels.expression_fn, "label", "leave label=None"),
    ):
        if bad:
            raise InputError(
                name, args.get(name, "given"), "cannot be combined with weights='importance'", fix
            )
    return True


def _with_batch(fn, batch_code, variables, batch, key):
    return fn(variables, batch, key, batch_code)


def _is_scanvi(self) -> bool:
    return isinstance(self.module, SCANVAE)


def _elbo_terms(self, adata, indices, batch_size):
    kernel = scanvi_elbo_terms if _is_scanvi(self) else elbo_terms
    return self._map(
        jitted(partial(kernel, self.module)), self._cells_for(adata), indices, batch_size
    )


def get_elbo(
    self, adata=None, indices=None, batch_size: int | None = None, return_mean: bool = True
):
    """The ELBO (higher is better): -(reconstruction + local KL), mean over cells,
    or each cell's with ``return_mean=False``; one posterior sample, eval mode.

    For SCVI the terms are -log p(x|z,l) and KL(q(z|x)||p(z)) + KL(q(l|x)||p(l)).
    For SCANVI they are scvi-tools 1.4.2's scANVI bound, with every cell's
    label marginalised under q(c|z1) (L_U; see `losses.scanvi_elbo_terms`),
    whatever ``plan_kwargs["objective"]`` the model was trained with, so the
    number is comparable with scvi-tools'. (With the default objective
    "seed", the history's ``elbo_*`` use L_S for labelled cells instead.)
    """
    t = _elbo_terms(self, adata, indices, batch_size)
    elbo = -(t["reconstruction_loss"] + t["kl_local"])
    return float(np.mean(elbo)) if return_mean else elbo


def get_reconstruction_error(
    self, adata=None, indices=None, batch_size: int | None = None, return_mean: bool = True
) -> dict:
    """``{"reconstruction_loss": ...}``, the mean over cells (or each cell's with
    ``return_mean=False``), as scvi-tools returns it.

    SCVI: -log p(x|z,l). SCANVI: scvi-tools' scANVI reconstruction term,
    -log p(x|z1,l) + log q(z1|x) + sum_c q(c|z1) [-log p(z1|u,c)] for every
    cell, labels unused (see `get_elbo`).
    """
    rec = _elbo_terms(self, adata, indices, batch_size)["reconstruction_loss"]
    return {"reconstruction_loss": float(np.mean(rec)) if return_mean else rec}


def get_marginal_ll(
    self,
    adata=None,
    indices=None,
    n_mc_samples: int = 1000,
    batch_size: int | None = None,
    return_mean: bool = True,
):
    """Importance-sampled log p(x) (higher is better), as scvi-tools computes it.

    ``return_mean=False`` gives each cell's estimate. The mean is scvi-tools':
    the mean over minibatches of ``batch_size`` cells (default
    ``jaxscanvi.settings.batch_size``, else 128 as scvi-tools') of each
    minibatch's mean, which differs from the mean over cells when the last
    minibatch is short. For SCANVI the weights
    are those scvi-tools forms for scANVI (`losses.scanvi_log_importance_weights`):
    comparable with scvi-tools' number, not an estimate of log p(x) under
    scANVI's class-structured prior.
    """
    check_positive_int("n_mc_samples", n_mc_samples)
    ll = marginal_ll_per_cell(self, self._cells_for(adata), indices, n_mc_samples, batch_size)
    if not return_mean:
        return ll
    size = int(batch_size or settings.batch_size or 128)
    return float(np.mean([ll[s : s + size].mean() for s in range(0, len(ll), size)]))


def marginal_ll_per_cell(self, cells, indices, n_mc_samples, batch_size) -> np.ndarray:
    """Importance-sampled log p(x) of each selected cell, up to 100 samples per pass."""
    per_pass = min(int(n_mc_samples), 100)
    n_pass = -(-int(n_mc_samples) // per_pass)
    kernel = scanvi_log_importance_weights if _is_scanvi(self) else log_importance_weights
    fn = jitted(partial(kernel, self.module, n_samples=per_pass))
    logw = np.concatenate(
        [self._map(fn, cells, indices, batch_size, seed=1000 + p) for p in range(n_pass)], axis=1
    )[:, :n_mc_samples]  # (N, S)
    m = logw.max(1, keepdims=True)
    return m[:, 0] + np.log(np.exp(logw - m).sum(1)) - np.log(logw.shape[1])
