"""The staged GPU check (bench/gpu_check.sh): its dry run on this CPU, and its parts.

The dry run (--allow-cpu) runs every stage at tiny sizes, the kernels under Triton's interpreter:
it checks that each stage writes its files and figures, that a stage stopped by its timeout is
recorded as such while the later stages still run, and that OUT stays within what the device
tool brings back (8 files, one level, plain names). The GPU run of the suite skips this file:
the check runs the suite itself (--ignore in bench/gpucheck/stages.py).
"""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import xml.etree.ElementTree as ET

import pytest

import fastmlp
from bench.gpucheck import correctness, plan, proc
from bench.runner import RunOptions, select_cases

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "bench", "gpu_check.sh")
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
STATUSES = {"ok", "fail", "timeout", "skipped"}


def _run_check(cwd, *args, timeout=400):
    """bash bench/gpu_check.sh out --allow-cpu ARGS from `cwd` (OUT relative to the caller)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the check sets it
    env["PYTHON"] = sys.executable
    started = time.monotonic()
    proc_ = subprocess.run(["bash", SCRIPT, "out", "--allow-cpu", *args], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=timeout)
    out = cwd / "out"
    with open(out / "summary.json") as f:
        summary = json.load(f)
    return proc_, out, summary, time.monotonic() - started


def _assert_compact(out):
    names = sorted(os.listdir(out))
    assert len(names) <= plan.MAX_OUT_FILES, names
    for name in names:
        assert os.path.isfile(out / name) and not os.path.islink(out / name), name
        assert NAME_OK.match(name), name
        assert not name.endswith(".tmp"), name
    return names


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gpu_check")
    return _run_check(cwd)


# ---------------------------------------------------------------------------------------------
# The dry run
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # every stage, kernels under the interpreter: about a minute on two cores
def test_dry_run_passes_and_records_every_stage(dry_run):
    result, out, summary, seconds = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert summary["verdict"] == "PASS" and summary["complete"] is True
    assert [s["name"] for s in summary["stages"]] == list(plan.STAGES)
    for stage in summary["stages"]:
        assert stage["status"] in STATUSES, stage
        assert stage["seconds"] is not None and stage["budget_s"] is not None, stage
        for name in stage["files"]:
            assert (out / name).is_file(), (stage["name"], name)
    by_name = {s["name"]: s for s in summary["stages"]}
    for name in ("correctness", "headline", "tests", "bench"):
        assert by_name[name]["status"] == "ok", by_name[name]
    sanitizer = by_name["sanitizer"]
    assert sanitizer["status"] == "skipped" and "CUDA" in sanitizer["reason"]
    env = summary["environment"]
    assert env["has_cuda"] is False and env["versions"]["git_commit"]
    assert summary["date"] and summary["mode"].startswith("dry run")
    # The device tool returns only the output tail: the final table is the last thing printed.
    tail = result.stdout.splitlines()[-(len(plan.STAGES) + 4):]
    assert tail[0].startswith("GPU CHECK PASS") and tail[-1].startswith("OUT ("), tail


@pytest.mark.slow
def test_dry_run_out_is_compact(dry_run):
    _, out, summary, _ = dry_run
    names = _assert_compact(out)
    assert set(names) == set(plan.FILES.values())
    assert summary["files"] == names


@pytest.mark.slow
def test_dry_run_correctness_covers_every_kernel_and_dtype(dry_run):
    _, out, summary, _ = dry_run
    with open(out / "correctness.json") as f:
        data = json.load(f)
    assert data["complete"] is True and data["interpreter"] is True
    rows = data["rows"]
    for kernel in ("forward", "dX", "dW+db", "SGD"):
        for dtype in correctness.DTYPES:
            mine = [r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype]
            assert mine, (kernel, dtype)
            assert all(r["status"] == "pass" for r in mine), [r for r in mine if r["status"] != "pass"]
    for activation in fastmlp.ACTIVATIONS:
        assert any(r["kernel"] == "forward" and r["activation"] == activation for r in rows), activation
    shapes = {r["case"] for r in rows if r["kernel"] == "dW+db"}
    assert {s.name for s in correctness.TINY_SHAPES} <= shapes
    fit = [r for r in rows if r["kernel"] == "fit"]
    assert len(fit) == 1 and fit[0]["status"] == "pass"
    # Only the modules this version lacks may be skipped, and they say why.
    for r in rows:
        assert r["status"] in ("pass", "skipped"), r
        if r["status"] == "skipped":
            assert r["kernel"] in correctness.MODULES and r["reason"]
    assert data["poison_outputs"] and "POISON_OUTPUTS" in data["poison_outputs"][0]
    figures = next(s for s in summary["stages"] if s["name"] == "correctness")["figures"]
    assert figures["fail"] == 0 and figures["pass"] == sum(r["status"] == "pass" for r in rows)


@pytest.mark.slow
def test_dry_run_headline_rows_and_compile_budget(dry_run):
    _, out, _, _ = dry_run
    with open(out / "headline.json") as f:
        data = json.load(f)
    assert data["complete"] is True
    assert [r["id"] for r in data["records"]] == plan.headline_ids(tiny=True)
    for record in data["records"]:
        assert record["variants"]["fastmlp"]["status"] == "ok", record["id"]
        assert "autotuner_added" in record
        name = "stock-dataloader+compile-ro" if record["kind"] == "epoch" else "compile"
        compiled = record["variants"][name]
        assert compiled["status"] == "skipped" and compiled["reason"].startswith("budget"), compiled
    baselines = data["records"][0]["speedup"]
    assert baselines["eager"] and baselines["cublaslt-epilogue"]
    step = next(r for r in data["records"] if r["pass"] == "step")
    assert step["variants"]["eager"]["status"] == "ok"
    epoch = next(r for r in data["records"] if r["kind"] == "epoch")
    assert epoch["variants"]["stock-dataloader"]["status"] == "ok"
    assert "available" in data["autotuner"]


@pytest.mark.slow
def test_dry_run_tests_and_bench_results(dry_run):
    _, out, summary, _ = dry_run
    root = ET.parse(out / "junit.xml").getroot()
    assert root.iter("testcase") is not None
    tests = next(s for s in summary["stages"] if s["name"] == "tests")["figures"]
    assert tests["tests"] > 0 and tests["failures"] == 0 and tests["xdist"] is True
    with tarfile.open(out / "bench-results.tar.gz") as tar:
        names = tar.getnames()
        assert "bench-results/results.json" in names and "bench-results/bench.log" in names
        results = json.load(tar.extractfile("bench-results/results.json"))
    ids = [r["id"] for r in results["records"]]
    assert ids and not set(ids) & set(plan.headline_ids(tiny=True))
    text = (out / "summary.md").read_text()
    assert "## Stages" in text and "| forward |" in text and "## Headline figures" in text


@pytest.mark.slow
def test_a_stage_stopped_by_its_timeout_is_recorded_and_later_stages_run(tmp_path):
    result, out, summary, seconds = _run_check(
        tmp_path, "--stages", "correctness,tests", "--correctness-budget", "4", "--grace", "3")
    assert result.returncode == 1, result.stdout[-3000:]
    by_name = {s["name"]: s for s in summary["stages"]}
    stopped = by_name["correctness"]
    assert stopped["status"] == "timeout", stopped
    assert any(s.startswith("SIGINT") for s in stopped["signals"]), stopped
    assert stopped["seconds"] < 4 + 3 + 5
    if (out / "correctness.json").exists():  # SIGINT after the stage's first write: partial
        with open(out / "correctness.json") as f:
            partial = json.load(f)
        assert partial["complete"] is False and partial["unfinished"]
    assert by_name["tests"]["status"] == "ok", by_name["tests"]
    for name in ("headline", "sanitizer", "bench"):
        assert by_name[name]["status"] == "skipped" and "not selected" in by_name[name]["reason"]
    assert summary["verdict"].startswith("FAIL") and "correctness" in summary["verdict"]
    _assert_compact(out)


def test_sigterm_to_the_check_stops_the_stage_and_writes_the_summary(tmp_path):
    """What a device tool's timeout does: the stage in flight is stopped, the summary stays valid."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    check = subprocess.Popen(["bash", SCRIPT, str(tmp_path / "out"), "--allow-cpu", "--grace", "3"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    summary_path = tmp_path / "out" / "summary.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:   # until the first stage runs
        try:
            if json.loads(summary_path.read_text())["stages"][0]["status"] == "running":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    check.send_signal(signal.SIGTERM)    # bash exec'd python: this is the check itself
    output, _ = check.communicate(timeout=60)
    assert check.returncode == 130, output[-3000:]
    summary = json.loads(summary_path.read_text())
    assert "interrupted: SIGTERM" in summary["verdict"] and summary["complete"] is False
    statuses = [s["status"] for s in summary["stages"]]
    assert statuses == ["timeout"] + ["skipped"] * (len(plan.STAGES) - 1), statuses
    assert all("interrupted" in s["reason"] for s in summary["stages"])
    assert "GPU CHECK FAIL" in output
    _assert_compact(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------
def _child(tmp_path, code):
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(code))
    return [sys.executable, str(path)]


def test_proc_sigint_first_lets_the_child_write(tmp_path):
    marker = tmp_path / "wrote"
    cmd = _child(tmp_path, f"""
        import time
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            open({str(marker)!r}, "w").write("partial")
            raise SystemExit(130)
    """)
    outcome = proc.run(cmd, timeout=1.5, grace=10, log_path=str(tmp_path / "log"))
    assert outcome.timed_out and outcome.returncode == 130
    assert marker.read_text() == "partial"
    assert outcome.signals and outcome.signals[0].startswith("SIGINT") and not outcome.killed


def test_proc_sigkill_after_grace_when_sigint_is_ignored(tmp_path):
    cmd = _child(tmp_path, """
        import signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("ignoring SIGINT", flush=True)
        time.sleep(60)
    """)
    outcome = proc.run(cmd, timeout=1.5, grace=1, log_path=str(tmp_path / "log"), header="== h\n")
    assert outcome.timed_out and outcome.killed and outcome.returncode == -signal.SIGKILL
    assert outcome.seconds < 10
    assert (tmp_path / "log").read_text().startswith("== h\nignoring SIGINT")


def test_proc_kills_what_a_finished_command_left_behind(tmp_path):
    pid_file = tmp_path / "pid"
    cmd = _child(tmp_path, f"""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
    """)
    outcome = proc.run(cmd, timeout=30, grace=1, log_path=str(tmp_path / "log"))
    assert outcome.returncode == 0 and not outcome.timed_out
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z", "X"):
            break
        time.sleep(0.1)
    assert state in ("gone", "Z", "X"), f"leftover process {pid} still running ({state})"


@pytest.mark.parametrize("device_type,tiny", [("cuda", False), ("cuda", True), ("cpu", True)])
def test_rest_patterns_select_the_catalogue_minus_the_headline(device_type, tiny):
    """python -m bench --only with these patterns runs every other row, and no headline row."""
    patterns, overlap = plan.rest_patterns(device_type, tiny)
    head = set(plan.headline_ids(tiny))
    selected = {c.id for c in select_cases(RunOptions(device=device_type, tiny=tiny, only=patterns))}
    catalogue = {c.id for c in select_cases(RunOptions(device=device_type, tiny=tiny))}
    assert overlap == [] and not selected & head
    assert selected == catalogue - head
    if device_type == "cuda":
        assert {c.id for c in plan.headline_cases(tiny)} == head <= catalogue


def test_every_activation_has_a_float64_reference():
    import torch

    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for name in fastmlp.ACTIVATIONS:
        out = correctness.reference_activation(name)(z)
        assert out.shape == z.shape and out.dtype == torch.float64, name
    with pytest.raises(LookupError, match="no float64 reference"):
        correctness.reference_activation("no-such-activation")


def test_correctness_rows_fail_on_nan_and_on_error():
    status, worst, reason = correctness.judge({"y": {"err": 1e-7, "nan": 3}}, 1e-5)
    assert status == "fail" and "NaN" in reason
    status, worst, reason = correctness.judge({"y": {"err": 2e-5, "nan": 0}}, 1e-5)
    assert status == "fail" and "2.000e-05" in reason
    assert correctness.judge({"y": {"err": 5e-6, "nan": 0}}, 1e-5)[0] == "pass"
    assert correctness.judge({"dw": {"err": None, "nan": 0, "missing": True}}, 1e-5)[0] == "fail"


def test_compile_timer_stops_an_overrunning_compile(monkeypatch):
    from bench.gpucheck import headline

    monkeypatch.setattr(headline, "MIN_COMPILE_S", 0.05)
    allowance = headline.Allowance(time.monotonic() + 60, compile_budget=0.3)
    previous = signal.signal(signal.SIGALRM, headline._on_alarm)
    try:
        assert allowance.skip_reason("compile") is None   # armed for the 0.3 s left
        with pytest.raises(headline.CompileOverBudget):
            time.sleep(5)
    finally:
        allowance.disarm()
        signal.signal(signal.SIGALRM, previous)
    allowance.compile_spent = 0.3
    assert allowance.skip_reason("compile").startswith("budget")
    assert headline.Allowance(time.monotonic() + 60, 30, only_compile=True).skip_reason(
        "eager") == headline.MEASURED_IN_PASS_A


def test_out_file_names_fit_the_device_tool():
    assert len(plan.FILES) <= plan.MAX_OUT_FILES
    assert all(NAME_OK.match(n) for n in plan.FILES.values())
    fixed = sum(plan.DEFAULT_STAGE_BUDGET_S.values())
    assert fixed + plan.BENCH_MIN_S + plan.PACK_RESERVE_S <= plan.DEFAULT_BUDGET_S


def test_sanitize_target_racecheck_mode_and_sgd_on_the_interpreter(triton_backend):
    """The racecheck workload's references hold, and the memcheck target's SGD rows pass through
    the Triton SGD kernel (the interpreter here)."""
    from bench import sanitize_target

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert sanitize_target.check_layer(300, 16, 8, "fp32", True, "relu", device) == ""
    for dtype in ("fp32", "bf16"):
        assert sanitize_target.check_sgd(dtype, device, 0.9) == ""
    assert sanitize_target.main(["--device", device, "--mode", "racecheck"]) == 0
