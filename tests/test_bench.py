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

import fastmlp
from bench import __main__ as bench_main
from bench import costs, plots, report, timing
from bench.cases import catalogue
from bench.runner import VARIANT_FIELDS, RunOptions, run_suite

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL_FIELDS = ("schema_version", "complete", "started_at", "duration_s", "load_average",
                    "command", "date", "device", "versions", "options", "fastmlp_path",
                    "peak", "datasheet", "compile_spent_s", "not_run", "records",
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
    assert kinds == {"layer", "model", "gated", "epoch"}
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


# --------------------------------------------------------------------------------------------
# The gated rows (Llama-7B's MLP block, bench/test_gated_mlp.py) and bench.saved_bytes
# --------------------------------------------------------------------------------------------
def test_catalogue_has_the_llama_gated_rows_on_gpus_only():
    from bench.runner import variants_for

    gpu = {c.id: c for c in catalogue("cuda")}
    block = "4096x4096->11008->4096/bf16"
    for workload in ("gated-mlp", "gated-mlp-packed"):
        for tokens in (4096, 16384):
            for pass_ in ("fwd", "fwd+bwd"):
                assert f"{workload}/{block.replace('4096x', f'{tokens}x', 1)}/{pass_}/silu" in gpu
        assert f"{workload}/64x4096->11008->4096/bf16/fwd/silu" in gpu       # decoding step
        assert f"{workload}/64x4096->11008->4096/bf16/fwd+bwd/silu" not in gpu
    assert "gated-linear/16384x4096->11008/bf16/fwd+bwd/silu" in gpu        # the op alone
    gated = [c for c in gpu.values() if c.kind == "gated"]
    assert len(gated) == 15 and all(c.gpu_only for c in gated)
    assert not any(c.kind == "gated" for c in catalogue("cpu"))
    assert not any(c.kind == "gated" for c in catalogue("cpu", full=True))
    assert not any(c.kind == "gated" for c in catalogue("cuda", dtypes=["fp32"]))
    opts = RunOptions(device="cuda")
    assert variants_for(gpu[f"gated-mlp/{block}/fwd+bwd/silu"], opts) == [
        "fastmlp", "eager", "liger", "compile"]
    assert variants_for(gpu[f"gated-mlp-packed/{block}/fwd/silu"], opts) == [
        "fastmlp", "eager", "compile"]
    assert variants_for(gpu["gated-linear/4096x4096->11008/bf16/fwd/silu"], opts) == [
        "fastmlp", "eager", "compile"]
    # GEMM FLOPs of the block's forward+backward: three GEMMs per projection.
    case = gpu[f"gated-mlp/{block}/fwd+bwd/silu"]
    assert case.cost.flops == 3 * 3 * 2 * 4096 * 4096 * 11008


def test_gpu_only_rows_are_named_with_a_reason_on_cpu(tmp_path):
    from bench.conftest import module_params
    from bench.runner import not_run_here

    opts = RunOptions(device="cpu", only=["gated-"], compile=False,
                      timing=timing.TimingOptions.single_round())
    not_run = not_run_here(opts)
    assert len(not_run) == 15 and all("GPU-only" in e["reason"] for e in not_run)
    results = run_suite(opts, log=lambda _msg: None)
    assert results["records"] == [] and results["not_run"] == not_run
    paths = report.write_results({**results, "date": "2026-12-04"}, str(tmp_path), "2026-12-04")
    assert "Not run on cpu: 15 GPU-only case(s), gated-linear 4096x4096->11008 (2)" in \
        open(paths["table"]).read()
    # pytest-benchmark: the file's one test is skipped, saying why, not an empty parameter set.
    kinds, workloads = ("gated",), ("gated-linear", "gated-mlp", "gated-mlp-packed")
    params, ids = module_params(RunOptions(device="cpu"), kinds, workloads)
    assert ids == ["none"] and "15 GPU-only case(s)" in params[0].marks[0].kwargs["reason"]
    params, ids = module_params(RunOptions(device="cpu", tiny=True), kinds, workloads)
    # 6 tiny cases x (fastmlp, eager, compile), + liger on the 2 Llama-layout block cases.
    assert len(params) == 6 * 3 + 2 and all(p[0].kind == "gated" for p in params)


def _tiny_gated_cases():
    return [c for c in catalogue("cpu", tiny=True) if c.kind == "gated"]


def _gated_params():
    """(case, variant, form) for every tiny gated case and variant but compile (slow test
    below); form "functional" is fastmlp without fastmlp.GatedMLP (its fallback)."""
    from bench.runner import variants_for

    out = []
    for case in _tiny_gated_cases():
        for name in variants_for(case, RunOptions(device="cpu", tiny=True, compile=False)):
            out.append(pytest.param(case, name, "", id=f"{case.id}|{name}"))
            if name == "fastmlp" and case.workload != "gated-linear":
                out.append(pytest.param(case, name, "functional",
                                        id=f"{case.id}|{name}-functional"))
    return out


def _check_gated_variant(case, name, device):
    """Run the runner's own Runnable of the variant (bench.variants.build) and compare its
    output (fwd) or dX and every weight gradient (fwd+bwd) with the reference block in float64;
    the tolerance is the dtype's, or 4x eager torch's own error in the case's dtype."""
    from reference import rel_err, tolerance

    from bench import variants

    with variants.precision(case.dtype):
        reference = variants.reference_model(case, torch.device(device))
        data = variants.case_data(case, torch.device(device))
        ref64 = variants.reference_model(case, torch.device(device)).double()
        ref64.load_state_dict(reference.state_dict())
        x64 = data.x.double().requires_grad_(True)
        y64 = ref64(x64)
        y64.backward(data.target.double())
        expected = {"y": y64.detach(), "x": x64.grad}
        expected.update({n: p.grad for n, p in ref64.named_parameters()})

        def results(variant):
            runnable = variants.build(case, variant, reference, data)
            if runnable.reset:
                runnable.reset()
            runnable.fn()
            if case.pass_ == "fwd":
                return {"y": runnable.output()}
            got = {"x": runnable.grads[0].grad}
            got.update({n.replace("_orig_mod.", ""): p.grad
                        for n, p in runnable.model.named_parameters()})
            return got

        torch_err = {k: rel_err(v, expected[k]) for k, v in results("eager").items()}
        got = results(name)
    assert set(got) == set(torch_err)
    for key, value in got.items():
        dtype = variants.TORCH_DTYPES[case.dtype]
        err, tol = rel_err(value, expected[key]), tolerance(dtype, torch_err[key])
        assert err < tol, f"{case.id} {name} {key}: relative error {err:.3e} >= {tol:.1e}"


@pytest.mark.parametrize("case,name,form", _gated_params())
def test_gated_rows_compute_the_eager_block(case, name, form, device, triton_backend,
                                            monkeypatch):
    """Every gated row's variants compute what the eager block computes, forward and every
    gradient; fastmlp through its kernels (Triton's interpreter on a CPU, outputs poisoned
    with NaN), in the GatedMLP form and the functional fallback."""
    from bench import variants

    why = variants.unavailable(case, name, torch.device(device))
    if why is not None:
        assert name == "liger" and "liger" in why.lower()
        pytest.skip(why)    # Liger-Kernel is optional (not installed here): only its row skips
    if form == "functional":
        monkeypatch.delattr(fastmlp, "GatedMLP")
    runnable = variants.build(case, name, variants.reference_model(case, torch.device(device)),
                              variants.case_data(case, torch.device(device)))
    if name == "fastmlp":
        expected = ("fastmlp.functional" if form or case.workload == "gated-linear"
                    else "fastmlp.GatedMLP")
        assert runnable.notes.startswith(expected), runnable.notes
    _check_gated_variant(case, name, device)


@pytest.mark.slow  # torch.compile of three blocks, forward and backward
@pytest.mark.parametrize("case", [c for c in _tiny_gated_cases() if c.pass_ == "fwd+bwd"],
                         ids=lambda c: c.id)
def test_gated_rows_compile_baseline_computes_the_eager_block(case, device):
    _check_gated_variant(case, "compile", device)


def test_saved_bytes_of_fastmlp_are_what_the_gated_op_saves(triton_backend):
    """fastmlp keeps, per token, X (for dW_g and dW_u), G and U (the gated op's backward reads
    them) and the gated output Y (the down projection's input, for dW_d): nothing more. Derived
    from the shapes, so the test fails if the op starts saving more. Measured both ways the
    script can: under FakeTensorMode (what it uses at Llama-7B's size on a CPU) and by running
    the kernels (interpreter), which must agree."""
    from bench import saved_bytes

    k, h, n = 13, 19, 11
    e = torch.bfloat16.itemsize
    fake = saved_bytes.measure("fastmlp", (k, h, n), "bf16", "cpu", (5, 7))
    real = saved_bytes.measure("fastmlp", (k, h, n), "bf16", "cpu", (5, 7), fake=False)
    assert "FakeTensorMode" in fake.method and "FakeTensorMode" not in real.method
    for m in (fake, real):
        assert m.error is None
        assert m.x_per_token == e * k
        assert m.other_per_token == e * 3 * h
        assert m.constant == 0
        assert m.described() == "X + 3 x [19]"
    assert [r.other for r in fake.runs] == [r.other for r in real.runs] == [
        [e * 5 * h] * 3, [e * 7 * h] * 3]
    # Eager torch's graph keeps X, G (silu's input), silu(G) and U (the product's inputs) and
    # the product (down_proj's input).
    eager = saved_bytes.measure("eager", (k, h, n), "bf16", "cpu", (5, 7))
    assert (eager.x_per_token, eager.other_per_token, eager.constant) == (e * k, e * 4 * h, 0)


def test_saved_bytes_script_prints_the_table():
    from bench import saved_bytes

    lines = []
    assert saved_bytes.main(["--dims", "13", "19", "13", "--measure-at", "2", "3",
                             "--no-compile", "--tokens", "4096"], out=lines.append) == 0
    table = lines[0]
    assert "| implementation | saved per token |" in table and "MiB at 4096 tokens" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert "torch.compile (inductor, fullgraph)" not in rows
    assert "| X + 4 x [19] | 152 | 178 |" in rows["eager torch (nn.Linear x3, nn.SiLU)"]
    assert "| X + 3 x [19] | 114 | 140 |" in rows["fastmlp (gated op + linear)"]
    liger = rows["Liger-Kernel LigerSwiGLUMLP"]
    from bench.variants import liger_import_error

    assert ("not measured: liger_kernel is not importable" in liger) == (
        liger_import_error() is not None)


@pytest.mark.slow  # torch.compile, twice
def test_saved_bytes_measures_torch_compile():
    from bench import saved_bytes

    k, h = 13, 19
    m = saved_bytes.measure("compile", (k, h, k), "bf16", "cpu", (5, 7))
    eager = saved_bytes.measure("eager", (k, h, k), "bf16", "cpu", (5, 7))
    assert m.error is None and m.x_per_token == 2 * k
    assert 0 < m.other_per_token <= eager.other_per_token
