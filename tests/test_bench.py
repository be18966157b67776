"""The benchmark harness itself (bench/), at toy sizes and one round, so CI keeps it working.

On a CUDA machine the same tests run the CUDA timers (do_bench, do_bench_cudagraph, peak memory).
"""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import __main__ as bench_main
from bench import costs, plots, report, timing
from bench.cases import catalogue
from bench.runner import VARIANT_FIELDS, RunOptions, run_suite

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL_FIELDS = ("schema_version", "complete", "started_at", "duration_s", "load_average",
                    "command", "date", "device", "versions", "options", "fastmlp_path",
                    "peak", "datasheet", "compile_spent_s", "records",
                    "plots", "plots_skipped")
VERSION_FIELDS = ("python", "torch", "triton", "cuda", "fastmlp", "git_commit")
RECORD_FIELDS = ("id", "workload", "kind", "pass", "dtype", "shape", "flops", "min_bytes",
                 "h100_datasheet_floor_us", "variants", "speedup", "tflops", "pct_of_peak")


def test_costs_count_gemm_flops_and_minimum_bytes():
    fwd = costs.layer_forward(64, 1000, 100, 4)
    assert fwd.flops == 2 * 64 * 1000 * 100
    assert fwd.min_bytes == 4 * (64 * 1000 + 100 * 1000 + 64 * 100 + 100)
    # A hidden layer's backward is two GEMMs; a model's first layer skips dX.
    assert costs.layer_backward(8, 4, 2, 2, grad_input=True).flops == 2 * 2 * 8 * 4 * 2
    assert costs.layer_backward(8, 4, 2, 2, grad_input=False).flops == 2 * 8 * 4 * 2
    step = costs.mlp_cost(64, (1000, 100, 10), "fp32", "step", input_grad=False)
    fb = costs.mlp_cost(64, (1000, 100, 10), "fp32", "fwd+bwd", input_grad=False)
    assert step.flops == fb.flops and step.min_bytes == fb.min_bytes + 4 * 3 * (100_100 + 1010)
    seconds, bound = costs.floor_seconds(costs.layer_forward(8192, 8192, 8192, 2), "bf16")
    assert bound == "compute" and seconds == pytest.approx(2 * 8192**3 / 989e12)


def test_catalogue_matches_the_issue():
    gpu = {c.id: c for c in catalogue("cuda")}
    cpu = {c.id: c for c in catalogue("cpu")}
    assert "mlp-layer/8192x8192->8192/bf16/fwd+bwd" in gpu      # large: GPU only
    assert not any("8192->8192" in i for i in cpu)
    assert {"seed-layer/64x1000->100/fp32/fwd", "seed-model/64x1000->100->10/fp32/step",
            "seed-epoch/64x1000->100->10/fp32/epoch"} <= set(cpu)
    assert {c.dtype for c in gpu.values()} == {"fp32", "tf32", "fp16", "bf16"}
    assert gpu["seed-epoch/64x1000->100->10/fp32/epoch"].samples == 64_000
    full_cpu = catalogue("cpu", full=True)
    assert any("4096" in c.id for c in full_cpu) and len(full_cpu) > len(cpu)
    assert len(gpu) == len(set(gpu))


def test_stats_median_and_quantiles():
    stats = timing.Stats.from_times([5.0, 1.0, 3.0, 2.0, 4.0], "test")
    assert (stats.median_ms, stats.min_ms, stats.samples) == (3.0, 1.0, 5)
    assert stats.q20_ms == pytest.approx(1.8) and stats.q80_ms == pytest.approx(4.2)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One tiny, one-round report on the device at hand, without compile baselines."""
    out = tmp_path_factory.mktemp("bench") / "report"
    code = bench_main.main(["--tiny", "--rounds", "1", "--no-compile", "--quiet", "--out", str(out),
                            "--date", "2026-11-25"])
    assert code == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_report_writes_every_file_and_field(tiny_report):
    out, results = tiny_report
    for name in ("results.json", "results.csv", "README-table.md"):
        assert (out / name).is_file()
    for key in TOP_LEVEL_FIELDS:
        assert key in results, key
    assert results["complete"] is True
    for key in VERSION_FIELDS:
        assert key in results["versions"], key
    assert results["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert results["peak"]["fp32"]["tflops"] > 0
    kinds = {r["kind"] for r in results["records"]}
    assert kinds == {"layer", "model", "epoch"}
    for record in results["records"]:
        for key in RECORD_FIELDS:
            assert key in record, key
        for name, entry in record["variants"].items():
            assert set(VARIANT_FIELDS) <= set(entry), (record["id"], name)
            if entry["status"] == "ok":
                assert entry["median_ms"] > 0 and entry["samples"] >= 1
    if importlib.util.find_spec("matplotlib"):
        assert results["plots"] and all((out / p).is_file() for p in results["plots"])
    else:
        assert results["plots_skipped"]


def test_ratios_come_from_the_same_run(tiny_report):
    _, results = tiny_report
    checked = 0
    for record in results["records"]:
        fast = record["variants"]["fastmlp"]
        for name, entry in record["variants"].items():
            if entry["status"] == "ok":
                assert record["tflops"][name] == pytest.approx(
                    record["flops"] / (entry["median_ms"] * 1e-3) / 1e12)
            if name == "fastmlp":
                continue
            if entry["status"] == "ok" and fast["status"] == "ok":
                assert record["speedup"][name] == pytest.approx(entry["median_ms"] / fast["median_ms"])
                checked += 1
            else:
                assert record["speedup"][name] is None
    assert checked >= 5
    # The forward outputs were checked against the fp32 reference.
    fwd = [r for r in results["records"] if r["pass"] == "fwd"]
    assert all(r["variants"]["eager"]["parity_ok"] for r in fwd)


def test_csv_and_table_hold_the_json_figures(tiny_report):
    out, results = tiny_report
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(r["variants"]) for r in results["records"])
    first = results["records"][0]
    row = next(r for r in rows if r["id"] == first["id"] and r["variant"] == "eager")
    assert float(row["median_ms"]) == pytest.approx(first["variants"]["eager"]["median_ms"])
    table = (out / "README-table.md").read_text()
    assert results["command"] in table and "| fastmlp ms |" in table and first["shape"] in table


def test_loop_workload_runs(tiny_report):
    _, results = tiny_report
    epoch = next(r for r in results["records"] if r["kind"] == "epoch")
    for name in ("stock-dataloader", "fastmlp", "fastmlp-parts"):
        assert epoch["variants"][name]["status"] == "ok", epoch["variants"][name]


@pytest.mark.slow  # torch.compile or a subprocess re-running the harness
def test_compile_baseline_and_its_budget():
    """The compile path runs; once the compile budget is spent, later compiles are skipped."""
    opts = RunOptions(device="cuda" if torch.cuda.is_available() else "cpu", tiny=True,
                      only=["seed-layer"], compile=True, compile_budget_s=0.0,
                      timing=timing.TimingOptions.single_round())
    results = run_suite(opts, log=lambda _msg: None)
    first, second = (r["variants"]["compile"] for r in results["records"])
    assert first["status"] == "ok" and first["median_ms"] > 0
    assert second["status"] == "skipped" and "compile budget" in second["reason"]
    assert results["records"][1]["speedup"]["compile"] is None


def test_time_budget_skips_and_still_reports(tmp_path):
    opts = RunOptions(device="cpu", tiny=True, only=["seed-model"], compile=False, time_budget_s=0.0,
                      timing=timing.TimingOptions.single_round())
    results = run_suite(opts, log=lambda _msg: None)
    assert all(e["status"] == "skipped" for r in results["records"] for e in r["variants"].values())
    paths = report.write_results({**results, "date": "2026-11-25"}, str(tmp_path), "2026-11-25")
    assert "skip" in open(paths["table"]).read()


def test_plots_degrade_without_matplotlib(monkeypatch, tiny_report, tmp_path):
    _, results = tiny_report
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    written, why = plots.write_plots(results, str(tmp_path))
    assert written == [] and "matplotlib" in why


@pytest.mark.slow  # torch.compile or a subprocess re-running the harness
@pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                    reason="pytest-benchmark is not installed")
def test_pytest_benchmark_suite_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "--bench-tiny",
         "--bench-no-compile", "--bench-rounds", "1", "-q", "-k", "seed-layer",
         f"--benchmark-json={out}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    groups = {b["group"] for b in data["benchmarks"]}
    assert groups == {"seed-layer 8x16->12 fp32 fwd", "seed-layer 8x16->12 fp32 fwd+bwd"}
    assert {b["extra_info"]["variant"] for b in data["benchmarks"]} >= {"fastmlp", "eager"}


def test_sanitize_target_checks_pass_on_this_device():
    """The compute-sanitizer workload's own references agree with fastmlp (CUDA when present)."""
    from bench import sanitize_target

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert sanitize_target.main(["--device", device]) == 0
