"""Label transfer on real PBMCs: jaxscanvi SCANVI (both objectives) vs scvi-tools.

Data: ``../shared/data/pbmc_3k_4k.h5ad`` (4,808 PBMCs, two 10x runs as the
batches, ``obs['cell_type']`` with B, CD4 T, CD8 T, NK, Mono/DC, Platelet and
Unknown). The script exits with a message, status 0, where the file is absent.

Per seed (``--seeds``):

1. genes: the top ``--n-hvg`` genes by variance of log-normalised counts
   (counts scaled to 10,000 per cell, log1p), computed once on all cells;
   the model sees the raw counts of those genes;
2. labels: within each cell type, ``--hide-fraction`` of the cells (rounded)
   drawn with ``numpy.random.default_rng(seed)`` lose their label ("Unknown").
   Cells labelled "Unknown" in the source stay unlabelled and are never
   scored. Types with fewer than ``--min-class-size`` cells (Platelet, 14
   cells, with the defaults) keep all their labels: they inform training but
   are not scored, since 70 % of 14 cells would give a 10-cell class a sixth
   of the balanced accuracy;
3. jaxscanvi: SCVI for ``--scvi-epochs``, then, for each objective
   (``plan_kwargs={"objective": "seed"}`` and ``{"objective": "scvi-tools"}``),
   ``SCANVI.from_scvi_model`` trained ``--scanvi-epochs`` from that same scVI;
4. scvi-tools (where importable): the same with ``scvi.model.SCVI`` /
   ``scvi.model.SCANVI`` on the same genes, labels, epochs, batch size and
   train_size, ``scvi.settings.seed = seed``.

Scores on the hidden cells: accuracy and balanced accuracy (mean per-class
recall over the classes present among them), per seed and mean +- sd over
seeds, and jaxscanvi minus scvi-tools in percentage points (paired by seed).

Architecture: n_hidden 128, n_latent 10, n_layers 1, ZINB (both libraries'
defaults). Default epochs are scvi-tools' heuristics for 4,808 cells: 400 for
scVI, 10 for scANVI after pretraining.

``--reference-to-query`` runs the other setting instead: a labelled
reference batch, an unlabelled query batch mapped by scArches surgery (see
``benchmarks/_ref_query.py``), scored by accuracy, balanced accuracy and
macro F1, with times.

Usage:
    python benchmarks/label_transfer.py                  # full run
    python benchmarks/label_transfer.py --reference-to-query --scvi-epochs 100
    python benchmarks/label_transfer.py --quick          # smoke run
    python benchmarks/label_transfer.py --scvi-epochs 200 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_smoke,
    format_table,
    have_scvi_tools,
    loadavg,
    machine_info,
    parser,
    usable_cores,
    versions,
    write_json,
)
from _label_transfer_runs import (
    ARCH,
    TRAIN_SIZE,
    UNKNOWN,
    earlier_runs,
    hide_labels,
    load_data,
    run_jaxscanvi,
    run_scvi_tools,
    seed_done,
    write_partial,
)
from _metrics import mean_sd

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "pbmc_3k_4k.h5ad"
DEFAULT_OUT = HERE / "results" / "label_transfer.json"


# -------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument(
        "--out",
        default=None,
        help=f"JSON results path (default {DEFAULT_OUT}, "
        "or label_transfer_quick.json beside it with --quick)",
    )
    p.add_argument("--labels-key", default="cell_type")
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--hide-fraction", type=float, default=0.7)
    p.add_argument(
        "--min-class-size",
        type=int,
        default=50,
        help="cell types with fewer cells keep all labels and are not scored",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scvi-epochs", type=int, default=400)
    p.add_argument("--scanvi-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--n-samples-per-label",
        type=int,
        default=None,
        help="scANVI's labelled cells per class per epoch (both libraries)",
    )
    p.add_argument(
        "--max-cells",
        type=int,
        default=None,
        help="random subsample of cells (fixed seed 0), for smoke runs",
    )
    p.add_argument(
        "--objectives", nargs="+", default=["seed", "scvi-tools"], choices=["seed", "scvi-tools"]
    )
    p.add_argument("--no-scvi-tools", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the seeds already in --out (or its .partial file, which "
        "is rewritten after every seed) and run only the others",
    )
    p.add_argument("--torch-threads", type=int, default=usable_cores())
    add_smoke(p, "smoke run: 1,500 cells, 300 genes, seed 0, 2 scVI + 1 scANVI epochs")
    p.add_argument(
        "--reference-to-query",
        action="store_true",
        help="reference batch -> query batch by surgery (see _ref_query.py)",
    )
    p.add_argument(
        "--query-epochs",
        type=int,
        default=100,
        help="query training epochs in --reference-to-query (100)",
    )
    return p


def _use_scvi_tools(args) -> bool:
    use_scvi = not args.no_scvi_tools and have_scvi_tools()
    if not args.no_scvi_tools and not use_scvi:
        print("scvi-tools (or torch) is not importable: skipping the comparison", file=sys.stderr)
    return use_scvi


def _print_run(r: dict) -> None:
    name = f"jaxscanvi[{r['objective']}]" if r["framework"] == "jaxscanvi" else "scvi-tools"
    print(
        f"  {name}: balanced acc {100 * r['balanced_accuracy']:.2f}, acc "
        f"{100 * r['accuracy']:.2f} (scVI {r['scvi_train_seconds']:.1f} s, scANVI "
        f"{r['scanvi_train_seconds']:.1f} s)",
        flush=True,
    )


def run_seeds(args, adata, truth, use_scvi: bool) -> tuple[list[dict], dict]:
    """Every seed not run already: its hidden labels, jaxscanvi, and scvi-tools."""
    runs, splits = earlier_runs(args), {}
    for seed in args.seeds:
        if seed_done(runs, seed, use_scvi):
            print(f"seed {seed}: in {args.out} already (--resume)", flush=True)
            continue
        labels, hidden, info = hide_labels(truth, args.hide_fraction, seed, args.min_class_size)
        args._labels = labels
        splits[seed] = {
            "per_class": info,
            "n_hidden": int(hidden.sum()),
            "n_labelled": int((labels != UNKNOWN).sum()),
        }
        print(
            f"seed {seed}: {hidden.sum()} hidden (scored), {splits[seed]['n_labelled']} labelled",
            flush=True,
        )
        for r in run_jaxscanvi(adata, seed, args, truth, hidden):
            runs.append(r)
            _print_run(r)
        if use_scvi:
            runs.append(run_scvi_tools(adata, seed, args, truth, hidden))
            _print_run(runs[-1])
        write_partial(args, runs)  # a long run keeps every finished seed
    del args._labels
    return runs, splits


def summarise(runs: list[dict], objectives, use_scvi: bool) -> list[dict]:
    """Mean and sd over seeds per method; jaxscanvi minus scvi-tools, paired by seed."""
    groups = [("jaxscanvi", o) for o in objectives]
    if use_scvi:
        groups.append(("scvi-tools", "scvi-tools"))
    by = {g: {r["seed"]: r for r in runs if (r["framework"], r["objective"]) == g} for g in groups}
    summary = []
    for g in groups:
        rs = by[g]
        row = {
            "framework": g[0],
            "objective": g[1],
            "balanced_accuracy": mean_sd([rs[s]["balanced_accuracy"] for s in rs]),
            "accuracy": mean_sd([rs[s]["accuracy"] for s in rs]),
            "per_seed": {
                s: {"balanced_accuracy": rs[s]["balanced_accuracy"], "accuracy": rs[s]["accuracy"]}
                for s in rs
            },
        }
        if use_scvi and g[0] == "jaxscanvi":
            ref = by[("scvi-tools", "scvi-tools")]
            common = [s for s in rs if s in ref]
            for m in ("balanced_accuracy", "accuracy"):
                row[f"{m}_minus_scvi_tools_points"] = {
                    **mean_sd([100 * (rs[s][m] - ref[s][m]) for s in common]),
                    "per_seed": {s: 100 * (rs[s][m] - ref[s][m]) for s in common},
                }
        summary.append(row)
    return summary


def _pm(d, scale=100):
    if d["mean"] is None:
        return "-"
    if d["sd"] is None:
        return f"{scale * d['mean']:.2f}"
    return f"{scale * d['mean']:.2f} ± {scale * d['sd']:.2f}"


def print_summary(seeds, summary: list[dict]) -> None:
    headers = [
        "method",
        *[f"BA s{s}" for s in seeds],
        "BA mean±sd",
        "acc mean±sd",
        "ΔBA pts",
        "Δacc pts",
    ]
    rows = []
    for row in summary:
        name = (
            row["framework"]
            if row["framework"] == "scvi-tools"
            else f"jaxscanvi[{row['objective']}]"
        )
        per = [
            None
            if s not in row["per_seed"]
            else f"{100 * row['per_seed'][s]['balanced_accuracy']:.2f}"
            for s in seeds
        ]
        d_ba = row.get("balanced_accuracy_minus_scvi_tools_points")
        d_acc = row.get("accuracy_minus_scvi_tools_points")
        rows.append(
            [
                name,
                *per,
                _pm(row["balanced_accuracy"]),
                _pm(row["accuracy"]),
                None if d_ba is None else _pm(d_ba, 1),
                None if d_acc is None else _pm(d_acc, 1),
            ]
        )
    print()
    print(
        f"hidden-label cells, {len(seeds)} seed(s); BA = balanced accuracy "
        f"(mean per-class recall), in %; Δ = jaxscanvi - scvi-tools, points, paired "
        f"by seed"
    )
    print(format_table(headers, rows))


def method(args) -> dict:
    return {
        "hvg": "top n_hvg by variance (ddof=1) of log1p(counts / total * 1e4), all cells",
        "labels": f"per class hide round({args.hide_fraction} * n) with "
        "default_rng(seed); classes < min_class_size keep all labels "
        "and are not scored; source 'Unknown' cells stay unlabelled "
        "and unscored",
        "scores": "on hidden cells; balanced accuracy = mean recall over the "
        "classes present among them",
    }


def _missing(data_path: Path) -> bool:
    if data_path.exists():
        return False
    print(
        f"label_transfer: {data_path} not found; nothing to do. It ships in "
        "../shared/data beside the project on developer machines; pass --data PATH.",
        file=sys.stderr,
    )
    return True


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.reference_to_query:
        from _ref_query import main_query

        return main_query(args, DEFAULT_OUT)
    if args.quick:
        args.n_hvg, args.seeds, args.scvi_epochs, args.scanvi_epochs = 300, [0], 2, 1
        args.max_cells = args.max_cells or 1500
    if args.out is None:
        args.out = str(
            DEFAULT_OUT.with_name("label_transfer_quick.json") if args.quick else DEFAULT_OUT
        )
    data_path = Path(args.data)
    if _missing(data_path):
        return 0
    use_scvi = _use_scvi_tools(args)
    t = time.perf_counter()
    adata, data_info = load_data(data_path, args.labels_key, args.n_hvg, args.max_cells)
    truth = adata.obs[args.labels_key].astype(str).to_numpy()
    print(
        f"data: {data_info['n_cells']} cells, top {data_info['n_hvg']} of "
        f"{data_info['n_genes_total']} genes by log-normalised variance "
        f"({time.perf_counter() - t:.1f} s); epochs scVI {args.scvi_epochs}, scANVI "
        f"{args.scanvi_epochs}; batch size {args.batch_size}; scvi-tools "
        f"{'yes' if use_scvi else 'no'}",
        flush=True,
    )
    runs, splits = run_seeds(args, adata, truth, use_scvi)
    summary = summarise(runs, args.objectives, use_scvi)
    print_summary(args.seeds, summary)
    meta = {
        "versions": versions(),
        "machine": machine_info(),
        "args": vars(args),
        "architecture": ARCH,
        "train_size": TRAIN_SIZE,
        "data": {**data_info, "path": str(data_path)},
        "splits": splits,
        "scvi_tools_compared": use_scvi,
        "method": method(args),
    }
    meta["machine"]["loadavg_at_end"] = loadavg()
    out = write_json(args.out, {**meta, "summary": summary, "runs": runs})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
