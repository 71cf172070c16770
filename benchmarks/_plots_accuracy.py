"""Annotation accuracy figures: label transfer, and paired per class. Drawn by benchmarks/plots.py."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.ticker
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


def _metric_bars(ax, groups, metrics, title):
    """groups: list of (label, color, {metric: (mean, sd, per_seed list)})."""
    width = 0.8 / len(groups)
    for gi, (_lab, color, vals) in enumerate(groups):
        for mi, m in enumerate(metrics):
            if m not in vals:
                continue
            mean, sd, seeds = vals[m]
            x = mi + (gi - (len(groups) - 1) / 2) * width
            ax.bar(
                x,
                100 * mean,
                width * 0.95,
                yerr=100 * sd if sd else None,
                color=color,
                capsize=2,
                error_kw={"lw": 0.8},
            )
            ax.annotate(
                f"{100 * mean:.1f}",
                (x, 100 * mean),
                xytext=(0, -4),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=6.5,
                color="white",
                fontweight="bold",
            )
            if seeds:
                ax.plot(np.full(len(seeds), x), [100 * s for s in seeds], "k.", ms=2.5, alpha=0.6)
    ax.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics])
    ax.set_title(title)
    handles = [matplotlib.patches.Patch(color=c, label=lab) for lab, c, _ in groups]
    ax.legend(
        handles=handles, frameon=False, loc="upper left", fontsize=7, ncol=min(3, len(groups))
    )


def _label_transfer_panel(lt: dict) -> tuple:
    """(groups, metrics, title, per-class recall) of label_transfer.json."""
    groups = []
    for s in lt["summary"]:
        fw, obj = s["framework"], s.get("objective")
        lab = fw if fw == "scvi-tools" else f"jaxscanvi ({obj} objective)"
        color = REF if fw == "scvi-tools" else (JAX if obj == "scvi-tools" else JAX2)
        vals = {
            m: (s[m]["mean"], s[m]["sd"], [v[m] for v in (s.get("per_seed") or {}).values()])
            for m in ("balanced_accuracy", "accuracy")
            if m in s
        }
        groups.append((lab, color, vals))
    groups.sort(key=lambda g: ("scvi-tools" in g[0] and "jaxscanvi" not in g[0], g[0]))
    a = lt.get("args", {})
    dname = Path(a.get("data", "?")).stem
    per_class = _per_class(lt.get("runs") or [], objective="scvi-tools")
    return (
        groups,
        ["balanced_accuracy", "accuracy"],
        f"label_transfer.json: {dname}, {a.get('hide_fraction', 0):.0%} of labels "
        f"hidden\n{len(a.get('seeds', []))} seeds, scVI {a.get('scvi_epochs')} + "
        f"scANVI {a.get('scanvi_epochs')} epochs; {machine(lt)}",
        per_class,
    )


def _ref_query_panel(rq: dict) -> tuple:
    """(groups, metrics, title, per-class recall) of reference_to_query.json."""
    groups = []
    for s in rq["summary"]:
        fw = s["framework"]
        seeds = [r for r in rq.get("runs") or [] if r["framework"] == fw]
        vals = {
            m: (s[m]["mean"], s[m]["sd"], [r[m] for r in seeds])
            for m in ("balanced_accuracy", "accuracy", "macro_f1")
            if m in s
        }
        groups.append((fw, JAX if fw == "jaxscanvi" else REF, vals))
    a = rq.get("args", {})
    return (
        groups,
        ["balanced_accuracy", "accuracy", "macro_f1"],
        f"reference_to_query.json: {Path(a.get('data', '?')).stem}, v1 run -> "
        f"v2 run\n{len(a.get('seeds', []))} seeds, query {a.get('query_epochs')} "
        f"epochs; {machine(rq)}",
        _per_class(rq.get("runs") or []),
    )


def _recall_bars(ax, per_class: dict, k: int, n_panels: int) -> None:
    """Recall per cell type, jaxscanvi beside scvi-tools."""
    classes = sorted({c for fw in per_class for c in per_class[fw]})
    width = 0.38
    for fi, (fw, color) in enumerate((("jaxscanvi", JAX), ("scvi-tools", REF))):
        if fw not in per_class:
            continue
        xs = np.arange(len(classes)) + (fi - 0.5) * width
        ys = [100 * per_class[fw].get(c, np.nan) for c in classes]
        b = ax.bar(xs, ys, width * 0.95, color=color, label=fw)
        label_bars(ax, b, fmt="{:.0f}", fontsize=6.5)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("recall (%), mean over seeds")
    ax.set_title(
        "recall per cell type"
        + (" (jaxscanvi: scvi-tools objective)" if k == 0 and n_panels == 2 else "")
    )
    ax.legend(frameon=False, loc="upper left", fontsize=7, ncol=2)


def fig_accuracy(results: Path, out: Path) -> None:
    """Label transfer and reference-to-query accuracy, jaxscanvi vs scvi-tools."""
    lt = load(results, "label_transfer.json", required=False)
    rq = load(results, "reference_to_query.json", required=False)
    if not ((lt and lt.get("summary")) or (rq and rq.get("summary"))):
        raise Skip("label_transfer.json and reference_to_query.json both missing")
    panels = []
    if lt and lt.get("summary"):
        print("  " + source("label_transfer.json", lt))
        panels.append(_label_transfer_panel(lt))
    if rq and rq.get("summary"):
        print("  " + source("reference_to_query.json", rq))
        panels.append(_ref_query_panel(rq))
    fig, axes = plt.subplots(2, len(panels), figsize=(5.3 * len(panels), 7.2), squeeze=False)
    for k, (groups, metrics, title, per_class) in enumerate(panels):
        ax = axes[0][k]
        _metric_bars(ax, groups, metrics, title)
        ax.set_ylabel("% of scored cells (hidden / query)")
        lo = max(0, min(100 * v[m][0] for _, _, v in groups for m in v) - 25)
        ax.set_ylim(lo, 100 + 0.18 * (100 - lo))
        ax.set_yticks([t for t in range(0, 101, 5 if 100 - lo <= 40 else 10) if t >= lo])
        _recall_bars(axes[1][k], per_class, k, len(panels))
    fig.tight_layout()
    save(fig, out, "accuracy")


def _per_class(runs: list, objective: str | None = None) -> dict:
    """Mean per-class recall per framework over the seeds in ``runs``."""
    acc: dict = {}
    for r in runs:
        if "per_class_recall" not in r:
            continue
        if r["framework"] == "jaxscanvi" and objective and r.get("objective") != objective:
            continue
        for c, v in r["per_class_recall"].items():
            acc.setdefault(r["framework"], {}).setdefault(c, []).append(v)
    return {fw: {c: float(np.mean(v)) for c, v in cs.items()} for fw, cs in acc.items()}


def fig_accuracy_paired(results: Path, out: Path) -> None:
    """Paired-seed balanced accuracy per setting (label_transfer_paired.json), if present."""
    name = "label_transfer_paired.json"
    d = load(results, name, required=False)
    if d is None:
        raise Skip(f"{name} not present (benchmarks/label_transfer_paired.py writes it)")
    settings = d.get("settings") or {}
    settings = {k: v for k, v in settings.items() if v.get("n")}
    if not settings:
        raise Skip(f"{name} has no settings with paired seeds")
    print("  " + source(name, d))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    ax = axes[0]
    names = list(settings)
    width = 0.38
    for i, k in enumerate(names):
        r = settings[k]
        for off, key, color in ((-width / 2, "jaxscanvi", JAX), (width / 2, "scvi_tools", REF)):
            v = r[key]
            b = ax.bar(
                i + off,
                np.mean(v),
                width * 0.95,
                color=color,
                label=key.replace("_", "-") if i == 0 else None,
            )
            label_bars(ax, b, fmt="{:.1f}", fontsize=6.5)
            ax.plot(np.full(len(v), i + off), v, "k.", ms=2.5, alpha=0.6)
    ax.set_xticks(range(len(names)), [f"{k}\n({settings[k]['n']} seeds)" for k in names])
    ax.set_ylabel("balanced accuracy (%)")
    lo = min(min(settings[k]["jaxscanvi"] + settings[k]["scvi_tools"]) for k in names)
    ax.set_ylim(max(0, lo - 15), 106)
    ax.set_title("balanced accuracy per setting (dots: seeds)")
    ax.legend(frameon=False, loc="upper right", ncol=2)
    ax = axes[1]
    for i, k in enumerate(names):
        r = settings[k]
        ax.plot(
            np.full(len(r["difference_points"]), i), r["difference_points"], "k.", ms=3, alpha=0.5
        )
        ci = r.get("ci95")
        if ci:
            ax.errorbar(
                i,
                r["mean_difference"],
                yerr=[[r["mean_difference"] - ci[0]], [ci[1] - r["mean_difference"]]],
                fmt="o",
                color=JAX,
                capsize=4,
            )
        else:
            ax.plot(i, r["mean_difference"], "o", color=JAX)
        ax.annotate(
            f"{r['mean_difference']:+.2f}",
            (i, r["mean_difference"]),
            xytext=(8, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    ax.axhline(0, color=GREY, lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("jaxscanvi - scvi-tools (points)")
    ax.set_title("paired difference, mean and 95% t interval")
    fig.suptitle(f"{name}: {machine(next(iter(settings.values())))}", fontsize=9)
    fig.tight_layout()
    save(fig, out, "accuracy_paired")
