"""SCANVI: semi-supervised annotation on top of scVI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal

import numpy as np

from .._settings import default_seed
from ..data.registry import registry_of
from ..data.registry import setup_anndata as _setup
from ..module import SCANVAE, SCANVIConfig
from ..train.fit import FitPlan
from . import (
    _calibration,
    _novelty,
    _posterior,
    _predict,
    _pretrained,
    _scanvi_args,
    _scanvi_train,
    _train_docs,
)
from ._base import BaseModel
from ._calibration import expected_calibration_error
from ._predict import UNASSIGNED
from ._replay import replay_of, replay_spec

__all__ = ["SCANVI", "UNASSIGNED", "expected_calibration_error"]


class SCANVI(BaseModel):
    """scANVI (Xu et al. 2021): scVI with a cell-type-structured latent prior.

    The default objective is the user guide's: labelled cells use L_S with
    their label, unlabelled cells L_U with the label marginalised, plus the
    classifier's cross-entropy times ``classification_ratio`` (50).
    ``plan_kwargs={"objective": "scvi-tools"}`` marginalises every cell
    instead, as scvi-tools does. ``get_elbo``, ``get_reconstruction_error``
    and ``get_marginal_ll`` always compute scvi-tools' scANVI quantities
    (every cell marginalised), whichever objective trained the model.
    """

    config_cls = SCANVIConfig

    @staticmethod
    def setup_anndata(
        adata,
        labels_key: str,
        unlabeled_category: str,
        layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        *,
        allow_noninteger_counts: bool = False,
        label_hierarchy: Mapping[str, str] | None = None,
    ) -> None:
        """Validate ``adata``; ``unlabeled_category`` marks cells without a label.

        ``label_hierarchy`` (child -> parent over label names, one root) lets
        cells carry labels at any depth: its leaves are the predicted types,
        and a cell labelled at an inner node is trained on the leaves under
        it (see the hierarchy guide). Refused before training: cycles, several
        roots, a label missing from the map, a leaf no cell carries. A flat
        hierarchy (every type under the root) trains exactly as flat labels.
        """
        _scanvi_args.check_setup_keys(labels_key, unlabeled_category)
        _setup(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            unlabeled_category=unlabeled_category,
            allow_noninteger_counts=allow_noninteger_counts,
            label_hierarchy=label_hierarchy,
        )

    def __init__(
        self,
        adata,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        use_observed_lib_size: bool = True,
        latent_distribution: Literal["normal", "ln"] = "normal",
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: Literal["encoder", "decoder", "none", "both"] = "both",
        use_layer_norm: Literal["encoder", "decoder", "none", "both"] = "none",
        linear_classifier: bool = False,
        y_prior: Sequence[float] | None = None,
        classifier_parameters: dict | None = None,
        *,
        seed: int | None = None,
        class_chunk_size: int = 64,
        encoder=None,
        decoder=None,
        registry=None,
        _config=None,
    ):
        seed = default_seed(seed)
        registry = registry if registry is not None else registry_of(adata)
        _scanvi_args.check_registry(registry)
        if _config is None:
            _config = _scanvi_args.config_of(
                registry,
                n_hidden=n_hidden,
                n_latent=n_latent,
                n_layers=n_layers,
                dropout_rate=dropout_rate,
                dispersion=dispersion,
                gene_likelihood=gene_likelihood,
                latent_distribution=latent_distribution,
                encode_covariates=encode_covariates,
                deeply_inject_covariates=deeply_inject_covariates,
                use_batch_norm=use_batch_norm,
                use_layer_norm=use_layer_norm,
                use_observed_lib_size=use_observed_lib_size,
                linear_classifier=linear_classifier,
                y_prior=y_prior,
                classifier_parameters=classifier_parameters,
                class_chunk_size=class_chunk_size,
            )
        module = SCANVAE(_config, encoder_cls=encoder, decoder_cls=decoder)
        self._build(adata, registry, module, seed)
        self._read_metadata({})  # not pretrained, temperature 1, no statistics
        if adata is not None and _config is None:  # internal paths may lack labels
            _scanvi_args.check_labels(self._train_cells().labels, self.registry)

    @classmethod
    def from_scvi_tools(cls, dir_path, adata=None) -> SCANVI:
        """Load a folder written by scvi-tools' ``SCANVI.save`` (``model.pt``).

        As `SCVI.from_scvi_tools`, plus the classifier, the class networks
        and the class prior. The unlabelled category is scvi-tools'; to train
        further as scvi-tools would, pass ``plan_kwargs={"objective":
        "scvi-tools"}``.
        """
        from ._import import import_model

        return import_model(cls, dir_path, adata, "SCANVI")

    def _read_metadata(self, meta: dict) -> None:
        self.was_pretrained = bool(meta.get("was_pretrained", False))
        self.temperature = float(meta.get("temperature", 1.0))
        self.calibration: dict = dict(meta.get("calibration") or {})
        self.reference_stats: dict | None = meta.get("reference_stats")

    def _metadata(self):
        names = ("was_pretrained", "temperature", "calibration", "reference_stats")
        return {k: getattr(self, k) for k in names}

    def _inherit_reference(self, reference_model) -> None:
        # a frozen encoder maps reference cells as before, so the reference's
        # calibration and latent statistics still describe them
        self.temperature = reference_model.temperature
        self.calibration = dict(reference_model.calibration)
        self.reference_stats = reference_model.reference_stats

    from_scvi_model = classmethod(_pretrained.from_scvi_model)

    def train(
        self,
        max_epochs: int | None = None,
        n_samples_per_label: int | None = None,
        check_val_every_n_epoch: int | None = None,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 128,
        accelerator: str = "auto",
        devices="auto",
        adversarial_classifier: bool | None = None,
        datasplitter_kwargs: dict | None = None,
        plan_config: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        trainer_config: dict | None = None,
        *,
        early_stopping: bool = False,
        early_stopping_patience: int = 45,
        early_stopping_monitor: str = "elbo_validation",
        seed: int | None = None,
        progress_bar: bool = True,
        on_nonfinite: Literal["raise", "skip_step"] = "raise",
        data_source: Literal["auto", "device", "host", "stream"] = "auto",
        loss_terms: dict | None = None,
        loss_weights: dict | None = None,
        checkpoint_dir=None,
        checkpoint_every: int = 1,
        resume: bool = False,
        data_shards: int | None = None,
        precision: Literal["float32", "bfloat16"] = "float32",
        calibrate: bool = True,
        **trainer_kwargs,
    ):
        # documented in _train_docs.SCANVI_TRAIN: each argument reaches fit_plan by name
        return self._train(
            self.fit_plan(
                max_epochs=max_epochs,
                n_samples_per_label=n_samples_per_label,
                check_val_every_n_epoch=check_val_every_n_epoch,
                train_size=train_size,
                validation_size=validation_size,
                shuffle_set_split=shuffle_set_split,
                batch_size=batch_size,
                accelerator=accelerator,
                devices=devices,
                adversarial_classifier=adversarial_classifier,
                datasplitter_kwargs=datasplitter_kwargs,
                plan_config=plan_config,
                plan_kwargs=plan_kwargs,
                datamodule=datamodule,
                trainer_config=trainer_config,
                early_stopping=early_stopping,
                early_stopping_patience=early_stopping_patience,
                early_stopping_monitor=early_stopping_monitor,
                seed=seed,
                progress_bar=progress_bar,
                on_nonfinite=on_nonfinite,
                data_source=data_source,
                loss_terms=loss_terms,
                loss_weights=loss_weights,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=checkpoint_every,
                resume=resume,
                data_shards=data_shards,
                precision=precision,
                calibrate=calibrate,
                **trainer_kwargs,
            )
        )

    train.__doc__ = _train_docs.SCANVI_TRAIN

    def _plan(self, arguments: dict) -> FitPlan:
        cells, C = self._train_cells(), self.registry.n_labels
        config = _scanvi_train.train_config(
            arguments, cells.n_obs, was_pretrained=self.was_pretrained
        )
        # an unlabelled query trains on the L_U bound alone
        labelled = self.query_info is None or (cells.labels != C).any()
        n_per = arguments["n_samples_per_label"]
        hooks = _scanvi_train.task_hooks(self.module, cells, C, config, n_per, labelled=labelled)
        replay = replay_of(self.query_info, self.reference_stats)
        task = self._task(
            config,
            partial(_scanvi_train.loss, self.module, config, replay),
            ("scanvi", self.module, replay_spec(replay)),
            **hooks,
        )
        return FitPlan(config, task, calibrate=bool(arguments["calibrate"]))

    def _after_fit(self, plan: FitPlan) -> None:
        """The reference's latent statistics, then calibration on the labelled
        validation cells (with ``train(calibrate=True)`` and at least ten)."""
        if self.query_info is None:
            self.reference_stats = _novelty.reference_statistics(self)
        val_lab = _calibration.labelled_cells(self, None, None)[1]  # of the validation cells
        if plan.calibrate and len(val_lab) >= 10:
            self.calibrate(indices=val_lab)
            if self._history.n_epochs:
                history = _calibration.with_calibration(self._history, self.calibration)
                self._adopt(history=history)

    # ------------------------------------------------------------ prediction
    def calibrate(self, adata=None, indices=None, batch_size: int | None = None) -> dict:
        """Fit the temperature T of softmax(logits / T) on labelled cells.

        Default cells: the labelled validation cells (the ones training did
        not fit). T minimises their negative log-likelihood; it never changes
        which type is predicted, only how confident the probabilities are.
        Returns (and keeps in ``model.calibration``) T, the expected
        calibration error and the NLL before and after.
        """
        calibration = _calibration.temperature_fit(self, adata, indices, batch_size)
        self.calibration, self.temperature = calibration, calibration["temperature"]
        return dict(self.calibration)

    def calibration_error(
        self, adata=None, indices=None, n_bins: int = 10, batch_size: int | None = None
    ) -> float:
        """Expected calibration error of ``predict(soft=True)`` on labelled cells
        (default: the labelled validation cells)."""
        return _calibration.labelled_error(self, adata, indices, n_bins, batch_size)

    def novelty_score(self, adata=None, indices=None, batch_size: int | None = None) -> np.ndarray:
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
        return _novelty.novelty_scores(self, adata, indices, batch_size)

    def _logits(self, variables, cells, indices, batch_size, **options) -> np.ndarray:
        """q(c|z)'s logits for the selected cells, under ``variables`` (`_predict.logits`)."""
        return _predict.logits(self.module, variables, cells, indices, batch_size, **options)

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
        label: str | None = None,
        silent: bool = True,
        **importance_weighting_kwargs,
    ):
        """As SCVI's, plus ``label``: decode each cell as if it were of that cell type.

        Through scANVI's hierarchy: u ~ q(u | z1, c0) with c0 the cell's known
        label (its prediction when unlabelled), then z1' = E p(z1 | u, label),
        then the count decoder. Without ``label`` the usual z1 is decoded.
        """
        kernel, kernel_kw = _predict.expression_kernel(self.registry, label)
        return _posterior.normalized_expression(
            self,
            kernel,
            kernel_kw,
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
                label=label,
                importance_weighting_kwargs=importance_weighting_kwargs,
            ),
        )

    def predict(
        self,
        adata=None,
        indices=None,
        soft: bool = False,
        batch_size: int | None = None,
        use_posterior_mean: bool = True,
        unassigned_threshold: float | None = None,
        level: Literal["leaf", "deepest", "all"] | int = "leaf",
        threshold: float | None = None,
    ):
        """Predicted cell types (names), or with ``soft=True`` a DataFrame of
        calibrated probabilities (see `calibrate`), one column per cell type,
        rows summing to 1. With ``unassigned_threshold=p``, cells whose top
        probability is below p are predicted "Unassigned".

        With a label hierarchy: ``level="deepest", threshold=p`` gives a
        DataFrame of each cell's deepest node whose probability (summed over
        the leaves under it) is at least p, with that probability and depth;
        ``soft=True, level="all"`` the probability of every node; ``level=d``
        (an int) the most probable node at depth d (1: the root's children;
        leaves shallower than d count as themselves).
        """
        _predict.check_options(
            self, level, threshold, soft=soft, unassigned_threshold=unassigned_threshold
        )
        probs, names = _predict.probabilities(
            self, adata, indices, batch_size, use_posterior_mean=use_posterior_mean
        )
        return _predict.predictions(
            self.registry,
            probs,
            names,
            soft=soft,
            level=level,
            threshold=threshold,
            unassigned_threshold=unassigned_threshold,
        )
