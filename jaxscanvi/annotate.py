"""The annotation workflow behind ``jaxscanvi annotate``: reference -> query labels.

HVG selection on the reference, scVI, scANVI, then scArches surgery on the
query (or joint training on both), then calibrated predictions, "Unassigned"
below a probability threshold, and a novelty flag, written to the query.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from .data.hvg import highly_variable_genes
from .errors import InputError
from .model._align import align_genes
from .model.scanvi import SCANVI, UNASSIGNED
from .model.scvi import SCVI


@dataclass
class AnnotateSettings:
    labels_key: str
    batch_key: str | None = None
    unlabeled: str = "Unknown"
    layer: str | None = None
    n_top_genes: int | None = 2000
    hvg_flavor: str = "seurat_v3"  # scanpy's flavour (jaxscanvi.data.hvg)
    mode: str = "surgery"  # or "joint"
    scvi_epochs: int | None = None
    scanvi_epochs: int | None = None
    query_epochs: int | None = None
    n_hidden: int = 128
    n_latent: int = 10
    batch_size: int = 128
    unassigned_threshold: float = 0.5
    seed: int = 0
    progress_bar: bool = True


def _check_inputs(ref, query, s: AnnotateSettings) -> None:
    if s.labels_key not in ref.obs.columns:
        raise InputError(
            "labels_key",
            s.labels_key,
            f"not a column of the reference's obs (columns: {list(ref.obs.columns)[:12]})",
            "pass --labels-key naming the reference's cell-type column",
        )
    for name, a in (("reference", ref), ("query", query)):
        if s.batch_key is not None and s.batch_key not in a.obs.columns:
            raise InputError(
                "batch_key",
                s.batch_key,
                f"not a column of the {name}'s obs",
                f"add it to the {name}, or leave --batch-key out",
            )
    if s.mode not in ("surgery", "joint"):
        raise InputError("mode", s.mode, "unknown mode", "pass 'surgery' or 'joint'")
    if not 0 <= s.unassigned_threshold <= 1:
        raise InputError(
            "unassigned_threshold",
            s.unassigned_threshold,
            "must be a probability in [0, 1]",
            "pass e.g. 0.5",
        )


def train_reference(ref, s: AnnotateSettings) -> SCANVI:
    """scVI then scANVI on the reference (genes already selected)."""
    SCVI.setup_anndata(ref, layer=s.layer, batch_key=s.batch_key, labels_key=s.labels_key)
    vae = SCVI(ref, n_hidden=s.n_hidden, n_latent=s.n_latent, seed=s.seed)
    # with few epochs set explicitly, scvi-tools' 400-epoch KL warm-up would never
    # finish; warm up over half of them so the latent space is regularised
    plan = None if s.scvi_epochs is None else {"n_epochs_kl_warmup": max(s.scvi_epochs // 2, 1)}
    vae.train(
        max_epochs=s.scvi_epochs,
        batch_size=s.batch_size,
        seed=s.seed,
        progress_bar=s.progress_bar,
        plan_kwargs=plan,
    )
    model = SCANVI.from_scvi_model(vae, unlabeled_category=s.unlabeled)
    model.train(
        max_epochs=s.scanvi_epochs,
        batch_size=s.batch_size,
        seed=s.seed,
        progress_bar=s.progress_bar,
    )
    return model


def map_query(query, reference: SCANVI, s: AnnotateSettings) -> SCANVI:
    """Surgery: a query model trained on the query alone (reference frozen)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        SCANVI.prepare_query_anndata(query, reference)
    if s.labels_key != reference.registry.labels_key:
        raise InputError(
            "labels_key",
            s.labels_key,
            f"differs from the reference model's ({reference.registry.labels_key!r})",
            "pass the labels key the reference was trained with",
        )
    model = SCANVI.load_query_data(query, reference)
    model.train(
        max_epochs=s.query_epochs,
        batch_size=s.batch_size,
        seed=s.seed,
        progress_bar=s.progress_bar,
        plan_kwargs={"weight_decay": 0.0},
    )
    return model


def write_predictions(adata, model: SCANVI, s: AnnotateSettings, prefix: str = "") -> None:
    """Predictions, calibrated probabilities, Unassigned, novelty and latent into adata."""
    probs = model.predict(adata, soft=True)
    assert isinstance(probs, pd.DataFrame)  # soft=True: one column per class
    top = probs.to_numpy().max(1)
    pred = np.asarray(probs.columns, dtype=object)[probs.to_numpy().argmax(1)]
    adata.obs[f"{prefix}prediction"] = pd.Categorical(pred)
    adata.obs[f"{prefix}prediction_probability"] = top
    adata.obs[f"{prefix}prediction_assigned"] = pd.Categorical(
        np.where(top < s.unassigned_threshold, UNASSIGNED, pred)
    )
    if model.reference_stats:
        novelty = model.novelty_score(adata)
        adata.obs[f"{prefix}novelty_score"] = novelty
        adata.obs[f"{prefix}is_novel"] = novelty > 1.0
    adata.obsm["X_scANVI"] = model.get_latent_representation(adata)
    adata.obsm["prediction_probabilities"] = probs.to_numpy()
    adata.uns["prediction_classes"] = list(probs.columns)


def annotate(reference, query, s: AnnotateSettings) -> tuple[ad.AnnData, SCANVI, SCANVI]:
    """(annotated query, query model, reference model). Inputs are not modified."""
    _check_inputs(reference, query, s)
    ref = reference.copy()
    if s.n_top_genes:
        ref = ref[
            :,
            highly_variable_genes(
                ref, s.n_top_genes, layer=s.layer, flavor=s.hvg_flavor, batch_key=s.batch_key
            ),
        ].copy()
    q = query.copy()
    if s.mode == "joint":
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            aligned = align_genes(q, pd.Index(ref.var_names.astype(str)), inplace=False)
        assert aligned is not None  # inplace=False returns the aligned copy
        q = aligned
        q.obs[s.labels_key] = s.unlabeled
        both = ad.concat([ref, q], label="_dataset", keys=["reference", "query"], index_unique="-")
        both.obs[s.labels_key] = both.obs[s.labels_key].astype(str)
        model = train_reference(both, s)
        out = both[both.obs["_dataset"] == "query"].copy()
        out.obs_names = query.obs_names
        out.uns.pop("_jaxscanvi_registry", None)
        write_predictions(out, model, s)
        return out, model, model
    ref_model = train_reference(ref, s)
    qmodel = map_query(q, ref_model, s)
    write_predictions(q, qmodel, s)
    return q, qmodel, ref_model
