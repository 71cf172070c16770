"""GPU throughput and kernel figures, and the time to first epoch. Drawn by benchmarks/plots.py."""

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
    model_name,
    plt,
    save,
    source,
)


def _gpu_scvi_tools(results: Path) -> tuple[str, dict, list] | None:
    for name in (
        "gpu/gpu_check_h200.json",
        "gpu/gpu_check_h200_scvi_tools.json",
        "gpu/gpu_check_h200_atlas_10m.json",
    ):
        d = load(results, name, required=False)
        part = ((d or {}).get("parts") or {}).get("scvi_tools") or {}
        if part.get("status") == "ok" and part.get("results"):
            return name, d, part["results"]
        if part:
            print(f"  note: {name}: scvi_tools part status {part.get('status')!r}, not used")
    return None


def fig_throughput_gpu(results: Path, out: Path) -> None:
    """Training cells/s on the H200, jaxscanvi and scvi-tools."""
    name = "gpu/gpu_check_h200.json"
    d = load(results, name)
    print("  " + source(name, d))
    part = d["parts"]["throughput"]
    if part.get("status") != "ok" or not part.get("results"):
        raise Skip(f"{name}: throughput part status {part.get('status')!r}")
    jax = {(r["model"], r["batch_size"]): r for r in part["results"]}
    ref_src = _gpu_scvi_tools(results)
    ref = {}
    if ref_src:
        print("  " + source(ref_src[0], ref_src[1]))
        ref = {(r["model"], r["batch_size"]): r for r in ref_src[2]}
    models = [m for m in ("scvi", "scanvi") if any(k[0] == m for k in jax)]
    bss = sorted({k[1] for k in jax} | {k[1] for k in ref})
    fig, axes = plt.subplots(
        1, len(models), figsize=(4.4 * len(models), 3.8), squeeze=False, sharey=True
    )
    width = 0.38
    same_json = ref_src is not None and ref_src[0] == name
    for ax, m in zip(axes[0], models):
        for i, bs in enumerate(bss):
            j = jax.get((m, bs))
            r = ref.get((m, bs))
            if j:
                b = ax.bar(
                    i - width / 2,
                    j["cells_per_s"],
                    width,
                    color=JAX,
                    label="jaxscanvi" if i == 0 else None,
                )
                label_bars(ax, b, fontsize=6.5)
            if r:
                b = ax.bar(
                    i + width / 2,
                    r["cells_per_s"],
                    width,
                    color=REF,
                    label="scvi-tools" if i == 0 else None,
                )
                label_bars(ax, b, fontsize=6.5)
            if j and r:
                ax.annotate(
                    f"{j['cells_per_s'] / r['cells_per_s']:.0f}x",
                    (i - width / 2, j["cells_per_s"]),
                    xytext=(0, 11),
                    textcoords="offset points",
                    ha="center",
                    fontsize=8,
                    fontweight="bold",
                    color=JAX,
                )
        ax.set_yscale("log")
        ax.set_xticks(range(len(bss)), [f"batch {b}" for b in bss])
        ax.set_title(
            f"{model_name(m)}, {part['spec'].get('n_cells', 0):,} cells x "
            f"{part['spec'].get('n_genes', 0):,} genes"
        )
        vals = [r["cells_per_s"] for r in list(jax.values()) + list(ref.values())]
        ax.set_ylim(10 ** np.floor(np.log10(min(vals))), max(vals) * 6)
        ax.grid(axis="y", alpha=0.3, which="major")
    axes[0][0].set_ylabel("training cells / s (steady epochs, log)")
    axes[0][0].legend(frameon=False, loc="upper left")
    note = (
        ""
        if ref_src is None
        else ""
        if same_json
        else f"\nscvi-tools from {ref_src[0]} (a separate run on the same GPU model)"
    )
    fig.suptitle(
        f"Training throughput on {machine(d).split(';')[0]}: jaxscanvi from {name}{note}",
        fontsize=8.5,
    )
    fig.tight_layout()
    save(fig, out, "throughput_gpu")


def fig_gpu_kernels(results: Path, out: Path) -> None:
    """GPU kernel ablation and float32 vs bfloat16 on the H200."""
    name = "gpu/gpu_check_h200.json"
    d = load(results, name)
    print("  " + source(name, d))
    parts = d["parts"]
    kern = parts.get("kernels") or {}
    prec = parts.get("precision") or {}
    have_k = kern.get("status") == "ok" and kern.get("results")
    have_p = prec.get("status") == "ok" and prec.get("results")
    if not (have_k or have_p):
        raise Skip(f"{name}: no kernels or precision results")
    n = int(bool(have_k)) + int(bool(have_p))
    fig, axes = plt.subplots(
        1, n, figsize=(9.6, 3.8), squeeze=False, gridspec_kw={"width_ratios": [1.6, 1][:n]}
    )
    k = 0
    if have_k:
        ax = axes[0][k]
        k += 1
        rows = kern["results"]
        names = [r["config"] for r in rows]
        vals = [r["cells_per_s"] for r in rows]
        colors = [JAX if c == "default" else GREY if c == "library" else JAX2 for c in names]
        y = np.arange(len(rows))[::-1]
        ax.barh(y, vals, color=colors)
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v / 1e3:,.0f}k", va="center", fontsize=7)
        ax.set_yticks(y, names)
        ax.set_xlabel("training cells / s")
        sp = kern.get("spec", {})
        ax.set_title(
            f"kernel ablation: scVI, {sp.get('n_cells', 0):,} cells, batch "
            f"{sp.get('batch_size', '?')}, one pass in order"
        )
        ax.set_xlim(0, max(vals) * 1.2)
    if have_p:
        ax = axes[0][k]
        rows = prec["results"]
        bss = sorted({r["batch_size"] for r in rows})
        width = 0.38
        for i, bs in enumerate(bss):
            for off, p, color in ((-width / 2, "float32", JAX), (width / 2, "bfloat16", JAX2)):
                r = next((r for r in rows if r["batch_size"] == bs and r["precision"] == p), None)
                if r is None:
                    continue
                ax.bar(i + off, r["cells_per_s"], width, color=color, label=p if i == 0 else None)
                elbo = r.get("validation_elbo_float32_eval")
                ax.annotate(
                    f"{r['cells_per_s'] / 1e6:.2f}M"
                    + (f"\nELBO\n{elbo:.1f}" if elbo is not None else ""),
                    (i + off, r["cells_per_s"]),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=6.5,
                )
        ax.set_xticks(range(len(bss)), [f"batch {b}" for b in bss])
        ax.set_ylabel("training cells / s")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.35)
        ax.set_title(
            f"precision: scVI, {prec.get('spec', {}).get('n_cells', 0):,} cells\n"
            "(validation ELBO evaluated in float32)"
        )
        ax.legend(frameon=False, loc="upper left")
    fig.suptitle(f"{machine(d).split(';')[0]}: {name}", fontsize=9)
    fig.tight_layout()
    save(fig, out, "gpu_kernels")


def _first_epoch_phases(ax, name: str, d: dict, rows: list) -> None:
    y = np.arange(len(rows))[::-1]
    h = 0.27
    for off, mode, color in ((h, "cold", REF), (0, "off", GREY), (-h, "warm", JAX)):
        v = [r[f"{mode}_s"] for r in rows]
        ax.barh(
            y + off,
            v,
            h * 0.95,
            color=color,
            label={
                "cold": "cache on, empty (cold)",
                "off": "cache off",
                "warm": "cache on, filled (warm)",
            }[mode],
        )
    for yi, r in zip(y, rows):
        ax.text(
            max(r["cold_s"], r["off_s"]), yi + h, f" {r['cold_s']:.1f} s", va="center", fontsize=6.5
        )
        ax.text(r["warm_s"], yi - h, f" {r['warm_s']:.1f} s", va="center", fontsize=6.5, color=JAX)
    ax.set_yticks(y, [r["phase"].replace("#1", " (1st call)") for r in rows])
    ax.set_xlabel("seconds, fresh process per mode")
    hl = d.get("headline") or {}
    ax.set_title(
        f"{name}: first call of each phase, {machine(d)}\n"
        f"all phases: {hl.get('wall_seconds_cold', float('nan')):.1f} s cold, "
        f"{hl.get('wall_seconds_warm', float('nan')):.1f} s warm, "
        f"{hl.get('wall_seconds_off', float('nan')):.1f} s off; compile "
        f"{hl.get('compile_seconds_cold', float('nan')):.1f} vs "
        f"{hl.get('compile_seconds_warm', float('nan')):.1f} s"
    )
    ax.legend(frameon=False, loc="lower right")
    ax.set_xlim(0, max(r["cold_s"] for r in rows) * 1.18)


def _first_epoch_vs_scvi_tools(ax, t: dict) -> None:
    summ = [s for s in t["summary"] if s["batch_size"] == 128 and not s["model"].endswith("[seed]")]
    models = ["scvi", "scanvi"]
    width = 0.38
    for i, m in enumerate(models):
        for off, fw, color in ((-width / 2, "jaxscanvi", JAX), (width / 2, "scvi-tools", REF)):
            s = next(
                (s for s in summ if s["framework"] == fw and s["model"].split("[")[0] == m),
                None,
            )
            if s is None:
                continue
            b = ax.bar(
                i + off,
                s["first_epoch_seconds"],
                width,
                color=color,
                label=fw if i == 0 else None,
            )
            label_bars(ax, b, fmt="{:.1f} s")
            ax.plot(
                [i + off - width * 0.45, i + off + width * 0.45],
                [s["steady_epoch_seconds_median"]] * 2,
                "k-",
                lw=1.5,
                label="steady epoch (median)" if i == 0 and fw == "jaxscanvi" else None,
            )
    ax.set_xticks(range(len(models)), [model_name(m) for m in models])
    ax.set_ylabel("seconds")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    dd = t.get("data", {})
    ax.set_title(
        f"train_throughput.json, batch 128,\n{dd.get('n_cells', 0):,} cells: "
        f"first vs steady epoch\n{machine(t)}"
    )
    ax.legend(frameon=False, loc="upper left")


def fig_first_epoch(results: Path, out: Path) -> None:
    """Time to first epoch: persistent compilation cache cold, warm, off; vs scvi-tools."""
    name = "first_epoch.json"
    d = load(results, name)
    print("  " + source(name, d))
    rows = [
        r
        for r in d["rows"]
        if r["phase"] not in ("import", "total") and not r["phase"].endswith("#2")
    ]
    if not rows:
        raise Skip(f"{name} has no phase rows")
    t = load(results, "train_throughput.json", required=False)
    need = {
        "framework",
        "model",
        "batch_size",
        "first_epoch_seconds",
        "steady_epoch_seconds_median",
    }
    two = bool(
        t
        and isinstance(t.get("summary"), list)
        and t["summary"]
        and all(isinstance(s, dict) and need <= s.keys() for s in t["summary"])
    )
    if t and not two:
        print("  note: train_throughput.json lacks first-epoch fields; its panel is left out")
    fig, axes = plt.subplots(
        1,
        2 if two else 1,
        figsize=(10.4 if two else 6.4, 4.4),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.5, 1][: 2 if two else 1]},
    )
    _first_epoch_phases(axes[0][0], name, d, rows)
    if two:
        print("  " + source("train_throughput.json", t))
        _first_epoch_vs_scvi_tools(axes[0][1], t)
    fig.tight_layout()
    save(fig, out, "first_epoch")
