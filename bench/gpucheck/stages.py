"""How each stage of the GPU check is run, and how its key figures are read back.

Each function takes the running check (bench/gpu_check.py's Check: OUT, the scratch folder, the
environment probe, the options, `command` to run a subprocess with a timeout) and the stage's
timeout in seconds, and returns the stage's entry for summary.json: status (ok, fail, timeout,
skipped), reason, files (what it wrote in OUT) and figures. Statuses come from what the stage
left on disk as much as from exit codes: a stage that exits 0 but wrote an incomplete result is
not "ok". No torch here (the orchestrator must stay light); every stage is a subprocess.
"""

import os
import re
import shlex
import tarfile
import xml.etree.ElementTree as ET
from typing import List, Optional

from bench.gpucheck import correctness as subset   # stage 1's tests (`correctness` runs them)
from bench.gpucheck import plan, report

FILES = plan.FILES


def _status(outcome, ok: bool) -> str:
    if outcome.timed_out:
        return "timeout"
    return "ok" if ok else "fail"


def _entry(outcome, status: str, files: List[str], figures: dict, reason: Optional[str] = None,
           out: str = "") -> dict:
    present = [f for f in files if os.path.isfile(os.path.join(out, f))]
    if reason is None and status == "timeout":
        reason = "stopped by its timeout (" + ", ".join(outcome.signals) + ")"
    elif reason is None and status == "fail":
        reason = f"exit status {outcome.returncode}"
    return {"status": status, "reason": reason, "files": present, "figures": figures,
            "returncode": outcome.returncode, "signals": outcome.signals}


# ---------------------------------------------------------------------------------------------
def correctness_command(check, path: str) -> List[str]:
    """pytest on the correctness subset (bench/gpucheck/correctness.py), with the plugin that
    selects it and writes `path`; in parallel where pytest-xdist is installed."""
    info = check.info
    cmd = [check.python, "-m", "pytest", *subset.test_files(), "-p", subset.PLUGIN,
           f"--silicon-out={path}", "-q", "-rfEs", "--tb=short"]
    if check.tiny:
        cmd.append("--silicon-tiny")
    workers = check.args.workers
    if workers is None:
        cpus = info.get("cpu_count") or 1
        # compile-bound: every CPU but two (the controller, the GPU driver's threads), at most
        # 14 (each worker holds a CUDA context); the dry run's two shared cores: 2
        workers = 2 if check.tiny else (min(14, cpus - 2) if cpus >= 4 else cpus)
    if info.get("pytest_xdist") and workers > 1:
        cmd += ["-n", str(workers)]
    if info.get("pytest_timeout") and check.args.test_timeout:
        cmd += [f"--timeout={check.args.test_timeout:g}"]
    return cmd


def correctness(check, timeout: float) -> dict:
    path = os.path.join(check.out, FILES["correctness"])
    if os.path.exists(path):
        os.remove(path)
    if not check.info.get("pytest"):
        return {"status": "fail", "reason": "pytest is not installed: the correctness stage runs "
                "the project's tests", "files": [], "figures": {}}
    cmd = correctness_command(check, path)
    # One tile config per kernel (the default): correctness of the default path, without spending
    # the stage on timing candidates (the headline stage autotunes). Every kernel output NaN-
    # poisoned before launch, also in the tests whose fixtures do not ask for it (fit, modules).
    # One OpenMP thread per worker: 14 workers with 16 threads each would fight ptxas and LLVM.
    outcome = check.command("correctness", cmd, timeout,
                            {"FASTMLP_AUTOTUNE": "0", "FASTMLP_POISON_OUTPUTS": "1",
                             "OMP_NUM_THREADS": "1"})
    data = report.load_json(path)
    figures = {}
    if data is not None:
        rows = data.get("rows", [])
        ratios = [r["err"] / r["tol"] for r in rows if r.get("err") is not None and r.get("tol")]
        figures = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "skipped")}
        figures.update(complete=bool(data.get("complete")), tests_done=data.get("tests_done"),
                       tests_total=data.get("tests_total"),
                       worst_ratio=max(ratios) if ratios else None,
                       unmatched=data.get("unmatched"), matrix=report.correctness_matrix(rows))
    # On a GPU nothing selected may skip: a skip there means a worker did not see CUDA (its
    # tests would then have run under the interpreter, or not at all) and proves nothing.
    skips_fail = not check.tiny and bool(figures.get("skipped"))
    ok = (outcome.returncode == 0 and figures.get("complete") and not figures.get("fail")
          and figures.get("pass") and not figures.get("unmatched") and not skips_fail)
    reason = None
    if outcome.timed_out:
        pass
    elif data is None:
        reason = f"no {FILES['correctness']} written (exit status {outcome.returncode}; check.log)"
    elif figures.get("fail"):
        reason = f"{figures['fail']} test(s) failed (summary.md, correctness.json)"
    elif data.get("collection_errors"):
        reason = f"collection errors: {'; '.join(data['collection_errors'])[:300]}"
    elif figures.get("unmatched"):
        reason = (f"selection entries that match no test (renamed?): "
                  f"{', '.join(figures['unmatched'])}")
    elif not figures.get("pass"):
        reason = "no test passed (every selected test skipped?)"
    elif skips_fail:
        reason = (f"{figures['skipped']} selected test(s) skipped on the GPU (did the workers see "
                  f"CUDA? correctness.json has each reason)")
    elif not ok:
        reason = f"pytest exit status {outcome.returncode}"
    return _entry(outcome, _status(outcome, bool(ok)), [FILES["correctness"]], figures, reason,
                  check.out)


# ---------------------------------------------------------------------------------------------
def headline(check, timeout: float) -> dict:
    path = os.path.join(check.out, FILES["headline"])
    compile_budget = check.args.compile_budget
    if compile_budget is None:
        # A CPU dry run would spend a minute per inductor compile on a small machine.
        compile_budget = 0.0 if check.tiny else plan.DEFAULT_COMPILE_BUDGET_S
    cmd = [check.python, "-m", "bench.gpucheck.headline", "--out", path, "--device", check.device,
           "--budget", f"{timeout:.0f}", "--compile-budget", f"{compile_budget:g}"]
    if check.tiny:
        cmd.append("--tiny")
    outcome = check.command("headline", cmd, timeout, {})
    data = report.load_json(path)
    figures = {}
    if data is not None:
        rows = []
        for r in data.get("records", []):
            fast = r["variants"].get("fastmlp", {})
            rows.append({"id": r["id"], "fastmlp_ms": fast.get("median_ms"),
                         "fastmlp_graphed_ms": fast.get("graphed_median_ms"),
                         "speedup": r.get("speedup"), "parity_ok": fast.get("parity_ok"),
                         "autotuner_added": r.get("autotuner_added")})
        figures = {"complete": bool(data.get("complete")), "rows": rows,
                   "compile": data.get("compile"), "peak": data.get("peak")}
    ok = outcome.returncode == 0 and figures.get("complete")
    # A row whose fastmlp variant was skipped (the stage's own deadline) has no headline figure:
    # the stage ran out of time even though it ended cleanly.
    records = (data or {}).get("records", [])
    unmeasured = [r["id"] for r in records
                  if r["variants"].get("fastmlp", {}).get("status") == "skipped"]
    missing = max(0, len(plan.HEADLINE) - len(records))
    if data is not None:
        figures["unmeasured"] = unmeasured
    reason = None
    status = _status(outcome, bool(ok))
    if data is None and not outcome.timed_out:
        reason = f"no {FILES['headline']} written (exit status {outcome.returncode}; check.log)"
    elif not ok and not outcome.timed_out:
        reason = "fastmlp failed or missed parity on a row (check.log, headline.json)"
    elif ok and (unmeasured or missing > 0):
        status = "timeout"
        reason = (f"{len(unmeasured) + missing} of {len(plan.HEADLINE)} rows without a "
                  f"fastmlp figure: the stage's budget ran out")
    return _entry(outcome, status, [FILES["headline"]], figures, reason, check.out)


# ---------------------------------------------------------------------------------------------
# A CPU dry run runs a few fast tests, not the CPU suite (minutes): the machinery (xdist,
# timeouts, junit, SIGINT on overrun) is what it checks.
TINY_PYTEST_SELECTION = ["tests/test_errors.py", "-m", "not slow"]


def pytest_command(check, junit: str) -> List[str]:
    if check.args.pytest_args:
        selection = shlex.split(check.args.pytest_args)
    elif check.tiny:
        selection = list(TINY_PYTEST_SELECTION)
    else:
        # Without the "slow" tests: AOT compiles of every config, multi-process gloo and the
        # benchmark harness in subprocesses, which CI runs on CPUs and stages 2 and 5 run here.
        selection = ["tests", "-m", "not slow"]
    cmd = [check.python, "-m", "pytest", *selection,
           # this file runs the whole check (dry run): inside the check it would recurse
           "--ignore=tests/test_gpu_check.py",
           # short tracebacks: a kernel broken on this GPU fails hundreds of tests alike
           "-q", "-rfEs", "--tb=short", "--durations=25", f"--junitxml={junit}"]
    info = check.info
    workers = check.args.pytest_workers
    if workers is None:
        workers = min(8, info.get("cpu_count") or 1) if not check.tiny else 2
    if info.get("pytest_xdist") and workers > 1:
        cmd += ["-n", str(workers)]
    if info.get("pytest_timeout") and check.args.test_timeout:
        cmd += [f"--timeout={check.args.test_timeout:g}"]
    return cmd


def junit_figures(path: str) -> dict:
    """Totals and the slowest tests from a junit.xml (pytest's or xdist's merged one)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    totals = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    totals["time_s"] = sum(float(s.get("time", 0)) for s in suites)
    cases = []
    for s in suites:
        for case in s.iter("testcase"):
            cases.append({"name": f"{case.get('classname')}::{case.get('name')}",
                          "seconds": float(case.get("time", 0) or 0)})
    totals["slowest"] = sorted(cases, key=lambda c: -c["seconds"])[:10]
    return totals


# pytest's last line: "3 failed, 250 passed, 2 skipped in 98.10s (0:01:38)", with "=" around it
# unless -q (which the stage passes), or "no tests ran in 0.10s"
_PYTEST_LINE = re.compile(r"^=*\s*((?:\d+ [a-z]+, )*\d+ [a-z]+ in [0-9.]+s(?: \([0-9:]+\))?"
                          r"|no tests ran in [0-9.]+s)\s*=*$")


def tests(check, timeout: float) -> dict:
    junit = os.path.join(check.out, FILES["junit"])
    if os.path.exists(junit):
        os.remove(junit)
    if not check.info.get("pytest"):
        return {"status": "fail", "reason": "pytest is not installed", "files": [], "figures": {}}
    cmd = pytest_command(check, junit)
    outcome = check.command("tests", cmd, timeout, {"FASTMLP_AUTOTUNE": "0"})
    figures = junit_figures(junit)
    for line in reversed(check.section_lines("tests")):
        match = _PYTEST_LINE.match(line.strip())
        if match:
            figures["line"] = match.group(1)
            break
    figures["xdist"] = "-n" in cmd
    figures["per_test_timeout"] = any(c.startswith("--timeout=") for c in cmd)
    reason = None
    if outcome.returncode == 5:
        reason = "pytest collected no tests"
    elif outcome.returncode not in (0, None) and not outcome.timed_out:
        reason = figures.get("line") or f"pytest exit status {outcome.returncode}"
    return _entry(outcome, _status(outcome, outcome.returncode == 0), [FILES["junit"]], figures,
                  reason, check.out)


# ---------------------------------------------------------------------------------------------
_MEMCHECK = re.compile(r"ERROR SUMMARY: (\d+) error")
_RACECHECK = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
SANITIZER_ERROR_EXIT = 97
TOOLS = (("memcheck", 0.6), ("racecheck", 1.0))   # share of the time left when each starts


def sanitizer(check, timeout: float) -> dict:
    """memcheck on bench.sanitize_target, then racecheck on its split-dW mode."""
    tool = check.info.get("compute_sanitizer")
    if not check.info.get("has_cuda"):
        return {"status": "skipped", "reason": "no CUDA device: compute-sanitizer needs one",
                "files": [], "figures": {}}
    if not tool:
        return {"status": "skipped", "reason": "compute-sanitizer not found (PATH, $CUDA_HOME, "
                "/usr/local/cuda*)", "files": [], "figures": {}}
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1",  # memcheck then sees each tensor's real bounds
           "FASTMLP_AUTOTUNE": "0"}                 # one config: no timing loops under the tool
    figures, statuses, signals = {}, [], []
    end = check.now() + timeout
    for name, share in TOOLS:
        left = end - check.now()
        if left < 5:
            figures[name] = {"status": "skipped", "reason": "no time left in the stage"}
            continue
        cmd = [tool, "--tool", name, "--error-exitcode", str(SANITIZER_ERROR_EXIT)]
        if name == "memcheck":
            # CUDA API calls that fail by design (libraries probing for entry points) would
            # otherwise count as errors; memory errors still do.
            cmd += ["--report-api-errors", "no"]
        cmd += [check.python, "-m", "bench.sanitize_target", "--mode", name]
        # compute-sanitizer writes nothing on SIGINT: a short grace, so that memcheck overrunning
        # its share does not also take racecheck's time
        outcome = check.command(f"sanitizer:{name}", cmd, left * share, env,
                                grace=plan.SHORT_GRACE_S)
        signals += outcome.signals
        text = "\n".join(check.section_lines(f"sanitizer:{name}"))
        found = (_MEMCHECK if name == "memcheck" else _RACECHECK).findall(text)
        summary = None
        if found:
            summary = (f"{found[-1]} errors" if name == "memcheck"
                       else f"{found[-1][0]} hazards ({found[-1][1]} errors, {found[-1][2]} warnings)")
        target = re.findall(r"sanitize target \(\w+\): (.*)", text)
        status = _status(outcome, outcome.returncode == 0)
        reason = None
        if status == "fail" and "Device not supported" in text:
            # compute-sanitizer refuses some virtualised GPUs (gVisor): nothing was checked,
            # which is a skip with its reason, not a failure of the kernels
            status, reason = "skipped", "compute-sanitizer: Device not supported on this machine"
        elif status == "fail":
            reason = ("the tool reported errors" if outcome.returncode == SANITIZER_ERROR_EXIT
                      else f"exit status {outcome.returncode}") + (f"; target: {target[-1]}"
                                                                   if target else "")
        figures[name] = {"status": status, "summary": summary, "target": target[-1] if target else None,
                         "reason": reason, "seconds": outcome.seconds, "returncode": outcome.returncode}
        statuses.append(status)
    if "fail" in statuses:
        status = "fail"
    elif "timeout" in statuses:
        status = "timeout"
    else:
        status = "ok" if "ok" in statuses else "skipped"
    reasons = [f"{k}: {v['reason']}" for k, v in figures.items() if v.get("reason")]
    return {"status": status, "reason": "; ".join(reasons) or None, "files": [],
            "figures": figures, "signals": signals}


# ---------------------------------------------------------------------------------------------
BENCH_MARGIN_S = 25.0   # after --time-budget: the variant in flight, plots, writing the report


def bench(check, timeout: float) -> dict:
    """python -m bench on the catalogue minus the headline rows, packed as one tar.gz."""
    patterns, overlap = plan.rest_patterns(check.device, check.tiny)
    if not patterns:
        return {"status": "skipped", "reason": "no rows left besides the headline's",
                "files": [], "figures": {}}
    report_dir = os.path.join(check.scratch, "bench-results")
    inner = max(5.0, timeout - min(BENCH_MARGIN_S, 0.4 * timeout))
    cmd = [check.python, "-m", "bench", "--out", report_dir, "--time-budget", f"{inner:.0f}"]
    if check.tiny:
        cmd += ["--tiny", "--rounds", "1", "--no-compile", "--device", "cpu"]
    else:
        compile_budget = 0.3 * inner
        cmd += ["--no-compile"] if compile_budget < 20 else ["--compile-budget", f"{compile_budget:.0f}"]
    for p in patterns:
        cmd += ["--only", p]
    cmd += shlex.split(check.args.bench_args or "")
    outcome = check.command("bench", cmd, timeout, {})
    tarball = os.path.join(check.out, FILES["bench"])
    results = report.load_json(os.path.join(report_dir, "results.json"))
    if os.path.isdir(report_dir):
        with open(os.path.join(report_dir, "bench.log"), "w") as f:
            f.write("\n".join(check.section_lines("bench")) + "\n")
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(report_dir, arcname="bench-results")
    figures = {"overlap_with_headline": overlap, "time_budget_s": inner}
    if results is not None:
        entries = [e for r in results.get("records", []) for e in r["variants"].values()]
        figures.update(records=len(results.get("records", [])),
                       complete=bool(results.get("complete")),
                       **{s: sum(e["status"] == s for e in entries) for s in ("ok", "skipped", "error")})
        try:
            with open(os.path.join(report_dir, "README-table.md")) as f:
                figures["readme_table"] = f.read()
        except OSError:
            pass
    # A baseline that errors is reported (figures, the packed results); fastmlp erroring fails.
    fast_errors = [r["id"] for r in (results or {}).get("records", [])
                   if r["variants"].get("fastmlp", {}).get("status") == "error"]
    figures["fastmlp_errors"] = fast_errors
    ok = (outcome.returncode == 0 and results is not None and results.get("complete")
          and not fast_errors)
    reason = None
    if not ok and not outcome.timed_out:
        if results is None:
            reason = f"no results.json (exit status {outcome.returncode}; check.log)"
        elif fast_errors:
            reason = f"fastmlp errored on {', '.join(fast_errors)}"
        else:
            reason = f"exit status {outcome.returncode}"
    return _entry(outcome, _status(outcome, bool(ok)), [FILES["bench"]], figures, reason, check.out)


RUNNERS = {"correctness": correctness, "headline": headline, "tests": tests,
           "sanitizer": sanitizer, "bench": bench}
