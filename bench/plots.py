"""PNG plots of a results dict: fastmlp's speedup per workload, and TFLOP/s against problem size.

matplotlib is optional (the GPU machine may not have it): without it, plotting is skipped with a
message saying so, and everything else in the report is still written.
"""

import os
from typing import List, Optional, Tuple


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(results: dict, out_dir: str) -> Tuple[List[str], Optional[str]]:
    """Write the plots; returns (paths written, reason they were skipped or None)."""
    plt = _pyplot()
    if plt is None:
        return [], "matplotlib is not installed: plots skipped (pip install matplotlib to get them)"
    paths = []
    for draw in (_speedup_plot, _tflops_plot):
        path = draw(plt, results, out_dir)
        if path:
            paths.append(path)
    return paths, None if paths else "no measured fastmlp figures to plot"


def _speedup_plot(plt, results: dict, out_dir: str) -> Optional[str]:
    """Grouped bars: per case, fastmlp's speedup over each baseline (log scale, 1× marked)."""
    records = [r for r in results["records"] if any(r["speedup"].values())]
    if not records:
        return None
    baselines = [b for b in dict.fromkeys(b for r in records for b in r["speedup"])]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(records) * max(1, len(baselines)) / 2), 5))
    width = 0.8 / max(1, len(baselines))
    for j, name in enumerate(baselines):
        xs = [i + (j - (len(baselines) - 1) / 2) * width for i in range(len(records))]
        ys = [r["speedup"].get(name) or 0 for r in records]
        ax.bar(xs, ys, width=width, label=f"vs {name}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(records)))
    ax.set_xticklabels([f"{r['workload']} {r['shape']}\n{r['dtype']} {r['pass']}" for r in records],
                       rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup of fastmlp (baseline time / fastmlp time)")
    ax.set_title(f"fastmlp speedup per workload — {results['device']['name']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "speedup.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _tflops_plot(plt, results: dict, out_dir: str) -> Optional[str]:
    """TFLOP/s against FLOPs per call, one panel per (dtype, pass), one line per variant."""
    panels = {}
    for r in results["records"]:
        if r["kind"] == "epoch":
            continue
        panels.setdefault((r["dtype"], r["pass"]), []).append(r)
    panels = {k: v for k, v in panels.items() if any(r["tflops"].get("fastmlp") for r in v)}
    if not panels:
        return None
    n = len(panels)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, ((dtype, pass_), recs) in zip(axes.flat, sorted(panels.items())):
        recs = sorted(recs, key=lambda r: r["flops"])
        names = dict.fromkeys(n for r in recs for n in r["tflops"])
        for name in names:
            pts = [(r["flops"], r["tflops"][name]) for r in recs if r["tflops"].get(name)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        peak = results["peak"].get(dtype, {}).get("tflops")
        if peak:
            ax.axhline(peak, color="grey", linestyle="--", linewidth=0.8, label="measured matmul peak")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("GEMM FLOPs per call")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{dtype} {pass_}", fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"TFLOP/s vs size — {results['device']['name']}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "tflops_vs_size.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
