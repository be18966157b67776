"""The activations' jit functions: each forward, each derivative, and the two dispatchers.

The kernels take the activation as a constexpr name (``ACTIVATION: tl.constexpr``, as in Triton's
tutorial 03) plus one constexpr parameter ``ALPHA`` (leaky_relu's negative slope, 0 for the rest)
and call :func:`activate` on the fp32 accumulator and :func:`activation_grad` on each gradient
tile as it is loaded. Adding an activation: a forward and a derivative here, one branch in each
dispatcher, and its row in ``fastmlp/activations.py`` (the table that says what it saves and how
torch computes it).

Each formula is the one torch's CUDA kernels use (aten's GeluCUDAKernelImpl, silu, sigmoid and
tanh backward, threshold_backward, leaky_relu_backward), computed in fp32 for 16-bit and fp32
inputs and in fp64 for fp64 inputs, so values at 0, NaN and ±inf come out as torch's do.

`saved` in a derivative is what ``fastmlp/activations.py`` says the activation saves: the output Y
(relu, leaky_relu with a positive slope, sigmoid, tanh) or the pre-activation Z (gelu, gelu_tanh,
silu, leaky_relu with a slope <= 0: its output no longer tells the sign of Z).
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastmlp.kernels.tuning import interpreter_enabled

# Triton's interpreter has no libdevice (its tanh is an empty stub there): under it, and only
# there, tanh is formed from exp.
_TANH_FROM_EXP = tl.constexpr(interpreter_enabled())

_SQRT1_2 = tl.constexpr(0.7071067811865476)        # 1/sqrt(2)
_GELU_PDF = tl.constexpr(0.3989422804014327)       # 1/sqrt(2 pi) = M_2_SQRTPI * M_SQRT1_2 * 0.5
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # M_SQRT2 * M_2_SQRTPI * 0.5
_GELU_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _opmath(x):
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
def relu(z):
    # where(z < 0, 0, z), not maximum(z, 0): max.f32 on the GPU drops NaN, torch keeps it.
    return tl.where(z < 0, 0.0, z)


@triton.jit
def leaky_relu(z, ALPHA: tl.constexpr):
    return tl.where(z > 0, z, z * ALPHA)


@triton.jit
def gelu(z):
    return z * 0.5 * (1.0 + tl.erf(z * _SQRT1_2))


@triton.jit
def gelu_tanh(z):
    # GELU adds tanh to 1, so an absolute error of ~1e-7 is all that reaches its result (the
    # same as libdevice's tanh after that addition); libdevice's tanh costs ~80 registers more
    # per thread in the backward kernels, enough to spill on most tile configs.
    inner = _SQRT_2_OVER_PI * (z + _GELU_KAPPA * z * z * z)
    return 0.5 * z * (1.0 + _tanh_from_exp(inner))


@triton.jit
def silu(z):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def tanh(z):
    return _tanh(z)


# ---- derivatives: dL/dZ from g = dL/dY and the saved tensor (both upcast) ---------------------
@triton.jit
def relu_grad(g, y):
    # threshold_backward(g, y, 0): 0 where y <= 0 (z exactly 0 included); NaN y lets g pass.
    return tl.where(y <= 0, 0.0, g)


@triton.jit
def leaky_relu_grad(g, saved, ALPHA: tl.constexpr):
    return tl.where(saved > 0, g, g * ALPHA)


@triton.jit
def gelu_grad(g, z):
    cdf = 0.5 * (1.0 + tl.erf(z * _SQRT1_2))
    pdf = tl.exp(-0.5 * z * z) * _GELU_PDF
    return g * (cdf + z * pdf)


@triton.jit
def gelu_tanh_grad(g, z):
    z_sq = z * z
    inner = _SQRT_2_OVER_PI * (z + _GELU_KAPPA * z_sq * z)
    tanh_inner = _tanh_from_exp(inner)  # see gelu_tanh
    left = 0.5 * z
    right = 1.0 + tanh_inner
    left_derivative = 0.5 * right
    right_derivative = left * (1.0 - tanh_inner * tanh_inner) * (_SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_KAPPA * z_sq))
    return g * (left_derivative + right_derivative)


@triton.jit
def silu_grad(g, z):
    s = 1.0 / (1.0 + tl.exp(-z))
    return g * s * (1.0 + z * (1.0 - s))


@triton.jit
def sigmoid_grad(g, y):
    return g * (1.0 - y) * y


@triton.jit
def tanh_grad(g, y):
    return g * (1.0 - y * y)


# ---- dispatchers ------------------------------------------------------------------------------
@triton.jit
def activate(z, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr):
    """The activation named ACTIVATION applied to z (same dtype in and out; "none": z)."""
    if ACTIVATION == "relu":
        z = relu(z)
    elif ACTIVATION == "leaky_relu":
        z = leaky_relu(z, ALPHA)
    elif ACTIVATION == "gelu":
        z = gelu(z)
    elif ACTIVATION == "gelu_tanh":
        z = gelu_tanh(z)
    elif ACTIVATION == "silu":
        z = silu(z)
    elif ACTIVATION == "sigmoid":
        z = sigmoid(z)
    elif ACTIVATION == "tanh":
        z = tanh(z)
    else:
        tl.static_assert(ACTIVATION == "none", "unknown activation")
    return z


@triton.jit
def activation_grad(g, saved, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr):
    """dL/dZ for a loaded tile g = dL/dY, in g's dtype (what the next tl.dot takes).

    ReLU is a pure select and stays in g's dtype; the others compute in fp32 (fp64 for fp64)
    and round once, as torch's backward ops do before the matmul reads their result.
    """
    if ACTIVATION == "relu":
        out = relu_grad(g, saved)
    elif ACTIVATION == "none":
        out = g
    else:
        gf = _opmath(g)
        sf = _opmath(saved)
        if ACTIVATION == "leaky_relu":
            d = leaky_relu_grad(gf, sf, ALPHA)
        elif ACTIVATION == "gelu":
            d = gelu_grad(gf, sf)
        elif ACTIVATION == "gelu_tanh":
            d = gelu_tanh_grad(gf, sf)
        elif ACTIVATION == "silu":
            d = silu_grad(gf, sf)
        elif ACTIVATION == "sigmoid":
            d = sigmoid_grad(gf, sf)
        else:
            tl.static_assert(ACTIVATION == "tanh", "unknown activation")
            d = tanh_grad(gf, sf)
        out = d.to(g.dtype)
    return out
