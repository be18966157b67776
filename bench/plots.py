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
    os.makedirs(out_dir, exist_ok=True)
    paths, problems = [], []
    for draw in (_speedup_plot, _tflops_plot):
        try:
            path = draw(plt, results, out_dir)
        except Exception as exc:  # a plot is a view of the JSON: never worth losing the report
            problems.append(f"{draw.__name__}: {type(exc).__name__}: {exc}")
            plt.close("all")
            continue
        if path:
            paths.append(path)
    if problems:
        return paths, "; ".join(problems)
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
    from matplotlib.ticker import FuncFormatter, LogLocator
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}×"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}×"))
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
    """TFLOP/s of one Linear+ReLU layer against its FLOPs per call: a panel per (dtype, pass)."""
    panels = {}
    for r in results["records"]:
        if r["kind"] != "layer":  # models and epochs are not points on a layer-size axis
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
    fig.suptitle(f"Linear+ReLU layer: TFLOP/s vs size — {results['device']['name']}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "tflops_vs_size.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
