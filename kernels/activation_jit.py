"""The activations' jit functions: each forward and derivative, and the two helpers that apply them.

Every row of kernels/activations.py that applies something has two jit functions here, found by
name (``functions(name)``):

* ``<name>(z, ALPHA)``: the forward on z, the fp32 accumulator with the bias added (fp64 under
  the float64 tests); same dtype out;
* ``<name>_grad(g, saved, ALPHA)``: dL/dZ from g = dL/dY and the tensor the row ``saves`` (Y or
  Z), both as loaded (the input dtype, or already fp32 in the fused MLP), returned in g's dtype
  (rounded to nearest by launch.round_to):
  what the next tl.dot takes.

``ALPHA`` is the activation's one constexpr parameter (leaky_relu's negative slope; the others
ignore it). The kernels take the functions themselves as constexprs (``ACTIVATION``,
``ACTIVATION_GRAD``, ...; None for "none") and call :func:`activate` / :func:`activation_grad`
on each tile: nothing in a kernel is specific to one activation, a function's source is part of
the compiled kernel's cache key, and each (activation, dtype, config) compiles to its own kernel.

Each formula is the one torch's CUDA kernels use (aten's GeluCUDAKernelImpl, silu, sigmoid and
tanh backward, threshold_backward, leaky_relu_backward), computed in fp32 for 16-bit and fp32
inputs and in fp64 for fp64 inputs (``opmath``), so values at 0, NaN and ±inf come out as
torch's do. ReLU's derivative is a pure select and stays in g's dtype.

No libdevice calls without a fallback: Triton's interpreter has none (see ``_tanh``).
"""

import importlib
from typing import Dict, Optional, Tuple

import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastmlp.kernels import activations
from fastmlp.kernels.launch import round_to
from fastmlp.kernels.tuning import interpreter_enabled

# Triton's interpreter has no libdevice (its tanh is an empty stub there): under it, and only
# there, tanh is formed from exp.
_TANH_FROM_EXP = tl.constexpr(interpreter_enabled())

_SQRT1_2 = tl.constexpr(0.7071067811865476)        # 1/sqrt(2)
_GELU_PDF = tl.constexpr(0.3989422804014327)       # 1/sqrt(2 pi) = M_2_SQRTPI * M_SQRT1_2 * 0.5
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # M_SQRT2 * M_2_SQRTPI * 0.5
_GELU_KAPPA = tl.constexpr(0.044715)


@triton.jit
def opmath(x):
    """x in the precision torch computes pointwise ops in: fp64 stays fp64, the rest go to fp32."""
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def _tanh_from_exp(x):
    """tanh(x) from one exp, exact at 0 and ±inf, NaN kept; within a few ulps of 1 in absolute
    terms (not relative: tanh of a tiny x comes out with an absolute error of ~1e-7)."""
    t = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _tanh(x):
    if _TANH_FROM_EXP:
        return _tanh_from_exp(x)
    else:
        return libdevice.tanh(x)


# ---- forwards (z: the fp32/fp64 accumulator with the bias added) ------------------------------
@triton.jit
def relu(z, ALPHA: tl.constexpr):
    # where(z < 0, 0, z), not maximum(z, 0): max.f32 on the GPU drops NaN, torch keeps it.
    return tl.where(z < 0, 0.0, z)


@triton.jit
def leaky_relu(z, ALPHA: tl.constexpr):
    return tl.where(z > 0, z, z * ALPHA)


@triton.jit
def gelu(z, ALPHA: tl.constexpr):
    return z * 0.5 * (1.0 + tl.erf(z * _SQRT1_2))


@triton.jit
def gelu_tanh(z, ALPHA: tl.constexpr):
    # GELU adds tanh to 1, so an absolute error of ~1e-7 is all that reaches its result (the
    # same as libdevice's tanh after that addition); libdevice's tanh takes many more registers
    # in the backward kernels, enough to spill on most tile configs (bench/NOTES.md).
    inner = _SQRT_2_OVER_PI * (z + _GELU_KAPPA * z * z * z)
    return 0.5 * z * (1.0 + _tanh_from_exp(inner))


@triton.jit
def silu(z, ALPHA: tl.constexpr):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def sigmoid(z, ALPHA: tl.constexpr):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def tanh(z, ALPHA: tl.constexpr):
    return _tanh(z)


# ---- derivatives: dL/dZ from g = dL/dY and the saved tensor, in g's dtype ---------------------
@triton.jit
def relu_grad(g, y, ALPHA: tl.constexpr):
    # threshold_backward(g, y, 0): 0 where y <= 0 (z exactly 0 included); NaN y lets g pass.
    # A pure select: it stays in g's dtype.
    return tl.where(y <= 0, 0.0, g)


@triton.jit
def leaky_relu_grad(g, saved, ALPHA: tl.constexpr):
    gf = opmath(g)
    sf = opmath(saved)
    return round_to(tl.where(sf > 0, gf, gf * ALPHA), g.dtype)


@triton.jit
def gelu_grad(g, z, ALPHA: tl.constexpr):
    gf = opmath(g)
    zf = opmath(z)
    cdf = 0.5 * (1.0 + tl.erf(zf * _SQRT1_2))
    pdf = tl.exp(-0.5 * zf * zf) * _GELU_PDF
    return round_to(gf * (cdf + zf * pdf), g.dtype)


@triton.jit
def gelu_tanh_grad(g, z, ALPHA: tl.constexpr):
    gf = opmath(g)
    zf = opmath(z)
    z_sq = zf * zf
    inner = _SQRT_2_OVER_PI * (zf + _GELU_KAPPA * z_sq * zf)
    tanh_inner = _tanh_from_exp(inner)  # see gelu_tanh
    left = 0.5 * zf
    right = 1.0 + tanh_inner
    left_derivative = 0.5 * right
    right_derivative = left * (1.0 - tanh_inner * tanh_inner) * (_SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_KAPPA * z_sq))
    return round_to(gf * (left_derivative + right_derivative), g.dtype)


@triton.jit
def silu_grad(g, z, ALPHA: tl.constexpr):
    gf = opmath(g)
    zf = opmath(z)
    s = 1.0 / (1.0 + tl.exp(-zf))
    return round_to(gf * s * (1.0 + zf * (1.0 - s)), g.dtype)


@triton.jit
def sigmoid_grad(g, y, ALPHA: tl.constexpr):
    gf = opmath(g)
    yf = opmath(y)
    return round_to(gf * (1.0 - yf) * yf, g.dtype)


@triton.jit
def tanh_grad(g, y, ALPHA: tl.constexpr):
    gf = opmath(g)
    yf = opmath(y)
    return round_to(gf * (1.0 - yf * yf), g.dtype)


# ---- what the kernels call --------------------------------------------------------------------
@triton.jit
def activate(z, FORWARD: tl.constexpr, ALPHA: tl.constexpr):
    """FORWARD (an activation's jit forward, or None: no activation) applied to z."""
    if FORWARD is not None:
        z = FORWARD(z, ALPHA)
    return z


@triton.jit
def activation_grad(g, saved, GRAD: tl.constexpr, ALPHA: tl.constexpr):
    """dL/dZ for a loaded tile g = dL/dY, in g's dtype, by GRAD (an activation's jit derivative,
    or None: no activation, g itself)."""
    if GRAD is not None:
        g = GRAD(g, saved, ALPHA)
    return g


_FOUND: Dict[str, tuple] = {}   # name -> (row, (forward, derivative)), checked against the table


def functions(name: str) -> Tuple[Optional[triton.JITFunction], Optional[triton.JITFunction]]:
    """(jit forward, jit derivative) of the activation `name`, (None, None) for one that applies
    nothing; a ValueError for a name the table does not have, or a row whose module lacks them."""
    row = activations.get(name)
    found = _FOUND.get(name)
    if found is not None and found[0] is row:
        return found[1]
    pair = (None, None)
    if row.jit_module is not None:
        module = importlib.import_module(row.jit_module)
        try:
            pair = (getattr(module, row.name), getattr(module, row.name + "_grad"))
        except AttributeError:
            raise ValueError(f"fastmlp: activation {name!r}: {row.jit_module} has no jit "
                             f"functions {row.name}(z, ALPHA) and {row.name}_grad(g, saved, ALPHA)"
                             ) from None
    _FOUND[name] = (row, pair)
    return pair


def forward_of(name: str):
    """The jit forward of `name` (None for "none"): the value of a kernel's ACTIVATION."""
    return functions(name)[0]


def grad_of(name: str):
    """The jit derivative of `name` (None for "none"): the value of a kernel's ACTIVATION_GRAD."""
    return functions(name)[1]
