"""Tile configurations for the linear kernels and a small cached autotuner.

Why not ``triton.autotune``: the config list depends on the GPU generation and on the dtype class
(fp16/bf16 tensor cores, TF32, exact fp32 FMA), the key must be bucketed (next power of two of each
dimension) so that a training loop with a fixed shape tunes once, tuning must never run while a
CUDA graph is being captured, and the tests need one fixed config. A dict lookup per call keeps
the host path lean.

Every config is named by the role of its dimensions in the kernel that uses it:
``block_rows`` x ``block_cols`` is the output tile and ``block_red`` the step along the reduction.
The forward kernel maps them to (M, N, K), dX to (M, K, N) and dW to (N, K, M).

Environment:
  FASTMLP_AUTOTUNE=0   use the first (default) config of each list, never benchmark (tests, CI).
Under Triton's interpreter only the interpreter config is used (timing numpy is meaningless).
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch


@dataclass(frozen=True)
class TileConfig:
    block_rows: int
    block_cols: int
    block_red: int
    group: int
    num_warps: int
    num_stages: int


# Triton picks interpreted or compiled kernels when they are decorated, at import: read the
# switch once, at the same moment, instead of on every launch.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# A candidate the autotuner may pick on CUDA besides the Triton configs: torch's own GEMM
# (cuBLAS) plus one pointwise op, unfused. Fusion does not always win (cuBLAS's fp32 FMA GEMM,
# for one, is hard to beat with tl.dot(input_precision="ieee")); timing both per shape bucket
# means a fused layer is never slower than this plain path by more than the timing noise.
TORCH_GEMM = "torch-gemm"


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def autotune_enabled() -> bool:
    return os.environ.get("FASTMLP_AUTOTUNE", "1") not in ("0", "false", "False", "")


# Small tiles make several programs even for the seed's 64x100 output; big ones are for big GEMMs.
_INTERPRETER = [TileConfig(32, 32, 32, 4, 4, 1)]

# Tensor-core configs for fp16/bf16. Hopper (sm_90) configs keep 4 or 8 warps (whole warpgroups,
# so Triton emits wgmma) and tile rows >= 64. The first entry of each list is the default.
# Left out since the activations came in (kernels/aot.py, bench/NOTES.md): 128x256x64 (sm_90;
# spills with any epilogue heavier than ReLU's, and its wgmma are serialised on triton 3.6),
# 64x64x128 (sm_90) and 128x128x64 (sm_80), which spill kilobytes in the GELU backward kernels.
_TENSOR_CORE_SM90 = [
    TileConfig(128, 128, 64, 8, 8, 3),
    TileConfig(128, 64, 64, 8, 8, 4),
    TileConfig(64, 128, 64, 8, 4, 4),
    TileConfig(64, 64, 64, 8, 4, 4),
    TileConfig(64, 32, 64, 8, 4, 4),
]
_TENSOR_CORE_SM80 = [
    TileConfig(128, 128, 32, 8, 8, 4),
    TileConfig(128, 64, 32, 8, 4, 4),
    TileConfig(64, 128, 32, 8, 4, 4),
    TileConfig(64, 64, 64, 8, 4, 4),
    TileConfig(32, 64, 64, 8, 4, 4),
    TileConfig(32, 32, 64, 8, 2, 4),
]
# TF32 operands are 4 bytes: half the reduction step of fp16 for the same shared memory.
_TF32 = [
    TileConfig(128, 128, 32, 8, 8, 3),
    TileConfig(128, 64, 32, 8, 8, 4),
    TileConfig(64, 128, 32, 8, 4, 4),
    TileConfig(64, 64, 32, 8, 4, 4),
    TileConfig(32, 32, 32, 8, 4, 4),
]
# Exact fp32 ("ieee") products run on FMA units: moderate tiles, fewer stages.
_IEEE_FP32 = [
    TileConfig(64, 64, 32, 8, 8, 3),  # with 4 warps: 12-24 B (sm_90, 3.6) and 184 B (sm_80, 3.9) of spills
    TileConfig(64, 128, 32, 8, 8, 3),
    TileConfig(32, 64, 32, 8, 4, 3),
    TileConfig(32, 32, 32, 8, 2, 3),
]


# Activations whose derivative (transcendental in the pre-activation) makes the dX and dW kernels
# need more than sm_80's 255 registers per thread on nearly every tile (kernels/aot.py; bench/NOTES.md,
# 2026-12-01): on GPUs before Hopper their backward GEMMs take TORCH_GEMM (torch's own backward
# op, then cuBLAS) instead of a spilling kernel. Their forward stays fused; Hopper fuses both.
TORCH_BACKWARD_BEFORE_SM90 = ("gelu", "gelu_tanh", "silu")


def candidate_configs(dtype: torch.dtype, dot_precision: str, capability: Tuple[int, int],
                      kernel: str = "fwd", activation: str = "relu") -> List:
    """The configs worth trying for one kernel ("fwd", "dx", "dw"), dtype class and activation on
    one GPU generation (default first), then TORCH_GEMM on GPUs."""
    if interpreter_enabled() or capability == (0, 0):
        return _INTERPRETER
    if kernel in ("dx", "dw") and activation in TORCH_BACKWARD_BEFORE_SM90 and capability[0] < 9:
        return [TORCH_GEMM]
    if dtype in (torch.float16, torch.bfloat16):
        triton_configs = _TENSOR_CORE_SM90 if capability[0] == 9 else _TENSOR_CORE_SM80
    else:
        triton_configs = _TF32 if dot_precision == "tf32" else _IEEE_FP32
    return triton_configs + [TORCH_GEMM]


def all_shipped_configs() -> Dict[str, List[TileConfig]]:
    """Every GPU config list, by name, for the ahead-of-time compile checks."""
    return {"tensor_core_sm90": _TENSOR_CORE_SM90, "tensor_core_sm80": _TENSOR_CORE_SM80,
            "tf32": _TF32, "ieee_fp32": _IEEE_FP32}


def bucket(n: int) -> int:
    """Next power of two (0 stays 0): shapes in one bucket share a tuned config."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


_best: Dict[tuple, TileConfig] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def pick_config(key: tuple, candidates: List, device: torch.device, run: Callable) -> object:
    """The fastest of `candidates` for `key`, timed once with `run(config)` and cached.

    FASTMLP_AUTOTUNE=0 means the default config, always: it is checked before the cache, so a
    pick cached while autotuning was on (an earlier test, an earlier phase of a run) never leaks
    into a run that asked for the default. With one candidate, off CUDA, or during CUDA-graph
    capture (where timing is impossible) a cached pick is used if there is one, else the
    default, and nothing new is cached.
    """
    if not autotune_enabled():
        return candidates[0]
    best = _best.get(key)
    if best is not None:
        return best
    if len(candidates) == 1 or device.type != "cuda" or _capturing(device):
        return candidates[0]
    import triton.testing

    timings = []
    for config in candidates:
        try:
            ms = triton.testing.do_bench(lambda: run(config), warmup=5, rep=20)
        except Exception as error:  # a config the compiler rejects (e.g. out of shared memory)
            if "OutOfResources" not in type(error).__name__ and "out of resource" not in str(error):
                raise
            continue
        timings.append((ms, config))
    if not timings:
        raise RuntimeError(f"fastmlp: no kernel config fits this GPU for {key}")
    best = min(timings, key=lambda t: t[0])[1]
    _best[key] = best
    return best


def chosen_configs() -> Dict[tuple, object]:
    """What the autotuner has picked so far, key -> config (or TORCH_GEMM): for reports."""
    return dict(_best)
