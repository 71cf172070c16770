"""The ``jaxscanvi`` command line: annotate, train, predict, demo.

Each command prints one line ``jaxscanvi <command>: error: <reason>`` and
exits with status 2 on bad input, before any training starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def _metrics(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    classes = np.unique(truth)
    recalls = [(pred[truth == c] == c).mean() for c in classes]
    return {"accuracy": float((truth == pred).mean()), "balanced_accuracy": float(np.mean(recalls))}


def _read(path: str, what: str):
    import anndata as ad

    from .errors import InputError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"--{what} {path}: no such file. Fix: pass the path of an .h5ad file"
        )
    try:
        return ad.read_h5ad(p)
    except Exception as e:  # noqa: BLE001 (h5py and anndata raise many kinds on bad files)
        raise InputError(
            f"--{what}",
            path,
            f"not a readable .h5ad file ({type(e).__name__}: {' '.join(str(e).split())[:160]})",
            "pass an .h5ad written by "
            "anndata (adata.write_h5ad), and check that it was copied whole",
        ) from None


def write_h5ad_atomic(adata, path) -> None:
    """Write next to the target, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".h5ad", dir=path.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _settings(args, **over):
    from .annotate import AnnotateSettings

    g = vars(args).get
    kw: dict[str, Any] = dict(  # argparse's values: typed by the parser, not here
        labels_key=g("labels_key"),
        batch_key=g("batch_key"),
        unlabeled=g("unlabeled", "Unknown"),
        layer=g("layer"),
        n_top_genes=g("n_top_genes") or None,
        hvg_flavor=g("hvg_flavor") or "seurat_v3",
        scvi_epochs=args.scvi_epochs,
        scanvi_epochs=args.scanvi_epochs,
        query_epochs=getattr(args, "query_epochs", None),
        n_latent=args.n_latent,
        n_hidden=args.n_hidden,
        batch_size=args.batch_size,
        unassigned_threshold=getattr(args, "unassigned_threshold", 0.5),
        mode=getattr(args, "mode", "surgery"),
        seed=args.seed,
        progress_bar=not args.quiet,
    )
    kw.update(over)
    return AnnotateSettings(**kw)


def _model_dir(args, out: Path) -> Path:
    return Path(args.model_dir) if args.model_dir else out.with_name(out.stem + "_model")


def _summary(adata) -> str:
    n = adata.n_obs
    un = int((adata.obs["prediction_assigned"].astype(str) == "Unassigned").sum())
    nov = int(adata.obs["is_novel"].sum()) if "is_novel" in adata.obs else 0
    return f"{n} cells annotated; {un} Unassigned; {nov} flagged novel"


def cmd_annotate(args) -> int:
    from .annotate import annotate

    t0 = time.perf_counter()
    out = Path(args.out)
    ref, query = _read(args.reference, "reference"), _read(args.query, "query")
    annotated, qmodel, _ = annotate(ref, query, _settings(args))
    write_h5ad_atomic(annotated, out)
    mdir = _model_dir(args, out)
    qmodel.save(mdir, overwrite=True)
    print(f"{_summary(annotated)}; wrote {out} and {mdir} in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_train(args) -> int:
    from .annotate import train_reference
    from .data.hvg import highly_variable_genes
    from .model.scvi import SCVI

    adata = _read(args.adata, "adata")
    if args.n_top_genes:
        adata = adata[
            :,
            highly_variable_genes(
                adata,
                args.n_top_genes,
                layer=args.layer,
                batch_key=args.batch_key,
                flavor=args.hvg_flavor,
            ),
        ].copy()
    s = _settings(args)
    if args.labels_key is None:
        SCVI.setup_anndata(adata, layer=args.layer, batch_key=args.batch_key)
        model = SCVI(adata, n_hidden=args.n_hidden, n_latent=args.n_latent, seed=args.seed)
        model.train(
            max_epochs=args.scvi_epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            progress_bar=not args.quiet,
        )
        key = "X_scVI"
    else:
        model = train_reference(adata, s)
        key = "X_scANVI"
    model.save(args.model_dir, overwrite=True)
    msg = f"trained {type(model).__name__} on {adata.n_obs} cells; saved {args.model_dir}"
    if args.out:
        adata.obsm[key] = model.get_latent_representation()
        write_h5ad_atomic(adata, args.out)
        msg += f" and {args.out}"
    print(msg)
    return 0


def cmd_predict(args) -> int:
    from .annotate import AnnotateSettings, map_query, write_predictions
    from .model.scanvi import SCANVI

    adata = _read(args.adata, "adata")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        SCANVI.prepare_query_anndata(adata, args.model_dir)
    model = SCANVI.load(args.model_dir, adata=adata)
    r = model.registry
    s = AnnotateSettings(
        labels_key=r.labels_key,
        batch_key=r.batch_key,
        unlabeled=r.unlabeled_category,
        layer=r.layer,
        query_epochs=args.query_epochs,
        batch_size=args.batch_size,
        unassigned_threshold=args.unassigned_threshold,
        seed=args.seed,
        progress_bar=not args.quiet,
    )
    known = True
    if r.batch_key is not None and r.batch_key in adata.obs:
        known = set(adata.obs[r.batch_key].astype(str)) <= set(r.batch_categories)
    if not known:  # unseen batches: scArches surgery first
        model = map_query(adata, model, s)
    write_predictions(adata, model, s)
    write_h5ad_atomic(adata, args.out)
    print(
        f"{_summary(adata)}{'' if known else ' (after surgery for new batches)'}; wrote {args.out}"
    )
    return 0


def demo(args) -> int:
    """Reference (3 batches, 11 types) -> query (a 4th batch with a 12th, novel type)."""
    import pandas as pd

    from . import synthetic_atlas
    from .annotate import annotate
    from .model.scanvi import expected_calibration_error

    t0 = time.perf_counter()
    adata = synthetic_atlas(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_batches=4,
        n_lineages=4,
        types_per_lineage=3,
        seed=args.seed,
        marker_lfc=args.marker_lfc,
        batch_effect=args.batch_effect,
    )
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    novel = args.novel_type
    is_query = (adata.obs["batch"] == "batch3").to_numpy()
    ref = adata[~is_query & (truth != novel)].copy()
    query = adata[is_query].copy()
    qtruth = truth[is_query]
    assert isinstance(query.obs, pd.DataFrame)  # anndata types obs loosely; in memory here
    del query.obs["cell_type"]
    print(
        f"synthetic atlas, {adata.n_vars} genes, 12 cell types in 4 lineages: reference "
        f"{ref.n_obs} cells in 3 batches without {novel}; query {query.n_obs} cells in a "
        f"4th batch, unlabelled, {int((qtruth == novel).sum())} of them {novel}"
    )
    s = _settings(
        args,
        labels_key="cell_type",
        batch_key="batch",
        unlabeled="Unknown",
        layer=None,
        n_top_genes=None,
        query_epochs=args.query_epochs,
        mode="surgery",
    )
    out_adata, qmodel, ref_model = annotate(ref, query, s)
    obs = out_adata.obs
    pred = obs["prediction"].astype(str).to_numpy()
    known = qtruth != novel
    m = _metrics(qtruth[known], pred[known])
    probs = np.asarray(out_adata.obsm["prediction_probabilities"])
    classes = list(out_adata.uns["prediction_classes"])
    codes = np.asarray([classes.index(t) for t in qtruth[known]])
    ece = expected_calibration_error(probs[known], codes)
    flagged = obs["is_novel"].to_numpy()
    assigned = obs["prediction_assigned"].astype(str).to_numpy()
    print(
        f"reference model: temperature {ref_model.temperature:.2f}, validation calibration "
        f"error {ref_model.calibration.get('ece_before', float('nan')):.3f} -> "
        f"{ref_model.calibration.get('ece_after', float('nan')):.3f}"
    )
    print(
        f"query, {int(known.sum())} cells of reference types: accuracy "
        f"{m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}, "
        f"calibration error {ece:.3f}, {int((assigned[known] == 'Unassigned').sum())} "
        f"Unassigned (p < {s.unassigned_threshold})"
    )
    print(
        f"novelty: {int(flagged[~known].sum())} of {int((~known).sum())} {novel} cells "
        f"flagged novel ({flagged[~known].mean():.0%}), vs "
        f"{flagged[known].mean():.1%} of the other query cells"
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        obs["cell_type_truth"] = pd.Categorical(qtruth)
        write_h5ad_atomic(out_adata, out / "query_annotated.h5ad")
        qmodel.save(out / "query_model", overwrite=True)
        ref_model.save(out / "reference_model", overwrite=True)
        wrote = [out / "query_annotated.h5ad", out / "query_model", out / "reference_model"]
        try:
            import matplotlib

            matplotlib.use("Agg")
            from . import pl

            pl.history(ref_model, save=out / "history.png")
            pl.confusion_matrix(qtruth, assigned, save=out / "confusion_matrix.png")
            wrote += [out / "history.png", out / "confusion_matrix.png"]
        except ImportError:
            print(
                "(plots skipped: pip install 'jaxscanvi[plot]' for history.png and "
                "confusion_matrix.png)"
            )
        print("wrote " + ", ".join(str(w) for w in wrote))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def _common(p, *, labels_required: bool) -> None:
    p.add_argument(
        "--labels-key",
        required=labels_required,
        default=None,
        help="obs column with cell types"
        + ("" if labels_required else " (omit to train scVI only)"),
    )
    p.add_argument("--batch-key", default=None, help="obs column with batches (optional)")
    p.add_argument(
        "--unlabeled",
        default="Unknown",
        help="label value that marks cells without a label (default Unknown)",
    )
    p.add_argument("--layer", default=None, help="layer holding raw counts (default X)")
    p.add_argument(
        "--n-top-genes",
        type=int,
        default=2000,
        help="highly variable genes to keep, chosen on the reference (0 keeps all; default 2000)",
    )
    p.add_argument(
        "--hvg-flavor",
        default="seurat_v3",
        choices=["seurat_v3", "seurat", "variance"],
        help="how genes are chosen: scanpy's seurat_v3 on counts (default, as "
        "scvi-tools' tutorials), scanpy's seurat on log-normalised X, or the "
        "variance of log-normalised counts",
    )
    p.add_argument(
        "--scvi-epochs",
        type=int,
        default=None,
        help="scVI epochs (default: scvi-tools' heuristic from the cell count; "
        "when set, the KL weight warms up over half of them)",
    )
    p.add_argument(
        "--scanvi-epochs",
        type=int,
        default=None,
        help="scANVI epochs (default: scvi-tools' heuristic after pretraining)",
    )
    p.add_argument("--n-latent", type=int, default=10, help="latent dimensions (10)")
    p.add_argument("--n-hidden", type=int, default=128, help="hidden units per layer (128)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size (128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxscanvi",
        description="scVI and scANVI in JAX: "
        "integrate single-cell atlases and annotate cell types.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser(
        "annotate",
        help="label a query from a labelled reference",
        description="Select genes on the reference, train scVI then scANVI "
        "on it, map the query by scArches surgery (or train jointly), and "
        "write predictions, calibrated probabilities, Unassigned calls, a "
        "novelty flag and the latent space to the query.",
    )
    a.add_argument("--reference", required=True, help="reference .h5ad (raw counts)")
    a.add_argument("--query", required=True, help="query .h5ad (raw counts)")
    _common(a, labels_required=True)
    a.add_argument(
        "--mode",
        choices=("surgery", "joint"),
        default="surgery",
        help="surgery: train on the reference, then the query alone with the "
        "reference frozen (default); joint: one model on both",
    )
    a.add_argument(
        "--query-epochs",
        type=int,
        default=None,
        help="query training epochs in surgery mode (default: heuristic)",
    )
    a.add_argument(
        "--unassigned-threshold",
        type=float,
        default=0.5,
        help="top probability below which a cell is 'Unassigned' (0.5)",
    )
    a.add_argument("--out", required=True, help="annotated query .h5ad to write")
    a.add_argument(
        "--model-dir", default=None, help="folder for the query model (default: <out>_model)"
    )
    a.set_defaults(func=cmd_annotate)

    t = sub.add_parser(
        "train",
        help="train scVI (and scANVI with --labels-key), save it",
        description="Train on one AnnData and save the model folder.",
    )
    t.add_argument("--adata", required=True, help=".h5ad with raw counts")
    _common(t, labels_required=False)
    t.add_argument("--model-dir", required=True, help="folder to save the model in")
    t.add_argument("--out", default=None, help="also write the .h5ad with the latent space")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser(
        "predict",
        help="predict cell types with a saved scANVI model",
        description="Align genes to the model, run surgery when the data "
        "has batches the model has not seen, and write predictions.",
    )
    r.add_argument("--model-dir", required=True, help="folder of a saved SCANVI model")
    r.add_argument("--adata", required=True, help=".h5ad with raw counts")
    r.add_argument("--out", required=True, help="annotated .h5ad to write")
    r.add_argument(
        "--query-epochs",
        type=int,
        default=None,
        help="surgery epochs when batches are new (default: heuristic)",
    )
    r.add_argument(
        "--unassigned-threshold",
        type=float,
        default=0.5,
        help="top probability below which a cell is 'Unassigned' (0.5)",
    )
    r.add_argument("--batch-size", type=int, default=128, help="minibatch size (128)")
    r.add_argument("--seed", type=int, default=0, help="random seed (0)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_predict)

    d = sub.add_parser(
        "demo",
        help="annotate a simulated query from a simulated reference (a few minutes on 2 CPU cores)",
        description="Simulate a 12-type atlas in 4 batches; train on 3 "
        "batches without one type, map the 4th by surgery, and report "
        "accuracy, calibration and novelty flags; write plots.",
    )
    d.add_argument("--n-cells", type=int, default=5000, help="cells to simulate (5000)")
    d.add_argument("--n-genes", type=int, default=1000, help="genes to simulate (1000)")
    d.add_argument(
        "--marker-lfc",
        type=float,
        default=1.5,
        help="log fold change of marker genes: lower is harder (1.5)",
    )
    d.add_argument(
        "--batch-effect",
        type=float,
        default=0.25,
        help="sd of per-gene log batch effects: higher is harder (0.25)",
    )
    d.add_argument("--novel-type", default="L3_T2", help="type left out of the reference (L3_T2)")
    d.add_argument("--scvi-epochs", type=int, default=60, help="scVI epochs (60)")
    d.add_argument("--scanvi-epochs", type=int, default=15, help="scANVI epochs (15)")
    d.add_argument("--query-epochs", type=int, default=40, help="query epochs (40)")
    d.add_argument("--n-latent", type=int, default=10, help="latent dimensions (10)")
    d.add_argument("--n-hidden", type=int, default=128, help="hidden units (128)")
    d.add_argument("--batch-size", type=int, default=128, help="minibatch size (128)")
    d.add_argument("--seed", type=int, default=0, help="random seed (0)")
    d.add_argument(
        "--out",
        default="jaxscanvi_demo",
        help="folder for the annotated query, models and plots ('' for none)",
    )
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        msg = " ".join(str(e).split())
        print(f"jaxscanvi {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
