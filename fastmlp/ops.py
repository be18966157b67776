"""The fused Linear(+bias)+activation operator: checks, torch reference, torch.library ops, autograd.

Layers of this file, bottom up:

1. ``check_linear_inputs``: every bad input becomes a ValueError/TypeError that names shapes,
   dtypes, devices or the activation, before any kernel sees it.
2. The torch implementation (``torch_forward``, ``torch_grad_input``, ``torch_grad_weight``):
   the same math with torch's own ops (fastmlp/activations.py's forward and backward per
   activation). It is fastmlp's torch backend (CPU, float64 on GPUs, meta tensors) and the
   candidate the kernels' autotuner times against its Triton configs (passed to the launchers as
   ``torch_impl``), so there is one torch reference, here.
3. Three ``torch.library`` custom ops (``fastmlp::linear_act``, ``fastmlp::linear_act_grad_input``,
   ``fastmlp::linear_act_grad_weight``) with fake kernels, so ``torch.compile(fullgraph=True)``
   treats them as opaque nodes with known output shapes. Each dispatches per call to the Triton
   kernels or to the torch implementation (fastmlp.backend decides).
4. One autograd formula (``_save_for_backward`` / ``_backward``), used both by the registered op
   (``register_autograd``) and by ``FusedLinearFunction``, the public autograd.Function. It saves
   X, W and the one tensor the activation's derivative needs (fastmlp/activations.py): Y for
   relu, leaky_relu with a positive slope, sigmoid and tanh; the pre-activation Z for gelu,
   gelu_tanh, silu (the forward writes it only when autograd will need it); nothing more for
   "none". Backward computes only the gradients autograd asks for.
5. ``fused_linear``: the front used by fastmlp.functional and the modules; applies autocast the
   way nn.Linear does (every float16/bfloat16/float32 input cast to the autocast dtype).
"""

import functools
import math
from typing import Optional, Tuple

import torch

from fastmlp import activations, backend

ACTIVATIONS = activations.ACTIVATIONS
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def check_linear_inputs(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        activation: str = "relu", alpha: float = 0.0) -> None:
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
    activations.check(activation, alpha)
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


def saved_for_backward(activation: str, alpha: float, y, z):
    """The tensor an activation's derivative reads (fastmlp/activations.py): Y, Z or None."""
    saves = activations.get(activation).saves(alpha)
    return y if saves == "output" else (z if saves == "preact" else None)


# --------------------------------------------------------------------------------------------
# The torch implementation (torch backend; the autotuner's torch candidate)
# --------------------------------------------------------------------------------------------
# cuBLASLt's GEMM epilogues, through torch._addmm_activation: relu, and GELU's tanh form. They
# compute the activation on the fp32 accumulator (one rounding, as the kernels do).
_EPILOGUES = {"relu": False, "gelu_tanh": True}   # activation -> use_gelu


_EPILOGUE_KEEPS_NAN = {}   # (device, dtype) -> bool, see _epilogue_keeps_nan


def _epilogue_keeps_nan(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._addmm_activation's ReLU keeps NaN on this device, as torch.relu does.

    A GEMM epilogue may compute ReLU as max(z, 0), which drops NaN; torch.relu keeps it. Probed
    once per device and dtype on a small product with a NaN row, and remembered; where it drops
    NaN the plain addmm + relu path is used instead, so the torch candidate never changes a
    result.
    """
    key = (device, dtype)
    if key not in _EPILOGUE_KEEPS_NAN:
        x = torch.ones(8, 8, device=device, dtype=dtype)
        x[3, 5] = float("nan")
        w = torch.ones(8, 8, device=device, dtype=dtype)
        b = -torch.full((8,), 100.0, device=device, dtype=dtype)  # every finite output clamps
        y = torch._addmm_activation(b, x, w.t())
        _EPILOGUE_KEEPS_NAN[key] = bool(torch.isnan(y[3]).all()) and not bool(torch.isnan(y[:3]).any())
    return _EPILOGUE_KEEPS_NAN[key]


def _use_epilogue(x: torch.Tensor, bias, activation: str) -> bool:
    if activation not in _EPILOGUES or bias is None or x.device.type != "cuda" or \
            x.dtype == torch.float64:
        return False
    if activation == "relu":
        known = _EPILOGUE_KEEPS_NAN.get((x.device, x.dtype))
        if known is None and torch.cuda.is_current_stream_capturing():
            return False   # the probe cannot run inside a capture; addmm + relu can
        return _epilogue_keeps_nan(x.device, x.dtype)
    return True


def torch_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  activation: str, alpha: float, save_preact: bool):
    """(Y, Z or None) for 2-D x with torch's ops; Z only when save_preact."""
    if not save_preact and _use_epilogue(x, bias, activation):
        return torch._addmm_activation(bias, x, weight.t(),
                                       use_gelu=_EPILOGUES[activation]), None
    z = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    if activation == "none":
        return z, (z if save_preact else None)
    if activation == "relu" and not save_preact:
        return torch.relu_(z), None
    return activations.get(activation).torch_forward(z, alpha), (z if save_preact else None)


def _activation_grad(grad, saved, activation, alpha):
    return activations.get(activation).torch_backward(grad, saved, alpha)


def torch_grad_input(grad, saved, weight, activation, alpha):
    """dX = act'(G) W with torch's own backward op for the activation."""
    return torch.mm(_activation_grad(grad, saved, activation, alpha), weight)


def torch_grad_weight(grad, saved, x, activation, alpha, compute_weight, compute_bias):
    """(dW or None, db or None) from one masked gradient."""
    g = _activation_grad(grad, saved, activation, alpha)
    return (torch.mm(g.t(), x) if compute_weight else None), (g.sum(0) if compute_bias else None)


# --------------------------------------------------------------------------------------------
# The three operations (plain functions), then their torch.library registration
# --------------------------------------------------------------------------------------------
def _linear_act_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     activation: str, alpha: float, save_preact: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Y, Z) for 2-D X [M, K], W [N, K], b [N] or None; Z is an empty (0,) tensor unless
    save_preact (custom ops return tensors, not None)."""
    if backend.uses_triton(x.device, x.dtype):
        reference = functools.partial(torch_forward, x, weight, bias, activation, alpha, save_preact)
        y, z = _kernels().linear_act_forward(x, weight, bias, activation, alpha, save_preact,
                                             _allow_tf32(), torch_impl=reference)
    else:
        y, z = torch_forward(x, weight, bias, activation, alpha, save_preact)
    return y, (z if z is not None else x.new_empty((0,)))


def _grad_input_impl(grad: torch.Tensor, saved: torch.Tensor, weight: torch.Tensor,
                     activation: str, alpha: float) -> torch.Tensor:
    """dX = act'(G) W; `saved` is Y or Z as the activation needs (G itself for "none")."""
    if backend.uses_triton(grad.device, grad.dtype):
        reference = functools.partial(torch_grad_input, grad, saved, weight, activation, alpha)
        return _kernels().linear_act_grad_input(grad, saved, weight, activation, alpha,
                                                _allow_tf32(), torch_impl=reference)
    return torch_grad_input(grad, saved, weight, activation, alpha)


def _grad_weight_impl(grad: torch.Tensor, saved: torch.Tensor, x: torch.Tensor, activation: str,
                      alpha: float, compute_weight: bool, compute_bias: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """dW = act'(G)ᵀ X and db = column sums of the same act'(G), in one pass.

    A gradient that is not asked for comes back as an empty tensor of shape (0,).
    """
    if backend.uses_triton(grad.device, grad.dtype):
        reference = functools.partial(torch_grad_weight, grad, saved, x, activation, alpha,
                                      compute_weight, compute_bias)
        dw, db = _kernels().linear_act_grad_weight(grad, saved, x, activation, alpha,
                                                   compute_weight, compute_bias, _allow_tf32(),
                                                   torch_impl=reference)
    else:
        dw, db = torch_grad_weight(grad, saved, x, activation, alpha, compute_weight, compute_bias)
    return (dw if dw is not None else grad.new_empty((0,)),
            db if db is not None else grad.new_empty((0,)))


linear_act = torch.library.custom_op("fastmlp::linear_act", _linear_act_impl, mutates_args=())
linear_act_grad_input = torch.library.custom_op("fastmlp::linear_act_grad_input", _grad_input_impl,
                                                mutates_args=())
linear_act_grad_weight = torch.library.custom_op("fastmlp::linear_act_grad_weight", _grad_weight_impl,
                                                 mutates_args=())


@linear_act.register_fake
def _(x, weight, bias, activation, alpha, save_preact):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, (x.new_empty((x.shape[0], weight.shape[0])) if save_preact else x.new_empty((0,)))


@linear_act_grad_input.register_fake
def _(grad, saved, weight, activation, alpha):
    return grad.new_empty((grad.shape[0], weight.shape[1]))


@linear_act_grad_weight.register_fake
def _(grad, saved, x, activation, alpha, compute_weight, compute_bias):
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


# --------------------------------------------------------------------------------------------
# The autograd formula (one copy: the registered op and FusedLinearFunction both use it)
# --------------------------------------------------------------------------------------------
def linear_act_backward(grad, x, weight, saved, activation, alpha, needs_x, needs_w, needs_b):
    """The three gradients of Y = act(X Wᵀ + b) for 2-D tensors, each only if needed (else None).

    `saved` is what :func:`saved_for_backward` kept (None for "none": G stands in, unread).
    """
    saved = grad if saved is None else saved
    dx = dw = db = None
    if needs_x:
        dx = _call(linear_act_grad_input, _grad_input_impl, grad, saved, weight, activation, alpha)
    if needs_w or needs_b:
        dw, db = _call(linear_act_grad_weight, _grad_weight_impl, grad, saved, x, activation, alpha,
                       needs_w, needs_b)
        dw = dw if needs_w else None
        db = db if needs_b else None
    return dx, dw, db


def _save_for_backward(ctx, x2, weight, bias, activation, alpha, y2, z2):
    ctx.activation = activation
    ctx.alpha = alpha
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x2, weight, saved_for_backward(activation, alpha, y2, z2))


def _backward(ctx, grad2):
    """(dX, dW, db) for the 2-D gradient of Y, from what _save_for_backward kept."""
    x2, weight, saved = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    return linear_act_backward(grad2, x2, weight, saved, ctx.activation, ctx.alpha,
                               needs_x, needs_w, needs_b and ctx.has_bias)


def _op_setup_context(ctx, inputs, output):
    x, weight, bias, activation, alpha, _ = inputs
    y, z = output
    ctx.mark_non_differentiable(z)
    _save_for_backward(ctx, x, weight, bias, activation, alpha, y, z if z.dim() == 2 else None)


def _op_backward(ctx, grad_y, grad_z):
    return (*_backward(ctx, grad_y), None, None, None)


linear_act.register_autograd(_op_backward, setup_context=_op_setup_context)


def _needs_preact(x, weight, bias) -> bool:
    """Whether autograd will run this layer's backward (so a "preact" activation must save Z)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


# --------------------------------------------------------------------------------------------
# The public autograd.Function and the front used by functional / nn
# --------------------------------------------------------------------------------------------
class FusedLinearFunction(torch.autograd.Function):
    """Y = act(X Wᵀ + b) with fused Triton forward and backward kernels.

    ``FusedLinearFunction.apply(x, weight, bias, activation[, alpha[, save_preact]])``: x of any
    shape [..., K], weight [N, K] (nn.Linear layout), bias [N] or None, activation a name from
    fastmlp.ACTIVATIONS, alpha leaky_relu's negative slope (ignored by the others). For gelu,
    gelu_tanh and silu the forward also writes the pre-activation for backward; save_preact None
    (the default) decides from which inputs require grad, which cannot see ``torch.no_grad()``:
    call fastmlp.functional.linear_act instead to get that, and autocast, handled as nn.Linear
    does. Backward computes only the gradients autograd asks for.
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None, activation="relu", alpha=0.0, save_preact=None):
        check_linear_inputs(x, weight, bias, activation, alpha)
        if save_preact is None:
            save_preact = any(ctx.needs_input_grad[:3])
        save_preact = bool(save_preact) and activations.get(activation).saves(alpha) == "preact"
        x2 = _rows(x)
        y2, z2 = _call(linear_act, _linear_act_impl, x2, weight, bias, activation, float(alpha),
                       save_preact)
        ctx.x_shape = x.shape
        _save_for_backward(ctx, x2, weight, bias, activation, float(alpha), y2,
                           z2 if save_preact else None)
        return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels have no second derivative
    def backward(ctx, grad):
        dx, dw, db = _backward(ctx, _rows(grad))
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None, None


def autocast_caster(device_type: str):
    """The cast nn.Linear applies under autocast on `device_type` (fp16/bf16/fp32 tensors to the
    autocast dtype; float64, non-float tensors and None unchanged), or None when autocast is off.
    Shared with FusedMLP."""
    # (meta tensors, used for shape inference, have no autocast state to ask about)
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if t is None or t.dtype == dtype or t.dtype == torch.float64 or not t.is_floating_point():
            return t
        return t.to(dtype)

    return cast


def _autocast_inputs(x, weight, bias):
    """Cast like nn.Linear under autocast: fp16/bf16/fp32 tensors go to the autocast dtype."""
    cast = autocast_caster(x.device.type)
    return (x, weight, bias) if cast is None else (cast(x), cast(weight), cast(bias))


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 activation: str = "relu", alpha: float = 0.0) -> torch.Tensor:
    """act(x @ weight.T + bias) with nn.Linear's autocast rules; activation a name, alpha
    leaky_relu's negative slope.

    On the Triton backend (and whenever torch.compile traces) this is FusedLinearFunction. On the
    torch backend in eager mode it is torch's own linear followed by the activation's torch op
    (in place for relu): the same math and the same saved tensors, with autograd's C++ nodes
    instead of a Python Function, which on small CPU layers costs less than the arithmetic.
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        x, weight, bias = _autocast_inputs(x, weight, bias)
        if not torch.compiler.is_compiling() and not backend.uses_triton(x.device, x.dtype):
            check_linear_inputs(x, weight, bias, activation, alpha)
            y = torch.nn.functional.linear(x, weight, bias)
            if activation == "relu":
                return torch.relu_(y)
            return activations.get(activation).torch_forward(y, alpha)
        save_preact = _needs_preact(x, weight, bias)
        return FusedLinearFunction.apply(x, weight, bias, activation, alpha, save_preact)
    return FusedLinearFunction.apply(x, weight, bias, activation, alpha)
