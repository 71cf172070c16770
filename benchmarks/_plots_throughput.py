"""CPU training throughput, memory and differential expression figures. Drawn by benchmarks/plots.py."""

from __future__ import annotations

from pathlib import Path
from statistics import median

import numpy as np
from _plots_common import (
    JAX,
    JAX2,
    REF,
    Skip,
    label_bars,
    load,
    machine,
    model_name,
    plt,
    save,
    source,
)


def _throughput_bar(ax, s: dict, xpos: float, width: float, bs: int, runs: list, shown: set):
    """One configuration's bar, its repeats as dots, and its ratio to scvi-tools."""
    fw = s["framework"]
    seed_obj = s["model"].endswith("[seed]")
    color = REF if fw == "scvi-tools" else (JAX2 if seed_obj else JAX)
    label = (
        "scvi-tools"
        if fw == "scvi-tools"
        else "jaxscanvi (scANVI seed objective)"
        if seed_obj
        else "jaxscanvi"
    )
    bar = ax.bar(
        xpos,
        s["cells_per_s"],
        width * 0.95,
        color=color,
        label=None if label in shown else label,
    )
    shown.add(label)
    label_bars(ax, bar, fontsize=6.5)
    # each repeat's steady cells/s
    base, _, obj = s["model"].partition("[")
    obj = obj.rstrip("]") or None
    reps = [
        r["cells_per_s"]
        for r in runs
        if r.get("spec", {}).get("framework") == fw
        and r["spec"].get("model") == base
        and r["spec"].get("batch_size") == bs
        and (fw == "scvi-tools" or r["spec"].get("objective") == obj)
        and r.get("cells_per_s")
    ]
    if len(reps) > 1:
        ax.plot(np.full(len(reps), xpos), reps, "k.", ms=2.5, alpha=0.6)
    ratio = s.get("ratio_vs_scvi_tools")
    if ratio and not seed_obj:
        ax.annotate(
            f"{ratio:.1f}x",
            (xpos, s["cells_per_s"]),
            xytext=(0, 11),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            fontweight="bold",
            color=JAX,
        )


def _throughput_panel(ax, name: str, d: dict) -> None:
    """One JSON's panel: bars per (model, batch size), one per library or objective."""
    print("  " + source(name, d))
    summ = d["summary"]
    runs = d.get("runs") or []
    groups = []  # (model, batch_size)
    for s in summ:
        key = (model_name(s["model"]), s["batch_size"])
        if key not in groups:
            groups.append(key)
    groups.sort(key=lambda k: (k[1], k[0] != "scVI"))
    jax_variants = []
    for s in summ:
        if s["framework"] == "jaxscanvi" and s["model"] not in jax_variants:
            jax_variants.append(s["model"])
    # scANVI objectives: the scvi-tools objective (the default) first
    series = [
        ("jaxscanvi", "scvi"),
        ("jaxscanvi", "scanvi[scvi-tools]"),
        ("jaxscanvi", "scanvi[seed]"),
        ("scvi-tools", None),
    ]
    width = 0.26
    x = np.arange(len(groups))
    shown = set()
    for gi, (mname, bs) in enumerate(groups):
        rows = [s for s in summ if model_name(s["model"]) == mname and s["batch_size"] == bs]
        cols = []
        for fw, mod in series:
            for s in rows:
                if s["framework"] == fw and (mod is None or s["model"] == mod):
                    cols.append(s)
        n = len(cols)
        for ci, s in enumerate(cols):
            off = (ci - (n - 1) / 2) * width
            _throughput_bar(ax, s, gi + off, width, bs, runs, shown)
    ax.set_xticks(x, [f"{m}\nbatch {b}" for m, b in groups])
    ax.set_ylabel("training cells / s (steady epochs)")
    a = d.get("args", {})
    data = d.get("data", {})
    extra = ", validation every epoch" if a.get("validate") else ""
    lab = data.get("labelled_fraction")
    ax.set_title(
        f"{name}\n{machine(d)}\n{data.get('n_cells', '?'):,} cells x "
        f"{data.get('n_genes', '?'):,} genes"
        + (f", {lab:.0%} labelled" if isinstance(lab, float) else "")
        + extra
    )
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)


def fig_throughput_cpu(results: Path, out: Path) -> None:
    """Training cells/s, jaxscanvi vs scvi-tools, on CPU (one panel per JSON)."""
    panels = []
    for name in ("train_throughput.json", "train_throughput_validate.json"):
        d = load(results, name, required=False)
        if d is None:
            print(f"  note: {name} missing; its panel is left out")
            continue
        if not d.get("summary"):
            print(f"  note: {name} has no summary; its panel is left out")
            continue
        panels.append((name, d))
    if not panels:
        raise Skip("no throughput JSON with a summary")
    ngroups = [
        len({(model_name(s["model"]), s["batch_size"]) for s in d["summary"]}) for _, d in panels
    ]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(3.2 + 1.9 * sum(ngroups), 4.3),
        squeeze=False,
        gridspec_kw={"width_ratios": ngroups},
    )
    for ax, (name, d) in zip(axes[0], panels):
        _throughput_panel(ax, name, d)
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(
        "Training throughput on CPU (bold: jaxscanvi / scvi-tools in the same run; dots: repeats)",
        fontsize=9.5,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save(fig, out, "throughput_cpu")


def fig_memory_cpu(results: Path, out: Path) -> None:
    """Peak RSS by phase of a fresh process, jaxscanvi vs scvi-tools."""
    name = "train_throughput.json"
    d = load(results, name)
    print("  " + source(name, d))
    runs = d.get("runs")
    if not runs:
        raise Skip(f"{name} has no runs")
    phases = ["import", "load", "init", "first_epoch", "steady"]
    bss = sorted({r["spec"]["batch_size"] for r in runs})
    fig, axes = plt.subplots(1, len(bss), figsize=(4.6 * len(bss), 3.5), squeeze=False, sharey=True)
    for ax, bs in zip(axes[0], bss):
        for fw, model, obj, color, ls in (
            ("jaxscanvi", "scvi", None, JAX, "-"),
            ("jaxscanvi", "scanvi", "scvi-tools", JAX, "--"),
            ("scvi-tools", "scvi", None, REF, "-"),
            ("scvi-tools", "scanvi", None, REF, "--"),
        ):
            sel = [
                r
                for r in runs
                if r["spec"]["framework"] == fw
                and r["spec"]["model"] == model
                and r["spec"]["batch_size"] == bs
                and (fw == "scvi-tools" or r["spec"].get("objective") == obj)
                and "phases" in r
            ]
            if not sel:
                continue
            ys = [median(r["phases"][p]["peak_rss_mb"] for r in sel) for p in phases]
            ax.plot(
                phases,
                ys,
                ls,
                marker="o",
                ms=3.5,
                color=color,
                label=f"{fw} {model_name(model)} (median of {len(sel)})",
            )
            ax.annotate(
                f"{ys[-1]:,.0f}",
                (len(phases) - 1, ys[-1]),
                xytext=(4, 4 if fw == "jaxscanvi" else -5),
                textcoords="offset points",
                va="center",
                fontsize=7,
                color=color,
            )
        ax.set_title(f"batch {bs}")
        ax.set_xlabel("end of phase (fresh process per configuration)")
        ax.set_xlim(-0.3, len(phases) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("peak RSS so far (MB)")
    axes[0][0].legend(frameon=False, loc="upper left")
    data = d.get("data", {})
    fig.suptitle(
        f"Host memory while training, {name}: {machine(d)}; "
        f"{data.get('n_cells', '?'):,} cells x {data.get('n_genes', '?'):,} genes",
        fontsize=9.5,
    )
    fig.tight_layout()
    save(fig, out, "memory_cpu")


def fig_de(results: Path, out: Path) -> None:
    """Differential expression throughput, jaxscanvi vs scvi-tools."""
    name = "de_throughput.json"
    d = load(results, name)
    print("  " + source(name, d))
    j = d["jaxscanvi"]
    r = d.get("scvi_tools")
    fig, axes = plt.subplots(1, 2, figsize=(6.6, 3.2))
    ax = axes[0]
    labs, vals, cols = ["jaxscanvi"], [j["genes_x_comparisons_per_s"]], [JAX]
    if r:
        labs.append(f"scvi-tools {r.get('version', '')}")
        vals.append(r["genes_x_comparisons_per_s"])
        cols.append(REF)
    b = ax.bar(labs, vals, color=cols, width=0.6)
    label_bars(ax, b)
    ax.set_ylim(0, max(vals) * 1.25)
    ax.set_ylabel("genes x comparisons / s")
    ratio = d.get("ratio_jax_over_scvi_tools")
    ax.set_title("one-vs-rest DE" + (f": {ratio:.2f}x" if ratio else ""))
    ax = axes[1]
    labs, vals, cols = ["jaxscanvi"], [j["de_seconds"]], [JAX]
    if r:
        labs.append("scvi-tools")
        vals.append(r["de_seconds"])
        cols.append(REF)
    b = ax.bar(labs, vals, color=cols, width=0.6)
    label_bars(ax, b, fmt="{:.1f} s")
    ax.set_ylim(0, max(vals) * 1.25)
    ax.set_ylabel("seconds")
    ax.set_title("wall time of differential_expression()")
    fig.suptitle(
        f"{name}: {d.get('dataset')}, {d.get('n_cells', 0):,} cells x "
        f"{d.get('n_genes', 0):,} genes, {d.get('n_comparisons')} comparisons, "
        f"{d.get('n_samples')} samples; {machine(d)}",
        fontsize=8.5,
    )
    fig.tight_layout()
    save(fig, out, "de_throughput")
