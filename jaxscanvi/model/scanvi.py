"""SCANVI: semi-supervised annotation on top of scVI."""

from __future__ import annotations

import warnings
from functools import partial
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..data.registry import build_registry, registry_of
from ..data.registry import setup_anndata as _setup
from ..errors import InputError
from ..losses import scanvi_elbo
from ..module import SCANVAE, SCANVIConfig
from ._base import (BaseModel, _jitted, check_positive_int, max_epochs_heuristic)
from ._downstream import DownstreamMixin
from ._query import QueryMixin
from .scvi import SCVI

_ARCH_KEYS = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion",
              "gene_likelihood", "latent_distribution", "encode_covariates",
              "deeply_inject_covariates", "use_batch_norm", "use_layer_norm",
              "use_observed_lib_size")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10
                               ) -> float:
    """ECE: bin cells by top-class confidence; weighted |accuracy - confidence|."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


class SCANVI(QueryMixin, DownstreamMixin, BaseModel):
    """scANVI (Xu et al. 2021): scVI with a cell-type-structured latent prior.

    The default objective is the user guide's: labelled cells use L_S with
    their label, unlabelled cells L_U with the label marginalised, plus the
    classifier's cross-entropy times ``classification_ratio`` (50).
    ``plan_kwargs={"objective": "scvi-tools"}`` marginalises every cell
    instead, as scvi-tools does.
    """

    _kind = "scanvi"

    @staticmethod
    def setup_anndata(adata, labels_key: str, unlabeled_category: str,
                      layer: str | None = None, batch_key: str | None = None,
                      size_factor_key: str | None = None,
                      categorical_covariate_keys: Sequence[str] | None = None,
                      continuous_covariate_keys: Sequence[str] | None = None, *,
                      allow_noninteger_counts: bool = False) -> None:
        """Validate ``adata``; ``unlabeled_category`` marks cells without a label."""
        if labels_key is None:
            raise InputError("labels_key", None, "scANVI needs a cell-type column",
                             "pass labels_key naming the adata.obs column of labels")
        if unlabeled_category is None:
            raise InputError("unlabeled_category", None, "scANVI needs the value that "
                             "marks unlabelled cells", "pass e.g. unlabeled_category="
                             "'Unknown'")
        _setup(adata, layer=layer, batch_key=batch_key, labels_key=labels_key,
               size_factor_key=size_factor_key,
               categorical_covariate_keys=categorical_covariate_keys,
               continuous_covariate_keys=continuous_covariate_keys,
               unlabeled_category=unlabeled_category,
               allow_noninteger_counts=allow_noninteger_counts)

    def __init__(self, adata, n_hidden: int = 128, n_latent: int = 10, n_layers: int = 1,
                 dropout_rate: float = 0.1,
                 dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
                 gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
                 use_observed_lib_size: bool = True,
                 latent_distribution: Literal["normal", "ln"] = "normal",
                 encode_covariates: bool = False, deeply_inject_covariates: bool = True,
                 use_batch_norm: Literal["encoder", "decoder", "none", "both"] = "both",
                 use_layer_norm: Literal["encoder", "decoder", "none", "both"] = "none",
                 linear_classifier: bool = False, y_prior: Sequence[float] | None = None,
                 classifier_parameters: dict | None = None, *, seed: int = 0,
                 class_chunk_size: int = 64, encoder=None, decoder=None, registry=None,
                 _config=None):
        registry = registry if registry is not None else registry_of(adata)
        if registry.unlabeled_category is None or registry.labels_key is None:
            raise InputError("adata", "set up without unlabeled_category",
                             "SCANVI needs labels_key and unlabeled_category",
                             "call SCANVI.setup_anndata(adata, labels_key=..., "
                             "unlabeled_category=...)")
        if _config is None:
            cls_kw = dict(classifier_parameters or {})
            allowed = {"n_hidden", "n_layers", "dropout_rate", "use_batch_norm",
                       "use_layer_norm"}
            unknown = set(cls_kw) - allowed
            if unknown:
                raise InputError("classifier_parameters", sorted(unknown),
                                 "unknown classifier options", f"use only {sorted(allowed)}")
            _config = SCANVIConfig(
                n_genes=registry.n_vars, n_batch=registry.n_batch,
                n_labels=registry.n_labels, n_cats_per_cov=registry.n_cats_per_cov,
                n_continuous_cov=registry.n_continuous_cov, n_hidden=n_hidden,
                n_latent=n_latent, n_layers=n_layers, dropout_rate=dropout_rate,
                dispersion=dispersion, gene_likelihood=gene_likelihood,
                latent_distribution=latent_distribution,
                encode_covariates=encode_covariates,
                deeply_inject_covariates=deeply_inject_covariates,
                use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm,
                use_observed_lib_size=use_observed_lib_size,
                use_size_factor_key=registry.size_factor_key is not None,
                classifier_n_hidden=cls_kw.get("n_hidden", 0 if linear_classifier
                                               else n_hidden),
                classifier_n_layers=cls_kw.get("n_layers", 0 if linear_classifier
                                               else n_layers),
                classifier_dropout_rate=cls_kw.get("dropout_rate", dropout_rate),
                classifier_use_batch_norm=cls_kw.get("use_batch_norm"),
                classifier_use_layer_norm=cls_kw.get("use_layer_norm"),
                y_prior=None if y_prior is None else tuple(float(p) for p in y_prior),
                class_chunk_size=class_chunk_size)
        self._build(adata, registry,
                    SCANVAE(_config, encoder_cls=encoder, decoder_cls=decoder), seed)
        self.was_pretrained = False
        self.temperature = 1.0
        self.calibration: dict = {}
        self.reference_stats: dict | None = None
        if adata is not None and _config is None:  # internal paths may lack labels
            self._check_labels()

    def _check_labels(self) -> None:
        labels = self._train_cells().labels
        present = np.unique(labels[labels < self.registry.n_labels])
        if len(present) == 0:
            raise InputError(f"adata.obs[{self.registry.labels_key!r}]", "all unlabelled",
                             "no cell carries a label", "label some cells of at least two "
                             "types")
        if len(present) < 2:
            raise InputError(f"adata.obs[{self.registry.labels_key!r}]",
                             self.registry.label_categories[present[0]],
                             "only one cell type is labelled",
                             "label cells of at least two types")

    @classmethod
    def from_scvi_tools(cls, dir_path, adata=None) -> "SCANVI":
        """Load a folder written by scvi-tools' ``SCANVI.save`` (``model.pt``).

        As `SCVI.from_scvi_tools`, plus the classifier, the class networks
        and the class prior. The unlabelled category is scvi-tools'; to train
        further as scvi-tools would, pass ``plan_kwargs={"objective":
        "scvi-tools"}``.
        """
        from ._import import import_model
        return import_model(cls, dir_path, adata, "SCANVI")

    @classmethod
    def _config_cls(cls):
        return SCANVIConfig

    @classmethod
    def _from_metadata(cls, meta, registry, config, adata, **modules):
        model = cls(adata, registry=registry, _config=config, seed=meta.get("init_seed", 0),
                    **modules)
        model.was_pretrained = bool(meta.get("was_pretrained", False))
        model.temperature = float(meta.get("temperature", 1.0))
        model.calibration = dict(meta.get("calibration") or {})
        model.reference_stats = meta.get("reference_stats")
        return model

    def _extra_metadata(self):
        return {"was_pretrained": self.was_pretrained, "temperature": self.temperature,
                "calibration": self.calibration, "reference_stats": self.reference_stats}

    def _inherit_reference(self, reference_model) -> None:
        # a frozen encoder maps reference cells as before, so the reference's
        # calibration and latent statistics still describe them
        self.temperature = reference_model.temperature
        self.calibration = dict(reference_model.calibration)
        self.reference_stats = reference_model.reference_stats

    @classmethod
    def from_scvi_model(cls, scvi_model: SCVI, unlabeled_category: str,
                        labels_key: str | None = None, adata=None, **scanvi_kwargs):
        """Initialise from a trained SCVI: every shared weight is copied.

        Architecture arguments already fixed by the scVI model are ignored
        with a warning, as in scvi-tools; the classifier and the class
        networks start fresh.
        """
        if not isinstance(scvi_model, SCVI):
            raise InputError("scvi_model", type(scvi_model).__name__, "not an SCVI model",
                             "pass a trained jaxscanvi.SCVI")
        if not scvi_model.is_trained:
            warnings.warn("from_scvi_model: the scVI model has not been trained",
                          UserWarning, stacklevel=2)
        adata = adata if adata is not None else scvi_model.adata
        reg = scvi_model.registry
        labels_key = labels_key or reg.labels_key
        if labels_key is None:
            raise InputError("labels_key", None, "the scVI model was set up without "
                             "labels and none was given", "pass labels_key=...")
        cfg = scvi_model.module.config
        for k in _ARCH_KEYS:
            if k in scanvi_kwargs:
                warnings.warn(f"Ignoring param '{k}' as it was already passed in to the "
                              f"pretrained SCVI model with value {getattr(cfg, k)!r}.",
                              UserWarning, stacklevel=2)
                scanvi_kwargs.pop(k)
        new_reg = build_registry(
            adata, layer=reg.layer, batch_key=reg.batch_key, labels_key=labels_key,
            size_factor_key=reg.size_factor_key,
            categorical_covariate_keys=reg.categorical_covariate_keys,
            continuous_covariate_keys=reg.continuous_covariate_keys,
            unlabeled_category=unlabeled_category,
            allow_noninteger_counts=reg.allow_noninteger_counts)
        # keep the scVI model's category orders for batches and covariates
        new_reg = new_reg.replace(
            batch_categories=reg.batch_categories,
            categorical_covariate_categories=reg.categorical_covariate_categories)
        if cfg.dispersion == "gene-label":
            raise InputError("dispersion", "gene-label", "the scVI model's per-label "
                             "dispersion does not carry over to scANVI's classes",
                             "pretrain scVI with dispersion='gene' or 'gene-batch'")
        adata.uns["_jaxscanvi_registry"] = new_reg.to_json()
        arch = {k: getattr(cfg, k) for k in _ARCH_KEYS}
        scanvi_kwargs.setdefault("encoder", scvi_model.module.encoder_cls)
        scanvi_kwargs.setdefault("decoder", scvi_model.module.decoder_cls)
        model = cls(adata, **arch, **scanvi_kwargs, seed=scvi_model.init_seed,
                    registry=new_reg)
        model.params = _copy_shared(scvi_model.params, model.params)
        model.state = _copy_shared(scvi_model.state, model.state)
        model.was_pretrained = True
        return model

    def train(self, max_epochs: int | None = None, n_samples_per_label: int | None = None,
              check_val_every_n_epoch: int | None = None, train_size: float = 0.9,
              validation_size: float | None = None, batch_size: int = 128,
              early_stopping: bool = False, plan_kwargs: dict | None = None, seed: int = 0,
              progress_bar: bool = True, *, early_stopping_patience: int = 45,
              early_stopping_monitor: str = "elbo_validation",
              on_nonfinite: Literal["raise", "skip_step"] = "raise",
              data_source: Literal["auto", "device", "host", "stream"] = "auto",
              loss_terms: dict | None = None, loss_weights: dict | None = None,
              checkpoint_dir=None, checkpoint_every: int = 1, resume: bool = False,
              devices="auto", data_shards: int | None = None,
              precision: Literal["float32", "bfloat16"] = "float32",
              calibrate: bool = True):
        """Train on all cells, each minibatch paired with a minibatch of labelled cells.

        ``n_samples_per_label`` re-draws, every epoch, a class-balanced subset
        of at most that many labelled training cells per type for the
        labelled minibatches. ``plan_kwargs`` adds ``classification_ratio``
        (50) and ``objective`` ("seed" or "scvi-tools") to SCVI's options.
        A query model (`load_query_data`) may have no labelled cells; it then
        trains on the unlabelled bound alone. With ``calibrate`` and labelled
        validation cells, a temperature is fitted at the end (`calibrate`).
        """
        cells = self._train_cells()
        if max_epochs is None:
            max_epochs = max_epochs_heuristic(cells.n_obs)
            if self.was_pretrained:
                max_epochs = int(min(10, max(2, round(max_epochs / 3.0))))
        check_positive_int("max_epochs", max_epochs)
        check_positive_int("n_samples_per_label", n_samples_per_label, allow_none=True)
        plan = dict(plan_kwargs or {})
        objective = plan.get("objective", "seed")
        if objective not in ("seed", "scvi-tools"):
            raise InputError("plan_kwargs['objective']", objective, "unknown objective",
                             "pass 'seed' (default) or 'scvi-tools'")
        C = self.registry.n_labels
        labels = cells.labels
        is_query = getattr(self, "query_info", None) is not None
        # an unlabelled query trains on the L_U bound alone
        unlabelled_query = is_query and not (labels < C).any()

        def train_labelled(rng):
            lab = self.train_indices[labels[self.train_indices] < C]
            if len(lab) == 0:
                raise InputError("train_size", train_size, "no labelled cell fell in the "
                                 "training split", "label more cells or raise train_size")
            if n_samples_per_label is None:
                return lab
            picks = []
            for c in range(C):
                of_c = lab[labels[lab] == c]
                if len(of_c):
                    picks.append(rng.choice(of_c, min(n_samples_per_label, len(of_c)),
                                            replace=False))
            return np.sort(np.concatenate(picks))

        def val_metrics(ts):
            val = self.validation_indices
            val_lab = val[labels[val] < C]
            if len(val_lab) == 0:
                return {}
            probs = self._probabilities(ts.params, ts.state, cells, val_lab, None, True)
            y = labels[val_lab]
            p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
            return {"classification_loss_validation_labelled": float(-np.log(p_true).mean()),
                    "accuracy_validation_labelled": float((probs.argmax(1) == y).mean()),
                    "calibration_error_validation": expected_calibration_error(probs, y)}

        self._fit(max_epochs=max_epochs, batch_size=batch_size, train_size=train_size,
                  validation_size=validation_size, early_stopping=early_stopping,
                  early_stopping_patience=early_stopping_patience,
                  early_stopping_monitor=early_stopping_monitor,
                  check_val_every_n_epoch=check_val_every_n_epoch, plan_kwargs=plan_kwargs,
                  seed=seed, progress_bar=progress_bar, on_nonfinite=on_nonfinite,
                  data_source=data_source,
                  labelled_idx=None if unlabelled_query else train_labelled,
                  val_labelled=None if unlabelled_query else lambda: self.validation_indices[
                      labels[self.validation_indices] < C], loss_terms=loss_terms,
                  loss_weights=loss_weights, extra_val_metrics=val_metrics,
                  default_plan={"objective": "seed", "classification_ratio": 50.0},
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                  resume=resume, devices=devices, data_shards=data_shards,
                  precision=precision)
        if not is_query:
            self.reference_stats = self._novelty_stats()

        val_lab = self.validation_indices[labels[self.validation_indices] < C]
        if calibrate and len(val_lab) >= 10:
            self.calibrate(indices=val_lab)
            if len(self._history):
                last = self._history.index[-1]
                self._history.loc[last, "temperature"] = self.temperature
                self._history.loc[last, "calibration_error_validation_calibrated"] = \
                    self.calibration["ece_after"]
        return self

    def _loss(self, *, train, plan, extra_terms, extra_weights):
        return partial(scanvi_elbo, self.module, train=train,
                       objective=plan.get("objective", "seed"),
                       classification_ratio=float(plan.get("classification_ratio", 50.0)),
                       sparse=plan.get("sparse_likelihood", True),
                       extra_terms=extra_terms, extra_weights=extra_weights,
                       replay=self._replay())

    def _replay(self):
        """Reference cell types to replay while a query learns new ones (or None)."""
        info = getattr(self, "query_info", None) or {}
        stats = self.reference_stats or {}
        if not info.get("new_labels") or "latent_means" not in stats:
            return None
        return (np.asarray(stats["latent_codes"], np.int32),
                np.asarray(stats["latent_means"], np.float32),
                np.asarray(stats["latent_sds"], np.float32))

    def _loss_key(self):
        r = self._replay()
        return None if r is None else tuple(a.tobytes() for a in r)

    # ------------------------------------------------------------ prediction
    def _logits(self, params, state, cells, indices, batch_size, use_posterior_mean
                ) -> np.ndarray:
        fn = _jitted(partial(_classify_fn, self.module,
                             use_posterior_mean=bool(use_posterior_mean)))
        saved = self.params, self.state
        self.params, self.state = params, state
        try:
            logits = self._map(fn, cells, indices, batch_size)
        finally:
            self.params, self.state = saved
        return np.asarray(logits, np.float64)

    def _probabilities(self, params, state, cells, indices, batch_size, use_posterior_mean,
                       temperature: float = 1.0):
        logits = self._logits(params, state, cells, indices, batch_size, use_posterior_mean)
        return _softmax(logits / temperature)

    # ----------------------------------------------------------- calibration
    def _labelled(self, adata, indices) -> tuple:
        """Cells, the labelled cells among ``indices`` (default: validation), their codes."""
        cells = self._cells_for(adata)
        C = self.registry.n_labels
        if indices is None:
            if adata is not None and adata is not self.adata:
                idx = np.arange(cells.n_obs)
            else:
                idx = self.validation_indices
        else:
            idx = np.asarray(indices)
            idx = np.flatnonzero(idx) if idx.dtype == bool else idx
        idx = idx[cells.labels[idx] < C]
        return cells, idx, cells.labels[idx]

    def calibrate(self, adata=None, indices=None, batch_size: int | None = None) -> dict:
        """Fit the temperature T of softmax(logits / T) on labelled cells.

        Default cells: the labelled validation cells (the ones training did
        not fit). T minimises their negative log-likelihood; it never changes
        which type is predicted, only how confident the probabilities are.
        Returns (and keeps in ``model.calibration``) T, the expected
        calibration error and the NLL before and after.
        """
        from scipy.optimize import minimize_scalar
        cells, idx, y = self._labelled(adata, indices)
        if len(idx) < 10:
            raise InputError("indices", f"{len(idx)} labelled cells", "too few labelled "
                             "cells to fit a temperature (10 or more needed)",
                             "train with validation cells that carry labels (train_size < 1) "
                             "or pass adata/indices with labelled cells")
        logits = self._logits(self.params, self.state, cells, idx, batch_size, True)

        def nll(log_t):
            z = logits / np.exp(log_t)
            z = z - z.max(1, keepdims=True)
            return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).mean())

        res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(50.0)), method="bounded",
                              options={"xatol": 1e-4})
        t = float(np.exp(res.x))
        before = _softmax(logits)
        self.temperature = t
        self.calibration = {
            "temperature": t, "n_cells": int(len(idx)),
            "nll_before": nll(0.0), "nll_after": float(res.fun),
            "ece_before": expected_calibration_error(before, y),
            "ece_after": expected_calibration_error(_softmax(logits / t), y)}
        return dict(self.calibration)

    def calibration_error(self, adata=None, indices=None, n_bins: int = 10,
                          batch_size: int | None = None) -> float:
        """Expected calibration error of ``predict(soft=True)`` on labelled cells
        (default: the labelled validation cells)."""
        cells, idx, y = self._labelled(adata, indices)
        if len(idx) == 0:
            raise InputError("indices", "no labelled cells", "the calibration error needs "
                             "cells with known labels", "pass adata/indices with labels")
        probs = self._probabilities(self.params, self.state, cells, idx, batch_size, True,
                                    self.temperature)
        return expected_calibration_error(probs, y, n_bins)

    # --------------------------------------------------------------- novelty
    def _unexplained(self, cells, indices, batch_size) -> np.ndarray:
        fn = _jitted(partial(_excess_fn, self.module))
        return np.asarray(self._map(fn, cells, indices, batch_size), np.float64)

    def _novelty_stats(self, quantile: float = 0.99) -> dict | None:
        """The ``quantile`` of the labelled training cells' residual scores (the
        level above which `novelty_score` calls a cell novel), and each type's
        latent mean and spread."""
        cells = self._train_cells()
        C = self.registry.n_labels
        idx = self.train_indices[cells.labels[self.train_indices] < C]
        if len(idx) < 10:
            return None
        scores = self._unexplained(cells, idx, None)
        z = np.asarray(self.get_latent_representation(indices=idx), np.float64)
        y = cells.labels[idx]
        codes = [c for c in range(C) if (y == c).sum() >= 2]
        return {"threshold": float(np.quantile(scores, quantile)), "quantile": quantile,
                "median": float(np.median(scores)),
                "statistic": "unexplained count fraction", "n_cells": int(len(idx)),
                # per-type latent moments: what a query adding types replays
                "latent_codes": codes,
                "latent_means": [z[y == c].mean(0).tolist() for c in codes],
                "latent_sds": [z[y == c].std(0).tolist() for c in codes]}

    def novelty_score(self, adata=None, indices=None, batch_size: int | None = None
                      ) -> np.ndarray:
        """How poorly the reference's cell types explain each cell; above 1 means novel.

        scANVI maps a cell of a type it never saw onto the nearest known
        type, confidently, so neither the latent space nor the classifier
        flags it. Its counts do: the decoder, given that latent position,
        under-predicts the novel type's own genes. The statistic is the
        fraction of the cell's counts the model leaves unexplained (the
        excess x - mu summed over genes with x > 3 mu + 3, mu the decoder's
        mean at the posterior mean of z), divided by the 99th percentile of
        the same statistic over the labelled reference cells at the end of
        reference training; a query model keeps its reference's threshold.
        A batch effect that surgery leaves unexplained raises every query
        cell's score: compare a type's flag rate with the query's overall rate.
        """
        if not self.reference_stats or "threshold" not in self.reference_stats:
            raise InputError("model", "no reference statistics", "novelty scores need a "
                             "model trained on labelled cells (or a query model built from "
                             "one)", "train the reference SCANVI first")
        scores = self._unexplained(self._cells_for(adata), indices, batch_size)
        return scores / self.reference_stats["threshold"]

    def get_normalized_expression(self, adata=None, indices=None, transform_batch=None,
                                  gene_list: Sequence[str] | None = None,
                                  library_size: float | str = 1, n_samples: int = 1,
                                  n_samples_overall: int | None = None,
                                  batch_size: int | None = None, return_mean: bool = True,
                                  return_numpy: bool | None = None, label: str | None = None):
        """As SCVI's, plus ``label``: decode each cell as if it were of that cell type.

        Through scANVI's hierarchy: u ~ q(u | z1, c0) with c0 the cell's known
        label (its prediction when unlabelled), then z1' = E p(z1 | u, label),
        then the count decoder. Without ``label`` the usual z1 is decoded.
        """
        self._label = None
        if label is not None:
            cats = list(self.registry.label_categories)
            if str(label) not in cats:
                raise InputError("label", label, f"is not a cell type of the model ({cats[:10]})",
                                 "pass one of model.registry.label_categories")
            self._label = cats.index(str(label))
        try:
            return super().get_normalized_expression(
                adata=adata, indices=indices, transform_batch=transform_batch,
                gene_list=gene_list, library_size=library_size, n_samples=n_samples,
                n_samples_overall=n_samples_overall, batch_size=batch_size,
                return_mean=return_mean, return_numpy=return_numpy)
        finally:
            self._label = None

    def _expression_kernel(self, **kw):
        target = getattr(self, "_label", None)
        if target is None:
            return super()._expression_kernel(**kw)
        return _jitted(partial(_label_expression_fn, self.module, target=target, **kw))

    def predict(self, adata=None, indices=None, soft: bool = False,
                batch_size: int | None = None, use_posterior_mean: bool = True,
                unassigned_threshold: float | None = None):
        """Predicted cell types (names), or with ``soft=True`` a DataFrame of
        calibrated probabilities (see `calibrate`), one column per cell type,
        rows summing to 1. With ``unassigned_threshold=p``, cells whose top
        probability is below p are predicted "Unassigned"."""
        if unassigned_threshold is not None:
            if soft:
                raise InputError("unassigned_threshold", unassigned_threshold,
                                 "applies to hard predictions only",
                                 "pass soft=False, or threshold the probabilities yourself")
            if not (isinstance(unassigned_threshold, (int, float))
                    and 0 <= unassigned_threshold <= 1):
                raise InputError("unassigned_threshold", unassigned_threshold,
                                 "must be a probability in [0, 1]",
                                 "pass e.g. unassigned_threshold=0.5")
        cells = self._cells_for(adata)
        probs = self._probabilities(self.params, self.state, cells, indices, batch_size,
                                    use_posterior_mean, self.temperature)
        names = np.asarray(self.registry.label_categories, dtype=object)
        if not soft:
            pred = names[probs.argmax(1)]
            if unassigned_threshold is not None:
                pred = np.where(probs.max(1) < unassigned_threshold, UNASSIGNED, pred)
            return pred
        idx = np.arange(cells.n_obs) if indices is None else np.asarray(indices)
        probs = probs / probs.sum(1, keepdims=True)
        return pd.DataFrame(probs, index=cells.obs_names[idx], columns=list(names))


UNASSIGNED = "Unassigned"


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _excess_fn(module, variables, batch, key):
    """Fraction of each cell's counts far above the model's expectation at the
    posterior mean of z: sum of (x - mu) over genes with x > 3 mu + 3, over sum x."""
    def run(mdl, b):
        inf = mdl.inference(b, train=False)
        z = inf["qz_m"]
        if mdl.config.latent_distribution == "ln":
            z = jax.nn.softmax(z, -1)
        lib = inf.get("ql_m", inf["library"])
        mu = jnp.exp(mdl.generative(z, lib, b, train=False)["log_mu"])
        excess = jnp.where(b.x > 3.0 * mu + 3.0, b.x - mu, 0.0).sum(-1)
        return excess / jnp.maximum(b.x.sum(-1), 1.0)

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def _classify_fn(module, variables, batch, key, *, use_posterior_mean):
    return module.apply(variables, batch, train=False, rngs={"sample": key},
                        use_posterior_mean=use_posterior_mean, method=SCANVAE.classify)


def _label_expression_fn(module, variables, batch, key, batch_code, *, target: int,
                         n_samples: int, latent_library: bool):
    def run(mdl, b):
        inf = mdl.inference(b, train=False, n_samples=n_samples)
        z1 = inf["z"]
        C = mdl.config.n_labels
        qz_m, _ = mdl.encode_z(b, train=False)
        pred = jnp.argmax(mdl.classifier(qz_m, train=False, mask=b.weight), -1)
        src = jnp.where(b.labels < C, b.labels, pred)
        flat = z1.reshape(-1, z1.shape[-1])
        reps = flat.shape[0] // src.shape[0]
        w = jnp.tile(b.weight, reps)
        m2, v2 = mdl.encoder_z2_z1(flat, (jnp.tile(src, reps),), train=False, mask=w)
        u = m2 + jnp.sqrt(v2) * jax.random.normal(mdl.make_rng("sample"), m2.shape)
        z1t, _ = mdl.decoder_z1_z2(u, (jnp.full(src.shape[0] * reps, target, jnp.int32),),
                                   train=False, mask=w)
        z1t = z1t.reshape(z1.shape)
        bidx = None if batch_code is None else jnp.full_like(b.batch, batch_code)
        gen = mdl.generative(z1t, inf["library"], b, train=False, batch_index=bidx)
        out = jnp.exp(gen["log_mu"] if latent_library else gen["log_scale"])
        return jnp.swapaxes(out, 0, 1) if out.ndim == 3 else out

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def _copy_shared(src: dict, dst: dict) -> dict:
    """dst with every leaf that also exists in src (same path and shape) taken from src."""
    out = {}
    for k, v in dst.items():
        if k in src and isinstance(v, dict) and isinstance(src[k], dict):
            out[k] = _copy_shared(src[k], v)
        elif k in src and not isinstance(v, dict) and np.shape(src[k]) == np.shape(v):
            out[k] = src[k]
        else:
            out[k] = v
    return out
