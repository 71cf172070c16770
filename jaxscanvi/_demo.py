"""``jaxscanvi demo``: the annotation workflow end to end on a simulated atlas.

Apart from ``cli.py`` so that the command line's own module stays about
reading arguments and files.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def _metrics(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    classes = np.unique(truth)
    recalls = [(pred[truth == c] == c).mean() for c in classes]
    return {"accuracy": float((truth == pred).mean()), "balanced_accuracy": float(np.mean(recalls))}


def demo(args) -> int:
    """Reference (3 batches, 11 types) -> query (a 4th batch with a 12th, novel type)."""
    from .annotate import annotate
    from .cli import _settings

    t0 = time.perf_counter()
    ref, query, qtruth = _simulate(args)
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
    assigned = _report(out_adata, ref_model, qtruth, args.novel_type, s.unassigned_threshold)
    if args.out:
        _write(Path(args.out), out_adata, qmodel, ref_model, qtruth, assigned)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def _simulate(args):
    """The reference without the novel type, and the unlabelled query with its truth."""
    import pandas as pd

    from . import synthetic_atlas

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
    return ref, query, qtruth


def _report(out_adata, ref_model, qtruth, novel, threshold) -> np.ndarray:
    """Print accuracy, calibration and novelty flags; return the assigned labels."""
    from .model.scanvi import expected_calibration_error

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
        f"Unassigned (p < {threshold})"
    )
    print(
        f"novelty: {int(flagged[~known].sum())} of {int((~known).sum())} {novel} cells "
        f"flagged novel ({flagged[~known].mean():.0%}), vs "
        f"{flagged[known].mean():.1%} of the other query cells"
    )
    return assigned


def _write(out: Path, out_adata, qmodel, ref_model, qtruth, assigned) -> None:
    """The annotated query with its truth, both models and, with matplotlib, two plots."""
    import pandas as pd

    from .cli import write_h5ad_atomic

    out.mkdir(parents=True, exist_ok=True)
    out_adata.obs["cell_type_truth"] = pd.Categorical(qtruth)
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


def add_demo_parser(sub) -> None:
    """The ``demo`` subcommand and its options."""
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
