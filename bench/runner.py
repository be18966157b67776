"""Run the suite: every case, fastmlp and each baseline back to back, into one results dict.

Honesty rules this file enforces: all variants of a case run in the same process, one after
another, on the same inputs; warm-up (first call: compile, autotune, JIT) is timed separately and
never mixed into the steady-state figures; speedups and TFLOP/s are computed from this run's
medians only; a variant that fails or is skipped for a budget is recorded as such,
with no figure.
"""

import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from bench import costs, environment, report
from bench import timing as timers
from bench.cases import Case, catalogue, gpu_only_cases
from bench.loops import EPOCH_VARIANTS, build_epoch, epoch_data
from bench.peak import measure_matmul_peak
from bench.variants import (COMPILE_MODES, LAYER_VARIANTS, Runnable, applies, build, case_data,
                            precision, reference_model, unavailable)

SCHEMA_VERSION = 1
# Parity tolerance of a forward output against the fp32 ("highest") reference, relative to the
# reference's largest magnitude. A miss is reported (parity_ok false), never hidden.
PARITY_RTOL = {"fp32": 1e-4, "tf32": 2e-2, "fp16": 2e-2, "bf16": 6e-2}
VARIANT_FIELDS = ("status", "reason", "median_ms", "q20_ms", "q80_ms", "min_ms", "samples",
                  "method", "first_call_s", "peak_mem_mib", "graphed_median_ms", "graphed_method",
                  "graphed_error", "max_rel_err", "parity_ok", "final_loss", "notes")


@dataclass
class RunOptions:
    """What to run and how long it may take."""

    device: str = "cpu"
    full: bool = False
    tiny: bool = False
    compile: bool = True
    max_autotune: bool = False
    compile_budget_s: Optional[float] = None
    time_budget_s: Optional[float] = None
    only: List[str] = field(default_factory=list)
    dtypes: List[str] = field(default_factory=list)
    cudagraph: bool = True
    epoch_reps: int = 3
    peak_size: int = 2048
    timing: timers.TimingOptions = field(default_factory=timers.TimingOptions)


def select_cases(opts: RunOptions) -> List[Case]:
    cases = catalogue(opts.device, full=opts.full, tiny=opts.tiny, dtypes=opts.dtypes or None)
    if opts.only:
        cases = [c for c in cases if any(pattern in c.id for pattern in opts.only)]
    return cases


def gpu_only_left_out(opts: RunOptions) -> List[Case]:
    """The selected cases a CUDA run would have and this CPU run leaves out for their size
    (none on CUDA)."""
    if opts.device == "cuda":
        return []
    here = {c.id for c in select_cases(opts)}
    cases = gpu_only_cases(full=opts.full, tiny=opts.tiny, dtypes=opts.dtypes or None)
    if opts.only:
        cases = [c for c in cases if any(pattern in c.id for pattern in opts.only)]
    return [c for c in cases if c.id not in here]


def not_run_here(opts: RunOptions) -> List[dict]:
    """gpu_only_left_out as {"id", "reason"} entries: the report lists them, so that no row goes
    missing silently."""
    return [{"id": c.id, "reason": f"GPU-only case ({c.cost.flops / 1e9:.0f} GFLOP per call, "
                                   f"too long for a run on {opts.device})"}
            for c in gpu_only_left_out(opts)]


def variants_for(case: Case, opts: RunOptions) -> List[str]:
    """Variant names for a case, fastmlp first; compile baselines only when enabled."""
    if case.kind == "epoch":
        return [v for v in EPOCH_VARIANTS if opts.compile or "compile" not in v]
    names = [v for v in LAYER_VARIANTS if v not in COMPILE_MODES and applies(case, v)]
    if opts.compile:
        names.append("compile")
        if opts.max_autotune:
            names.append("compile-max-autotune")
    return names


def empty_variant(status: str, reason: str = "") -> dict:
    entry = dict.fromkeys(VARIANT_FIELDS)
    entry.update(status=status, reason=reason or None)
    return entry


class _Budget:
    """Wall-clock allowances: the whole run, and the part of it spent compiling."""

    def __init__(self, opts: RunOptions):
        self.start = time.perf_counter()
        self.opts = opts
        self.compile_spent = 0.0

    def skip_reason(self, variant: str) -> Optional[str]:
        if self.opts.time_budget_s is not None and \
                time.perf_counter() - self.start > self.opts.time_budget_s:
            return f"time budget of {self.opts.time_budget_s:g} s used up"
        if "compile" in variant and self.opts.compile_budget_s is not None and \
                self.compile_spent > self.opts.compile_budget_s:
            return f"compile budget of {self.opts.compile_budget_s:g} s used up"
        return None


def _reference_output(case: Case, reference, data, device) -> torch.Tensor:
    """The fp32, exact-precision forward of the same parameters and inputs, for the parity check."""
    model32 = reference_model(case, device).float()
    model32.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    with precision("fp32"), torch.no_grad():
        return model32(data.x.float())


def _measure(case: Case, runnable: Runnable, device: torch.device, opts: RunOptions,
             entry: dict) -> None:
    """Warm-up call, steady-state timing, CUDA-graph timing, peak memory: into entry."""
    t0 = time.perf_counter()
    if runnable.reset:
        runnable.reset()
    runnable.fn()
    timers.synchronize(device)
    entry["first_call_s"] = time.perf_counter() - t0

    if case.kind == "epoch":
        def synced():
            runnable.fn()
            timers.synchronize(device)

        reps = 1 if opts.tiny else opts.epoch_reps
        stats = timers.time_cpu(synced, None, timers.TimingOptions(
            warmup=0, min_reps=reps, max_reps=reps, target_s=0.0))
        stats.method = "wall-clock+sync per epoch"
    elif device.type == "cuda":
        stats = timers.time_cuda(runnable.fn, runnable.grads, opts.timing)
    else:
        stats = timers.time_cpu(runnable.fn, runnable.reset, opts.timing)
    entry.update({k: v for k, v in stats.as_dict().items()})

    if device.type == "cuda" and case.launch_bound and opts.cudagraph:
        try:
            graphed = timers.time_cuda_graph(runnable.fn, runnable.grads, opts.timing)
            entry["graphed_median_ms"], entry["graphed_method"] = graphed.median_ms, graphed.method
        except Exception as exc:  # capture is not possible for every variant: say so, go on
            entry["graphed_error"] = _describe(exc)
    if case.kind != "epoch":
        entry["peak_mem_mib"] = timers.peak_memory_mib(runnable.fn, runnable.reset, device)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def run_case(case: Case, device: torch.device, opts: RunOptions, budget: _Budget,
             log: Callable[[str], None]) -> dict:
    """Time every variant of one case and derive the same-run ratios."""
    cost = case.cost
    floor_s, bound = costs.floor_seconds(cost, case.dtype)
    # Tables show the workload column only: an activation other than ReLU joins it there.
    workload = case.workload if case.activation == "relu" else f"{case.workload}+{case.activation}"
    record = {"id": case.id, "workload": workload, "activation": case.activation,
              "kind": case.kind, "pass": case.pass_,
              "dtype": case.dtype, "shape": case.shape, "batch": case.batch, "dims": list(case.dims),
              "samples": case.samples or None, "flops": cost.flops, "min_bytes": cost.min_bytes,
              "h100_datasheet_floor_us": floor_s * 1e6, "h100_floor_bound": bound,
              "launch_bound": case.launch_bound, "variants": {}}
    with precision(case.dtype):
        if case.kind == "epoch":
            data, reference, ref_out = epoch_data(case), None, None
        else:
            data, reference = case_data(case, device), reference_model(case, device)
            ref_out = _reference_output(case, reference, data, device) if case.pass_ == "fwd" else None

    for name in variants_for(case, opts):
        reason = unavailable(case, name, device) or budget.skip_reason(name)
        if reason:
            record["variants"][name] = empty_variant("skipped", reason)
            log(f"  {name:<28} skipped: {reason}")
            continue
        entry = empty_variant("ok")
        started = time.perf_counter()
        try:
            with precision(case.dtype):
                runnable = build_epoch(case, name, device, data) if case.kind == "epoch" else \
                    build(case, name, reference, data)
                entry["notes"] = runnable.notes or None
                _measure(case, runnable, device, opts, entry)
                if runnable.output is not None:
                    out = runnable.output()
                    if case.kind == "epoch":
                        entry["final_loss"] = float(out)
                    elif ref_out is not None:
                        err = (out.float() - ref_out).abs().max() / ref_out.abs().max().clamp_min(1e-6)
                        entry["max_rel_err"] = float(err)
                        entry["parity_ok"] = bool(err <= PARITY_RTOL[case.dtype])
            log(f"  {name:<28} {entry['median_ms']:10.4f} ms  (first call {entry['first_call_s']:.2f} s)")
        except Exception as exc:  # one failing variant must not cost the whole report
            entry = empty_variant("error", _describe(exc))
            entry["notes"] = traceback.format_exc(limit=3)[-1500:]
            log(f"  {name:<28} ERROR {entry['reason']}")
        finally:
            runnable = None
            if "compile" in name:  # the first call is the compile (plus one run)
                budget.compile_spent += entry.get("first_call_s") or time.perf_counter() - started
            if device.type == "cuda":
                torch.cuda.empty_cache()
        record["variants"][name] = entry
    return record


def add_ratios(record: dict, peaks: Dict[str, dict]) -> dict:
    """Speedups (baseline median / fastmlp median), TFLOP/s and % of the measured peak, same run."""
    variants = record["variants"]
    fast = variants.get("fastmlp", {})
    fast_ms = fast.get("median_ms") if fast.get("status") == "ok" else None
    record["speedup"] = {}
    record["tflops"] = {}
    record["pct_of_peak"] = {}
    peak = peaks.get(record["dtype"], {}).get("tflops")
    for name, entry in variants.items():
        ms = entry.get("median_ms") if entry.get("status") == "ok" else None
        tflops = record["flops"] / (ms * 1e-3) / 1e12 if ms else None
        record["tflops"][name] = tflops
        record["pct_of_peak"][name] = 100.0 * tflops / peak if tflops and peak else None
        if name != "fastmlp":
            record["speedup"][name] = ms / fast_ms if ms and fast_ms else None
    return record


def describe_fastmlp_path(device: torch.device) -> str:
    """Which implementation the fastmlp figures measure on this device (stated in every report)."""
    from fastmlp import backend

    if backend.uses_triton(device, torch.float32):
        return f"Triton kernels (fastmlp backend {backend.get_backend()!r})"
    return (f"fastmlp's torch path (backend {backend.get_backend()!r}: the Triton kernels run on "
            f"CUDA only; on CPU they would need the interpreter, which is for tests, not speed)")


def run_suite(opts: RunOptions, log: Callable[[str], None] = print,
              on_progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the selected cases on opts.device and return the complete results dict.

    on_progress, if given, receives the results so far after each case (results["complete"] is
    False until the end), so that a run killed from outside still leaves its measured cases.
    """
    device = torch.device(opts.device)
    started_at, t_start = environment.now(), time.perf_counter()
    load_at_start = environment.load_average()
    cases = select_cases(opts)
    not_run = not_run_here(opts)
    dtypes = sorted({c.dtype for c in cases}, key=["fp32", "tf32", "fp16", "bf16"].index)
    if not_run:
        log(report.not_run_line(not_run, device.type))
    log(f"fastmlp bench on {device.type}: {len(cases)} cases; measuring the matmul peak "
        f"({', '.join(dtypes)}) ...")
    peak_opts = timers.TimingOptions.single_round() if opts.tiny else opts.timing
    peaks = measure_matmul_peak(device, dtypes, opts.peak_size, peak_opts)
    budget = _Budget(opts)
    results = {
        "schema_version": SCHEMA_VERSION,
        "suite": "fastmlp bench",
        "complete": False,
        "started_at": started_at,
        "duration_s": None,
        "load_average": {"start": load_at_start, "end": None},
        "command": environment.command_line(),
        "device": environment.device_info(device),
        "versions": environment.versions(),
        "options": {**asdict(opts), "timing": asdict(opts.timing)},
        "fastmlp_path": describe_fastmlp_path(device),
        "peak": peaks,
        "datasheet": costs.H100_SXM_DATASHEET,
        "compile_spent_s": 0.0,
        "not_run": not_run,
        "records": [],
    }
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.id}")
        results["records"].append(add_ratios(run_case(case, device, opts, budget, log), peaks))
        results["compile_spent_s"] = budget.compile_spent
        results["duration_s"] = time.perf_counter() - t_start
        if on_progress and i < len(cases):
            on_progress(results)
    results["load_average"]["end"] = environment.load_average()
    results["duration_s"] = time.perf_counter() - t_start
    results["complete"] = True
    return results
