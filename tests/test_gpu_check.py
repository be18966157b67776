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
    # CI runs two suites side by side on two cores: the correctness stage's 86 interpreter tests
    # (~30 s alone) get room, so that a loaded machine does not read as a broken check.
    return _run_check(cwd, "--budget", "800", "--correctness-budget", "400", timeout=900)


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
def test_dry_run_correctness_runs_the_selected_tests(dry_run):
    """Stage 1 ran the dry run's slice of the tests through the plugin: every group, every
    activation of both ops, each test a row with its closest comparison, outputs poisoned."""
    _, out, summary, _ = dry_run
    with open(out / "correctness.json") as f:
        data = json.load(f)
    assert data["complete"] is True and data["interpreter"] is True, data["unfinished"]
    assert data["unmatched"] == [] and data["collection_errors"] == [] and data["exitstatus"] == 0
    rows = data["rows"]
    assert len(rows) == data["tests_total"] == data["tests_done"] > 50
    assert all(r["status"] == "pass" for r in rows), [r for r in rows if r["status"] != "pass"]
    assert {r["group"] for r in rows} == set(correctness.GROUPS)
    expected_tests = {e.test for e in correctness.SELECTION if e.runs_in(tiny=True)}
    assert {r["nodeid"].split("[")[0] for r in rows} == expected_tests
    # the kernels' variant of every parametrised test, never the torch path
    assert all("torch-cpu" not in r["id"] for r in rows)
    for group in ("linear_act", "gated"):
        seen = {re.sub(r"-?[0-9.]+$", "", r["activation"]) for r in rows if r["group"] == group}
        assert set(fastmlp.ACTIVATIONS) <= seen, (group, seen)
    assert {"fp32", "tf32"} <= {r["dtype"] for r in rows if r["group"] == "linear_act"}
    measured = [r for r in rows if r["comparisons"]]
    assert len(measured) > len(rows) // 2
    assert all(r["err"] < r["tol"] and r["what"] for r in measured)
    assert all(r["poisoned"] is True for r in rows)
    figures = next(s for s in summary["stages"] if s["name"] == "correctness")["figures"]
    assert figures["fail"] == 0 and figures["pass"] == len(rows) and figures["worst_ratio"] < 1


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
    assert re.fullmatch(r"\d+ passed in [0-9.]+s", tests["line"]), tests   # pytest -q's last line
    with tarfile.open(out / "bench-results.tar.gz") as tar:
        names = tar.getnames()
        assert "bench-results/results.json" in names and "bench-results/bench.log" in names
        results = json.load(tar.extractfile("bench-results/results.json"))
    ids = [r["id"] for r in results["records"]]
    assert ids and not set(ids) & set(plan.headline_ids(tiny=True))
    text = (out / "summary.md").read_text()
    assert "## Stages" in text and "| linear_act |" in text and "| gated |" in text
    assert "## Headline figures" in text


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
    if (out / "correctness.json").exists():  # SIGINT after the plugin's first write: partial
        with open(out / "correctness.json") as f:
            partial = json.load(f)
        assert partial["complete"] is False
        assert partial["tests_total"] is None or partial["unfinished"], partial
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
    """Also a process that moved to a group of its own (as a launcher may put its target)."""
    pid_file = tmp_path / "pid"
    cmd = _child(tmp_path, f"""
        import os, subprocess, sys
        sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
        p = subprocess.Popen(sleep)
        q = subprocess.Popen(sleep, preexec_fn=os.setpgrp)
        open({str(pid_file)!r}, "w").write(f"{{p.pid}} {{q.pid}}")
    """)
    outcome = proc.run(cmd, timeout=30, grace=1, log_path=str(tmp_path / "log"))
    assert outcome.returncode == 0 and not outcome.timed_out
    for pid in pid_file.read_text().split():
        _assert_gone(int(pid))


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


@pytest.mark.parametrize("tiny", [False, True], ids=["cuda-selection", "dry-run-selection"])
def test_correctness_selection_matches_the_tests(tmp_path, tiny):
    """Every entry of the stage's selection names a collected test (a renamed test or parameter
    fails here, not silently on the GPU), the kernels' variant only, the gated op included."""
    path = tmp_path / "correctness.json"
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMLP_BACKEND",)}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", *correctness.test_files(), "-p", correctness.PLUGIN,
           f"--silicon-out={path}", "--collect-only", "-q", "-p", "no:xdist"]
    if tiny:
        cmd.append("--silicon-tiny")
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    data = json.loads(path.read_text())
    assert data["unmatched"] == [] and data["collection_errors"] == []
    selected = data["unfinished"]            # collected, none run
    assert len(selected) == data["tests_total"] and data["rows"] == []
    entries = [e for e in correctness.SELECTION if e.runs_in(tiny)]
    assert {n.split("[")[0] for n in selected} == {e.test for e in entries}
    variant = "triton-interpreter" if tiny else "triton-cuda"
    for nodeid in selected:
        assert not re.search(r"\[(torch-cpu|torch-cuda|triton-cuda|triton-interpreter)", nodeid) \
            or f"[{variant}" in nodeid, nodeid
    gated = [n for n in selected if n.startswith("tests/test_gated.py::")]
    assert gated and any("every_activation" in n for n in gated)
    if not tiny:   # the GPU runs every parametrisation its entries allow
        assert len(selected) > 300
        assert any("int64_addressing" in n for n in selected)
        assert len([n for n in selected if "test_gated.py::test_every_activation" in n]) == 27


def test_correctness_labels_and_order():
    """Report labels come from the parameters; tests sharing kernels run next to each other."""
    assert correctness.labels({"dtype": "torch.bfloat16", "activation": "gelu", "id": "x"}) == \
        ("bf16", "gelu")
    assert correctness.labels({"mode": "tf32", "id": ""}) == ("tf32", "-")
    assert correctness.labels({"case": "('w32', 1, torch.float16)", "id": ""}) == ("fp16", "-")
    assert correctness.labels({"id": ""}) == ("fp32", "-")
    entry = correctness.BY_TEST["tests/test_gated.py::test_odd_shapes"]
    keys = [correctness.order_key(entry, {"activation": a, "id": ""}, i)
            for i, a in enumerate(["silu", "relu", "silu"])]
    assert sorted(range(3), key=keys.__getitem__) == [1, 0, 2]
    assert correctness.worst([["a", "fp32", 1e-6, 1e-5], ["b", "bf16", 1e-2, 2e-2]])[0] == "b"
    assert correctness.worst([]) is None
    # the impl variant decides: torch's path on CUDA is never the stage's
    nodeid = "tests/test_gated.py::test_odd_shapes[x]"
    params = {"impl": "('torch', 'cuda')", "activation": "silu", "id": "x"}
    assert correctness.select(nodeid, params, tiny=False) is None
    assert correctness.select(nodeid, dict(params, impl="('triton', 'cuda')"), tiny=False) is entry


def test_assert_close_records_every_comparison():
    """fastmlp.testing.record_comparisons sees passing and failing comparisons (before they
    raise), each block its own, nothing outside a block."""
    import torch

    from fastmlp import testing

    a = torch.ones(4)
    testing.assert_close(a, a, torch.float32, "outside")
    with testing.record_comparisons() as outer:
        testing.assert_close(a, a + 1e-7, torch.float32, "close")
        with testing.record_comparisons() as inner:
            with pytest.raises(AssertionError, match="relative error"):
                testing.assert_close(a * 1.5, a, torch.bfloat16, "far", tol=0.1)
    assert [c.what for c in outer] == ["close", "far"] and [c.what for c in inner] == ["far"]
    close, far = outer
    assert close.passed and close.dtype == "float32" and close.tolerance == 1e-5
    assert not far.passed and far.dtype == "bfloat16" and far.tolerance == 0.1
    assert far.error == pytest.approx(0.5)
    assert testing._RECORDERS == []


def _stage_with_rows(tmp_path, monkeypatch, rows, returncode=0, **extra):
    """The correctness stage's entry when its pytest run leaves these rows (no pytest run)."""
    from bench.gpucheck import stages

    check = _check(tmp_path)

    def fake_command(name, cmd, timeout, env_extra, grace=None):
        assert cmd[1:3] == ["-m", "pytest"] and correctness.PLUGIN in cmd
        assert env_extra == {"FASTMLP_AUTOTUNE": "0", "FASTMLP_POISON_OUTPUTS": "1",
                             "OMP_NUM_THREADS": "1"}
        out = next(c for c in cmd if c.startswith("--silicon-out=")).split("=", 1)[1]
        data = dict({"complete": True, "tests_total": len(rows), "tests_done": len(rows),
                     "unmatched": [], "collection_errors": [], "rows": rows}, **extra)
        with open(out, "w") as f:
            json.dump(data, f)
        return proc.Outcome(returncode=returncode, timed_out=False, seconds=1.0)

    monkeypatch.setattr(check, "command", fake_command)
    return stages.correctness(check, 100)


def test_correctness_stage_status_from_its_rows(tmp_path, monkeypatch):
    row = {"group": "gated", "dtype": "bf16", "status": "pass", "err": 1e-3, "tol": 2e-2}
    entry = _stage_with_rows(tmp_path, monkeypatch, [row, dict(row, dtype="fp32")])
    assert entry["status"] == "ok" and entry["figures"]["worst_ratio"] == pytest.approx(0.05)
    assert entry["figures"]["matrix"]["gated"]["bf16"]["pass"] == 1
    entry = _stage_with_rows(tmp_path, monkeypatch, [row, dict(row, status="fail")], returncode=1)
    assert entry["status"] == "fail" and "1 test(s) failed" in entry["reason"]
    entry = _stage_with_rows(tmp_path, monkeypatch, [row], unmatched=["tests/t.py::gone"])
    assert entry["status"] == "fail" and "tests/t.py::gone" in entry["reason"]
    entry = _stage_with_rows(tmp_path, monkeypatch, [dict(row, status="skipped")])
    assert entry["status"] == "fail" and "no test passed" in entry["reason"]
    # a GPU run (as _check builds it) may not skip a selected test: its worker did not see CUDA
    entry = _stage_with_rows(tmp_path, monkeypatch, [row, dict(row, status="skipped")])
    assert entry["status"] == "fail" and "skipped on the GPU" in entry["reason"]


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
    from bench import gpu_check

    assert len(plan.FILES) <= plan.MAX_OUT_FILES
    assert all(NAME_OK.match(n) for n in plan.FILES.values())
    fixed = sum(plan.DEFAULT_STAGE_BUDGET_S.values())
    assert fixed + plan.BENCH_MIN_S + plan.PACK_RESERVE_S <= plan.DEFAULT_BUDGET_S
    # Worst case, every stage overrunning: each later stage gets only what is left, so the last
    # one ends at most its grace and the reaping wait after the deadline less the final reserve
    # (bench: less the packing reserve too, which the packing then uses); then the last summary.
    # The device tool's timeout_s of ~540 needs all of it within ~510 s.
    worst = plan.DEFAULT_BUDGET_S - gpu_check.FINAL_RESERVE_S + plan.DEFAULT_GRACE_S + proc.REAP_S
    assert worst + 3 <= 510, worst
    # and check.log, one section per command, stays under the tool's 16 MiB per file
    commands = 1 + len(plan.STAGES) + 1   # the probe, the stages, sanitizer's second tool
    assert commands * gpu_check.MAX_SECTION_BYTES < 15 * 2**20


# ---------------------------------------------------------------------------------------------
# GPU-only paths, with the GPU's parts stood in for
# ---------------------------------------------------------------------------------------------
def _check(tmp_path, *argv):
    """A Check on OUT tmp_path/out as the GPU run would have it, without running the probe."""
    from bench import gpu_check

    check = gpu_check.Check(gpu_check.parse_args([str(tmp_path / "out"), *argv]))
    check.info = {"has_cuda": True, "cpu_count": 16, "pytest": True, "pytest_xdist": True,
                  "pytest_timeout": True}
    check.tiny, check.device = False, "cuda"
    return check


def test_pytest_quiet_summary_line_is_read():
    """The tests stage passes -q, where pytest's last line has no '=' around it."""
    from bench.gpucheck import stages

    for line, want in (("29 passed in 4.33s", "29 passed in 4.33s"),
                       ("3 failed, 250 passed, 2 skipped in 98.10s (0:01:38)", None),
                       ("== 1 failed, 28 passed, 3 warnings in 5.00s ==", None),
                       ("no tests ran in 0.01s", None),
                       ("===== slowest 25 durations =====", False),
                       ("(25 durations < 0.005s hidden.  Use -vv to show these durations.)", False)):
        match = stages._PYTEST_LINE.match(line)
        if want is False:
            assert match is None, line
        else:
            assert match and match.group(1) == (want or line.strip("= ")), line


def test_headline_rows_left_unmeasured_by_the_budget_are_not_ok(tmp_path, monkeypatch):
    """A headline run that ends cleanly but skipped fastmlp on rows (its own deadline) is a
    timeout, not a pass: on a cold GPU the first rows' autotuning can eat the stage."""
    from bench.gpucheck import stages

    check = _check(tmp_path)
    ids = plan.headline_ids(tiny=False)

    def fake_command(name, cmd, timeout, env_extra, grace=None):
        records = [{"id": i, "variants": {"fastmlp": {"status": "ok" if n < 2 else "skipped",
                                                      "median_ms": 1.0 if n < 2 else None}},
                    "speedup": {}} for n, i in enumerate(ids)]
        with open(cmd[cmd.index("--out") + 1], "w") as f:
            json.dump({"complete": True, "records": records, "compile": {}, "peak": {}}, f)
        return proc.Outcome(returncode=0, timed_out=False, seconds=1.0)

    monkeypatch.setattr(check, "command", fake_command)
    entry = stages.headline(check, 150)
    assert entry["status"] == "timeout", entry
    assert f"4 of {len(ids)} rows" in entry["reason"] and entry["figures"]["unmeasured"] == ids[2:]


def test_sanitizer_stage_command_lines_and_summaries(tmp_path):
    """The sanitizer stage with a stand-in compute-sanitizer: its argv, and the summaries read."""
    from bench.gpucheck import stages

    argv_log = tmp_path / "argv"
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        args = sys.argv[1:]
        open({str(argv_log)!r}, "a").write(repr(args) + "\\n")
        tool = args[args.index("--tool") + 1]
        if tool == "memcheck":
            print("sanitize target (memcheck): 52 checks, ok")
            print("========= ERROR SUMMARY: 3 errors")
            sys.exit(int(args[args.index("--error-exitcode") + 1]))
        print("sanitize target (racecheck): 4 checks, ok")
        print("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)")
    """))
    fake.chmod(0o755)
    check = _check(tmp_path)
    check.info["compute_sanitizer"] = str(fake)
    entry = stages.sanitizer(check, 30)
    calls = [eval(line) for line in argv_log.read_text().splitlines()]
    assert [c[c.index("--tool") + 1] for c in calls] == ["memcheck", "racecheck"]
    for c in calls:
        target = c[c.index(sys.executable):]
        assert target[:3] == [sys.executable, "-m", "bench.sanitize_target"]
        assert target[3:] == ["--mode", c[c.index("--tool") + 1]]
    assert entry["status"] == "fail"
    memcheck, racecheck = entry["figures"]["memcheck"], entry["figures"]["racecheck"]
    assert memcheck["summary"] == "3 errors" and memcheck["reason"].startswith("the tool reported")
    assert memcheck["target"] == "52 checks, ok"
    assert racecheck["status"] == "ok" and racecheck["summary"].startswith("0 hazards")


def test_caller_switches_do_not_leak_into_the_stages(tmp_path, monkeypatch):
    """TRITON_INTERPRET from the caller's shell would put a GPU run under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTMLP_BACKEND", "torch")
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "0")
    check = _check(tmp_path)
    assert "TRITON_INTERPRET" not in check.env and "FASTMLP_BACKEND" not in check.env
    assert check.summary["scrubbed_env"] == {"TRITON_INTERPRET": "1", "FASTMLP_BACKEND": "torch"}
    assert check.summary["env_vars"]["FASTMLP_AUTOTUNE"] == "0"   # recorded, left as set


def test_a_command_flooding_check_log_is_cut_in_the_middle(tmp_path):
    from bench import gpu_check

    check = _check(tmp_path)
    code = "[print(f'line {i} ' + 'x' * 40) for i in range(200000)]; print('THE END')"
    outcome = check.command("flood", [sys.executable, "-c", code], 60, {})
    assert outcome.returncode == 0
    size = os.path.getsize(check.log_path)
    assert size < gpu_check.MAX_SECTION_BYTES + 4096, size
    lines = check.section_lines("flood")
    assert "[gpu_check] flood:" in lines[1] and lines[2].startswith("line 0 ")  # header, start
    assert any("bytes of this command's output cut" in line for line in lines)
    assert lines[-2] == "THE END" and "exit 0" in lines[-1]       # the end, and the exit line


def test_failure_digest_fits_the_output_tail():
    from bench.gpucheck import report

    stages = [{"name": n, "status": "fail", "reason": "r" * 500,
               "log_tail": [f"{n} line {i} " + "y" * 300 for i in range(25)]} for n in plan.STAGES]
    stages[0]["status"] = "ok"
    digest = report.failure_digest({"stages": stages}, 6000)
    assert len(digest) <= 6000
    for n in plan.STAGES[1:]:
        assert f"--- {n}: fail" in digest and f"{n} line 24 " in digest   # each stage's last line
    assert f"--- {plan.STAGES[0]}" not in digest
    assert report.failure_digest({"stages": stages[:1]}, 6000) == ""
    # figures of an unexpected shape give a note, never an exception (the check prints them)
    assert "figures not rendered" in report.figures_text(
        {"name": "headline", "figures": {"rows": [{"id": None}]}, "reason": None})


def test_proc_second_interrupt_during_the_grace_still_kills_the_group(tmp_path):
    """A device tool's timeout may signal twice: the stage's processes must not outlive it."""
    pid_file = tmp_path / "pid"
    cmd = _child(tmp_path, f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        time.sleep(60)
    """)

    class Stop(BaseException):
        pass

    def raise_stop(signum, frame):
        raise Stop()

    previous = signal.signal(signal.SIGUSR1, raise_stop)
    try:
        import threading

        def twice():
            while not pid_file.exists():
                time.sleep(0.05)
            for _ in range(2):
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGUSR1)

        threading.Thread(target=twice, daemon=True).start()
        with pytest.raises(Stop):
            proc.run(cmd, timeout=30, grace=10, log_path=str(tmp_path / "log"))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    _assert_gone(int(pid_file.read_text()))


def _assert_gone(pid):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z", "X"):
            return
        time.sleep(0.1)
    raise AssertionError(f"leftover process {pid} still running ({state})")


def test_gpu_check_sh_skips_a_python_without_torch(tmp_path):
    """`python` may be another interpreter than the one with torch (python3 on the GPU machine)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\necho 'Python 2.7' >&2\nexit 1\n")
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_dir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    result = subprocess.run(["bash", SCRIPT, "--help"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--allow-cpu" in result.stdout


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
