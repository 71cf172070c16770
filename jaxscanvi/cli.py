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

from ._demo import add_demo_parser
from ._demo import demo as demo  # re-exported: jaxscanvi.cli.demo


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
    _add_annotate_parser(sub)
    _add_train_parser(sub)
    _add_predict_parser(sub)
    add_demo_parser(sub)
    return p


def _add_annotate_parser(sub) -> None:
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


def _add_train_parser(sub) -> None:
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


def _add_predict_parser(sub) -> None:
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
