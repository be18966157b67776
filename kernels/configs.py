"""Every tile configuration the kernels ship, and which GPUs, dtypes and activations each serves.

One place for the tables and for the rules that pick one (GPU generation, dtype class,
activation): the per-layer Linear+activation kernels' lists (``linear_candidates``) and the fused
MLP's tables by padded hidden width (``fused_configs``, ``fused_dw_configs``). The rules are pure
functions of the GPU's (capability, shared memory) and of whether Triton's interpreter runs:
the launchers read those from the device (kernels/launch.py) and the environment
(kernels/tuning.py), the ahead-of-time checks (kernels/aot.py, kernels/mlp_aot.py) compile these
tables entry by entry for sm_80 and sm_90, and the tests assert 0 spills for each. How each
entry was chosen, with register counts, is in bench/NOTES.md (the 2026-12-01 AOT entry for the
per-layer lists, "FusedMLP" for the fused tables).

No triton import here: the configs are plain data.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from fastmlp.kernels import activations

# Shared memory a block may opt in to (bytes) on the GPUs the tables were compiled and checked
# for: A100 (sm_80) and H100 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

# A candidate the autotuner may pick on CUDA besides the Triton configs: torch's own GEMM
# (cuBLAS) plus one pointwise op, unfused. Fusion does not always win (cuBLAS's fp32 FMA GEMM,
# for one, is hard to beat with tl.dot(input_precision="ieee")); timing both per shape bucket
# means a fused layer is never slower than this plain path by more than the timing noise.
TORCH_GEMM = "torch-gemm"


# ----------------------------------------------------------------------------------------------
# The per-layer kernels (kernels/linear_act.py)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    """A tile named by the role of its dimensions in the kernel that uses it: ``block_rows`` x
    ``block_cols`` is the output tile and ``block_red`` the step along the reduction. The forward
    kernel maps them to (M, N, K), dX to (M, K, N) and dW to (N, K, M)."""

    block_rows: int
    block_cols: int
    block_red: int
    group: int
    num_warps: int
    num_stages: int


# Under the interpreter (timing numpy is meaningless) one config: small tiles make several
# programs even for the seed's 64x100 output.
INTERPRETER = [TileConfig(32, 32, 32, 4, 4, 1)]

# Tensor-core configs for fp16/bf16. Hopper (sm_90) configs keep 4 or 8 warps (whole warpgroups,
# so Triton emits wgmma) and tile rows >= 64. The first entry of each list is the default. Tiles
# that spill with some activation's epilogue or prologue are left out (bench/NOTES.md lists
# them).
TENSOR_CORE_SM90 = [
    TileConfig(128, 128, 64, 8, 8, 3),
    TileConfig(128, 64, 64, 8, 8, 4),
    TileConfig(64, 128, 64, 8, 4, 4),
    TileConfig(64, 64, 64, 8, 4, 4),
    TileConfig(64, 32, 64, 8, 4, 4),
]
TENSOR_CORE_SM80 = [
    TileConfig(128, 128, 32, 8, 8, 4),
    TileConfig(128, 64, 32, 8, 4, 4),
    TileConfig(64, 128, 32, 8, 4, 4),
    TileConfig(64, 64, 64, 8, 4, 4),
    TileConfig(32, 64, 64, 8, 4, 4),
    TileConfig(32, 32, 64, 8, 2, 4),
]
# TF32 operands are 4 bytes: half the reduction step of fp16 for the same shared memory.
TF32 = [
    TileConfig(128, 128, 32, 8, 8, 3),
    TileConfig(128, 64, 32, 8, 8, 4),
    TileConfig(64, 128, 32, 8, 4, 4),
    TileConfig(64, 64, 32, 8, 4, 4),
    TileConfig(32, 32, 32, 8, 4, 4),
]
# Exact fp32 ("ieee") products run on FMA units: moderate tiles, fewer stages. The default takes
# 8 warps: with 4 it spills (bench/NOTES.md).
IEEE_FP32 = [
    TileConfig(64, 64, 32, 8, 8, 3),
    TileConfig(64, 128, 32, 8, 8, 3),
    TileConfig(32, 64, 32, 8, 4, 3),
    TileConfig(32, 32, 32, 8, 2, 3),
]


def linear_candidates(dtype: torch.dtype, dot_precision: str, capability: Tuple[int, int],
                      kernel: str, activation: str, interpreter: bool) -> List:
    """The configs worth trying for one per-layer kernel ("fwd", "dx", "dw"), dtype class and
    activation on a GPU of `capability` ((0, 0): none), default first, then TORCH_GEMM on GPUs.

    The dX and dW kernels of an activation take TORCH_GEMM alone on GPUs before the row's
    ``fused_backward_from`` (kernels/activations.py): there they would spill."""
    if interpreter or capability == (0, 0):
        return INTERPRETER
    if kernel in ("dx", "dw") and not activations.get(activation).fuses_backward_on(capability):
        return [TORCH_GEMM]
    if dtype in (torch.float16, torch.bfloat16):
        triton_configs = TENSOR_CORE_SM90 if capability[0] == 9 else TENSOR_CORE_SM80
    else:
        triton_configs = TF32 if dot_precision == "tf32" else IEEE_FP32
    return triton_configs + [TORCH_GEMM]


def all_shipped_configs() -> Dict[str, List[TileConfig]]:
    """Every GPU config list of the per-layer kernels, by name, for the ahead-of-time checks."""
    return {"tensor_core_sm90": TENSOR_CORE_SM90, "tensor_core_sm80": TENSOR_CORE_SM80,
            "tf32": TF32, "ieee_fp32": IEEE_FP32}


# ----------------------------------------------------------------------------------------------
# The fused MLP (kernels/mlp_kernels.py)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedConfig:
    """Tiles of the fused forward / dX-chain kernels (the hidden width H is the layer tile).

    block_m: rows per program; block_k: columns of X (forward) and of dX (backward) per step of
    the first layer; block_n: output columns per step of the last layer.
    """

    block_m: int
    block_k: int
    block_n: int
    num_warps: int
    num_stages: int


# Under the interpreter time goes per program and per block op, not per element: few, large
# tiles (but still several row tiles, column tiles and row chunks at the tests' sizes).
INTERPRETER_FUSED = [FusedConfig(32, 64, 32, 4, 1)]
INTERPRETER_DW = [TileConfig(128, 128, 32, 1, 4, 1)]

# Per (dtype class, GPU generation) and padded hidden width H: the fused configs a launch may
# pick, default first. A width with no entry does not take the fully fused path there (the
# per-layer path runs instead): 128 is the limit for every class (at 256, 16-bit backward spills
# at every tile tried and an fp32 256 x 256 weight tile alone overflows shared memory). Each
# entry compiles with 0 spills and no stack frame (tests/test_mlp_aot.py), also as launched on
# sizes that are not multiples of 16 (mlp_aot's "odd" sizes: K_IN 1000, N_OUT 10, ...), which
# take more registers. Register allocation near the 255-register limit is chaotic (one more
# temporary in an activation's derivative, a mask, or another Triton version moves a clean
# config to spills), so every entry was picked from a pool compiled under both Triton versions
# CI runs, clean in both and, where the pool allowed, below ~240 registers. At 128, 16-bit tiles
# take at most 64 rows with 8 warps, TF32 and exact fp32 (FMA, operands in registers) 16-32 rows
# with 2 stages on sm_90, and TF32 16-column first/last-layer steps (block_k = block_n = 16).
_C = FusedConfig
FUSED_CONFIGS: Dict[Tuple[str, int], Dict[int, List[FusedConfig]]] = {
    ("half", 90): {16: [_C(128, 32, 32, 8, 1)], 32: [_C(128, 32, 32, 8, 1)],
                   64: [_C(128, 32, 32, 8, 1), _C(64, 32, 32, 8, 1)],
                   128: [_C(64, 32, 32, 8, 1)]},
    ("half", 80): {16: [_C(128, 32, 32, 8, 1)], 32: [_C(128, 32, 32, 8, 1)],
                   64: [_C(128, 32, 32, 8, 1), _C(64, 32, 32, 8, 1)],
                   128: [_C(64, 32, 32, 8, 1)]},
    ("tf32", 90): {16: [_C(128, 32, 32, 8, 1)], 32: [_C(128, 32, 32, 8, 1)],
                   64: [_C(64, 32, 32, 8, 1), _C(32, 32, 32, 8, 2)],
                   128: [_C(32, 16, 16, 8, 2), _C(16, 32, 32, 8, 2)]},
    ("tf32", 80): {16: [_C(128, 32, 32, 8, 1)], 32: [_C(128, 32, 32, 8, 1)],
                   64: [_C(64, 32, 32, 8, 2), _C(64, 32, 32, 8, 1)],
                   128: [_C(64, 16, 16, 8, 2), _C(32, 32, 32, 8, 2)]},
    ("ieee", 90): {16: [_C(64, 32, 32, 8, 1)], 32: [_C(64, 32, 32, 8, 1)],
                   64: [_C(32, 32, 32, 8, 1), _C(32, 32, 32, 8, 2)],
                   128: [_C(32, 32, 32, 8, 2)]},
    ("ieee", 80): {16: [_C(64, 32, 32, 8, 1)], 32: [_C(64, 32, 32, 8, 1)],
                   64: [_C(32, 32, 32, 8, 1), _C(32, 32, 32, 8, 2)],
                   128: [_C(16, 32, 32, 8, 2)]},
}

# The tiles for activations whose derivative is "math" (kernels/activations.py), where the tiles
# above spill: at 16 bits their fp32 derivatives on a [block_m, H] tile need about 16 tile
# elements per thread, half what a select can take. A width without an entry here uses
# FUSED_CONFIGS for every activation.
MATH_CONFIGS: Dict[Tuple[str, int], Dict[int, List[FusedConfig]]] = {
    ("half", 90): {16: [_C(64, 32, 32, 4, 1)], 32: [_C(64, 32, 32, 4, 1)],
                   64: [_C(64, 32, 32, 8, 1), _C(32, 32, 32, 4, 1)],
                   128: [_C(64, 32, 32, 8, 1), _C(16, 32, 32, 8, 1)]},
    ("half", 80): {16: [_C(64, 32, 32, 4, 1)], 32: [_C(64, 32, 32, 4, 1)],
                   64: [_C(64, 32, 32, 8, 1), _C(32, 32, 32, 8, 1)],
                   128: [_C(32, 32, 32, 8, 1), _C(16, 32, 32, 8, 1)]},
}

# dW + db of the stack: output tile [block_rows (N), block_cols (K)], block_red rows per step
# (group unused: each program owns one output tile of one layer and one row chunk).
_T = TileConfig
DW_CONFIGS: Dict[Tuple[str, int], List[TileConfig]] = {
    ("half", 90): [_T(64, 64, 64, 1, 4, 3), _T(128, 128, 64, 1, 8, 3), _T(128, 64, 64, 1, 8, 3)],
    ("half", 80): [_T(64, 64, 64, 1, 8, 3), _T(128, 64, 32, 1, 8, 3)],
    ("tf32", 90): [_T(64, 64, 32, 1, 4, 3), _T(128, 128, 32, 1, 8, 3)],
    ("tf32", 80): [_T(64, 64, 32, 1, 4, 3), _T(128, 128, 32, 1, 8, 3)],
    ("ieee", 90): [_T(32, 64, 32, 1, 4, 3), _T(32, 32, 32, 1, 4, 3)],
    ("ieee", 80): [_T(32, 64, 32, 1, 4, 3), _T(32, 32, 32, 1, 4, 3)],
}


def dtype_class(dtype: torch.dtype, allow_tf32: bool) -> str:
    """"half" (fp16/bf16 tensor cores), "tf32", "ieee" (exact fp32 FMA) or "fp64"."""
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "ieee"
    return "fp64"


def padded_width(hidden: int) -> int:
    """The tile width H of a hidden width: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (hidden - 1).bit_length() if hidden > 0 else 0)


def table_arch(capability: Tuple[int, int], shared_memory: Optional[int]) -> Optional[int]:
    """80 or 90: whose fused tables serve a GPU of `capability` with `shared_memory` bytes a
    block may opt in to (None: unknown), or None when neither's checks hold there.

    The largest fused tiles need nearly the shared memory of an A100 (sm_80 TF32, H = 128) or an
    H100 (sm_90): on a GPU of either generation with less (sm_86 / sm_89: A10, L4, RTX 30/40
    series; sm_120) every TF32 tile at H = 128 would fail to launch, so such GPUs run the
    per-layer path instead. Before sm_80 (no bf16 tensor cores, other MMA shapes) nothing was
    compiled: per-layer there too."""
    major = capability[0]
    if major < 8:
        return None
    arch = 90 if major >= 9 else 80
    if shared_memory is not None and shared_memory < SHARED_MEMORY_LIMIT[arch]:
        return None
    return arch


def fused_configs(dtype: torch.dtype, allow_tf32: Optional[bool], hidden: int, activation: str,
                  capability: Tuple[int, int], shared_memory: Optional[int],
                  interpreter: bool) -> Optional[List[FusedConfig]]:
    """The fused configs for a stack of hidden width `hidden` (max over layers) with hidden
    activation `activation`, or None when that width is past the fully fused limit there, or
    the GPU is not one the tables were checked for (table_arch). allow_tf32=None (not known
    yet): fp32 configs only where both fp32 modes have them."""
    if interpreter:
        return INTERPRETER_FUSED if padded_width(hidden) <= 128 else None
    if allow_tf32 is None:
        modes = (True, False) if dtype == torch.float32 else (False,)
        found = [fused_configs(dtype, mode, hidden, activation, capability, shared_memory,
                               interpreter) for mode in modes]
        return None if any(f is None for f in found) else found[-1]
    arch = table_arch(capability, shared_memory)
    if arch is None:
        return None
    key = (dtype_class(dtype, allow_tf32), arch)
    H = padded_width(hidden)
    if activations.get(activation).derivative == activations.MATH and H in MATH_CONFIGS.get(key, {}):
        return MATH_CONFIGS[key][H]
    return FUSED_CONFIGS.get(key, {}).get(H)


def fused_dw_configs(dtype: torch.dtype, allow_tf32: bool, capability: Tuple[int, int],
                     shared_memory: Optional[int], interpreter: bool) -> List[TileConfig]:
    """The weight-gradient configs of a stack that fused_configs took (so its table exists)."""
    if interpreter or capability == (0, 0):
        return INTERPRETER_DW
    return DW_CONFIGS[(dtype_class(dtype, allow_tf32), table_arch(capability, shared_memory))]


# ----------------------------------------------------------------------------------------------
# The gated Linear kernels (kernels/gated.py)
# ----------------------------------------------------------------------------------------------
# Each program holds two fp32 accumulators (forward: gate and up for the same output columns;
# dW: dW_g and dW_u for the same tile), twice a plain tile's registers, so the output tiles are
# half linear_act's. Compiled by kernels/gated_aot.py (not by kernels/aot.py's CI matrix); the
# tests compile the sm_90 bf16 default of each gated kernel. Defaults first.
GATED_TENSOR_CORE_SM90 = [
    TileConfig(128, 64, 64, 8, 8, 3),
    TileConfig(64, 64, 64, 8, 8, 4),   # 8 warps: with 4, dX gelu_tanh spilled 244 B (triton 3.9)
    TileConfig(64, 32, 64, 8, 4, 4),
]
# The dW kernel on Hopper: its dY, G and U tiles are read transposed and the derivative runs on
# them in fp32, so its reduction step is 32 rows (a 64-row step spilled with every activation;
# 128x32x64 spilled in dX and is not in the list above).
GATED_DW_TENSOR_CORE_SM90 = [
    TileConfig(64, 64, 32, 8, 8, 3),
    TileConfig(128, 64, 32, 8, 8, 3),   # 0 spills, but silu at 255 registers (triton 3.6)
]
GATED_TENSOR_CORE_SM80 = [   # 64x32x64 w4 s4 spilled on sm_80 (dX sigmoid 64 B, dW tanh 144 B)
    TileConfig(128, 64, 32, 8, 8, 3),
    TileConfig(64, 64, 32, 8, 4, 4),
]
GATED_TF32 = [
    TileConfig(64, 64, 32, 8, 8, 3),
    TileConfig(64, 32, 32, 8, 4, 4),
]
GATED_IEEE_FP32 = [
    TileConfig(32, 64, 32, 8, 8, 3),
    TileConfig(32, 32, 32, 8, 4, 3),
]


def gated_candidates(dtype: torch.dtype, dot_precision: str, capability: Tuple[int, int],
                     kernel: str, activation: str, interpreter: bool) -> List:
    """The configs worth trying for one gated kernel ("fwd", "dx", "dw"), as linear_candidates:
    default first, TORCH_GEMM last on GPUs, TORCH_GEMM alone for an activation's backward
    before its row's ``fused_backward_from`` (the gated backward does its derivative and a
    second dot besides)."""
    if interpreter or capability == (0, 0):
        return INTERPRETER
    if kernel in ("dx", "dw") and not activations.get(activation).fuses_backward_on(capability):
        return [TORCH_GEMM]
    if dtype in (torch.float16, torch.bfloat16):
        if capability[0] == 9:
            triton_configs = GATED_DW_TENSOR_CORE_SM90 if kernel == "dw" else GATED_TENSOR_CORE_SM90
        else:
            triton_configs = GATED_TENSOR_CORE_SM80
    else:
        triton_configs = GATED_TF32 if dot_precision == "tf32" else GATED_IEEE_FP32
    return triton_configs + [TORCH_GEMM]


def all_gated_configs() -> Dict[str, List[TileConfig]]:
    """Every GPU config list of the gated kernels, by name, for the ahead-of-time checks."""
    return {"gated_tensor_core_sm90": GATED_TENSOR_CORE_SM90,
            "gated_dw_tensor_core_sm90": GATED_DW_TENSOR_CORE_SM90,
            "gated_tensor_core_sm80": GATED_TENSOR_CORE_SM80, "gated_tf32": GATED_TF32,
            "gated_ieee_fp32": GATED_IEEE_FP32}
