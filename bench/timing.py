"""Timers: median of many synchronised calls, warm-up excluded, on GPU and on CPU.

GPU: triton.testing.do_bench (CUDA events around each call, L2 flushed between calls, gradients
reset outside the timed region) and do_bench_cudagraph (the calls replayed from one CUDA graph, for
launch-bound shapes where host overhead would otherwise be all that is measured). Both return
every sample (return_mode="all") so the statistics here are computed the same way for every
timer. CPU: wall clock around each call after warm-up calls, with the reset (e.g. grads to None)
done outside the timed region, until a time target and a minimum count are both met.
"""

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class Stats:
    """Summary of one timer's samples, in milliseconds."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    min_ms: float
    samples: int
    method: str

    @classmethod
    def from_times(cls, times_ms: Sequence[float], method: str) -> "Stats":
        if not times_ms:
            raise ValueError("no timing samples")
        ordered = sorted(float(t) for t in times_ms)
        return cls(median_ms=statistics.median(ordered), q20_ms=_quantile(ordered, 0.2),
                   q80_ms=_quantile(ordered, 0.8), min_ms=ordered[0], samples=len(ordered),
                   method=method)

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted samples (numpy's default method)."""
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class TimingOptions:
    """How long and how often to time. CPU: counts and a time target; GPU: do_bench's ms budgets."""

    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 200
    target_s: float = 1.0
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100

    @classmethod
    def single_round(cls) -> "TimingOptions":
        """One warm-up call and one timed call: for the harness's own tests."""
        return cls(warmup=1, min_reps=1, max_reps=1, target_s=0.0, gpu_warmup_ms=1, gpu_rep_ms=1)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock timer sees the whole call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(fn: Callable[[], object], reset: Optional[Callable[[], None]],
             opts: TimingOptions) -> Stats:
    """Wall-clock each call of fn after opts.warmup untimed calls; reset runs untimed before each."""
    for _ in range(opts.warmup):
        if reset:
            reset()
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < opts.max_reps and (
            len(times) < opts.min_reps or time.perf_counter() - start < opts.target_s):
        if reset:
            reset()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Stats.from_times(times, "wall-clock")


def time_cuda(fn: Callable[[], object], grads: Sequence[torch.Tensor], opts: TimingOptions) -> Stats:
    """CUDA-event time of each call via triton.testing.do_bench (L2 flushed between calls)."""
    try:
        from triton.testing import do_bench
    except ImportError:  # triton missing: the same measurement with torch's events
        return _time_cuda_events(fn, grads, opts)
    times = do_bench(fn, warmup=opts.gpu_warmup_ms, rep=opts.gpu_rep_ms,
                     grad_to_none=list(grads) or None, return_mode="all")
    return Stats.from_times(times, "do_bench")


def _time_cuda_events(fn, grads, opts: TimingOptions) -> Stats:
    for _ in range(max(1, opts.warmup)):
        fn()
    torch.cuda.synchronize()
    starts, ends = [], []
    for _ in range(max(opts.min_reps, 10)):
        for g in grads:
            g.grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        starts.append(s)
        ends.append(e)
    torch.cuda.synchronize()
    return Stats.from_times([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda-events")


def time_cuda_graph(fn: Callable[[], object], grads: Sequence[torch.Tensor],
                    opts: TimingOptions) -> Stats:
    """Per-call time with the calls captured into one CUDA graph (do_bench_cudagraph)."""
    from triton.testing import do_bench_cudagraph

    times = do_bench_cudagraph(fn, rep=max(1, opts.gpu_rep_ms // 5), grad_to_none=list(grads) or None,
                               return_mode="all")
    return Stats.from_times(times, "do_bench_cudagraph")


def peak_memory_mib(fn: Callable[[], object], reset: Optional[Callable[[], None]],
                    device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated during one call, above what was allocated before it (MiB).

    None on CPU: torch keeps no allocator statistics there, and a process-wide RSS would not be
    a figure of this call.
    """
    if device.type != "cuda":
        return None
    if reset:
        reset()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
