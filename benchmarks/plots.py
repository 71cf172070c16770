"""Figures for the documentation's benchmarks page, from the committed JSON.

Reads the JSON files that the benchmark scripts wrote into
``benchmarks/results/`` (and ``benchmarks/results/gpu/``) and writes one PNG
per figure into ``docs/img/benchmarks/``. Nothing is measured here: every
number on a figure is read from a JSON file. A figure whose JSON is missing
or lacks a field is skipped with a note; the others are still drawn.

Usage:
    python benchmarks/plots.py                  # all figures
    python benchmarks/plots.py --only accuracy  # some of them
    python benchmarks/plots.py --results DIR --out DIR

For each figure the script prints its source: the JSON, the command that wrote
it (its ``command`` or ``args`` field), the machine and the date, where the
JSON records them; the captions on ``docs/benchmarks.md`` say the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parent / "docs" / "img" / "benchmarks"
DPI = 110

JAX = "#1f6fb4"  # jaxscanvi
JAX2 = "#7fb2e0"  # jaxscanvi, second variant
REF = "#e07b24"  # scvi-tools
GREY = "0.55"

plt.rcParams.update(
    {
        "font.size": 9,
        "axes.titlesize": 9.5,
        "axes.labelsize": 9,
        "legend.fontsize": 8,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
)


class Skip(Exception):
    """A figure cannot be drawn from the JSON at hand."""


# ---------------------------------------------------------------- helpers ---

_cache: dict[str, dict | None] = {}


def load(results: Path, name: str, required: bool = True) -> dict | None:
    """The JSON ``results/name`` as a dict; Skip (or None) where absent or malformed."""
    if name not in _cache:
        path = results / name
        try:
            data = json.loads(path.read_text())
            _cache[name] = data if isinstance(data, dict) else None
        except FileNotFoundError:
            _cache[name] = None
        except (OSError, ValueError) as e:
            print(f"  note: {name}: unreadable ({e})")
            _cache[name] = None
    data = _cache[name]
    if data is None and required:
        raise Skip(f"{name} missing or not a JSON object")
    return data


def machine(d: dict) -> str:
    """CPU model and usable cores (and the GPU, where recorded) of a JSON's run."""
    m = d.get("machine") or {}
    bits = []
    if d.get("nvidia_smi"):
        bits.append(str(d["nvidia_smi"]).split(",")[0])
    if m.get("cpu_model"):
        cores = m.get("cpus_usable") or m.get("cpu_count")
        bits.append(f"{m['cpu_model']}" + (f", {cores} cores" if cores else ""))
    elif m.get("cpus"):
        bits.append(f"{m['cpus']} CPUs")
    return "; ".join(bits) or "machine not recorded"


def source(name: str, d: dict) -> str:
    """One line naming a JSON's command (or args), machine and date."""
    if d.get("command"):
        cmd = str(d["command"])
    elif isinstance(d.get("args"), dict):
        cmd = "args " + ", ".join(
            f"{k}={v}" for k, v in d["args"].items() if v not in (None, False) and k != "out"
        )
    else:
        cmd = "command not recorded"
    when = d.get("started") or "date not recorded"
    return f"{name}: {cmd} | {machine(d)} | {when}"


def save(fig, out: Path, stem: str) -> Path:
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=DPI, pil_kwargs={"optimize": True})
    plt.close(fig)
    kb = path.stat().st_size / 1024
    print(
        f"  wrote {path.relative_to(out.parent.parent.parent) if out.is_relative_to(HERE.parent) else path}"
        f" ({kb:.0f} KB){'  <- over 100 KB' if kb > 100 else ''}"
    )
    return path


def label_bars(ax, bars, fmt="{:,.0f}", fontsize=7, rotation=0):
    for b in bars:
        h = b.get_height()
        if np.isfinite(h) and h > 0:
            ax.annotate(
                fmt.format(h),
                (b.get_x() + b.get_width() / 2, h),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=fontsize,
                rotation=rotation,
            )


def model_name(m: str) -> str:
    base = m.split("[")[0]
    return {"scvi": "scVI", "scanvi": "scANVI"}.get(base, base)


# --------------------------------------------------------------- figures ---


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
                    gi + off,
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
                    ax.plot(np.full(len(reps), gi + off), reps, "k.", ms=2.5, alpha=0.6)
                ratio = s.get("ratio_vs_scvi_tools")
                if ratio and not seed_obj:
                    ax.annotate(
                        f"{ratio:.1f}x",
                        (gi + off, s["cells_per_s"]),
                        xytext=(0, 11),
                        textcoords="offset points",
                        ha="center",
                        fontsize=8,
                        fontweight="bold",
                        color=JAX,
                    )
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


def fig_scale_cells(results: Path, out: Path) -> None:
    """Throughput and peak memory against the number of cells (CPU and GPU)."""
    cpu, gpu = [], []  # (n_cells, cells_per_s, peak_gb, data_gb, label)
    t = load(results, "train_throughput.json", required=False)
    if t and t.get("summary"):
        s = next(
            (
                s
                for s in t["summary"]
                if s["framework"] == "jaxscanvi" and s["model"] == "scvi" and s["batch_size"] == 128
            ),
            None,
        )
        if s:
            print("  " + source("train_throughput.json", t))
            cpu.append(
                (
                    t["data"]["n_cells"],
                    s["cells_per_s"],
                    s["peak_rss_mb"] / 1024,
                    None,
                    "in RAM, batch 128",
                )
            )
    sc = load(results, "scale.json", required=False)
    if sc:
        print("  " + source("scale.json", sc))
        mem = sc.get("memory")
        if mem:
            cpu.append(
                (
                    mem["n_cells"],
                    mem["cells_per_second"],
                    mem["peak_rss_mb"] / 1024,
                    mem["csr_mb"] / 1024,
                    "CSR in RAM",
                )
            )
        st = (sc.get("stream") or {}).get("streamed")
        if st:
            cpu.append(
                (
                    st["n_cells_in_file"],
                    st["cells_per_second"],
                    st["rss_max_mb"] / 1024,
                    None,
                    f"streamed from disk\n({st.get('steps', '?')} steps)",
                )
            )
    g = load(results, "gpu/gpu_check_h200.json", required=False)
    gname = "gpu/gpu_check_h200.json"
    if g:
        print("  " + source(gname, g))
        tp = g["parts"].get("throughput") or {}
        for r in tp.get("results") or []:
            if r["model"] == "scvi" and r["batch_size"] == 1024:
                gpu.append(
                    (
                        r["n_cells"],
                        r["cells_per_s"],
                        r["device_memory"]["peak_bytes_in_use"] / 2**30,
                        None,
                        "dense on device\nbatch 1024",
                    )
                )
        e1 = g["parts"].get("epoch_1m") or {}
        for r in e1.get("results") or []:
            if r.get("sparse_likelihood") is True and r.get("cells_per_s_last_epoch"):
                gpu.append(
                    (
                        r["n_cells"],
                        r["cells_per_s_last_epoch"],
                        r["device_memory"]["peak_bytes_in_use"] / 2**30,
                        r["csr_bytes"] / 2**30,
                        f"CSR on device\nbatch {r['batch_size']}",
                    )
                )
    for name in ("gpu/gpu_check_h200_atlas_10m.json", gname):
        a = load(results, name, required=False)
        part = ((a or {}).get("parts") or {}).get("atlas_10m") or {}
        done = [r for r in part.get("results") or [] if r.get("cells_per_s_last_epoch")]
        if part.get("status") == "ok" and done:
            r = done[-1]
            print("  " + source(name, a))
            gpu.append(
                (
                    r["n_cells"],
                    r["cells_per_s_last_epoch"],
                    r["device_memory"]["peak_bytes_in_use"] / 2**30,
                    r["csr_bytes"] / 2**30,
                    f"CSR on device\nbatch {r['batch_size']}",
                )
            )
            break
        if part:
            print(f"  note: {name}: atlas_10m status {part.get('status')!r}, not used")
    if not cpu and not gpu:
        raise Skip("no scale figures in the JSON")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    for pts, color, mk, lab, dy in (
        (cpu, JAX, "o", "CPU (host RSS)", -1),
        (gpu, "#2a9d8f", "s", "H200 (device memory)", 1),
    ):
        if not pts:
            continue
        pts = sorted(pts)
        n = [p[0] for p in pts]
        axes[0].plot(n, [p[1] for p in pts], mk, color=color, label=lab.split(" (")[0])
        axes[1].plot(n, [p[2] for p in pts], mk, color=color, label=f"peak, {lab}")
        dn = [(p[0], p[3]) for p in pts if p[3] is not None]
        if dn:
            axes[1].plot(
                *zip(*dn),
                mk,
                mfc="none",
                color=color,
                ms=8,
                label=f"data size, {lab.split(' (')[0]}",
            )
        for p in pts:
            axes[0].annotate(
                f"{p[1]:,.0f}/s\n{p[4]}",
                (p[0], p[1]),
                xytext=(0, 8 * dy),
                textcoords="offset points",
                fontsize=6.5,
                color=color,
                ha="center",
                va="bottom" if dy > 0 else "top",
            )
            axes[1].annotate(
                f"{p[2]:.1f} GiB",
                (p[0], p[2]),
                xytext=(7, 0),
                textcoords="offset points",
                fontsize=6.5,
                color=color,
                va="center",
            )
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells in the data set (log)")
        ax.grid(alpha=0.3, which="major")
    axes[0].set_ylabel("scVI training cells / s (log)")
    axes[0].set_title("scVI throughput against data size")
    axes[1].set_ylabel("GiB (log)")
    axes[1].set_title("peak memory against data size")
    axes[0].legend(frameon=False, loc="center left")
    axes[1].legend(frameon=False, loc="upper left", fontsize=7)
    axes[0].set_xlim(axes[0].get_xlim()[0] / 2, axes[0].get_xlim()[1] * 2)
    lo, hi = axes[0].get_ylim()
    axes[0].set_ylim(lo / 3, hi * 3)
    axes[1].set_xlim(right=axes[1].get_xlim()[1] * 3)
    lo, hi = axes[1].get_ylim()
    axes[1].set_yticks([t for t in (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64) if lo <= t <= hi])
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[1].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    save(fig, out, "scale_cells")


def fig_scale_classes(results: Path, out: Path) -> None:
    """scANVI step time and memory against the number of cell types; forced devices."""
    name = "scale.json"
    d = load(results, name)
    print("  " + source(name, d))
    cl = d.get("classes")
    if not cl:
        raise Skip(f"{name} has no 'classes' part")
    dev = d.get("devices") or []
    fig, axes = plt.subplots(
        1,
        3 if dev else 2,
        figsize=(10.5 if dev else 7.5, 3.5),
        gridspec_kw={"width_ratios": [1, 1, 0.6][: 3 if dev else 2]},
    )
    c = [r["n_labels"] for r in cl]
    ax = axes[0]
    ax.plot(c, [r["step_ms"] for r in cl], "o-", color=JAX, label="step (ms)")
    ax.plot(
        c,
        [r["first_epoch_seconds"] * 1000 / r["steps_per_epoch"] for r in cl],
        "s--",
        color=GREY,
        label="first epoch / steps (ms, incl. compile)",
    )
    for r in cl:
        ax.annotate(
            f"{r['step_ms']:.0f} ms",
            (r["n_labels"], r["step_ms"]),
            xytext=(4, -10),
            textcoords="offset points",
            fontsize=7,
            color=JAX,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cell types C (log)")
    ax.set_ylabel("ms per training step (log)")
    ax.set_ylim(min(r["step_ms"] for r in cl) / 2.5, ax.get_ylim()[1] * 1.5)
    ax.set_title(
        f"scANVI step against C\n{cl[0]['n_cells']:,} cells, "
        f"{cl[0]['steps_per_epoch']} steps per epoch"
    )
    ax.legend(frameon=False, fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(c, [r["peak_rss_mb"] for r in cl], "o-", color=JAX, label="peak RSS")
    ax.plot(
        c,
        [r["peak_rss_before_training_mb"] for r in cl],
        "s--",
        color=GREY,
        label="peak RSS before training",
    )
    for r in cl:
        ax.annotate(
            f"{r['peak_rss_mb']:,.0f}",
            (r["n_labels"], r["peak_rss_mb"]),
            xytext=(0, 5),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_ylim(0, max(r["peak_rss_mb"] for r in cl) * 1.25)
    ax.set_xlabel("cell types C (log)")
    ax.set_ylabel("MB")
    ax.set_title("scANVI host memory against C")
    ax.legend(frameon=False, fontsize=7, loc="lower right")
    if dev:
        ax = axes[2]
        b = ax.bar(
            [str(r["devices"]) for r in dev],
            [r["cells_per_second"] for r in dev],
            color=[JAX, JAX2][: len(dev)],
        )
        label_bars(ax, b)
        ax.set_xlabel("forced host devices\n(data parallel)")
        ax.set_ylabel("training cells / s")
        cores = (d.get("machine") or {}).get("cpus_usable")
        ax.set_title(f"devices on {cores} cores" if cores else "devices")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    fig.suptitle(f"{name}: {machine(d)}", fontsize=9)
    fig.tight_layout()
    save(fig, out, "scale_classes")


def fig_stream(results: Path, out: Path) -> None:
    """Host RSS while streaming the 10M-cell file from disk."""
    name = "scale.json"
    d = load(results, name)
    st = d.get("stream") or {}
    s = st.get("streamed") or {}
    trace = s.get("rss_trace_mb")
    if not trace:
        raise Skip(f"{name} has no stream.streamed.rss_trace_mb")
    print("  " + source(name, d))
    fig, ax = plt.subplots(figsize=(6.2, 3.2))
    steps = s.get("steps", len(trace))
    x = np.linspace(0, steps, len(trace))
    ax.plot(
        x,
        trace,
        "o-",
        ms=3,
        color=JAX,
        label=f"streamed from disk: {s['cells_per_second']:,.0f} cells/s",
    )
    mem = st.get("in_memory") or {}
    if mem.get("rss_max_mb"):
        ax.axhline(
            mem["rss_max_mb"],
            color=REF,
            ls="--",
            label=f"in memory (peak): {mem['cells_per_second']:,.0f} cells/s",
        )
    f = st.get("file") or {}
    ax.set_ylim(0, max(trace) * 1.25)
    ax.set_xlabel("training step")
    ax.set_ylabel("host RSS (MB)")
    ax.set_title(
        f"scVI on a {s['n_cells_in_file']:,}-cell file"
        + (f" ({f['file_mb'] / 1024:.1f} GB on disk)" if f.get("file_mb") else "")
        + f": RSS stays flat\n{name}: {machine(d)}; stream / in-memory speed "
        f"{st.get('ratio_stream_over_memory', float('nan')):.2f}"
    )
    ax.legend(frameon=False, loc="lower right")
    fig.tight_layout()
    save(fig, out, "stream_rss")


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
    ax = axes[0][0]
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
    if two:
        print("  " + source("train_throughput.json", t))
        ax = axes[0][1]
        summ = [
            s for s in t["summary"] if s["batch_size"] == 128 and not s["model"].endswith("[seed]")
        ]
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
    fig.tight_layout()
    save(fig, out, "first_epoch")


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


def fig_accuracy(results: Path, out: Path) -> None:
    """Label transfer and reference-to-query accuracy, jaxscanvi vs scvi-tools."""
    lt = load(results, "label_transfer.json", required=False)
    rq = load(results, "reference_to_query.json", required=False)
    if not ((lt and lt.get("summary")) or (rq and rq.get("summary"))):
        raise Skip("label_transfer.json and reference_to_query.json both missing")
    panels = []
    if lt and lt.get("summary"):
        print("  " + source("label_transfer.json", lt))
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
        panels.append(
            (
                groups,
                ["balanced_accuracy", "accuracy"],
                f"label_transfer.json: {dname}, {a.get('hide_fraction', 0):.0%} of labels "
                f"hidden\n{len(a.get('seeds', []))} seeds, scVI {a.get('scvi_epochs')} + "
                f"scANVI {a.get('scanvi_epochs')} epochs; {machine(lt)}",
                per_class,
            )
        )
    if rq and rq.get("summary"):
        print("  " + source("reference_to_query.json", rq))
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
        panels.append(
            (
                groups,
                ["balanced_accuracy", "accuracy", "macro_f1"],
                f"reference_to_query.json: {Path(a.get('data', '?')).stem}, v1 run -> "
                f"v2 run\n{len(a.get('seeds', []))} seeds, query {a.get('query_epochs')} "
                f"epochs; {machine(rq)}",
                _per_class(rq.get("runs") or []),
            )
        )
    fig, axes = plt.subplots(2, len(panels), figsize=(5.3 * len(panels), 7.2), squeeze=False)
    for k, (groups, metrics, title, per_class) in enumerate(panels):
        ax = axes[0][k]
        _metric_bars(ax, groups, metrics, title)
        ax.set_ylabel("% of scored cells (hidden / query)")
        lo = max(0, min(100 * v[m][0] for _, _, v in groups for m in v) - 25)
        ax.set_ylim(lo, 100 + 0.18 * (100 - lo))
        ax.set_yticks([t for t in range(0, 101, 5 if 100 - lo <= 40 else 10) if t >= lo])
        ax = axes[1][k]
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
            + (" (jaxscanvi: scvi-tools objective)" if k == 0 and len(panels) == 2 else "")
        )
        ax.legend(frameon=False, loc="upper left", fontsize=7, ncol=2)
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
        summ = ds["summary"]
        methods = list(summ)
        width = 0.8 / len(methods)
        ax = row[0]
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
        ax = row[1]
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
        ax = row[2]
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
    ax = axes[0][0]
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
    k = 1
    if curves:
        ax = axes[0][k]
        k += 1
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
    if post:
        ax = axes[0][k]
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
    fig.suptitle(
        f"{name}: jaxscanvi vs scvi-tools {d.get('scvi_tools', '?')} (torch {d.get('torch', '?')})",
        fontsize=9,
    )
    fig.tight_layout()
    save(fig, out, "parity")


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


FIGURES = {
    "throughput_cpu": fig_throughput_cpu,
    "memory_cpu": fig_memory_cpu,
    "throughput_gpu": fig_throughput_gpu,
    "gpu_kernels": fig_gpu_kernels,
    "first_epoch": fig_first_epoch,
    "scale_cells": fig_scale_cells,
    "stream_rss": fig_stream,
    "scale_classes": fig_scale_classes,
    "accuracy": fig_accuracy,
    "accuracy_paired": fig_accuracy_paired,
    "integration_summary": fig_integration,
    "mmd_mixing": fig_mmd,
    "parity": fig_parity,
    "de_throughput": fig_de,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON files")
    p.add_argument("--out", type=Path, default=OUT, help="folder for the PNG files")
    p.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    done, skipped = [], []
    for stem in args.only:
        print(f"{stem}:")
        try:
            FIGURES[stem](args.results, args.out)
            done.append(stem)
        except Skip as e:
            print(f"  skipped: {e}")
            skipped.append(stem)
        except (
            KeyError,
            TypeError,
            ValueError,
            IndexError,
            AttributeError,
            ZeroDivisionError,
            StopIteration,
        ) as e:
            print(f"  skipped: a JSON lacks what this figure needs ({type(e).__name__}: {e})")
            skipped.append(stem)
        finally:
            plt.close("all")
    for extra in ("integration.png", "label_transfer_paired.png"):
        if (args.results / extra).exists():
            print(
                f"{extra}: written by benchmarks/{extra.split('.')[0]}.py; "
                "the page shows it from benchmarks/results/"
            )
    print(f"{len(done)} figures written to {args.out}; skipped: {', '.join(skipped) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
