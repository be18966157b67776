"""Turn a results dict into the printed table, results.json, results.csv and README-table.md.

Every cell comes from the results dict of one run; nothing here measures, and nothing invents a
figure: a variant without a measurement shows why (skipped, error) instead of a number.
"""

import csv
import json
import os
from typing import Dict, List, Optional

CSV_FIELDS = ("id", "workload", "shape", "pass", "dtype", "flops", "min_bytes", "variant", "status",
              "median_ms", "q20_ms", "q80_ms", "min_ms", "samples", "method", "first_call_s",
              "peak_mem_mib", "graphed_median_ms", "tflops", "pct_of_peak", "speedup_of_fastmlp",
              "max_rel_err", "parity_ok", "final_loss", "reason")
_MISSING = {"skipped": "skip", "error": "err"}


# The report's tables: kernels (layers and models) and the training loop, each with its own baselines.
TABLE_GROUPS = (("Layers and models", ("layer", "model")),
                ("Gated op and gated MLP blocks", ("gated",)),
                ("Training loop, one epoch", ("epoch",)))


def grouped(results: dict) -> List[tuple]:
    """[(title, sub-results with only that group's records)] for the groups that have records."""
    out = []
    for title, kinds in TABLE_GROUPS:
        records = [r for r in results["records"] if r["kind"] in kinds]
        if records:
            out.append((title, {**results, "records": records}))
    return out


def baseline_names(results: dict) -> List[str]:
    """Every non-fastmlp variant that appears, in first-appearance order."""
    names: List[str] = []
    for record in results["records"]:
        for name in record["variants"]:
            if name != "fastmlp" and name not in names:
                names.append(name)
    return names


def _ms(entry: Optional[dict]) -> str:
    if not entry:
        return "—"
    if entry["status"] != "ok":
        return _MISSING.get(entry["status"], entry["status"])
    text = _fmt(entry["median_ms"])
    return text + ("†" if entry.get("parity_ok") is False else "")


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if value < 1 else f"{value:.{digits}f}"


def table_rows(results: dict) -> List[List[str]]:
    """Header plus one row per case: times, speedups, fastmlp TFLOP/s, % of peak, memory."""
    baselines = baseline_names(results)
    with_memory = any(r["variants"].get("fastmlp", {}).get("peak_mem_mib") is not None
                      for r in results["records"])
    header = ["workload", "shape", "pass", "dtype", "fastmlp ms"]
    header += [f"{b} ms" for b in baselines]
    header += [f"× {b}" for b in baselines]
    header += ["fastmlp TFLOP/s", "% peak"]
    if with_memory:
        header.append("fastmlp peak MiB")
    rows = [header]
    for r in results["records"]:
        v = r["variants"]
        row = [r["workload"], r["shape"], r["pass"], r["dtype"], _ms(v.get("fastmlp"))]
        row += [_ms(v.get(b)) for b in baselines]
        row += [(f"{r['speedup'][b]:.2f}×" if r["speedup"].get(b) else "—") for b in baselines]
        row += [_fmt(r["tflops"].get("fastmlp")), _fmt(r["pct_of_peak"].get("fastmlp"), 2)]
        if with_memory:
            row.append(_fmt(v.get("fastmlp", {}).get("peak_mem_mib")))
        rows.append(row)
    return rows


def markdown_table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def graphed_table(results: dict) -> Optional[str]:
    """Launch-bound cases replayed from a CUDA graph (GPU only), if any were measured."""
    rows = []
    names = ["fastmlp"] + baseline_names(results)
    for r in results["records"]:
        cells = [r["variants"].get(n, {}).get("graphed_median_ms") for n in names]
        if any(c is not None for c in cells):
            rows.append([r["workload"], r["shape"], r["pass"], r["dtype"]] + [_fmt(c) for c in cells])
    if not rows:
        return None
    return markdown_table([["workload", "shape", "pass", "dtype"] + [f"{n} ms (graph)" for n in names]]
                          + rows)


def not_run_line(not_run: List[dict], device_type: str) -> str:
    """One line naming the cases this device's run left out (runner.not_run_here), grouped by
    workload and shape, with the count of cases (dtypes, passes) in each."""
    groups: Dict[str, int] = {}
    for entry in not_run:
        workload, shape = entry["id"].split("/")[:2]
        key = f"{workload} {shape}"
        groups[key] = groups.get(key, 0) + 1
    listed = ", ".join(f"{key} ({n})" for key, n in groups.items())
    return f"Not run on {device_type}: {len(not_run)} GPU-only case(s), {listed}."


def peak_line(results: dict) -> str:
    parts = [f"{d} {p['tflops']:.2f} TFLOP/s ({p['size']}³ torch.matmul)"
             for d, p in results["peak"].items()]
    return "Measured matmul peak (denominator of % peak): " + "; ".join(parts)


def _machine_line(results: dict) -> str:
    dev, load = results["device"], results.get("load_average") or {}
    text = f"Device: {dev['name']}"
    if dev["type"] == "cpu":
        text += f", {dev['threads']} torch thread(s) of {dev['logical_cpus']} logical CPUs"
    else:
        text += f", {dev['sm_count']} SMs, {dev['memory_gib']} GiB, capability {dev['capability']}"
    if load.get("start"):
        text += f"; load average (1/5/15 min) {load['start']} at start, {load['end']} at end"
    return text + "."


def summary_markdown(results: dict, date: str) -> str:
    """The block for the README: device, command, versions, table, and how to read it."""
    dev, ver = results["device"], results["versions"]
    lines = [
        f"### {dev['name']} ({dev['type']}) — {date}",
        "",
        *([] if results.get("complete", True) else
          ["**Partial run: the report was written before the run finished.**", ""]),
        f"Command: `{results['command']}`",
        "",
        f"Versions: Python {ver['python']}, torch {ver['torch']}, triton {ver['triton']}, "
        f"CUDA {ver['cuda']}, fastmlp {ver['fastmlp']} (git {(ver['git_commit'] or '?')[:10]}"
        f"{', dirty tree' if ver['git_dirty'] else ''}).",
        "",
        f"fastmlp path measured: {results['fastmlp_path']}.",
        "",
        _machine_line(results),
        "",
        peak_line(results) + ".",
        "",
    ]
    for title, sub in grouped(results):
        lines += [f"**{title}**", "", markdown_table(table_rows(sub)), ""]
    if results.get("not_run"):
        lines += [not_run_line(results["not_run"], dev["type"]) + " (results.json: "
                  "\"not_run\", each with its reason)", ""]
    lines += [
        "Times are medians in ms of many synchronised calls after warm-up (epochs: whole epochs, "
        "first epoch excluded); × = baseline median / fastmlp median from the same run (above 1: "
        "fastmlp is faster); TFLOP/s counts GEMM FLOPs only; skip = not run: over a "
        "time/compile budget, or not available here (results.json gives the reason); "
        "err = the variant failed (see results.json), "
        "† = forward output off the fp32 reference by more than the dtype's tolerance.",
    ]
    graphed = graphed_table(results)
    if graphed:
        lines += ["", "Launch-bound cases, calls replayed from one CUDA graph (do_bench_cudagraph):",
                  "", graphed]
    missing = results.get("loop_api_missing")
    if missing:
        lines += ["", f"fastmlp training loop not measured: fastmlp has no {', '.join(missing)} yet."]
    return "\n".join(lines) + "\n"


def csv_rows(results: dict) -> List[Dict]:
    rows = []
    for r in results["records"]:
        for name, e in r["variants"].items():
            rows.append({
                "id": r["id"], "workload": r["workload"], "shape": r["shape"], "pass": r["pass"],
                "dtype": r["dtype"], "flops": r["flops"], "min_bytes": r["min_bytes"],
                "variant": name, "tflops": r["tflops"].get(name),
                "pct_of_peak": r["pct_of_peak"].get(name),
                "speedup_of_fastmlp": r["speedup"].get(name),
                **{k: e.get(k) for k in CSV_FIELDS if k in e},
            })
    return rows


def write_results(results: dict, out_dir: str, date: str) -> Dict[str, str]:
    """results.json, results.csv and README-table.md in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"),
             "csv": os.path.join(out_dir, "results.csv"),
             "table": os.path.join(out_dir, "README-table.md")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csv_rows(results))
    with open(paths["table"], "w") as f:
        f.write(summary_markdown(results, date))
    return paths


def text_table(rows: List[List[str]]) -> str:
    """The table padded into columns, for the terminal."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
