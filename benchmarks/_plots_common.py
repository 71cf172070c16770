"""What the figure modules of benchmarks/plots.py share: style, colours,
loading the JSON, the source line, saving."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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
