"""One-call GPU check: tests on CUDA, compute-sanitizer on a small fused op, the benchmark report.

    bench/gpu_check.sh OUT            (or: PYTHONPATH=. python -m bench.gpu_check OUT)

Made for a CUDA machine with torch and triton installed and no package registry, used through a
plain copy of the repository. Everything lands in OUT as a handful of files (a device tool may
bring back only a few, only a couple of folders deep):

    summary.log           each step's status, duration and output tail; last line PASS or FAIL
    pytest.log, junit.xml the test suite but its "slow" tests (the gpu marker included)
    sanitizer.log         compute-sanitizer memcheck of bench.sanitize_target (or why it was skipped)
    bench.log             python -m bench's output
    README-table.md       the report's table, ready for the README
    bench-results.tar.gz  the results folder: results.json, results.csv, README-table.md, PNGs

Each step has a timeout carved from one overall budget (default 480 s, 8 minutes), and the
benchmark gets a --time-budget inside its timeout so it ends with a report rather than a kill.
"""

import argparse
import datetime
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from typing import List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL_LINES = 40


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for every output (created)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (480)")
    p.add_argument("--tests-timeout", type=float, default=200.0, help="cap for the test suite (200)")
    p.add_argument("--sanitizer-timeout", type=float, default=80.0, help="cap for compute-sanitizer (80)")
    p.add_argument("--bench-args", default="--compile-budget 60",
                   help="extra arguments for python -m bench (default: %(default)s)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-sanitizer", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--keep-results-dir", action="store_true",
                   help="keep OUT/results/ beside the tarball (more files)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run without a CUDA device (to test this script itself)")
    return p.parse_args(argv)


class Check:
    """Runs steps as subprocesses within one time budget and writes summary.log."""

    def __init__(self, out: str, budget: float):
        self.out = os.path.abspath(out)
        os.makedirs(self.out, exist_ok=True)
        self.deadline = time.monotonic() + budget
        self.lines: List[str] = []
        self.failed: List[str] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + self.env["PYTHONPATH"]
                                              if self.env.get("PYTHONPATH") else "")
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def note(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        self.write_summary()

    def write_summary(self) -> None:
        with open(os.path.join(self.out, "summary.log"), "w") as f:
            f.write("\n".join(self.lines) + "\n")

    def run(self, name: str, cmd: List[str], log_name: str, timeout: float,
            env: Optional[dict] = None) -> Optional[int]:
        """Run cmd with output to log_name; returns the exit code, or None on timeout."""
        timeout = max(5.0, min(timeout, self.remaining()))
        log_path = os.path.join(self.out, log_name)
        self.note(f"== {name}: {' '.join(shlex.quote(c) for c in cmd)} (timeout {timeout:.0f} s)")
        start = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env or self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code: Optional[int] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the step's own process group only
                proc.wait()
                code = None
        took = time.monotonic() - start
        status = "TIMEOUT" if code is None else ("ok" if code == 0 else f"exit {code}")
        self.note(f"   {name}: {status} in {took:.0f} s (log: {log_name})")
        self.note("   " + "\n   ".join(_tail(log_path)))
        return code


def _tail(path: str, n: int = TAIL_LINES) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-n:]]
    except OSError:
        return []


def find_compute_sanitizer() -> Optional[str]:
    """compute-sanitizer on PATH, under $CUDA_HOME, or in a /usr/local/cuda* toolkit."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]
    for root in filter(None, roots):
        for sub in ("bin", "compute-sanitizer"):
            path = os.path.join(root, sub, "compute-sanitizer")
            if os.access(path, os.X_OK):
                return path
    return None


def environment_report(check: Check) -> bool:
    """Versions and the device; returns whether torch sees CUDA."""
    import platform

    import torch

    has_cuda = torch.cuda.is_available()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    check.note(f"gpu_check started {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
               f" in {REPO_ROOT}")
    check.note(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}, "
               f"CUDA {torch.version.cuda}, cuda available: {has_cuda}")
    if has_cuda:
        check.note(f"device: {torch.cuda.get_device_name(0)}")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            check.note(f"nvidia-smi: {out.stdout.strip() or out.stderr.strip()}")
        except (subprocess.TimeoutExpired, OSError) as exc:  # informational only
            check.note(f"nvidia-smi: not read ({exc})")
    return has_cuda


def step_tests(check: Check, timeout: float) -> None:
    # One tile config per kernel: autotuning every shape bucket of the suite would spend the
    # budget compiling configs (tests that check the autotuner turn it back on themselves).
    # Without the "slow" tests: they compile every shipped config for sm_80/sm_90 without a GPU,
    # run multi-process gloo, or re-run the benchmark harness in subprocesses, all of which CI
    # already does on CPUs and the bench step below does on this GPU. --durations names the
    # slowest tests in pytest.log, for sizing the next check.
    env = dict(check.env, FASTMLP_AUTOTUNE="0")
    code = check.run("tests", [sys.executable, "-m", "pytest", "tests", "-q", "-rs",
                               "-m", "not slow", "--durations=25", "-p", "no:cacheprovider",
                               f"--junitxml={os.path.join(check.out, 'junit.xml')}"],
                     "pytest.log", timeout, env=env)
    if code != 0:
        check.failed.append("tests")


def step_sanitizer(check: Check, timeout: float) -> None:
    tool = find_compute_sanitizer()
    log = os.path.join(check.out, "sanitizer.log")
    if tool is None:
        with open(log, "w") as f:
            f.write("compute-sanitizer not found (PATH, $CUDA_HOME, /usr/local/cuda*): step skipped\n")
        check.note("== sanitizer: SKIPPED, compute-sanitizer not found")
        return
    env = dict(check.env)
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # so memcheck sees each tensor's real bounds
    env["FASTMLP_AUTOTUNE"] = "0"  # one config per kernel: no timing loops under memcheck's slowdown
    # --report-api-errors no: CUDA API calls that fail by design (libraries probing for entry
    # points or pointer attributes) would otherwise count as errors; memory errors still do.
    code = check.run("sanitizer", [tool, "--tool", "memcheck", "--report-api-errors", "no",
                                   "--error-exitcode", "97",
                                   sys.executable, "-m", "bench.sanitize_target"],
                     "sanitizer.log", timeout, env=env)
    if code != 0:
        check.failed.append("sanitizer" + (" (memcheck found errors)" if code == 97 else ""))


def step_bench(check: Check, extra_args: str, keep_dir: bool) -> None:
    results_root = os.path.join(check.out, "results")
    timeout = check.remaining() - 15  # room to pack the results
    inner_budget = max(10.0, timeout - 45)  # the run stops starting variants here, then writes
    cmd = [sys.executable, "-m", "bench", "--out", os.path.join(results_root, "report"),
           "--time-budget", f"{inner_budget:.0f}", *shlex.split(extra_args)]
    code = check.run("bench", cmd, "bench.log", timeout)
    if code != 0:
        check.failed.append("bench")
    report_dir = os.path.join(results_root, "report")
    if os.path.isdir(report_dir):
        table = os.path.join(report_dir, "README-table.md")
        if os.path.exists(table):
            shutil.copy(table, os.path.join(check.out, "README-table.md"))
        with tarfile.open(os.path.join(check.out, "bench-results.tar.gz"), "w:gz") as tar:
            tar.add(report_dir, arcname="bench-results")
        check.note("   packed bench-results.tar.gz")
        if not keep_dir:
            shutil.rmtree(results_root)


def main(argv=None) -> int:
    args = parse_args(argv)
    check = Check(args.out, args.budget)
    has_cuda = environment_report(check)
    if not has_cuda and not args.allow_cpu:
        check.note("FAIL: no CUDA device visible to torch (use --allow-cpu to test this script)")
        return 2
    if not args.skip_tests:
        step_tests(check, args.tests_timeout)
    if not args.skip_sanitizer:
        if has_cuda:
            step_sanitizer(check, args.sanitizer_timeout)
        else:
            check.note("== sanitizer: SKIPPED, no CUDA device")
    if not args.skip_bench:
        step_bench(check, args.bench_args, args.keep_results_dir)
    verdict = "PASS" if not check.failed else f"FAIL ({', '.join(check.failed)})"
    check.note(f"GPU CHECK: {verdict}; files: {', '.join(sorted(os.listdir(check.out)))}")
    return 0 if not check.failed else 1


if __name__ == "__main__":
    sys.exit(main())
