"""Integration, batch mixing (MMD) and parity figures. Drawn by benchmarks/plots.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _plots_common import (
    GREY,
    JAX,
    JAX2,
    REF,
    Skip,
    label_bars,
    load,
    machine,
    plt,
    save,
    source,
)


def _integration_scores(ax, dname: str, ds: dict, keys: list, colors: dict) -> None:
    summ = ds["summary"]
    methods = list(summ)
    width = 0.8 / len(methods)
    for mi, m in enumerate(methods):
        xs = np.arange(len(keys)) + (mi - (len(methods) - 1) / 2) * width
        means = [summ[m][k]["mean"] for k in keys]
        sds = [summ[m][k]["sd"] for k in keys]
        b = ax.bar(
            xs,
            means,
            width * 0.95,
            yerr=sds,
            capsize=1.5,
            color=colors.get(m, GREY),
            label=m,
            error_kw={"lw": 0.7},
        )
        label_bars(ax, b, fmt="{:.2f}", fontsize=5.5, rotation=90)
        for x, k in zip(xs, keys):
            seeds = [s["scores"][m][k] for s in ds.get("per_seed", []) if m in s["scores"]]
            ax.plot(np.full(len(seeds), x), seeds, "k.", ms=2, alpha=0.6)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("scib-metrics score")
    ax.set_title(
        f"{dname} ({ds.get('n_cells', 0):,} cells): mean +- sd over "
        f"{len(ds.get('per_seed', []))} seeds"
    )
    ax.legend(frameon=False, fontsize=6.5, loc="upper left", ncol=3)


def _integration_paired(ax, ds: dict) -> None:
    pair = ds.get("paired_total_jax_minus_scvi") or {}
    for i, p in enumerate(pair.values()):
        v = p["total_difference_per_seed"]
        ax.plot(np.full(len(v), i), v, "k.", ms=4, alpha=0.6)
        lo, hi = p.get("ci95") or (p["mean"] - p["sd"], p["mean"] + p["sd"])
        ax.errorbar(
            i,
            p["mean"],
            yerr=[[p["mean"] - lo], [hi - p["mean"]]],
            fmt="o",
            color=JAX,
            capsize=4,
        )
        ax.annotate(
            f"{p['mean']:+.3f}",
            (i, p["mean"]),
            xytext=(8, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    ax.axhline(0, color=GREY, lw=0.8)
    ax.set_xticks(range(len(pair)), list(pair))
    ax.set_xlim(-0.5, len(pair) - 0.3)
    ax.set_ylabel("Total: jaxscanvi - scvi-tools")
    interval = "95% t interval" if any("ci95" in p for p in pair.values()) else "sd"
    ax.set_title(f"paired by seed (mean, {interval})")


def _integration_times(ax, d: dict, ds: dict) -> None:
    ps = [
        s
        for s in ds.get("per_seed", [])
        if s.get("jaxscanvi_seconds") and s.get("scvi_tools_seconds")
    ]
    if ps:
        seeds = [str(s["seed"]) for s in ps]
        x = np.arange(len(ps))
        ax.bar(
            x - 0.2,
            [s["jaxscanvi_seconds"] / 60 for s in ps],
            0.38,
            color=JAX,
            label="jaxscanvi",
        )
        ax.bar(
            x + 0.2,
            [s["scvi_tools_seconds"] / 60 for s in ps],
            0.38,
            color=REF,
            label="scvi-tools",
        )
        for xi, s in zip(x, ps):
            ax.annotate(
                f"{s['scvi_tools_seconds'] / s['jaxscanvi_seconds']:.1f}x",
                (xi, max(s["jaxscanvi_seconds"], s["scvi_tools_seconds"]) / 60),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                fontweight="bold",
            )
        ax.set_xticks(x, seeds)
        ax.set_xlabel("seed")
        ax.set_ylabel("minutes (scVI + scANVI)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
        a = d.get("args", {})
        ax.set_title(f"wall time, {a.get('scvi_epochs')} + {a.get('scanvi_epochs')} epochs")
        ax.legend(frameon=False, fontsize=7)
    else:
        ax.set_visible(False)


def fig_integration(results: Path, out: Path) -> None:
    """scIB aggregate scores per method with seeds, paired totals and wall time."""
    name = "integration.json"
    d = load(results, name)
    print("  " + source(name, d))
    datasets = d.get("datasets") or {}
    if not datasets:
        raise Skip(f"{name} has no datasets")
    keys = ["Batch correction", "Bio conservation", "Total"]
    n = len(datasets)
    fig, axes = plt.subplots(
        n, 3, figsize=(11, 3.9 * n), squeeze=False, gridspec_kw={"width_ratios": [2.2, 1, 1]}
    )
    colors = {
        "Unintegrated": "0.75",
        "jaxscanvi scVI": JAX2,
        "jaxscanvi scANVI": JAX,
        "scvi-tools scVI": "#f2b27a",
        "scvi-tools scANVI": REF,
    }
    for row, (dname, ds) in zip(axes, datasets.items()):
        _integration_scores(row[0], dname, ds, keys, colors)
        _integration_paired(row[1], ds)
        _integration_times(row[2], d, ds)
    fig.suptitle(f"{name}: {machine(d)}", fontsize=9)
    fig.tight_layout()
    save(fig, out, "integration_summary")


def fig_mmd(results: Path, out: Path) -> None:
    """Batch mixing against cell-type signal for the MMD penalty weight."""
    name = "mmd_mixing.json"
    d = load(results, name)
    print("  " + source(name, d))
    summ = d.get("summary")
    runs = d.get("runs") or []
    if not summ:
        raise Skip(f"{name} has no summary")
    ws = sorted(summ, key=float)
    metrics = [
        ("batch_entropy_k50", "batch entropy (k=50), mixing", JAX),
        ("knn_accuracy_cell_type", "kNN cell-type accuracy", "#2a9d8f"),
        ("cross_batch_transfer_accuracy", "cross-batch transfer accuracy", REF),
    ]
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    x = np.arange(len(ws))
    for key, lab, color in metrics:
        if key not in summ[ws[0]]:
            continue
        m = [summ[w][key]["mean"] for w in ws]
        s = [summ[w][key]["sd"] for w in ws]
        ax.errorbar(x, m, yerr=s, fmt="o-", color=color, capsize=3, label=lab)
        for xi, w in zip(x, ws):
            pts = [r[key] for r in runs if float(r["weight"]) == float(w)]
            ax.plot(np.full(len(pts), xi + 0.06), pts, ".", color=color, ms=3, alpha=0.6)
        dy = 5 if key == "knn_accuracy_cell_type" else -12
        for xi, v in zip(x, m):
            ax.annotate(
                f"{v:.3f}",
                (xi, v),
                xytext=(-8, dy),
                textcoords="offset points",
                fontsize=7,
                color=color,
                ha="right",
            )
    ax.set_xticks(x, [f"{float(w):g}" for w in ws])
    ax.set_xlim(-0.4, len(ws) - 0.6)
    ax.set_xlabel("MMD penalty weight on the latent")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (mean +- sd; dots: seeds)")
    ax.set_title(
        f"{name}: jaxscanvi scVI on {Path(str(d.get('data', '?'))).stem}, "
        f"{d.get('n_cells', 0):,} cells, {d.get('epochs')} epochs\n{machine(d)}"
    )
    ax.legend(frameon=False, loc="lower right", fontsize=7)
    fig.tight_layout()
    save(fig, out, "mmd_mixing")


def _parity_forward(ax, d: dict, res: list) -> None:
    for i, r in enumerate(res):
        v = list(r["max_rel_diff"].values())
        ax.plot(np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)), v, "o", ms=3, color=JAX)
    tol = d.get("tolerance")
    if tol:
        ax.axhline(tol, color=REF, ls="--", label=f"tolerance {tol:g}")
        ax.legend(frameon=False, loc="upper right")
    ax.set_yscale("log")
    ax.set_xticks(range(len(res)), [r["case"] for r in res], fontsize=7, rotation=25, ha="right")
    ax.set_ylabel("max relative difference (log)")
    ax.set_title(
        f"same weights, one forward pass: {len(res)} models\n"
        "(dots: latent, likelihood, losses, predictions)"
    )
    ax.set_ylim(top=max(tol or 0, ax.get_ylim()[1]) * 10)


def _parity_curves(ax, curves: list) -> None:
    for c, ls in zip(curves, ("-", "--")):
        ep = np.arange(1, len(c["elbo_train_jaxscanvi"]) + 1)
        ax.plot(
            ep,
            c["elbo_train_scvi_tools"],
            ls,
            color=REF,
            marker="o",
            ms=3,
            label=f"{c['model']} scvi-tools",
        )
        ax.plot(
            ep,
            c["elbo_train_jaxscanvi"],
            ls,
            color=JAX,
            marker="x",
            ms=4,
            label=f"{c['model']} jaxscanvi (max rel. diff {c['max_rel_diff']:.1e})",
        )
    ax.set_xticks(ep)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train ELBO loss per cell")
    ax.set_title("training from the same initial weights")
    ax.legend(frameon=False, fontsize=6.5)


def _parity_posterior(ax, d: dict, post: list) -> None:
    zmax = d.get("z_max")
    keys = sorted({q for p in post for q in p.get("z", {})})
    for qi, (q, mk) in enumerate(zip(keys, "os^")):
        ax.plot(
            np.arange(len(post)) + (qi - 0.5) * 0.2,
            [p["z"].get(q, np.nan) for p in post],
            mk,
            color=[JAX, REF, GREY][qi],
            label=q,
        )
    if zmax:
        ax.axhspan(-zmax, zmax, color="0.92", zorder=0, label=f"|z| < {zmax:g}")
    ax.axhline(0, color=GREY, lw=0.6)
    ax.set_xticks(
        range(len(post)), [p["case"] for p in post], fontsize=6.5, rotation=25, ha="right"
    )
    ax.set_ylabel("z of the mean difference")
    ax.set_title("Monte Carlo posterior estimates")
    ax.legend(frameon=False, fontsize=6.5, loc="lower left")


def fig_parity(results: Path, out: Path) -> None:
    """Same weights, same numbers: relative differences to scvi-tools."""
    name = "parity.json"
    d = load(results, name)
    print(
        f"  {name}: scvi-tools {d.get('scvi_tools')}, torch {d.get('torch')} "
        "| machine not recorded | date not recorded"
    )
    res = d.get("results")
    if not res:
        raise Skip(f"{name} has no results")
    curves = d.get("training_curves") or []
    post = d.get("posterior") or []
    ncols = 1 + bool(curves) + bool(post)
    fig, axes = plt.subplots(
        1,
        ncols,
        figsize=(3.5 * ncols + 1.0, 3.8),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.5] + [1] * (ncols - 1)},
    )
    _parity_forward(axes[0][0], d, res)
    k = 1
    if curves:
        _parity_curves(axes[0][k], curves)
        k += 1
    if post:
        _parity_posterior(axes[0][k], d, post)
    fig.suptitle(
        f"{name}: jaxscanvi vs scvi-tools {d.get('scvi_tools', '?')} (torch {d.get('torch', '?')})",
        fontsize=9,
    )
    fig.tight_layout()
    save(fig, out, "parity")
