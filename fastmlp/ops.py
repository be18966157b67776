"""The fused Linear(+bias)(+ReLU) operator: checks, torch.library registration, autograd.

Layers of this file, bottom up:

1. ``check_linear_inputs``: every bad input becomes a ValueError/TypeError that names shapes,
   dtypes and devices, before any kernel sees it.
2. Three ``torch.library`` custom ops (``fastmlp::linear_act``, ``fastmlp::linear_act_grad_input``,
   ``fastmlp::linear_act_grad_weight``) with fake kernels, so ``torch.compile(fullgraph=True)``
   treats them as opaque nodes with known output shapes. Each dispatches per call to the Triton
   kernels or to an equivalent torch implementation (fastmlp.backend decides).
3. ``FusedLinearFunction``: the public autograd.Function tying the forward op to the backward ops.
   It saves X, W and Y only (Y > 0 is the ReLU mask) and computes only the gradients asked for.
4. ``fused_linear``: the front used by fastmlp.functional and the modules; applies autocast the
   way nn.Linear does (every float16/bfloat16/float32 input cast to the autocast dtype).
"""

import math
from typing import Optional, Tuple

import torch

from fastmlp import backend

ACTIVATIONS = ("relu", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def check_linear_inputs(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        activation: str = "relu") -> None:
    """Raise a clear error for anything the kernels cannot take (never a crash inside one)."""
    for name, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastmlp linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"fastmlp linear: {name} has dtype {t.dtype}; expected one of float16, bfloat16, "
                f"float32, float64")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastmlp linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weight.dim() != 2:
        raise ValueError(
            f"fastmlp linear: weight must be 2-D [out_features, in_features], got shape "
            f"{tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("fastmlp linear: input must have at least 1 dimension, got a 0-d tensor")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"fastmlp linear: input's last dimension is {x.shape[-1]} (input shape {tuple(x.shape)}) "
            f"but weight {tuple(weight.shape)} expects in_features={in_features}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(
            f"fastmlp linear: bias must have shape ({out_features},) to match weight "
            f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        got = f"input {x.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(
            f"fastmlp linear: dtypes differ ({got}); cast them to one dtype or run under "
            f"torch.autocast")
    if x.device != weight.device or (bias is not None and bias.device != weight.device):
        got = f"input on {x.device}, weight on {weight.device}" + (
            f", bias on {bias.device}" if bias is not None else "")
        raise ValueError(f"fastmlp linear: tensors are on different devices ({got})")


def _allow_tf32() -> bool:
    """Whether torch lets fp32 matmuls on CUDA use TF32 (by default it does not).

    Read from ``torch.backends.cuda.matmul.fp32_precision`` where torch has it: that reflects
    the legacy switches (``set_float32_matmul_precision``, ``allow_tf32``) and the newer
    ``fp32_precision`` ones alike ("tf32": allowed; "ieee", "none": exact fp32), whereas
    ``get_float32_matmul_precision()`` raises once the newer API has turned TF32 on.
    """
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as a matrix [prod(...), C]; reshape(-1, C) cannot do it when t is empty."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _kernels():
    """Import the Triton launchers only when a Triton path runs (importing triton costs ~1 s)."""
    from fastmlp.kernels import linear_act
    return linear_act


# --------------------------------------------------------------------------------------------
# Torch reference implementation (CPU default; same math and saved tensors as the kernels)
# --------------------------------------------------------------------------------------------
def _torch_forward(x, weight, bias, activation):
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return torch.relu_(y) if activation == "relu" else y


def _masked_grad(grad, y, activation):
    """torch's own relu backward: 0 where Y <= 0 (pre-activation exactly 0 included); the
    gradient passes where Y is NaN, since NaN <= 0 is false."""
    return torch.ops.aten.threshold_backward(grad, y, 0) if activation == "relu" else grad


# --------------------------------------------------------------------------------------------
# The three operations (plain functions), then their torch.library registration
# --------------------------------------------------------------------------------------------
def _linear_act_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     activation: str) -> torch.Tensor:
    """Y = act(X Wᵀ + b) for 2-D X [M, K], W [N, K], b [N] or None."""
    if backend.uses_triton(x.device, x.dtype):
        return _kernels().linear_act_forward(x, weight, bias, activation, _allow_tf32())
    return _torch_forward(x, weight, bias, activation)


def _grad_input_impl(grad: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                     activation: str) -> torch.Tensor:
    """dX = (G ⊙ [Y > 0]) W (mask only for relu)."""
    if backend.uses_triton(grad.device, grad.dtype):
        return _kernels().linear_act_grad_input(grad, y, weight, activation, _allow_tf32())
    return _masked_grad(grad, y, activation) @ weight


def _grad_weight_impl(grad: torch.Tensor, y: torch.Tensor, x: torch.Tensor, activation: str,
                      compute_weight: bool, compute_bias: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """dW = (G ⊙ [Y > 0])ᵀ X and db = column sums of the same masked G, in one pass.

    A gradient that is not asked for comes back as an empty tensor of shape (0,).
    """
    if backend.uses_triton(grad.device, grad.dtype):
        dw, db = _kernels().linear_act_grad_weight(grad, y, x, activation, compute_weight,
                                                   compute_bias, _allow_tf32())
    else:
        g = _masked_grad(grad, y, activation)
        dw = g.t() @ x if compute_weight else None
        db = g.sum(0) if compute_bias else None
    return (dw if dw is not None else grad.new_empty((0,)),
            db if db is not None else grad.new_empty((0,)))


linear_act = torch.library.custom_op("fastmlp::linear_act", _linear_act_impl, mutates_args=())
linear_act_grad_input = torch.library.custom_op("fastmlp::linear_act_grad_input", _grad_input_impl,
                                                mutates_args=())
linear_act_grad_weight = torch.library.custom_op("fastmlp::linear_act_grad_weight", _grad_weight_impl,
                                                 mutates_args=())


@linear_act.register_fake
def _(x, weight, bias, activation):
    return x.new_empty((x.shape[0], weight.shape[0]))


@linear_act_grad_input.register_fake
def _(grad, y, weight, activation):
    return grad.new_empty((grad.shape[0], weight.shape[1]))


@linear_act_grad_weight.register_fake
def _(grad, y, x, activation, compute_weight, compute_bias):
    n, k = grad.shape[1], x.shape[1]
    return (grad.new_empty((n, k) if compute_weight else (0,)),
            grad.new_empty((n,) if compute_bias else (0,)))


def _call(op, impl, *args):
    """The plain function for plain tensors in eager mode, the registered op otherwise.

    The op costs ~30 µs of Python dispatch per call, more than the kernel on the seed's
    launch-bound shapes. Whenever something traces (torch.compile, or make_fx / AOT autograd,
    whose tensors are FakeTensor or FunctionalTensor subclasses) the op must be used: it is an
    opaque node with a fake kernel, and a Triton launch cannot run on fake tensors.
    """
    if torch.compiler.is_compiling() or type(args[0]) is not torch.Tensor:
        return op(*args)
    return impl(*args)


def linear_act_backward(grad, x, weight, y, activation, needs_x, needs_w, needs_b):
    """The three gradients of Y = act(X Wᵀ + b), each computed only if needed (else None)."""
    dx = dw = db = None
    if needs_x:
        dx = _call(linear_act_grad_input, _grad_input_impl, grad, y, weight, activation)
    if needs_w or needs_b:
        dw, db = _call(linear_act_grad_weight, _grad_weight_impl, grad, y, x, activation, needs_w, needs_b)
        dw = dw if needs_w else None
        db = db if needs_b else None
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    # Y is saved only when the ReLU mask needs it; a plain linear keeps X and W alone.
    ctx.save_for_backward(x, weight, output if activation == "relu" else None)


def _op_backward(ctx, grad):
    x, weight, y = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    dx, dw, db = linear_act_backward(grad, x, weight, y if y is not None else grad, ctx.activation,
                                     needs_x, needs_w, needs_b and ctx.has_bias)
    return dx, dw, db, None


linear_act.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# The public autograd.Function and the front used by functional / nn
# --------------------------------------------------------------------------------------------
class FusedLinearFunction(torch.autograd.Function):
    """Y = act(X Wᵀ + b) with fused Triton forward and backward kernels.

    ``FusedLinearFunction.apply(x, weight, bias, activation)``: x of any shape [..., K], weight
    [N, K] (nn.Linear layout), bias [N] or None, activation "relu" or "none". Saves X, W and Y
    (Y only for relu); backward computes only the gradients autograd asks for. Call
    fastmlp.functional.linear_relu instead to get autocast handled as nn.Linear does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None, activation="relu"):
        check_linear_inputs(x, weight, bias, activation)
        x2 = _rows(x)
        y2 = _call(linear_act, _linear_act_impl, x2, weight, bias, activation)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, weight, y2 if activation == "relu" else None)
        return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels have no second derivative
    def backward(ctx, grad):
        x2, weight, y2 = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        g2 = _rows(grad)
        dx, dw, db = linear_act_backward(g2, x2, weight, y2 if y2 is not None else g2,
                                         ctx.activation, needs_x, needs_w, needs_b and ctx.has_bias)
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None


def _autocast_inputs(x, weight, bias):
    """Cast like nn.Linear under autocast: fp16/bf16/fp32 tensors go to the autocast dtype."""
    device_type = x.device.type
    # (meta tensors, used for shape inference, have no autocast state to ask about)
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if t is None or t.dtype == dtype or t.dtype == torch.float64 or not t.is_floating_point():
            return t
        return t.to(dtype)

    return cast(x), cast(weight), cast(bias)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 activation: str = "relu") -> torch.Tensor:
    """act(x @ weight.T + bias) with nn.Linear's autocast rules.

    On the Triton backend (and whenever torch.compile traces) this is FusedLinearFunction. On the
    torch backend in eager mode it is torch's own linear + in-place relu: the same math and the
    same saved tensors (X, W, Y), with autograd's C++ nodes instead of a Python Function, which
    on small CPU layers costs less than the arithmetic.
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        x, weight, bias = _autocast_inputs(x, weight, bias)
        if not torch.compiler.is_compiling() and not backend.uses_triton(x.device, x.dtype):
            check_linear_inputs(x, weight, bias, activation)
            y = torch.nn.functional.linear(x, weight, bias)
            return torch.relu_(y) if activation == "relu" else y
    return FusedLinearFunction.apply(x, weight, bias, activation)
