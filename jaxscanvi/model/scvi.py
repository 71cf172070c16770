"""SCVI: the user-facing scVI model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

from .._settings import default_seed
from ..data.registry import Registry, registry_of
from ..data.registry import setup_anndata as _setup
from ..losses import scvi_elbo
from ..module import VAE, VAEConfig
from ..train.config import TrainConfig, max_epochs_heuristic
from ..train.fit import FitPlan
from . import _train_docs
from ._base import BaseModel


class SCVI(BaseModel):
    """scVI (Lopez et al. 2018) with scvi-tools' architecture and defaults.

    Examples
    --------
    >>> SCVI.setup_anndata(adata, layer="counts", batch_key="batch")  # doctest: +SKIP
    >>> model = SCVI(adata)                                          # doctest: +SKIP
    >>> model.train()                                                # doctest: +SKIP
    >>> adata.obsm["X_scVI"] = model.get_latent_representation()     # doctest: +SKIP
    """

    config_cls = VAEConfig

    @staticmethod
    def setup_anndata(
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        *,
        allow_noninteger_counts: bool = False,
    ) -> None:
        """Validate ``adata`` and record how to read it (stored in ``adata.uns``)."""
        _setup(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            allow_noninteger_counts=allow_noninteger_counts,
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
        *,
        seed: int | None = None,
        encoder=None,
        decoder=None,
        registry: Registry | None = None,
        _config: VAEConfig | None = None,
    ):
        seed = default_seed(seed)
        registry = registry if registry is not None else registry_of(adata)
        config = _config or VAEConfig(
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
        )
        self._build(adata, registry, VAE(config, encoder_cls=encoder, decoder_cls=decoder), seed)

    @classmethod
    def from_scvi_tools(cls, dir_path, adata=None) -> SCVI:
        """Load a folder written by scvi-tools' ``SCVI.save`` (``model.pt``).

        Every weight, batch-norm statistic, library prior and registry entry
        (category orders, keys, layer) is taken from the file, so the model
        gives scvi-tools' outputs (see the README's parity table). ``adata``
        defaults to the folder's ``adata.h5ad`` (else None: pass data to each
        call). ``SCVI.load`` does the same for such a folder. Needs no torch:
        the file is read through a whitelist that runs nothing in it, and
        scvi-tools < 0.15's ``model_params.pt``/``attr.pkl`` layout is read too.
        """
        from ._import import import_model

        return import_model(cls, dir_path, adata, "SCVI")

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices="auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool = False,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_config: dict | None = None,
        plan_kwargs: dict | None = None,
        datamodule=None,
        trainer_config: dict | None = None,
        *,
        early_stopping_patience: int = 45,
        early_stopping_monitor: str = "elbo_validation",
        check_val_every_n_epoch: int | None = None,
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
        **trainer_kwargs,
    ):
        # documented in _train_docs.SCVI_TRAIN: each argument reaches fit_plan by name
        return self._train(
            self.fit_plan(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                train_size=train_size,
                validation_size=validation_size,
                shuffle_set_split=shuffle_set_split,
                load_sparse_tensor=load_sparse_tensor,
                batch_size=batch_size,
                early_stopping=early_stopping,
                datasplitter_kwargs=datasplitter_kwargs,
                plan_config=plan_config,
                plan_kwargs=plan_kwargs,
                datamodule=datamodule,
                trainer_config=trainer_config,
                early_stopping_patience=early_stopping_patience,
                early_stopping_monitor=early_stopping_monitor,
                check_val_every_n_epoch=check_val_every_n_epoch,
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
                **trainer_kwargs,
            )
        )

    train.__doc__ = _train_docs.SCVI_TRAIN

    def _plan(self, arguments: dict) -> FitPlan:
        if arguments["max_epochs"] is None:
            arguments["max_epochs"] = max_epochs_heuristic(self._train_cells().n_obs)
        arguments["seed"] = default_seed(arguments["seed"])
        config = TrainConfig.from_arguments(arguments)
        make_loss = partial(_loss, self.module, config)
        return FitPlan(config, self._task(config, make_loss, ("scvi", self.module)))


def _loss(module, config: TrainConfig, *, train: bool):
    return partial(
        scvi_elbo,
        module,
        train=train,
        sparse=config.plan.get("sparse_likelihood", True),
        extra_terms=dict(config.loss_terms),
        extra_weights=dict(config.loss_weights),
    )
