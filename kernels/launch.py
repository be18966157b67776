"""What every kernel family shares: jit helpers used inside the kernels, and host-side launch helpers.

Jit helpers (``mma``, ``round_to``, ``in_bounds``, ``tiles``): the GEMM step and the rounding
to a narrower dtype, each with its interpreter-only bf16 workaround, and the int32 edge masks, written once for the per-layer kernels (linear_act.py) and
the fused MLP's (mlp_kernels.py).

Launch helpers: the tl.dot precision that follows torch's fp32 setting (``precision``), the
dtype of tile-local offsets (``offset_dtype``), the GPU's multiprocessor count, and the device
guard. Triton launches on the *current* CUDA device and its current stream, whatever device the
tensor arguments live on; torch's own ops switch to the tensors' device themselves. A launcher
called with tensors on cuda:1 while cuda:0 is current would run the kernel on the wrong GPU (an
illegal address at best), so every launcher runs under the tensors' device
(``on_first_tensors_device``).
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl

from fastmlp.kernels import tuning


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b. UPCAST is set only under the interpreter, whose bf16 dot is wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


# Triton's interpreter converts fp32 -> bf16 by truncation (and its "rtne" mode does not carry a
# rounded-up mantissa into the exponent); a GPU rounds to nearest even. Truncation leaves the
# interpreter's bf16 results up to an ulp behind a GPU's at every rounding (bench/NOTES.md), so
# under the interpreter, and only there, bf16 rounding is done on the bits. A GPU's code is the
# plain cast.
_BF16_BY_BITS = tl.constexpr(tuning.interpreter_enabled())


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x rounded to DTYPE, to nearest even: every store or cast to a narrower float dtype in the
    kernels goes through here (what a GPU's cast does; the interpreter needs help for bf16)."""
    if _BF16_BY_BITS and DTYPE == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def in_bounds(lanes, start, size, BLOCK: tl.constexpr):
    """Which of a tile's lanes (0..BLOCK-1, from `start`) fall inside `size`: compared in int32
    although `start` is int64 (the count left is clamped to BLOCK first)."""
    return lanes < tl.minimum(size - start, BLOCK).to(tl.int32)


@triton.jit
def tiles(size, BLOCK: tl.constexpr):
    """cdiv(size, BLOCK) for size >= 1 (the launchers skip empty problems) without forming
    size + BLOCK - 1, which wraps when size is an int32 within BLOCK of 2**31."""
    return (size - 1) // BLOCK + 1


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (triton.cdiv is a constexpr function: slow to call here)."""
    return -(-a // b)


def precision(dtype: torch.dtype, allow_tf32: bool):
    """(accumulator dtype, tl.dot input_precision, upcast flag) for one input dtype.

    fp32 follows torch: exact ("ieee") products unless torch allows TF32. The interpreter's bf16
    dot multiplies raw bit patterns, so there (and only there) bf16 tiles are upcast to fp32.
    """
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    dot_precision = "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"
    upcast = dtype == torch.bfloat16 and tuning.interpreter_enabled()
    return acc, dot_precision, upcast


def acc_torch_dtype(acc) -> torch.dtype:
    """The torch dtype of a Triton accumulator dtype (partial sums are stored unrounded)."""
    return torch.float64 if acc == tl.float64 else torch.float32


def lane_offset_dtype(strides) -> tl.constexpr:
    """int32 tile-local offsets unless some stride (or row length) that tile lanes are multiplied
    by is so large that (block - 1) * stride might not fit: offsets inside a tile are at most
    (255 + 255) * max|stride| for any shipped block size. Strides that only a program id or a
    row start multiplies are int64 products in the kernels anyway and must be left out."""
    largest = max((abs(s) for s in strides), default=1)
    return tl.int32 if largest * 512 < 2**31 else tl.int64


def offset_dtype(*tensors: torch.Tensor, extra_strides=()) -> tl.constexpr:
    """lane_offset_dtype of every stride of `tensors`, and of `extra_strides`."""
    return lane_offset_dtype([s for t in tensors for s in t.stride()] + list(extra_strides))


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count (4 off CUDA: the interpreter's stand-in), for sizing the
    weight-gradient kernels' row splits."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def capability(device: torch.device):
    """(major, minor) compute capability of a CUDA device, (0, 0) for any other device; cached
    (the launchers key their tile tables and autotuner entries on it)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


@functools.lru_cache(maxsize=None)
def shared_memory(device: torch.device):
    """The shared memory a block may opt in to on `device` (None: not CUDA, or torch does not
    say)."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


def device_guard(device: torch.device):
    """A context that makes `device` current for the launch (a no-op when it already is)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_first_tensors_device(launcher):
    """Decorator: run `launcher(tensor, ...)` with its first argument's device current."""

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        with device_guard(first.device):
            return launcher(first, *args, **kwargs)

    return wrapper
