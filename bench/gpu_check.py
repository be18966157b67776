"""The GPU check: five stages in order of value, each within its own budget, in one short window.

    bash bench/gpu_check.sh OUT [options]      (or: PYTHONPATH=. python -m bench.gpu_check OUT)

Made for a CUDA machine lent for ~15 minutes (1-2 of them to start it, at most 10 per command),
with torch and triton installed and no package registry, used through a plain copy of the
repository, whose tool brings back at most 8 files from OUT. Stages (default budgets in
bench/gpucheck/plan.py; why these numbers: bench/NOTES.md):

  1 correctness  the tests that cover every kernel first (bench/gpucheck/correctness.py):
                 Linear+act and gated forward/dX/dW+db x fp32/TF32/fp16/bf16 x activations,
                 SGD, fit with and without CUDA graph, modules; pytest, NaN-poisoned 100 s
  2 headline     bf16 8192x4096->4096, bf16 65536x256->256, the seed step and epoch, against
                 eager, torch._addmm_activation and torch.compile, same run    150 s
  3 tests        pytest tests -m "not slow" in parallel, per-test timeout     120 s
  4 sanitizer    compute-sanitizer memcheck and racecheck                      60 s
  5 bench        python -m bench, the remaining rows, in what time is left     the rest

Each stage is a subprocess in its own process group with its own timeout: SIGINT first (pytest
writes its summary and junit.xml, the stage scripts their partial JSON), SIGKILL after --grace
seconds. Each stage writes its files into OUT as soon as it ends, and summary.json and
summary.md are rewritten after every stage, so a kill at any moment loses only the stage in
flight. Files in OUT (never more than 8, no folders):

  summary.json          every stage: status, seconds, budget, files, key figures; device,
                        versions, date, git commit; "verdict"
  summary.md            the same for people: stage table, correctness matrix, headline table
  check.log             every stage's stdout and stderr, in order
  correctness.json      stage 1's rows: one per test (status, closest error/tolerance, reason)
  headline.json         stage 2's records (bench's results.json schema) and autotuner picks
  junit.xml             stage 3
  bench-results.tar.gz  stage 5's results folder (results.json, .csv, README-table.md, PNGs, log)

Exit status 0 iff every stage is ok or skipped (with its reason); 1 otherwise; 2 without CUDA
(unless --allow-cpu, which runs every stage at tiny sizes on the CPU, kernels under Triton's
interpreter: the dry run CI uses to test this script).
"""

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script path rather than with -m
    sys.path.insert(0, REPO_ROOT)

from bench.gpucheck import plan, proc, report, stages  # noqa: E402

FINAL_RESERVE_S = 3.0    # kept back from every stage for the last summary
MIN_STAGE_S = 5.0        # a stage is not started with less than this
TAIL_LINES = 25
VALID_STATUSES = ("ok", "fail", "timeout", "skipped")
# Per command in check.log: above this, the middle is cut (a quarter kept from the start, the rest
# from the end, where pytest's and compute-sanitizer's summaries are), so that check.log stays
# under the device tool's 16 MiB per file even when every test fails with a long traceback.
MAX_SECTION_BYTES = 2 * 2**20
# Switches that must not leak from the caller's shell into the stages: the interpreter (a GPU run
# under it would measure numpy, and breaks with numpy >= 2.4), a forced backend, NaN-poisoned
# outputs in the timed stages. The check sets what each stage needs itself.
SCRUBBED_ENV = ("TRITON_INTERPRET", "FASTMLP_BACKEND", "FASTMLP_POISON_OUTPUTS")
RECORDED_ENV_PREFIXES = ("FASTMLP_", "TRITON_", "TORCHINDUCTOR_", "TORCH_", "PYTORCH_", "CUDA_")
DIGEST_CHARS = 6000      # failing stages' log tails printed before the final table


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) to the check itself: stop the stage in flight, write, leave."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("out", help="folder for every output (created; at most 8 files are written)")
    p.add_argument("--budget", type=float, default=plan.DEFAULT_BUDGET_S,
                   help="seconds for the whole check (default %(default)g)")
    for name, seconds in plan.DEFAULT_STAGE_BUDGET_S.items():
        p.add_argument(f"--{name}-budget", type=float, default=seconds, metavar="S",
                       help=f"seconds for stage {name} (default {seconds:g})")
    p.add_argument("--bench-min", type=float, default=plan.BENCH_MIN_S, metavar="S",
                   help="do not start the remaining benchmark rows with less than S seconds left "
                        "(default %(default)g)")
    p.add_argument("--compile-budget", type=float, default=None, metavar="S",
                   help=f"torch.compile seconds in the headline stage (default "
                        f"{plan.DEFAULT_COMPILE_BUDGET_S:g}; 0 in a CPU dry run)")
    p.add_argument("--grace", type=float, default=plan.DEFAULT_GRACE_S, metavar="S",
                   help="seconds between SIGINT and SIGKILL for an overrunning stage "
                        "(default %(default)g)")
    p.add_argument("--stages", default=",".join(plan.STAGES),
                   help="comma list of stages to run; the others are recorded as skipped "
                        "(default: all)")
    p.add_argument("--skip", action="append", default=[], choices=plan.STAGES,
                   help="skip a stage (repeatable)")
    p.add_argument("--workers", type=int, default=None,
                   help="pytest-xdist workers of the correctness stage (default CPUs - 2, at "
                        "most 14; 2 in a dry run)")
    p.add_argument("--pytest-workers", type=int, default=None,
                   help="pytest-xdist workers (default min(8, CPUs); 2 in a dry run)")
    p.add_argument("--test-timeout", type=float, default=60.0, metavar="S",
                   help="per-test timeout of stages 1 and 3 when pytest-timeout is installed "
                        "(default %(default)g; 0: none)")
    p.add_argument("--pytest-args", default=None,
                   help='test selection instead of the default (tests -m "not slow")')
    p.add_argument("--bench-args", default="",
                   help="extra arguments for python -m bench in the last stage")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without a CUDA device, run every stage at tiny sizes on the CPU (dry run)")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in plan.STAGES]
    if unknown:
        p.error(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(plan.STAGES)}")
    args.selected = [s for s in plan.STAGES if s in chosen and s not in args.skip]
    return args


class Check:
    """The running check: OUT, the budget, the environment, summary.json, subprocess runs."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        for name in plan.FILES.values():   # a previous run's files would pass for this one's
            path = os.path.join(self.out, name)
            if os.path.isfile(path):
                os.remove(path)
        self.log_path = os.path.join(self.out, plan.FILES["log"])
        self.scratch = tempfile.mkdtemp(prefix="fastmlp-gpu-check-")
        self.python = sys.executable
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.sections = {}      # command name -> (start offset, end offset) in check.log
        self.info: dict = {}
        self.tiny = False
        self.device = "cuda"
        self.env = dict(os.environ)
        scrubbed = {k: self.env.pop(k) for k in SCRUBBED_ENV if k in self.env}
        self.env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + self.env["PYTHONPATH"]
                                              if self.env.get("PYTHONPATH") else "")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.summary = {
            "schema": "fastmlp-gpu-check/1",
            "verdict": "RUNNING",
            "complete": False,
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "date": datetime.date.today().isoformat(),
            "command": "bash bench/gpu_check.sh " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "out": self.out,
            "budget_s": args.budget,
            "elapsed_s": 0.0,
            "options": {k: v for k, v in vars(args).items()},
            "environment": None,
            "env_vars": {k: v for k, v in sorted(os.environ.items())
                         if k.startswith(RECORDED_ENV_PREFIXES)},
            "scrubbed_env": scrubbed,
            "results_dir": None,
            "stages": [{"name": s, "status": "pending", "seconds": None, "budget_s": None,
                        "files": [], "figures": {}, "reason": None} for s in plan.STAGES],
            "files": [],
        }
        with open(self.log_path, "w") as f:
            f.write(f"fastmlp GPU check, {self.summary['started_at']}, in {REPO_ROOT}\n")
            if scrubbed:
                f.write(f"[gpu_check] removed from the stages' environment: {scrubbed}\n")

    # -- time ------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # -- output ----------------------------------------------------------------------------
    def note(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(f"[gpu_check] {text}\n")

    def stage(self, name: str) -> dict:
        return next(s for s in self.summary["stages"] if s["name"] == name)

    def write_summary(self) -> None:
        """summary.json (atomically) and summary.md, from what is known now."""
        for leftover in os.listdir(self.out):   # a stage killed while writing its JSON
            if leftover.endswith(".tmp"):
                os.remove(os.path.join(self.out, leftover))
        self.summary["elapsed_s"] = time.monotonic() - self.start
        self.summary["updated_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        names = sorted(set(os.listdir(self.out)) | {plan.FILES["summary_json"],
                                                   plan.FILES["summary_md"]})
        self.summary["files"] = names
        if len(names) > plan.MAX_OUT_FILES:
            self.summary["warning"] = (f"OUT holds {len(names)} files; the device tool brings back "
                                       f"{plan.MAX_OUT_FILES}: use an empty OUT")
        tmp = os.path.join(self.out, plan.FILES["summary_json"] + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.summary, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, os.path.join(self.out, plan.FILES["summary_json"]))
        try:
            text = report.summary_markdown(self.summary, self.out)
        except Exception as exc:  # the report must never cost the JSON
            text = f"# fastmlp GPU check\n\nsummary.md failed: {exc!r}; see summary.json.\n"
        with open(os.path.join(self.out, plan.FILES["summary_md"]), "w") as f:
            f.write(text)

    # -- subprocesses ----------------------------------------------------------------------
    def command(self, name: str, cmd: List[str], timeout: float, env_extra: dict,
                grace: Optional[float] = None) -> proc.Outcome:
        """Run one command of a stage; its output goes to check.log (section `name`).

        grace: seconds between SIGINT and SIGKILL (default --grace); a command that writes
        nothing on SIGINT (the probe, compute-sanitizer) needs only a few."""
        env = dict(self.env, **env_extra)
        grace = self.args.grace if grace is None else min(grace, self.args.grace)
        start = os.path.getsize(self.log_path)
        shown = " ".join(shlex.quote(c) for c in cmd)
        if len(shown) > 600:
            shown = shown[:600] + f" ... ({len(cmd)} arguments)"
        extra = " ".join(f"{k}={v}" for k, v in env_extra.items())
        header = (f"\n===== [gpu_check] {name}: {extra + ' ' if extra else ''}{shown} "
                  f"(timeout {timeout:.0f} s) =====\n")
        outcome = proc.run(cmd, timeout=timeout, grace=grace, log_path=self.log_path,
                           env=env, cwd=REPO_ROOT, header=header)
        self._cap_section(start)
        with open(self.log_path, "a") as f:
            f.write(f"===== [gpu_check] {name}: exit {outcome.returncode} in {outcome.seconds:.1f} s"
                    f"{' (' + ', '.join(outcome.signals) + ')' if outcome.signals else ''} =====\n")
        self.sections[name] = (start, os.path.getsize(self.log_path))
        return outcome

    def _cap_section(self, start: int) -> None:
        """Cut the middle of the section from `start` to the end of check.log if it is too long."""
        end = os.path.getsize(self.log_path)
        if end - start <= MAX_SECTION_BYTES:
            return
        head_n = MAX_SECTION_BYTES // 4
        tail_n = MAX_SECTION_BYTES - head_n
        with open(self.log_path, "r+b") as f:
            f.seek(start)
            head = f.read(head_n)
            f.seek(end - tail_n)
            tail = f.read(tail_n)
            f.seek(start)
            f.truncate()
            f.write(head + (f"\n[gpu_check] ... {end - start - head_n - tail_n} bytes of this "
                            f"command's output cut (check.log keeps {MAX_SECTION_BYTES} per "
                            f"command) ...\n").encode() + tail)

    def section_lines(self, name: str) -> List[str]:
        """The lines of check.log written by command `name` (or by every `name:*` command)."""
        spans = [v for k, v in self.sections.items() if k == name or k.startswith(name + ":")]
        lines: List[str] = []
        with open(self.log_path, "rb") as f:
            for start, end in spans:
                f.seek(start)
                lines += f.read(end - start).decode(errors="replace").splitlines()
        return lines

    # -- stages ----------------------------------------------------------------------------
    def probe_environment(self) -> bool:
        """Device, versions and tools (bench.gpucheck.env in a subprocess); whether CUDA is there."""
        path = os.path.join(self.scratch, "env.json")
        outcome = self.command("environment", [self.python, "-m", "bench.gpucheck.env", path],
                               plan.ENV_PROBE_TIMEOUT_S, {}, grace=plan.SHORT_GRACE_S)
        try:
            with open(path) as f:
                self.info = json.load(f)
        except (OSError, ValueError):
            self.info = {"error": f"environment probe failed (exit {outcome.returncode}); "
                                  f"check.log: " + " | ".join(self.section_lines("environment")[-5:])}
        self.summary["environment"] = self.info
        has_cuda = bool(self.info.get("has_cuda"))
        self.tiny = not has_cuda
        self.device = "cuda" if has_cuda else "cpu"
        if self.tiny:
            # Every stage's kernels run under Triton's interpreter: it must be switched on in
            # the subprocess's environment before anything there imports triton.
            self.env["TRITON_INTERPRET"] = "1"
        if self.info.get("device_slug"):
            self.summary["results_dir"] = f"bench/results/{self.info['device_slug']}-{self.summary['date']}"
        self.summary["mode"] = "gpu" if has_cuda else "dry run (CPU, tiny sizes, interpreter)"
        dev = self.info.get("device") or {}
        self.note(f"environment: {dev.get('name', '?')} ({self.summary['mode']}); "
                  f"torch {(self.info.get('versions') or {}).get('torch')}, "
                  f"triton {(self.info.get('versions') or {}).get('triton')}; "
                  f"nvidia-smi: {self.info.get('nvidia_smi')}; "
                  f"compute-sanitizer: {self.info.get('compute_sanitizer')}")
        self.write_summary()
        return has_cuda

    def budget_for(self, name: str) -> Optional[float]:
        if name == "bench":
            return None
        return getattr(self.args, f"{name}_budget")

    def _skip(self, entry: dict, name: str, timeout: float, reason: str) -> None:
        """Record a stage as skipped for lack of time (never started), with its reason."""
        entry.update(status="skipped", budget_s=max(0.0, timeout), reason=reason)
        self.note(f"stage {name}: skipped ({reason})")
        self.write_summary()

    def run_stage(self, name: str) -> None:
        entry = self.stage(name)
        budget = self.budget_for(name)
        left = self.remaining() - FINAL_RESERVE_S
        if name == "bench":
            timeout = left - plan.PACK_RESERVE_S
            if timeout < self.args.bench_min:
                self._skip(entry, name, timeout, f"{max(0.0, timeout):.0f} s left, under "
                                                 f"--bench-min {self.args.bench_min:g} s")
                return
        else:
            timeout = min(budget, left)
        if left < MIN_STAGE_S:
            self._skip(entry, name, timeout, f"no time left ({max(0.0, left):.0f} s of the "
                                             f"{self.args.budget:g} s budget)")
            return
        entry.update(status="running", budget_s=timeout)
        self.write_summary()
        self.note(f"stage {name}: started (timeout {timeout:.0f} s, {self.remaining():.0f} s of "
                  f"the total left)")
        started = time.monotonic()
        try:
            result = stages.RUNNERS[name](self, timeout)
        except (KeyboardInterrupt, Interrupted):
            entry.update(status="timeout", seconds=time.monotonic() - started,
                         reason="the check itself was interrupted while this stage ran")
            raise
        except Exception as exc:  # a bug in this script's stage code: the stage fails, others run
            result = {"status": "fail", "reason": f"gpu_check error: {type(exc).__name__}: {exc}",
                      "files": [], "figures": {}, "traceback": traceback.format_exc()[-3000:]}
        entry.update(result)
        entry["seconds"] = time.monotonic() - started
        if entry["status"] not in VALID_STATUSES:
            entry.update(status="fail", reason=f"invalid status {entry['status']!r}")
        if entry["status"] not in ("ok", "skipped"):
            entry["log_tail"] = self.section_lines(name)[-TAIL_LINES:]
        self.note(f"stage {name}: {entry['status']} in {entry['seconds']:.0f} s"
                  + (f" ({entry['reason']})" if entry.get("reason") else "")
                  + f"; {report.figures_text(entry)[:300]}")
        self.write_summary()

    def finish(self, interrupted: Optional[str] = None, verdict: Optional[str] = None) -> int:
        for entry in self.summary["stages"]:
            if entry["status"] in ("pending", "running"):
                entry.update(status="skipped" if entry["status"] == "pending" else "timeout",
                             reason=entry.get("reason") or (
                                 f"not run: the check was interrupted ({interrupted})"
                                 if interrupted else "not run"))
        failed = [s["name"] for s in self.summary["stages"] if s["status"] not in ("ok", "skipped")]
        self.summary["complete"] = interrupted is None
        self.summary["verdict"] = verdict or ("PASS" if not failed else f"FAIL ({', '.join(failed)})")
        if interrupted:
            self.summary["verdict"] += f" (interrupted: {interrupted})"
        self.write_summary()
        shutil.rmtree(self.scratch, ignore_errors=True)
        # The device tool may bring back only the output's tail: what failed, and the end of its
        # log, come before the final table (which stays the last thing printed).
        digest = report.failure_digest(self.summary, DIGEST_CHARS)
        if digest:
            print("\n" + digest, flush=True)
        try:
            table = report.final_table(self.summary)
        except Exception as exc:  # the table must never cost the exit status
            table = (f"GPU CHECK {self.summary['verdict']} (final table failed: {exc!r}; "
                     f"see summary.json)")
        with open(self.log_path, "a") as f:
            f.write("\n" + table + "\n")
        print("\n" + table, flush=True)
        return 0 if not failed and not interrupted and not verdict else 1


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Interruptible whatever the caller's signal dispositions were (a shell's background job may
    # start with SIGINT ignored, which the stages would inherit, losing their partial writes).
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    check = Check(args)
    try:
        check.note(f"GPU check: budget {args.budget:g} s, OUT {check.out}, stages "
                   f"{', '.join(args.selected)}")
        has_cuda = check.probe_environment()
        if "error" in check.info:
            verdict = f"FAIL ({check.info['error']})"
            for entry in check.summary["stages"]:
                entry.update(status="skipped", reason="the environment probe failed")
            check.note(verdict)
            check.finish(verdict=verdict)
            return 2
        if not has_cuda and not args.allow_cpu:
            for entry in check.summary["stages"]:
                entry.update(status="skipped", reason="no CUDA device visible to torch")
            verdict = "FAIL (no CUDA device; --allow-cpu runs the dry run)"
            check.note(verdict)
            check.finish(verdict=verdict)
            return 2
        for name in plan.STAGES:
            if name in args.selected:
                check.run_stage(name)
            else:
                check.stage(name).update(status="skipped", reason="not selected (--stages/--skip)")
                check.write_summary()
    except (KeyboardInterrupt, Interrupted) as exc:
        # A second SIGTERM/SIGINT (a device tool's timeout repeating itself) must not cut the
        # last summary short: the stage in flight is already stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        check.note(f"interrupted ({exc or 'SIGINT'}): writing what is there")
        check.finish(interrupted=str(exc) or "SIGINT")
        return 130
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
