"""pytest-benchmark glue: time one (case, variant) of the shared catalogue with benchmark.pedantic.

The pytest files (bench/test_*.py) only say which kinds of case they hold; everything else —
inputs, variants, warm-up, the synchronising target, the group (one per workload and shape, so
fastmlp and its baselines sit side by side in one table), extra_info with FLOPs and bytes — lives
here, so that pytest-benchmark and python -m bench time exactly the same calls.
"""

import time
from typing import Optional, Tuple

import torch

from bench import timing
from bench.cases import Case
from bench.loops import build_epoch, epoch_data
from bench.variants import build, case_data, precision, reference_model, unavailable

_cache: dict = {}


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(case: Case, device: torch.device):
    """The case's reference model and data, kept for the variants that follow (one case at a time)."""
    if case.id not in _cache:
        _cache.clear()
        if case.kind == "epoch":
            _cache[case.id] = (None, epoch_data(case))
        else:
            _cache[case.id] = (reference_model(case, device), case_data(case, device))
    return _cache[case.id]


def rounds_for(seconds_per_call: float, target_s: float, lo: int = 5, hi: int = 200) -> int:
    """Enough rounds to fill about target_s, within [lo, hi]."""
    if seconds_per_call <= 0:
        return hi
    return max(lo, min(hi, int(target_s / seconds_per_call)))


def run(benchmark, case: Case, variant: str, target_s: float = 1.0,
        rounds: Optional[int] = None) -> Tuple[float, int]:
    """Time `variant` of `case` with benchmark.pedantic; returns (first-call seconds, rounds).
    A variant that cannot run here (variants.unavailable: e.g. Liger-Kernel not installed) is
    a pytest skip with the reason."""
    device = bench_device()
    why = unavailable(case, variant, device)
    if why is not None:
        import pytest

        pytest.skip(why)
    benchmark.group = f"{case.workload} {case.shape} {case.dtype} {case.pass_}"
    cost = case.cost
    benchmark.extra_info.update(case=case.id, variant=variant, device=device.type, flops=cost.flops,
                                min_bytes=cost.min_bytes)
    with precision(case.dtype):
        reference, data = _inputs(case, device)
        runnable = build_epoch(case, variant, device, data) if case.kind == "epoch" else \
            build(case, variant, reference, data)

        def target():
            runnable.fn()
            timing.synchronize(device)

        def setup():
            if runnable.reset:
                runnable.reset()

        t0 = time.perf_counter()
        setup()
        target()  # warm-up: compile, autotune, JIT; never in the timed rounds
        first_call_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        setup()
        target()
        per_call = time.perf_counter() - t0
        n = rounds or (3 if case.kind == "epoch" else rounds_for(per_call, target_s))
        benchmark.extra_info["first_call_s"] = first_call_s
        benchmark.pedantic(target, setup=setup, rounds=n, warmup_rounds=0 if case.kind == "epoch" else 2,
                           iterations=1)
    return first_call_s, n
