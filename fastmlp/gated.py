"""The gated Linear operator (SwiGLU, GeGLU, ReGLU, GLU): checks, torch reference, ops, autograd.

For X [M, K], a gate weight W_g [H, K] and an up weight W_u [H, K] (nn.Linear layout, two
tensors or the two halves of one packed [2H, K] weight: any strides, so ``w[:H]`` and
``w[H:]`` are read as they are), biases b_g, b_u [H] or None:

    G = X W_gᵀ + b_g,   U = X W_uᵀ + b_u,   Y = act(G) ⊙ U
    dG = dY ⊙ U ⊙ act'(G),   dU = dY ⊙ act(G)
    dX = dG W_g + dU W_u,   dW_g = dGᵀ X,   dW_u = dUᵀ X,   db_g = Σ_rows dG,   db_u = Σ_rows dU

silu gives SwiGLU, gelu / gelu_tanh GeGLU, relu ReGLU, sigmoid GLU; every activation of
fastmlp.ACTIVATIONS works (the activation table, fastmlp/activations.py, supplies torch's
forward and backward ops; kernels/activation_jit.py the kernels').

Layers of this file, bottom up, as in fastmlp/ops.py (whose helpers it shares):

1. ``check_gated_inputs``: every bad input is a ValueError/TypeError naming the problem.
2. The torch implementation (``torch_forward``, ``torch_grad_input``, ``torch_grad_weight``),
   computed as torch's own graph computes it: G and U by F.linear, act(G) by the activation's
   torch op, the product, and in backward the activation's torch backward op on dY ⊙ U (read
   from act(G) for the rows that save the output, from G for the others). It is the torch
   backend and the autotuner's TORCH_GEMM candidate.
3. Three ``torch.library`` ops (``fastmlp::gated_linear`` and its two backward ops) with fake
   kernels, so torch.compile(fullgraph=True) sees opaque nodes; each dispatches per call to the
   Triton kernels (kernels/gated.py) or the torch implementation.
4. One autograd formula used by the registered op (``register_autograd``) and by the eager
   ``GatedLinearFunction``. Backward reads G and U (written by the forward only when autograd
   will need them: under no_grad, or with nothing requiring grad, Y alone is stored), and X,
   W_g, W_u. With create_graph=True, under torch.func transforms, forward-mode AD or a batched
   gradient, it is torch's differentiable ops recomputed from the inputs instead
   (``differentiable_backward``), so higher derivatives are torch's.
5. ``fused_gated``: the front of fastmlp.functional.gated_linear(_packed); autocast as nn.Linear
   (every fp16/bf16/fp32 input cast to the autocast dtype).
"""

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastmlp import activations, backend, ops, sharding

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NAMES = ("input", "gate_weight", "up_weight", "gate_bias", "up_bias")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def check_tensors(x, gate_weight, up_weight, gate_bias, up_bias) -> None:
    """A TypeError for an argument that is not a tensor (None allowed for the biases) or not
    of a float dtype the kernels take."""
    for name, t in zip(_NAMES, (x, gate_weight, up_weight, gate_bias, up_bias)):
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastmlp gated_linear: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fastmlp gated_linear: {name} has dtype {t.dtype}; expected one of "
                            f"float16, bfloat16, float32, float64")


def check_gated_inputs(x, gate_weight, up_weight, gate_bias, up_bias, activation: str,
                       alpha: float) -> None:
    """Raise a clear error for anything the op cannot take (never a crash inside a kernel)."""
    check_tensors(x, gate_weight, up_weight, gate_bias, up_bias)
    activations.check(activation, alpha)
    for name, w in (("gate_weight", gate_weight), ("up_weight", up_weight)):
        if w.dim() != 2:
            raise ValueError(f"fastmlp gated_linear: {name} must be 2-D [hidden, in_features], "
                             f"got shape {tuple(w.shape)}")
    if gate_weight.shape != up_weight.shape:
        raise ValueError(f"fastmlp gated_linear: gate_weight {tuple(gate_weight.shape)} and "
                         f"up_weight {tuple(up_weight.shape)} must have the same shape "
                         f"[hidden, in_features]")
    if x.dim() < 1:
        raise ValueError("fastmlp gated_linear: input must have at least 1 dimension, got a 0-d "
                         "tensor")
    hidden, in_features = gate_weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"fastmlp gated_linear: input's last dimension is {x.shape[-1]} (input "
                         f"shape {tuple(x.shape)}) but the weights {tuple(gate_weight.shape)} "
                         f"expect in_features={in_features}")
    for name, b in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if b is not None and (b.dim() != 1 or b.shape[0] != hidden):
            raise ValueError(f"fastmlp gated_linear: {name} must have shape ({hidden},) to match "
                             f"the weights {tuple(gate_weight.shape)}, got {tuple(b.shape)}")
    tensors = [(n, t) for n, t in zip(_NAMES, (x, gate_weight, up_weight, gate_bias, up_bias))
               if t is not None]
    if len({t.dtype for _, t in tensors}) > 1:
        got = ", ".join(f"{n} {t.dtype}" for n, t in tensors)
        raise TypeError(f"fastmlp gated_linear: dtypes differ ({got}); cast them to one dtype or "
                        f"run under torch.autocast")
    if len({t.device for _, t in tensors}) > 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ValueError(f"fastmlp gated_linear: tensors are on different devices ({got})")
    sharding.check_mixed("gated_linear", **dict(tensors))


def split_packed(weight, bias, gate_first: bool):
    """(gate_weight, up_weight, gate_bias, up_bias) as views of a packed [2H, K] weight and its
    [2H] bias (no copies: the kernels take the halves' strides and offsets as they are)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"fastmlp gated_linear_packed: weight must be a torch.Tensor, got "
                        f"{type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] % 2:
        raise ValueError(f"fastmlp gated_linear_packed: weight must be 2-D [2 * hidden, "
                         f"in_features] with an even number of rows (gate and up halves), got "
                         f"shape {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"fastmlp gated_linear_packed: bias must be a torch.Tensor or None, "
                            f"got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"fastmlp gated_linear_packed: bias must have shape "
                             f"({weight.shape[0]},) to match weight {tuple(weight.shape)}, got "
                             f"{tuple(bias.shape)}")
    if not isinstance(gate_first, bool):
        raise TypeError(f"fastmlp gated_linear_packed: gate_first must be a bool, got "
                        f"{type(gate_first).__name__}")
    h = weight.shape[0] // 2
    first, second = weight[:h], weight[h:]
    b_first, b_second = (bias[:h], bias[h:]) if bias is not None else (None, None)
    if gate_first:
        return first, second, b_first, b_second
    return second, first, b_second, b_first


# --------------------------------------------------------------------------------------------
# The torch implementation (torch backend; the autotuner's torch candidate)
# --------------------------------------------------------------------------------------------
def _saved_by_row(g, a, activation, alpha):
    """What the activation's torch backward op reads: act(G) for rows that save the output,
    G for those that save the pre-activation (None for "none")."""
    saves = activations.get(activation).saves(alpha)
    return a if saves == "output" else (g if saves == "preact" else None)


def torch_forward(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, save):
    """(Y, G or None, U or None) for 2-D x with torch's ops; G and U only when save."""
    g = F.linear(x, gate_weight, gate_bias)
    u = F.linear(x, up_weight, up_bias)
    y = activations.get(activation).torch_forward(g, alpha) * u
    return y, (g if save else None), (u if save else None)


def torch_gate_grads(grad, g, u, activation, alpha):
    """(dG, dU) from dY and the saved G, U: dU = dY ⊙ act(G), dG = act'(G) applied to dY ⊙ U by
    the activation's torch backward op."""
    row = activations.get(activation)
    a = row.torch_forward(g, alpha)
    du = grad * a
    dg = row.torch_backward(grad * u, _saved_by_row(g, a, activation, alpha), alpha)
    return dg, du


def torch_grad_input(grad, g, u, gate_weight, up_weight, activation, alpha):
    """dX = dG W_g + dU W_u."""
    dg, du = torch_gate_grads(grad, g, u, activation, alpha)
    return torch.addmm(torch.mm(dg, gate_weight), du, up_weight)


def torch_grad_weight(grad, g, u, x, activation, alpha, gate_weight, gate_bias, up_weight,
                      up_bias):
    """(dW_g, db_g, dW_u, db_u), each None unless its flag asks for it."""
    dg, du = torch_gate_grads(grad, g, u, activation, alpha)
    return ((torch.mm(dg.t(), x) if gate_weight else None), (dg.sum(0) if gate_bias else None),
            (torch.mm(du.t(), x) if up_weight else None), (du.sum(0) if up_bias else None))


# --------------------------------------------------------------------------------------------
# The three operations (plain functions), then their torch.library registration
# --------------------------------------------------------------------------------------------
def _kernels():
    """The Triton launchers, imported only when a Triton path runs (importing triton is slow)."""
    from fastmlp.kernels import gated
    return gated


def _empty(t):
    return t.new_empty((0,))


def _gated_impl(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
                gate_bias: Optional[torch.Tensor], up_bias: Optional[torch.Tensor],
                activation: str, alpha: float, save: bool
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y, G, U) for 2-D X [M, K]; G and U are empty (0,) tensors unless save."""
    if backend.uses_triton(x.device, x.dtype):
        reference = functools.partial(torch_forward, x, gate_weight, up_weight, gate_bias,
                                      up_bias, activation, alpha, save)
        y, g, u = _kernels().gated_forward(x, gate_weight, up_weight, gate_bias, up_bias,
                                           activation, alpha, save, ops._allow_tf32(),
                                           torch_impl=reference)
    else:
        y, g, u = torch_forward(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha,
                                save)
    return y, (g if g is not None else _empty(x)), (u if u is not None else _empty(x))


def _grad_input_impl(grad: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                     gate_weight: torch.Tensor, up_weight: torch.Tensor, activation: str,
                     alpha: float) -> torch.Tensor:
    """dX = dG W_g + dU W_u, with dG and dU formed from dY, G and U."""
    if backend.uses_triton(grad.device, grad.dtype):
        reference = functools.partial(torch_grad_input, grad, g, u, gate_weight, up_weight,
                                      activation, alpha)
        return _kernels().gated_grad_input(grad, g, u, gate_weight, up_weight, activation, alpha,
                                           ops._allow_tf32(), torch_impl=reference)
    return torch_grad_input(grad, g, u, gate_weight, up_weight, activation, alpha)


def _grad_weight_impl(grad: torch.Tensor, g: torch.Tensor, u: torch.Tensor, x: torch.Tensor,
                      activation: str, alpha: float, gate_weight: bool, gate_bias: bool,
                      up_weight: bool, up_bias: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dW_g, db_g, dW_u, db_u); one not asked for is an empty (0,) tensor."""
    flags = (gate_weight, gate_bias, up_weight, up_bias)
    if backend.uses_triton(grad.device, grad.dtype):
        reference = functools.partial(torch_grad_weight, grad, g, u, x, activation, alpha, *flags)
        out = _kernels().gated_grad_weight(grad, g, u, x, activation, alpha, *flags,
                                           ops._allow_tf32(), torch_impl=reference)
    else:
        out = torch_grad_weight(grad, g, u, x, activation, alpha, *flags)
    return tuple(t if t is not None else _empty(grad) for t in out)


gated_linear = torch.library.custom_op("fastmlp::gated_linear", _gated_impl, mutates_args=())
gated_linear_grad_input = torch.library.custom_op("fastmlp::gated_linear_grad_input",
                                                  _grad_input_impl, mutates_args=())
gated_linear_grad_weight = torch.library.custom_op("fastmlp::gated_linear_grad_weight",
                                                   _grad_weight_impl, mutates_args=())


@gated_linear.register_fake
def _(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, save):
    shape = (x.shape[0], gate_weight.shape[0])
    saved = shape if save else (0,)
    return x.new_empty(shape), x.new_empty(saved), x.new_empty(saved)


@gated_linear_grad_input.register_fake
def _(grad, g, u, gate_weight, up_weight, activation, alpha):
    return grad.new_empty((grad.shape[0], gate_weight.shape[1]))


@gated_linear_grad_weight.register_fake
def _(grad, g, u, x, activation, alpha, gate_weight, gate_bias, up_weight, up_bias):
    h, k = grad.shape[1], x.shape[1]
    return (grad.new_empty((h, k) if gate_weight else (0,)),
            grad.new_empty((h,) if gate_bias else (0,)),
            grad.new_empty((h, k) if up_weight else (0,)),
            grad.new_empty((h,) if up_bias else (0,)))


# --------------------------------------------------------------------------------------------
# The autograd formula (one copy: the registered op and GatedLinearFunction both use it)
# --------------------------------------------------------------------------------------------
def gated_backward(grad, x, gate_weight, up_weight, g, u, activation, alpha, needs):
    """(dX, dW_g, dW_u, db_g, db_u) for 2-D tensors, each only if `needs` (the five flags in
    that order) asks for it (else None)."""
    needs_x, needs_wg, needs_wu, needs_bg, needs_bu = needs
    dx = None
    if needs_x:
        dx = ops._call(gated_linear_grad_input, _grad_input_impl, grad, g, u, gate_weight,
                       up_weight, activation, alpha)
    dwg = dbg = dwu = dbu = None
    if needs_wg or needs_wu or needs_bg or needs_bu:
        dwg, dbg, dwu, dbu = ops._call(gated_linear_grad_weight, _grad_weight_impl, grad, g, u, x,
                                       activation, alpha, needs_wg, needs_bg, needs_wu, needs_bu)
        dwg, dbg = (dwg if needs_wg else None), (dbg if needs_bg else None)
        dwu, dbu = (dwu if needs_wu else None), (dbu if needs_bu else None)
    return dx, dwg, dwu, dbg, dbu


def torch_composite(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha):
    """Y with torch's differentiable ops: the graph torch itself records for the gated block."""
    g = F.linear(x, gate_weight, gate_bias)
    return activations.get(activation).torch_forward(g, alpha) * F.linear(x, up_weight, up_bias)


def differentiable_backward(grad, x, gate_weight, up_weight, gate_bias, up_bias, activation,
                            alpha, needs):
    """(dX, dW_g, dW_u, db_g, db_u) for 2-D tensors in differentiable torch ops, recomputed from
    the inputs (two extra GEMMs): what torch's own graph of the block computes, so derivatives
    of it are torch's (the activation's backward as torch differentiates it:
    activations' differentiable_backward)."""
    needs_x, needs_wg, needs_wu, needs_bg, needs_bu = needs
    with ops._autocast_off(x.device.type):
        g = F.linear(x, gate_weight, gate_bias)
        u = F.linear(x, up_weight, up_bias)
        a = activations.get(activation).torch_forward(g, alpha)
        du = grad * a
        dg = ops.torch_activation_grad(grad * u, g, a, activation, alpha)
        dx = None
        if needs_x:
            dx = dg.mm(gate_weight) + du.mm(up_weight)
        return (dx, (dg.t().mm(x) if needs_wg else None), (du.t().mm(x) if needs_wu else None),
                (dg.sum(0) if needs_bg else None), (du.sum(0) if needs_bu else None))


def _save_for_backward(ctx, x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha,
                       g, u, bias_on_ctx=False):
    """Save X (as the caller gave it: it keeps its history for the differentiable backward), the
    weights, G and U. The biases are read only by the differentiable backward: the eager
    Function keeps them on ctx with their versions (an in-place bias change between forward and
    a first-order backward is allowed, as with nn.Linear; the differentiable backward refuses
    it), the registered op and the Function under dynamo save them (see ops._save_for_backward)."""
    ctx.activation, ctx.alpha, ctx.bias_on_ctx = activation, alpha, bias_on_ctx
    if bias_on_ctx:
        ctx.biases = (gate_bias, up_bias)
        ctx.bias_versions = tuple(b._version if b is not None else None for b in ctx.biases)
        ctx.save_for_backward(x, gate_weight, up_weight, g, u)
    else:
        ctx.save_for_backward(x, gate_weight, up_weight, gate_bias, up_bias, g, u)


def _backward(ctx, grad2):
    """The five gradients for the 2-D gradient of Y: the kernels' first-order backward, or the
    differentiable one (create_graph=True, a torch.func transform, a batched gradient)."""
    if ctx.bias_on_ctx:
        x, gate_weight, up_weight, g, u = ctx.saved_tensors
        gate_bias, up_bias = ctx.biases
    else:
        x, gate_weight, up_weight, gate_bias, up_bias, g, u = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:5])
    needs = needs[:3] + (needs[3] and gate_bias is not None, needs[4] and up_bias is not None)
    if torch.is_grad_enabled() or ops.composite_only() or ops.batched_gradient(grad2):
        if ctx.bias_on_ctx:
            gate_bias = ops.unchanged_bias(gate_bias, ctx.bias_versions[0], "gated_linear")
            up_bias = ops.unchanged_bias(up_bias, ctx.bias_versions[1], "gated_linear")
        return differentiable_backward(grad2, ops._rows(x), gate_weight, up_weight, gate_bias,
                                       up_bias, ctx.activation, ctx.alpha, needs)
    x2 = ops._rows(x)
    if g.dim() != 2:
        # The forward was asked not to save G and U (save=False) although autograd runs this
        # backward: recompute them (in the layer's dtype) rather than read empty tensors.
        with torch.no_grad(), ops._autocast_off(x2.device.type):
            g, u = F.linear(x2, gate_weight, gate_bias), F.linear(x2, up_weight, up_bias)
    return gated_backward(grad2, x2, gate_weight, up_weight, g, u, ctx.activation, ctx.alpha,
                          needs)


def _op_setup_context(ctx, inputs, output):
    x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, _ = inputs
    _, g, u = output
    ctx.mark_non_differentiable(g, u)
    _save_for_backward(ctx, x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, g, u)


def _op_backward(ctx, grad_y, grad_g, grad_u):
    return (*_backward(ctx, grad_y), None, None, None)


gated_linear.register_autograd(_op_backward, setup_context=_op_setup_context)


# --------------------------------------------------------------------------------------------
# The public autograd.Function and the front used by fastmlp.functional
# --------------------------------------------------------------------------------------------
class _GatedFunction(torch.autograd.Function):
    """GatedLinearFunction without its routing of torch.func transforms (fused_gated checks
    those itself)."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, gate_bias=None, up_bias=None, activation="silu",
                alpha=0.0, save=None):
        check_gated_inputs(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha)
        if save is None:
            save = any(ctx.needs_input_grad[:5])
        x2 = ops._rows(x)
        y2, g2, u2 = ops._call(gated_linear, _gated_impl, x2, gate_weight, up_weight, gate_bias,
                               up_bias, activation, float(alpha), bool(save))
        ctx.x_shape = x.shape
        _save_for_backward(ctx, x, gate_weight, up_weight, gate_bias, up_bias, activation,
                           float(alpha), g2, u2, bias_on_ctx=not torch.compiler.is_compiling())
        return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], gate_weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        dx, dwg, dwu, dbg, dbu = _backward(ctx, ops._rows(grad))
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return dx, dwg, dwu, dbg, dbu, None, None, None


class GatedLinearFunction(_GatedFunction):
    """Y = act(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u) with fused kernels.

    ``GatedLinearFunction.apply(x, gate_weight, up_weight, gate_bias, up_bias, activation[,
    alpha[, save]])``: x [..., K], weights [H, K], biases [H] or None, activation a name from
    fastmlp.ACTIVATIONS. save (G and U for backward) None decides from which inputs require
    grad, which cannot see ``torch.no_grad()``: fastmlp.functional.gated_linear decides exactly
    and applies autocast. Backward computes only the gradients autograd asks for; with
    create_graph=True it is torch's differentiable ops, and under torch.func transforms and
    forward-mode AD the op is torch's composite (as FusedLinearFunction).
    """

    @classmethod
    def apply(cls, *args, **kwargs):
        if ops.composite_only():
            return _functorch_gated(*args, **kwargs)
        return super().apply(*args, **kwargs)


def _functorch_gated(x, gate_weight, up_weight, gate_bias=None, up_bias=None, activation="silu",
                     alpha=0.0, save=None):
    check_gated_inputs(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha)
    return torch_composite(x, gate_weight, up_weight, gate_bias, up_bias, activation, float(alpha))


def fused_gated(x, gate_weight, up_weight, gate_bias=None, up_bias=None, activation="silu",
                alpha=0.0) -> torch.Tensor:
    """act(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u) with nn.Linear's autocast rules; activation a name.

    On the Triton backend (and whenever torch.compile traces) this is GatedLinearFunction. On the
    torch backend in eager mode, under torch.func transforms or forward-mode AD, and for DTensor
    inputs, it is torch's composite (F.linear twice, the activation, the product) with
    autograd's own nodes.
    """
    check_tensors(x, gate_weight, up_weight, gate_bias, up_bias)
    cast = ops.autocast_caster(x.device.type)
    if cast is not None:
        x, gate_weight, up_weight, gate_bias, up_bias = (
            cast(t) for t in (x, gate_weight, up_weight, gate_bias, up_bias))
    dtensor = sharding._dtensor_class()
    if not torch.compiler.is_compiling() and (not backend.uses_triton(x.device, x.dtype)
                                              or ops.composite_only()
                                              or (dtensor is not None and isinstance(x, dtensor))):
        # DTensors too: the gated op has no sharding rule yet, while DTensor's rules for
        # linear, the activation and mul compute the composite on the shards
        check_gated_inputs(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha)
        return torch_composite(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gate_weight, up_weight, gate_bias, up_bias))
    return _GatedFunction.apply(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha,
                                save)


