"""SCANVI: semi-supervised annotation on top of scVI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd

from .._settings import default_seed
from ..data.registry import registry_of
from ..data.registry import setup_anndata as _setup
from ..errors import InputError, check_positive_int
from ..losses import scanvi_elbo
from ..module import SCANVAE, SCANVIConfig
from ..train.config import TrainConfig, max_epochs_heuristic
from ..train.fit import FitPlan
from ..train.history import History
from . import _calibration, _hierarchy, _kernels, _novelty, _posterior, _pretrained, _train_docs
from ._base import BaseModel
from ._calibration import expected_calibration_error, softmax
from ._inference import jitted, map_cells
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
    calibrate = _calibration.calibrate
    calibration_error = _calibration.calibration_error
    novelty_score = _novelty.novelty_score

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
        roots, a label missing from the map, a leaf no cell carries.
        """
        if labels_key is None:
            raise InputError(
                "labels_key",
                None,
                "scANVI needs a cell-type column",
                "pass labels_key naming the adata.obs column of labels",
            )
        if unlabeled_category is None:
            raise InputError(
                "unlabeled_category",
                None,
                "scANVI needs the value that marks unlabelled cells",
                "pass e.g. unlabeled_category='Unknown'",
            )
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
        if registry.unlabeled_category is None or registry.labels_key is None:
            raise InputError(
                "adata",
                "set up without unlabeled_category",
                "SCANVI needs labels_key and unlabeled_category",
                "call SCANVI.setup_anndata(adata, labels_key=..., unlabeled_category=...)",
            )
        if _config is None:
            cls_kw = _classifier_options(classifier_parameters)
            _config = SCANVIConfig(
                n_genes=registry.n_vars,
                n_batch=registry.n_batch,
                n_labels=registry.n_labels,
                n_cats_per_cov=registry.n_cats_per_cov,
                n_continuous_cov=registry.n_continuous_cov,
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
                use_size_factor_key=registry.size_factor_key is not None,
                classifier_n_hidden=cls_kw.get("n_hidden", 0 if linear_classifier else n_hidden),
                classifier_n_layers=cls_kw.get("n_layers", 0 if linear_classifier else n_layers),
                classifier_dropout_rate=cls_kw.get("dropout_rate", dropout_rate),
                classifier_use_batch_norm=cls_kw.get("use_batch_norm"),
                classifier_use_layer_norm=cls_kw.get("use_layer_norm"),
                y_prior=None if y_prior is None else tuple(float(p) for p in y_prior),
                class_chunk_size=class_chunk_size,
                label_parents=_hierarchy.parents_of(registry),
            )
        self._build(
            adata, registry, SCANVAE(_config, encoder_cls=encoder, decoder_cls=decoder), seed
        )
        self.was_pretrained = False
        self.temperature = 1.0
        self.calibration: dict = {}
        self.reference_stats: dict | None = None
        if adata is not None and _config is None:  # internal paths may lack labels
            self._check_labels()

    def _check_labels(self) -> None:
        labels = self._train_cells().labels
        C = self.registry.n_labels
        if self.registry.label_hierarchy and (labels != C).any():
            return  # every leaf has cells (setup_anndata checked)
        present = np.unique(labels[labels < C])
        if len(present) == 0:
            raise InputError(
                f"adata.obs[{self.registry.labels_key!r}]",
                "all unlabelled",
                "no cell carries a label",
                "label some cells of at least two types",
            )
        if len(present) < 2:
            raise InputError(
                f"adata.obs[{self.registry.labels_key!r}]",
                self.registry.label_categories[present[0]],
                "only one cell type is labelled",
                "label cells of at least two types",
            )

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
        self.calibration = dict(meta.get("calibration") or {})
        self.reference_stats = meta.get("reference_stats")

    def _metadata(self):
        return {
            "was_pretrained": self.was_pretrained,
            "temperature": self.temperature,
            "calibration": self.calibration,
            "reference_stats": self.reference_stats,
        }

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
        cells = self._train_cells()
        if arguments["max_epochs"] is None:
            max_epochs = max_epochs_heuristic(cells.n_obs)
            if self.was_pretrained:
                max_epochs = int(min(10, max(2, round(max_epochs / 3.0))))
            arguments["max_epochs"] = max_epochs
        check_positive_int("max_epochs", arguments["max_epochs"])
        arguments["seed"] = default_seed(arguments["seed"])
        n_per_label = arguments["n_samples_per_label"]
        check_positive_int("n_samples_per_label", n_per_label, allow_none=True)
        config = TrainConfig.from_arguments(
            arguments, default_plan={"objective": "seed", "classification_ratio": 50.0}
        )
        objective = config.plan.get("objective")
        if objective not in ("seed", "scvi-tools"):
            raise InputError(
                "plan_kwargs['objective']",
                objective,
                "unknown objective",
                "pass 'seed' (default) or 'scvi-tools'",
            )
        labels, C = cells.labels, self.registry.n_labels
        # an unlabelled query trains on the L_U bound alone
        unlabelled_query = self.query_info is not None and not (labels != C).any()
        replay = replay_of(self.query_info, self.reference_stats)
        hooks = {"val_metrics": partial(self._validation_metrics, cells)}
        if not unlabelled_query:
            hooks["labelled"] = partial(
                _labelled_training_cells, labels, C, n_per_label, config.train_size
            )
            hooks["val_labelled"] = partial(_labelled_among, labels, C)
        task = self._task(
            config,
            partial(_loss, self.module, config, replay),
            ("scanvi", self.module, replay_spec(replay)),
            **hooks,
        )
        return FitPlan(config, task, calibrate=bool(arguments["calibrate"]))

    def _after_fit(self, plan: FitPlan) -> None:
        """The reference's latent statistics, then calibration on the labelled
        validation cells (with ``train(calibrate=True)`` and at least ten)."""
        if self.query_info is None:
            self.reference_stats = _novelty.reference_statistics(self)
        labels, C = self._train_cells().labels, self.registry.n_labels
        val_lab = self.validation_indices[labels[self.validation_indices] < C]
        if plan.calibrate and len(val_lab) >= 10:
            self.calibrate(indices=val_lab)
            if self._history.n_epochs:
                frame = self._history.to_frame()
                last = frame.index[-1]
                frame.loc[last, "temperature"] = self.temperature
                frame.loc[last, "calibration_error_validation_calibrated"] = self.calibration[
                    "ece_after"
                ]
                self._adopt(history=History(frame))

    def _validation_metrics(self, cells, variables, val_idx, parallel) -> dict:
        """The classifier's loss, accuracy and calibration error on the labelled
        validation cells (extra history columns)."""
        C = self.registry.n_labels
        val_lab = val_idx[cells.labels[val_idx] < C]  # leaf-labelled cells
        if len(val_lab) == 0:
            return {}
        probs = softmax(self._logits(variables, cells, val_lab, None, parallel=parallel))
        y = cells.labels[val_lab]
        p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
        return {
            "classification_loss_validation_labelled": float(-np.log(p_true).mean()),
            "accuracy_validation_labelled": float((probs.argmax(1) == y).mean()),
            "calibration_error_validation": expected_calibration_error(probs, y),
        }

    # ------------------------------------------------------------ prediction
    def _logits(
        self,
        variables,
        cells,
        indices,
        batch_size,
        *,
        use_posterior_mean: bool = True,
        parallel=None,
    ) -> np.ndarray:
        """q(c|z)'s logits for the selected cells, under ``variables``."""
        if use_posterior_mean:  # the model's shared encoding program
            fn = jitted(partial(_kernels.encode_fn, self.module))
            out = map_cells(fn, variables, cells, indices, batch_size, parallel=parallel)
            return np.asarray(out["logits"], np.float64)
        fn = jitted(partial(_kernels.classify_fn, self.module, use_posterior_mean=False))
        return np.asarray(
            map_cells(fn, variables, cells, indices, batch_size, parallel=parallel), np.float64
        )

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
        kernel, kernel_kw = _kernels.expression_fn, {}
        if label is not None:
            cats = list(self.registry.label_categories)
            if str(label) not in cats:
                raise InputError(
                    "label",
                    label,
                    f"is not a cell type of the model ({cats[:10]})",
                    "pass one of model.registry.label_categories",
                )
            kernel, kernel_kw = _kernels.label_expression_fn, {"target": cats.index(str(label))}
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
        _hierarchy.check_level(self, level, threshold, soft, unassigned_threshold)
        if unassigned_threshold is not None:
            if soft:
                raise InputError(
                    "unassigned_threshold",
                    unassigned_threshold,
                    "applies to hard predictions only",
                    "pass soft=False, or threshold the probabilities yourself",
                )
            if not (
                isinstance(unassigned_threshold, (int, float)) and 0 <= unassigned_threshold <= 1
            ):
                raise InputError(
                    "unassigned_threshold",
                    unassigned_threshold,
                    "must be a probability in [0, 1]",
                    "pass e.g. unassigned_threshold=0.5",
                )
        cells = self._cells_for(adata)
        logits = self._logits(
            self.variables,
            cells,
            indices,
            batch_size,
            use_posterior_mean=use_posterior_mean,
            parallel=self._parallel,
        )
        probs = softmax(logits / self.temperature)
        names = np.asarray(self.registry.label_categories, dtype=object)
        idx = np.arange(cells.n_obs) if indices is None else np.asarray(indices)
        if level != "leaf":
            return _hierarchy.predict_level(
                self.registry, probs, level, threshold, cells.obs_names[idx]
            )
        if not soft:
            pred = names[probs.argmax(1)]
            if unassigned_threshold is not None:
                pred = np.where(probs.max(1) < unassigned_threshold, UNASSIGNED, pred)
            return pred
        probs = probs / probs.sum(1, keepdims=True)
        return pd.DataFrame(probs, index=cells.obs_names[idx], columns=list(names))


UNASSIGNED = "Unassigned"


def _classifier_options(classifier_parameters: dict | None) -> dict:
    """scvi-tools' ``classifier_parameters``, checked: the options our classifier has."""
    cls_kw = dict(classifier_parameters or {})
    allowed = {"n_hidden", "n_layers", "dropout_rate", "use_batch_norm", "use_layer_norm"}
    unknown = set(cls_kw) - allowed
    if unknown:
        raise InputError(
            "classifier_parameters",
            sorted(unknown),
            "unknown classifier options",
            f"use only {sorted(allowed)}",
        )
    return cls_kw


def _loss(module, config: TrainConfig, replay, *, train: bool):
    return partial(
        scanvi_elbo,
        module,
        train=train,
        objective=config.plan.get("objective"),
        classification_ratio=float(config.plan.get("classification_ratio")),
        sparse=config.plan.get("sparse_likelihood", True),
        extra_terms=dict(config.loss_terms),
        extra_weights=dict(config.loss_weights),
        replay=replay,
    )


def _labelled_among(labels: np.ndarray, n_labels: int, idx: np.ndarray) -> np.ndarray:
    # at a leaf (code < n_labels) or an inner node of a hierarchy (> n_labels)
    return idx[labels[idx] != n_labels]


def _labelled_training_cells(
    labels, n_labels: int, n_per_label: int | None, train_size, rng, *, train_idx: np.ndarray
) -> np.ndarray:
    """The labelled training cells an epoch pairs minibatches with: all of them, or
    a class-balanced draw of at most ``n_per_label`` per type."""
    lab = _labelled_among(labels, n_labels, train_idx)
    if len(lab) == 0:
        raise InputError(
            "train_size",
            train_size,
            "no labelled cell fell in the training split",
            "label more cells or raise train_size",
        )
    if n_per_label is None:
        return lab
    picks = []
    for c in np.unique(labels[lab]):  # leaves, and inner nodes of a hierarchy
        of_c = lab[labels[lab] == c]
        if len(of_c):
            picks.append(rng.choice(of_c, min(n_per_label, len(of_c)), replace=False))
    return np.sort(np.concatenate(picks))
