"""The device's matmul peak, measured in the same run: the denominator of "% of peak".

A large square torch.matmul per precision is as close to the attainable peak as stock software
gets (cuBLAS on GPU, oneDNN/MKL on CPU). It is measured, not looked up, so the percentage is of
what this machine did today, under the same clocks and thermals as the workloads around it.
"""

from typing import Dict, Iterable

import torch

from bench import timing
from bench.variants import TORCH_DTYPES, precision


def _matmul_tflops(device: torch.device, dtype: str, size: int, opts: timing.TimingOptions) -> dict:
    """One dtype's size³ matmul; its operands are freed when this returns."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=TORCH_DTYPES[dtype])
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=TORCH_DTYPES[dtype])
    with precision(dtype):
        if device.type == "cuda":
            stats = timing.time_cuda(lambda: torch.matmul(a, b), [], opts)
        else:
            stats = timing.time_cpu(lambda: torch.matmul(a, b), None, opts)
    return {"tflops": 2 * size**3 / (stats.median_ms * 1e-3) / 1e12,
            "median_ms": stats.median_ms, "size": size, "method": stats.method}


def measure_matmul_peak(device: torch.device, dtypes: Iterable[str], size: int,
                        opts: timing.TimingOptions) -> Dict[str, dict]:
    """TFLOP/s of a size³ matmul for each dtype: {dtype: {"tflops", "median_ms", "size", "method"}}."""
    return {dtype: _matmul_tflops(device, dtype, size, opts) for dtype in dtypes}
