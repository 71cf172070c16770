"""The ``jaxscanvi`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _metrics(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    classes = np.unique(truth)
    recalls = [(pred[truth == c] == c).mean() for c in classes]
    return {"accuracy": float((truth == pred).mean()),
            "balanced_accuracy": float(np.mean(recalls))}


def batch_entropy(z: np.ndarray, batches: np.ndarray, k: int = 15,
                  max_cells: int = 2000, seed: int = 0) -> float:
    """Mean entropy of batch labels among each cell's k nearest latent neighbours,
    divided by log(n_batches): 1 = perfectly mixed, 0 = separated."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(z), min(max_cells, len(z)), replace=False)
    zs = z[idx]
    d = ((zs[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    d[np.arange(len(idx)), idx] = np.inf
    nn = np.argpartition(d, k, axis=1)[:, :k]
    cats, codes = np.unique(batches, return_inverse=True)
    if len(cats) < 2:
        return 1.0
    counts = np.stack([(codes[nn] == c).sum(1) for c in range(len(cats))], 1) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(np.where(counts > 0, counts * np.log(counts), 0.0)).sum(1)
    return float(ent.mean() / np.log(len(cats)))


def demo(args) -> int:
    from . import SCANVI, SCVI, synthetic_atlas
    t0 = time.perf_counter()
    adata = synthetic_atlas(n_cells=args.n_cells, n_genes=args.n_genes, n_batches=3,
                            n_lineages=4, types_per_lineage=3, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    hidden = rng.random(adata.n_obs) < args.hide_fraction
    adata.obs["label"] = np.where(hidden, "Unknown", truth)
    print(f"synthetic atlas: {adata.n_obs} cells x {adata.n_vars} genes, 3 batches, "
          f"12 cell types; {hidden.sum()} labels hidden")
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="label")
    vae = SCVI(adata, seed=args.seed)
    # scvi-tools warms the KL weight up over 400 epochs; the demo trains fewer, so it
    # warms up over half of its epochs to reach a well-regularised latent space.
    vae.train(max_epochs=args.scvi_epochs, progress_bar=not args.quiet, seed=args.seed,
              plan_kwargs={"n_epochs_kl_warmup": max(args.scvi_epochs // 2, 1)})
    z = vae.get_latent_representation()
    print(f"scVI: {args.scvi_epochs} epochs, ELBO {vae.get_elbo():.1f}, batch mixing "
          f"(kNN batch entropy, 1 = mixed) {batch_entropy(z, adata.obs['batch'].to_numpy()):.3f}")
    lvae = SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    lvae.train(max_epochs=args.scanvi_epochs, progress_bar=not args.quiet, seed=args.seed,
               check_val_every_n_epoch=1)
    pred = lvae.predict()
    probs = lvae.predict(soft=True)
    m = _metrics(truth[hidden], pred[hidden])
    from .model.scanvi import expected_calibration_error
    codes = np.asarray([list(probs.columns).index(t) for t in truth[hidden]])
    ece = expected_calibration_error(probs.to_numpy()[hidden], codes)
    print(f"scANVI: {args.scanvi_epochs} epochs; on the {hidden.sum()} hidden cells accuracy "
          f"{m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}, "
          f"calibration error {ece:.3f}")
    adata.obsm["X_scANVI"] = lvae.get_latent_representation()
    adata.obs["prediction"] = pred
    adata.obs["prediction_probability"] = probs.to_numpy().max(1)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(out / "demo_annotated.h5ad")
        lvae.save(out / "scanvi_model", overwrite=True)
        print(f"wrote {out / 'demo_annotated.h5ad'} and {out / 'scanvi_model'}")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxscanvi", description="scVI and scANVI in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="integrate and annotate a simulated atlas (a few "
                       "minutes on 2 CPU cores)")
    d.add_argument("--n-cells", type=int, default=4000, help="cells to simulate")
    d.add_argument("--n-genes", type=int, default=1000, help="genes to simulate")
    d.add_argument("--scvi-epochs", type=int, default=60, help="scVI training epochs")
    d.add_argument("--scanvi-epochs", type=int, default=15, help="scANVI training epochs")
    d.add_argument("--hide-fraction", type=float, default=0.7,
                   help="fraction of cell labels hidden from the model")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--out", default="jaxscanvi_demo",
                   help="folder for the annotated .h5ad and the saved model ('' for none)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxscanvi {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
