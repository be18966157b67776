"""Stage 2 of the GPU check: the headline figures, with stock torch measured in the same run.

    python -m bench.gpucheck.headline --out OUT/headline.json [--tiny] [--budget S]
                                      [--compile-budget S]

Rows (bench/gpucheck/plan.py HEADLINE), tensor-core shapes first: bf16 8192x4096->4096 forward
and forward+backward, bf16 65536x256->256 (skinny) both passes, the seed model's SGD step (also
replayed from a CUDA graph) and one seed epoch (fastmlp.fit against the stock DataLoader loop).
Each row runs fastmlp and its baselines back to back through bench.runner.run_case (the report's
own timing: CUDA events, median of many calls, warm-up excluded, do_bench_cudagraph for the
launch-bound step), so every ratio comes from one process, one set of inputs, one clock state.

Two passes, because torch.compile is the slow part: pass A times every row without the compile
baselines; pass B then adds torch.compile ("compile"; for the epoch, "stock-dataloader+
compile-ro") row by row while the compile budget and the stage budget last. A compile that would
overrun is stopped by a timer (SIGALRM) and recorded as skipped with the budget as its reason, so
the stage never blows its budget on a compile and the figures of pass A are already on disk.

For every row the JSON records the autotuner's picks made while the row was timed
(fastmlp.kernels.tuning.chosen_configs(): key -> tile config, or "torch-gemm" where torch's own
GEMM won), and the full table at the end. The JSON follows bench's results.json schema
(records, variants, speedup, ...), plus "autotuner" and "compile". It is rewritten after every
row; on SIGINT (the stage's timeout) what was measured is written with "complete": false.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Callable, Dict, Optional

import torch

from bench import costs, environment, timing
from bench.gpucheck import plan
from bench.peak import measure_matmul_peak
from bench.runner import (SCHEMA_VERSION, RunOptions, add_ratios, describe_fastmlp_path,
                          empty_variant, run_case)

MEASURED_IN_PASS_A = "measured in pass A (no compile)"
MIN_COMPILE_S = 10.0     # a compile is not started with less time than this allowed
STAGE_RESERVE_S = 8.0    # stop starting variants this long before the stage's budget ends


class CompileOverBudget(BaseException):
    """Raised by the SIGALRM timer inside an overrunning compile; a BaseException so that the
    runner's per-variant `except Exception` does not turn it into an error entry."""


def compile_variant(case) -> str:
    return "stock-dataloader+compile-ro" if case.kind == "epoch" else "compile"


class Allowance:
    """bench.runner's budget protocol (skip_reason(variant), compile_spent) for one pass.

    Pass A (only_compile False): every variant until the stage deadline. Pass B (only_compile
    True): only compile variants, each armed with a timer for what is left of the compile budget
    and of the stage.
    """

    def __init__(self, deadline: float, compile_budget: float, only_compile: bool = False):
        self.deadline = deadline
        self.compile_budget = compile_budget
        self.only_compile = only_compile
        self.compile_spent = 0.0
        self.armed_for: Optional[float] = None

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.armed_for = None

    def skip_reason(self, variant: str) -> Optional[str]:
        self.disarm()   # the previous variant has finished: its timer must not fire later
        now = time.monotonic()
        if self.only_compile and "compile" not in variant:
            return MEASURED_IN_PASS_A
        if now > self.deadline:
            return "stage budget used up"
        if "compile" in variant:
            left = self.compile_budget - self.compile_spent
            allowed = min(left, self.deadline - now)
            if self.compile_budget <= 0:
                return "budget: no compile budget (--compile-budget 0)"
            if allowed < MIN_COMPILE_S:
                return (f"budget: {max(0.0, left):.0f} s of the {self.compile_budget:g} s compile "
                        f"budget and {self.deadline - now:.0f} s of the stage left")
            self.armed_for = allowed
            signal.setitimer(signal.ITIMER_REAL, allowed)
        return None


def _on_alarm(signum, frame):
    raise CompileOverBudget()


def _tuning_snapshot() -> Callable[[], Optional[Dict[str, object]]]:
    """A function returning the autotuner's picks so far (JSON-ready), or None if unavailable."""
    try:
        from fastmlp.kernels import tuning

        chosen = tuning.chosen_configs
    except Exception as exc:  # the kernels are being refactored: say so, keep timing
        why = f"{type(exc).__name__}: {exc}"
        snapshot = lambda: None  # noqa: E731
        snapshot.unavailable = why
        return snapshot

    def snapshot():
        out = {}
        for key, cfg in chosen().items():
            name = "|".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
            out[name] = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else str(cfg)
        return out

    snapshot.unavailable = None
    return snapshot


def _added(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    if before is None or after is None:
        return None
    return {k: v for k, v in after.items() if before.get(k) != v}


class Stage:
    def __init__(self, out: str, results: dict):
        self.out, self.results = out, results
        self.started = time.perf_counter()

    def write(self, complete: bool, interrupted: Optional[str] = None) -> None:
        self.results["complete"] = complete
        self.results["interrupted"] = interrupted
        self.results["duration_s"] = time.perf_counter() - self.started
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, self.out)


def run(stage: Stage, opts: RunOptions, budget_s: float, compile_budget_s: float, log) -> None:
    results = stage.results
    device = torch.device(opts.device)
    deadline = time.monotonic() + budget_s - STAGE_RESERVE_S
    snapshot = _tuning_snapshot()
    results["autotuner"] = {"available": snapshot.unavailable is None,
                            "reason": snapshot.unavailable, "chosen_at_end": None}
    headline = plan.headline_cases(opts.tiny)
    dtypes = sorted({c.dtype for c in headline}, key=["fp32", "tf32", "fp16", "bf16"].index)
    log(f"headline: {len(headline)} rows on {device.type}; measuring the matmul peak "
        f"({', '.join(dtypes)}) ...")
    results["peak"] = measure_matmul_peak(
        device, dtypes, opts.peak_size,
        timing.TimingOptions.single_round() if opts.tiny else opts.timing)
    stage.write(complete=False)

    # Pass A: every row without torch.compile.
    allowance = Allowance(deadline, compile_budget_s)
    for i, case in enumerate(headline, 1):
        log(f"[A {i}/{len(headline)}] {case.id}")
        before = snapshot()
        record = run_case(case, device, opts, allowance, log)
        record["autotuner_added"] = _added(before, snapshot())
        results["records"].append(add_ratios(record, results["peak"]))
        stage.write(complete=False)

    # Pass B: the compile baselines, row by row, within the compile budget.
    compile_opts = dataclasses.replace(opts, compile=True, max_autotune=False)
    allowance = Allowance(deadline, compile_budget_s, only_compile=True)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    quiet = lambda msg: None if MEASURED_IN_PASS_A in msg else log(msg)  # noqa: E731
    try:
        for i, (case, record) in enumerate(zip(headline, results["records"]), 1):
            name = compile_variant(case)
            log(f"[B {i}/{len(headline)}] {case.id}: {name}")
            started, spent_before = time.monotonic(), allowance.compile_spent
            try:
                extra = run_case(case, device, compile_opts, allowance, quiet)
                entry = extra["variants"][name]
            except CompileOverBudget:
                # run_case's finally has already counted the stopped compile: count it once
                allowance.compile_spent = spent_before + (time.monotonic() - started)
                entry = empty_variant("skipped", (
                    f"budget: compile stopped after {time.monotonic() - started:.0f} s "
                    f"(compile budget {compile_budget_s:g} s)"))
                log(f"  {name:<28} skipped: {entry['reason']}")
                torch._dynamo.reset()
            finally:
                allowance.disarm()
            record["variants"][name] = entry
            add_ratios(record, results["peak"])
            results["compile"]["spent_s"] = allowance.compile_spent
            stage.write(complete=False)
    finally:
        allowance.disarm()
        signal.signal(signal.SIGALRM, previous)
    results["autotuner"]["chosen_at_end"] = snapshot()
    results["load_average"]["end"] = environment.load_average()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpucheck.headline",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the stage's JSON (written after every row)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, one timed round (dry run)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--budget", type=float, default=plan.DEFAULT_STAGE_BUDGET_S["headline"],
                   help="seconds this stage may take (default %(default)s)")
    p.add_argument("--compile-budget", type=float, default=plan.DEFAULT_COMPILE_BUDGET_S,
                   help="seconds of torch.compile in all (default %(default)s; 0: none)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    tim = timing.TimingOptions.single_round() if args.tiny else timing.TimingOptions()
    opts = RunOptions(device=device, tiny=args.tiny, compile=False, cudagraph=True,
                      epoch_reps=5 if device == "cuda" else 3,
                      peak_size=64 if args.tiny else (8192 if device == "cuda" else 2048),
                      timing=tim)
    results = {
        "schema_version": SCHEMA_VERSION, "suite": "fastmlp gpu-check headline",
        "complete": False, "started_at": environment.now(), "duration_s": None,
        "load_average": {"start": environment.load_average(), "end": None},
        "command": environment.command_line(), "date": environment.today(),
        "device": environment.device_info(torch.device(device)),
        "versions": environment.versions(),
        "options": {**dataclasses.asdict(opts), "timing": dataclasses.asdict(opts.timing),
                    "budget_s": args.budget},
        "fastmlp_path": describe_fastmlp_path(torch.device(device)),
        "autotune": os.environ.get("FASTMLP_AUTOTUNE", "1"),
        "peak": {}, "datasheet": costs.H100_SXM_DATASHEET,
        "compile": {"budget_s": args.compile_budget, "spent_s": 0.0},
        "records": [],
    }
    stage = Stage(args.out, results)
    stage.write(complete=False)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        run(stage, opts, args.budget, args.compile_budget, log)
    except KeyboardInterrupt:
        signal.setitimer(signal.ITIMER_REAL, 0)
        stage.write(complete=False, interrupted="SIGINT (the stage's timeout)")
        log(f"headline: interrupted after {len(results['records'])} rows")
        return 130
    stage.write(complete=True)
    for r in results["records"]:
        ratios = ", ".join(f"x {n} {s:.2f}" for n, s in r["speedup"].items() if s)
        fast = r["variants"].get("fastmlp", {})
        log(f"{r['id']}: fastmlp {fast.get('median_ms')} ms; {ratios or 'no ratio'}")
    # fastmlp failing, or off the fp32 reference, fails the stage; a baseline that errors (a
    # torch.compile of this torch version, say) is reported in the JSON and the summary only.
    problems = []
    for r in results["records"]:
        for name, e in r["variants"].items():
            if e["status"] == "error":
                log(f"ERROR {r['id']} {name}: {e['reason']}")
                if name == "fastmlp":
                    problems.append(r["id"])
        if r["variants"].get("fastmlp", {}).get("parity_ok") is False:
            log(f"PARITY {r['id']}: fastmlp's forward is off the fp32 reference "
                f"(max_rel_err {r['variants']['fastmlp']['max_rel_err']:.3g})")
            problems.append(r["id"])
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
