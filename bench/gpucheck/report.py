"""summary.md and the final table of the GPU check, from summary.json and the stages' JSON.

Nothing here measures or runs anything, and nothing needs torch: the orchestrator re-renders
summary.md after every stage, so a check cut short still leaves a readable report of what it got.
"""

import json
import os
from typing import Dict, List, Optional

from bench import report as bench_report

DTYPE_ORDER = ("fp32", "tf32", "fp16", "bf16", "fp64")
# Baseline names in the one-line figures (others as they are: "fastmlp-mlp" and "fastmlp-parts"
# must not both read "fastmlp")
SHORT_NAMES = {"cublaslt-epilogue": "cublaslt", "stock-dataloader": "stock",
               "stock-dataloader+compile-ro": "stock+compile"}


def correctness_matrix(rows: List[dict]) -> Dict[str, Dict[str, dict]]:
    """group -> dtype -> {pass, fail, skipped, worst (err / tol of the closest comparison)}."""
    matrix: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        cell = matrix.setdefault(r["group"], {}).setdefault(
            r["dtype"], {"pass": 0, "fail": 0, "skipped": 0, "worst": None})
        cell[r["status"]] = cell.get(r["status"], 0) + 1
        if r.get("err") is not None and r.get("tol"):
            ratio = r["err"] / r["tol"]
            cell["worst"] = ratio if cell["worst"] is None else max(cell["worst"], ratio)
    return matrix


# The matrix's rows: the two ops' kernels first, then what is built on them.
GROUP_ORDER = ("linear_act", "gated", "modules", "SGD", "fit")


def _group_rank(group: str) -> tuple:
    return (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER), group)


def _cell(c: Optional[dict]) -> str:
    if not c:
        return "—"
    total = c["pass"] + c["fail"] + c["skipped"]
    text = f"{'FAIL ' if c['fail'] else ''}{c['pass']}/{total - c['skipped']}"
    if c["skipped"]:
        text += f" (+{c['skipped']} skipped)"
    if c["worst"] is not None:
        text += f", worst {c['worst']:.2g}×tol"
    return text


def correctness_markdown(result: dict) -> List[str]:
    rows = result.get("rows", [])
    matrix = correctness_matrix(rows)
    dtypes = [d for d in DTYPE_ORDER if any(d in v for v in matrix.values())]
    lines = [f"The tests of bench/gpucheck/correctness.py's selection ({result.get('mode')}); "
             f"{result.get('measure')}; FASTMLP_AUTOTUNE={result.get('autotune')}, "
             f"FASTMLP_POISON_OUTPUTS={result.get('poison_env')}; "
             f"{result.get('tests_done')}/{result.get('tests_total')} tests"
             + ("" if result.get("complete") else " (**incomplete**)") + ".", ""]
    if matrix:
        lines += ["| group | " + " | ".join(dtypes) + " |",
                  "|---|" + "---|" * len(dtypes)]
        for group, by_dtype in sorted(matrix.items(), key=lambda gv: _group_rank(gv[0])):
            lines.append(f"| {group} | " + " | ".join(_cell(by_dtype.get(d)) for d in dtypes) + " |")
        lines.append("")
        lines.append("Cells: tests passed / run, worst comparison as a multiple of its tolerance "
                     "(< 1 passes).")
    for name, what in (("unmatched", "Selection entries that matched no test"),
                       ("collection_errors", "Collection errors")):
        if result.get(name):
            lines += ["", f"**{what}**: " + "; ".join(f"`{u}`" for u in result[name])]
    failed = [r for r in rows if r["status"] == "fail"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    if failed:
        lines += ["", f"**{len(failed)} failing test(s)**:", "",
                  "| group | dtype | test | error | tol | why |",
                  "|---|---|---|---|---|---|"]
        for r in failed[:60]:
            err = f"{r['err']:.3g}" if r.get("err") is not None else "—"
            tol = f"{r['tol']:.3g}" if r.get("tol") is not None else "—"
            why = str(r.get("reason") or "").replace("|", "\\|")
            lines.append(f"| {r['group']} | {r['dtype']} | `{r['nodeid']}` | {err} | {tol} | {why} |")
        if len(failed) > 60:
            lines.append(f"| … {len(failed) - 60} more in correctness.json | | | | | |")
    for r in skipped:
        lines.append(f"- skipped: `{r['nodeid']}`: {r.get('reason')}")
    unfinished = result.get("unfinished") or []
    if unfinished and not result.get("complete"):
        lines += ["", f"Not finished when the stage ended ({len(unfinished)}): "
                  + ", ".join(f"`{u}`" for u in unfinished[:40])
                  + (" …" if len(unfinished) > 40 else "")]
    return lines


def headline_markdown(result: dict) -> List[str]:
    lines = []
    if not result.get("records"):
        return ["No row measured."]
    if not result.get("complete"):
        lines += ["**Incomplete: the stage ended before every row was measured.**", ""]
    for title, sub in bench_report.grouped(result):
        lines += [f"**{title}**", "", bench_report.markdown_table(bench_report.table_rows(sub)), ""]
    graphed = bench_report.graphed_table(result)
    if graphed:
        lines += ["Launch-bound rows replayed from one CUDA graph (do_bench_cudagraph):", "",
                  graphed, ""]
    if result.get("peak"):
        lines += [bench_report.peak_line(result) + ".", ""]
    comp = result.get("compile") or {}
    lines.append(f"torch.compile: {comp.get('spent_s', 0):.0f} s of a {comp.get('budget_s')} s "
                 f"budget; FASTMLP_AUTOTUNE={result.get('autotune')}.")
    tuner = result.get("autotuner") or {}
    if not tuner.get("available"):
        lines.append(f"Autotuner picks not recorded: {tuner.get('reason')}.")
    else:
        lines += ["", "Autotuner picks made while each row was timed:", ""]
        for r in result["records"]:
            added = r.get("autotuner_added") or {}
            picks = "; ".join(f"`{k}` → {_config(v)}" for k, v in added.items()) or "none new"
            lines.append(f"- {r['id']}: {picks}")
    errors = [f"{r['id']} {n}: {e['reason']}" for r in result["records"]
              for n, e in r["variants"].items() if e["status"] == "error"]
    if errors:
        lines += ["", "Variants that failed:", ""] + [f"- {e}" for e in errors]
    return lines


def _config(cfg) -> str:
    if isinstance(cfg, dict):
        return "(" + ", ".join(f"{k}={v}" for k, v in cfg.items()) + ")"
    return str(cfg)


def load_json(path: str) -> Optional[dict]:
    """A stage's JSON file, or None if it is missing or cut short (a killed stage)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def figures_text(stage: dict) -> str:
    """One line of a stage's key figures for the tables (never raises: the orchestrator prints
    it after every stage, and figures of an unexpected shape must not stop the check)."""
    try:
        return _figures_text(stage)
    except Exception as exc:
        return f"{stage.get('reason') or ''} (figures not rendered: {type(exc).__name__}: {exc})"


def _figures_text(stage: dict) -> str:
    f = stage.get("figures") or {}
    name = stage["name"]
    if stage.get("reason") and not f:
        return stage["reason"]
    if name == "correctness" and f:
        text = f"{f.get('pass', 0)} pass, {f.get('fail', 0)} fail, {f.get('skipped', 0)} skipped"
        if f.get("worst_ratio") is not None:
            text += f"; worst {f['worst_ratio']:.2g}×tol"
        if not f.get("complete"):
            text += f"; {f.get('tests_done')}/{f.get('tests_total')} tests"
        return text
    if name == "headline" and f:
        parts = []
        for row in f.get("rows", []):
            ratios = row.get("speedup") or {}
            short = ", ".join(f"{ratios[k]:.2f}×{SHORT_NAMES.get(k, k)}" for k in ratios if ratios[k])
            parts.append(f"{row['id'].split('/')[1]} {row['id'].split('/')[-1]}: {short or '—'}")
        return "; ".join(parts) or "no rows"
    if name == "tests" and f:
        return f.get("line") or ", ".join(f"{k} {v}" for k, v in f.items() if k != "slowest")
    if name == "sanitizer" and f:
        return "; ".join(f"{tool}: {v.get('status')} ({v.get('summary') or v.get('reason') or ''})"
                         for tool, v in f.items())
    if name == "bench" and f:
        return (f"{f.get('records', 0)} rows, variants ok {f.get('ok', 0)}, skipped "
                f"{f.get('skipped', 0)}, error {f.get('error', 0)}"
                + ("" if f.get("complete") else "; partial"))
    return stage.get("reason") or ""


def stage_table(summary: dict) -> List[List[str]]:
    rows = [["stage", "status", "seconds", "budget", "files", "key figures"]]
    for s in summary["stages"]:
        rows.append([s["name"], s["status"],
                     f"{s['seconds']:.0f}" if s.get("seconds") is not None else "—",
                     f"{s['budget_s']:.0f}" if s.get("budget_s") is not None else "—",
                     " ".join(s.get("files") or []) or "—", figures_text(s)])
    return rows


def summary_markdown(summary: dict, out: str) -> str:
    env = summary.get("environment") or {}
    dev = env.get("device") or {}
    ver = env.get("versions") or {}
    lines = [f"# fastmlp GPU check — {dev.get('name', '?')} — {summary.get('date')}", "",
             f"**{summary.get('verdict')}** ({summary.get('elapsed_s', 0):.0f} s of a "
             f"{summary.get('budget_s'):.0f} s budget). Command: `{summary.get('command')}`.", "",
             f"Versions: Python {ver.get('python')}, torch {ver.get('torch')}, triton "
             f"{ver.get('triton')}, CUDA {ver.get('cuda')}, fastmlp {ver.get('fastmlp')} (git "
             f"{(ver.get('git_commit') or '?')[:10]}{', dirty tree' if ver.get('git_dirty') else ''}; "
             f"tree digest {env.get('tree_digest') or '?'}: `python -m bench.gpucheck.env --digest` "
             f"in a checkout gives the same for the same files).",
             f"Device: {json.dumps(dev)}; nvidia-smi: {env.get('nvidia_smi')}.", "",
             "## Stages", "", bench_report.markdown_table(stage_table(summary)), ""]
    sections = (("correctness", "Correctness on silicon", "correctness.json", correctness_markdown),
                ("headline", "Headline figures", "headline.json", headline_markdown))
    for name, title, filename, render in sections:
        data = load_json(os.path.join(out, filename))
        if data is not None:
            lines += [f"## {title} (`{filename}`)", ""] + render(data) + [""]
    by_name = {s["name"]: s for s in summary["stages"]}
    tests = by_name.get("tests") or {}
    if (tests.get("figures") or {}).get("slowest"):
        lines += ["## Test suite: slowest tests (junit.xml)", ""]
        lines += [f"- {t['seconds']:.1f} s {t['name']}" for t in tests["figures"]["slowest"]]
        lines.append("")
    bench = by_name.get("bench") or {}
    table = (bench.get("figures") or {}).get("readme_table")
    if table:
        lines += ["## Remaining benchmark rows (`bench-results.tar.gz`)", "", table, ""]
    lines += ["Every stage's output is in `check.log`, in order.", ""]
    return "\n".join(lines)


def failure_digest(summary: dict, limit: int) -> str:
    """Each stage that did not pass: its reason and the end of its log, in at most `limit`
    characters in all (the device tool may return only the last 12,000 of the output)."""
    bad = [s for s in summary["stages"] if s["status"] not in ("ok", "skipped")]
    if not bad:
        return ""
    share = max(200, limit // len(bad))
    blocks = []
    for s in bad:
        head = f"--- {s['name']}: {s['status']}: {s.get('reason') or ''}"[:share // 2]
        lines, used = [], len(head)
        for line in reversed(s.get("log_tail") or []):
            line = "    " + line[:200]
            if used + len(line) + 1 > share:
                break
            lines.insert(0, line)
            used += len(line) + 1
        blocks.append("\n".join([head] + lines))
    return "\n".join(blocks)[-limit:]


def final_table(summary: dict) -> str:
    """The last lines the check prints (the device tool returns only the output tail)."""
    env = summary.get("environment") or {}
    head = (f"GPU CHECK {summary.get('verdict')}: {(env.get('device') or {}).get('name', '?')}, "
            f"{summary.get('date')}, git {((env.get('versions') or {}).get('git_commit') or '?')[:10]}, "
            f"tree {env.get('tree_digest') or '?'}, {summary.get('elapsed_s', 0):.0f} s")
    rows = stage_table(summary)
    body = bench_report.text_table([r[:4] + [r[5][:160]] for r in rows])
    files = f"OUT ({summary.get('out')}): {' '.join(summary.get('files') or [])}"
    return "\n".join([head, body, files])
