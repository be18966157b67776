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

1. ``check_gated_inputs`` / ``check_packed_inputs``: every bad input is a ValueError/TypeError
   naming the problem.
2. The torch implementation (``torch_forward``, ``torch_grad_input``, ``torch_grad_weight``,
   ``torch_grad_weight_packed``), computed as torch's own graph computes it: G and U by
   F.linear, act(G) by the activation's torch op, the product, and in backward the
   activation's torch backward op on dY ⊙ U (read from act(G) for the rows that save the
   output, from G for the others). It is the torch backend and the autotuner's TORCH_GEMM
   candidate.
3. ``torch.library`` ops with fake kernels, so torch.compile(fullgraph=True) sees opaque nodes;
   each dispatches per call to the Triton kernels (kernels/gated.py) or the torch
   implementation: ``fastmlp::gated_linear`` and its two backward ops
   (``gated_linear_grad_input``, ``gated_linear_grad_weight``), and the packed form,
   ``fastmlp::gated_linear_packed`` (the weight [2H, K] and bias [2H] as one tensor each, read
   as halves in place) with ``gated_linear_packed_grad_weight``, whose one grouped launch
   writes dW_g and dW_u (db_g, db_u) into the halves of one packed gradient: the packed
   Parameter gets that tensor, with no per-half buffer zero-filled and added (its dX is
   ``gated_linear_grad_input`` on the halves). fastmlp/sharding.py gives the ops DTensor
   sharding rules.
4. One autograd formula per form, used by the registered op (``register_autograd``) and by
   the eager Function (``GatedLinearFunction``; ``_GatedPackedFunction``). Backward reads G
   and U (written by the forward only when autograd will need them: under no_grad, or with
   nothing requiring grad, Y alone is stored), and X and the weights. With create_graph=True,
   under torch.func transforms, forward-mode AD or a batched gradient, it is torch's
   differentiable ops recomputed from the inputs instead (``differentiable_backward``,
   ``differentiable_packed_backward``), so higher derivatives are torch's.
5. ``fused_gated`` / ``fused_gated_packed``: the fronts of fastmlp.functional.gated_linear and
   gated_linear_packed; autocast as nn.Linear (every fp16/bf16/fp32 input cast to the
   autocast dtype), and the choice between the op and torch's composite.
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
def _check_tensor_args(where: str, named) -> None:
    """A TypeError for an argument that is not a tensor (None allowed for the biases) or not
    of a float dtype the kernels take; `named` is (name, value) pairs."""
    for name, t in named:
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastmlp {where}: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fastmlp {where}: {name} has dtype {t.dtype}; expected one of "
                            f"float16, bfloat16, float32, float64")


def _check_input_and_agreement(where: str, named, in_features: int, weights_shape) -> None:
    """The input's rank and last dimension, then one dtype, one device and no DTensor mixed
    with plain tensors among `named` ((name, tensor or None) pairs, the input first)."""
    x = named[0][1]
    if x.dim() < 1:
        raise ValueError(f"fastmlp {where}: input must have at least 1 dimension, got a 0-d "
                         f"tensor")
    if x.shape[-1] != in_features:
        raise ValueError(f"fastmlp {where}: input's last dimension is {x.shape[-1]} (input "
                         f"shape {tuple(x.shape)}) but the weights {tuple(weights_shape)} "
                         f"expect in_features={in_features}")
    tensors = [(n, t) for n, t in named if t is not None]
    if len({t.dtype for _, t in tensors}) > 1:
        got = ", ".join(f"{n} {t.dtype}" for n, t in tensors)
        raise TypeError(f"fastmlp {where}: dtypes differ ({got}); cast them to one dtype or "
                        f"run under torch.autocast")
    if len({t.device for _, t in tensors}) > 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ValueError(f"fastmlp {where}: tensors are on different devices ({got})")
    sharding.check_mixed(where, **dict(tensors))


def check_tensors(x, gate_weight, up_weight, gate_bias, up_bias) -> None:
    """A TypeError for an argument that is not a tensor (None allowed for the biases) or not
    of a float dtype the kernels take."""
    _check_tensor_args("gated_linear", zip(_NAMES, (x, gate_weight, up_weight, gate_bias,
                                                    up_bias)))


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
    hidden, in_features = gate_weight.shape
    for name, b in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if b is not None and (b.dim() != 1 or b.shape[0] != hidden):
            raise ValueError(f"fastmlp gated_linear: {name} must have shape ({hidden},) to match "
                             f"the weights {tuple(gate_weight.shape)}, got {tuple(b.shape)}")
    _check_input_and_agreement("gated_linear", list(zip(_NAMES, (x, gate_weight, up_weight,
                                                                 gate_bias, up_bias))),
                               in_features, gate_weight.shape)


def check_packed(weight, bias, gate_first) -> None:
    """The layout of a packed weight: a 2-D [2H, K] tensor with an even number of rows, a [2H]
    bias or None, gate_first a bool (clear errors otherwise)."""
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


def check_packed_inputs(x, weight, bias, activation: str, alpha: float, gate_first) -> None:
    """check_gated_inputs for the packed form, whose weight and bias are named as the caller
    passed them (never sliced here: the halves of a sharded DTensor would be gathered)."""
    check_packed(weight, bias, gate_first)
    named = [("input", x), ("weight", weight), ("bias", bias)]
    _check_tensor_args("gated_linear_packed", named)
    activations.check(activation, alpha)
    _check_input_and_agreement("gated_linear_packed", named, weight.shape[1], weight.shape)


def packed_halves(weight, bias, gate_first: bool):
    """(gate_weight, up_weight, gate_bias, up_bias) as views of a packed [2H, K] weight and its
    [2H] bias (no copies: the kernels take the halves' strides and offsets as they are)."""
    h = weight.shape[0] // 2
    first, second = weight[:h], weight[h:]
    b_first, b_second = (bias[:h], bias[h:]) if bias is not None else (None, None)
    if gate_first:
        return first, second, b_first, b_second
    return second, first, b_second, b_first


def split_packed(weight, bias, gate_first: bool):
    """packed_halves of a checked packed weight (check_packed's errors)."""
    check_packed(weight, bias, gate_first)
    return packed_halves(weight, bias, gate_first)


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


def torch_grad_weight_packed(grad, g, u, x, activation, alpha, gate_first, weight, bias):
    """(dW [2H, K], db [2H]) of a packed weight, each None unless its flag asks for it: each
    half written in place into one empty tensor (torch.mm / torch.sum with out= a half), so
    nothing per half is allocated, copied or added."""
    dg, du = torch_gate_grads(grad, g, u, activation, alpha)
    first, second = (dg, du) if gate_first else (du, dg)
    h = grad.shape[1]
    dw = db = None
    if weight:
        dw = grad.new_empty((2 * h, x.shape[1]))
        torch.mm(first.t(), x, out=dw[:h])
        torch.mm(second.t(), x, out=dw[h:])
    if bias:
        db = grad.new_empty((2 * h,))
        torch.sum(first, 0, out=db[:h])
        torch.sum(second, 0, out=db[h:])
    return dw, db


# --------------------------------------------------------------------------------------------
# The operations (plain functions), then their torch.library registration
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


def _gated_packed_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       activation: str, alpha: float, gate_first: bool, save: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_gated_impl on the halves of a packed [2H, K] weight (and [2H] bias), read in place."""
    return _gated_impl(x, *packed_halves(weight, bias, gate_first), activation, alpha, save)


def _packed_grad_weight_impl(grad: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                             x: torch.Tensor, activation: str, alpha: float, gate_first: bool,
                             weight: bool, bias: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dW [2H, K], db [2H]) of a packed weight from one grouped launch that writes dW_g and
    dW_u (db_g, db_u) into the halves of one output; one not asked for is an empty (0,)."""
    if backend.uses_triton(grad.device, grad.dtype):
        reference = functools.partial(torch_grad_weight_packed, grad, g, u, x, activation, alpha,
                                      gate_first, weight, bias)
        out = _kernels().gated_grad_weight_packed(grad, g, u, x, activation, alpha, gate_first,
                                                  weight, bias, ops._allow_tf32(),
                                                  torch_impl=reference)
    else:
        out = torch_grad_weight_packed(grad, g, u, x, activation, alpha, gate_first, weight, bias)
    return tuple(t if t is not None else _empty(grad) for t in out)


gated_linear = torch.library.custom_op("fastmlp::gated_linear", _gated_impl, mutates_args=())
gated_linear_grad_input = torch.library.custom_op("fastmlp::gated_linear_grad_input",
                                                  _grad_input_impl, mutates_args=())
gated_linear_grad_weight = torch.library.custom_op("fastmlp::gated_linear_grad_weight",
                                                   _grad_weight_impl, mutates_args=())

gated_linear_packed = torch.library.custom_op("fastmlp::gated_linear_packed", _gated_packed_impl,
                                              mutates_args=())
gated_linear_packed_grad_weight = torch.library.custom_op(
    "fastmlp::gated_linear_packed_grad_weight", _packed_grad_weight_impl, mutates_args=())


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


@gated_linear_packed.register_fake
def _(x, weight, bias, activation, alpha, gate_first, save):
    shape = (x.shape[0], weight.shape[0] // 2)
    saved = shape if save else (0,)
    return x.new_empty(shape), x.new_empty(saved), x.new_empty(saved)


@gated_linear_packed_grad_weight.register_fake
def _(grad, g, u, x, activation, alpha, gate_first, weight, bias):
    h, k = grad.shape[1], x.shape[1]
    return (grad.new_empty((2 * h, k) if weight else (0,)),
            grad.new_empty((2 * h,) if bias else (0,)))


# --------------------------------------------------------------------------------------------
# The autograd formulas (one copy per form: the registered op and the Function both use it)
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


def packed_backward(grad, x, weight, g, u, activation, alpha, gate_first, needs):
    """(dX, dW, db) of the packed form for 2-D tensors, each only if `needs` (x, weight, bias)
    asks for it (else None): dX from the weight's halves read in place, dW and db each one
    packed tensor written by one grouped launch (its halves in the gate_first order)."""
    needs_x, needs_w, needs_b = needs
    dx = dw = db = None
    if needs_x:
        gate_weight, up_weight, _, _ = packed_halves(weight, None, gate_first)
        dx = ops._call(gated_linear_grad_input, _grad_input_impl, grad, g, u, gate_weight,
                       up_weight, activation, alpha)
    if needs_w or needs_b:
        dw, db = ops._call(gated_linear_packed_grad_weight, _packed_grad_weight_impl, grad, g, u,
                           x, activation, alpha, gate_first, needs_w, needs_b)
        dw, db = (dw if needs_w else None), (db if needs_b else None)
    return dx, dw, db


def torch_composite(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha):
    """Y with torch's differentiable ops: the graph torch itself records for the gated block."""
    g = F.linear(x, gate_weight, gate_bias)
    return activations.get(activation).torch_forward(g, alpha) * F.linear(x, up_weight, up_bias)


def torch_packed_composite(x, weight, bias, activation, alpha, gate_first):
    """Y of the packed form with torch's differentiable ops, as models write it: one F.linear
    with the packed weight, then ``.chunk(2, -1)``. Autograd's gradient of the packed weight is
    then that F.linear's one GEMM (the halves' gradients meet in the [..., 2H] output gradient,
    not in weight-sized buffers)."""
    first, second = F.linear(x, weight, bias).chunk(2, -1)
    g, u = (first, second) if gate_first else (second, first)
    return activations.get(activation).torch_forward(g, alpha) * u


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


def differentiable_packed_backward(grad, x, weight, bias, activation, alpha, gate_first, needs):
    """(dX, dW, db) of the packed form for 2-D tensors in differentiable torch ops, recomputed
    from the inputs as torch's own graph of torch_packed_composite computes them: one F.linear
    with the packed weight, its chunks, and the gradient of that F.linear's [M, 2H] output (dG
    and dU side by side, as chunk's backward puts them) multiplied out once."""
    needs_x, needs_w, needs_b = needs
    with ops._autocast_off(x.device.type):
        first, second = F.linear(x, weight, bias).chunk(2, -1)
        g, u = (first, second) if gate_first else (second, first)
        a = activations.get(activation).torch_forward(g, alpha)
        du = grad * a
        dg = ops.torch_activation_grad(grad * u, g, a, activation, alpha)
        dz = torch.cat((dg, du) if gate_first else (du, dg), -1)
        return ((dz.mm(weight) if needs_x else None), (dz.t().mm(x) if needs_w else None),
                (dz.sum(0) if needs_b else None))


def _save_for_backward(ctx, x, weights, biases, activation, alpha, g, u, bias_on_ctx=False):
    """Save X (as the caller gave it: it keeps its history for the differentiable backward), the
    weights (gate and up, or the one packed weight), G and U. The biases are read only by the
    differentiable backward: the eager Functions keep them on ctx with their versions (an
    in-place bias change between forward and a first-order backward is allowed, as with
    nn.Linear; the differentiable backward refuses it), the registered ops and the Functions
    under dynamo save them (see ops._save_for_backward)."""
    ctx.activation, ctx.alpha, ctx.bias_on_ctx = activation, alpha, bias_on_ctx
    ctx.n_weights = len(weights)
    if bias_on_ctx:
        ctx.biases = tuple(biases)
        ctx.bias_versions = tuple(b._version if b is not None else None for b in ctx.biases)
        ctx.save_for_backward(x, *weights, g, u)
    else:
        ctx.save_for_backward(x, *weights, *biases, g, u)


def _saved(ctx):
    """(x, weights, biases, g, u) as _save_for_backward kept them (a bias kept on ctx is checked
    unchanged by the backward that reads it: _unchanged_biases)."""
    saved = ctx.saved_tensors
    n = ctx.n_weights
    x, weights = saved[0], saved[1:1 + n]
    if ctx.bias_on_ctx:
        biases, (g, u) = ctx.biases, saved[1 + n:]
    else:
        biases, (g, u) = saved[1 + n:1 + 2 * n], saved[1 + 2 * n:]
    return x, weights, biases, g, u


def _differentiable(grad2) -> bool:
    """Whether a backward must be torch's differentiable ops: grad mode on (create_graph=True),
    a torch.func transform, or a batched gradient."""
    return torch.is_grad_enabled() or ops.composite_only() or ops.batched_gradient(grad2)


def _unchanged_biases(ctx, biases, what):
    if not ctx.bias_on_ctx:
        return biases
    return tuple(ops.unchanged_bias(b, v, what) for b, v in zip(biases, ctx.bias_versions))


def _backward(ctx, grad2):
    """The five gradients for the 2-D gradient of Y: the kernels' first-order backward, or the
    differentiable one (create_graph=True, a torch.func transform, a batched gradient)."""
    x, (gate_weight, up_weight), (gate_bias, up_bias), g, u = _saved(ctx)
    needs = tuple(ctx.needs_input_grad[:5])
    needs = needs[:3] + (needs[3] and gate_bias is not None, needs[4] and up_bias is not None)
    if _differentiable(grad2):
        gate_bias, up_bias = _unchanged_biases(ctx, (gate_bias, up_bias), "gated_linear")
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


def _packed_backward(ctx, grad2):
    """(dX, dW, db) of the packed form for the 2-D gradient of Y, as _backward."""
    x, (weight,), (bias,), g, u = _saved(ctx)
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    needs = (needs_x, needs_w, needs_b and bias is not None)
    if _differentiable(grad2):
        (bias,) = _unchanged_biases(ctx, (bias,), "gated_linear_packed")
        return differentiable_packed_backward(grad2, ops._rows(x), weight, bias, ctx.activation,
                                              ctx.alpha, ctx.gate_first, needs)
    x2 = ops._rows(x)
    if g.dim() != 2:   # not saved by the forward (save=False): recomputed, as in _backward
        gate_weight, up_weight, gate_bias, up_bias = packed_halves(weight, bias, ctx.gate_first)
        with torch.no_grad(), ops._autocast_off(x2.device.type):
            g, u = F.linear(x2, gate_weight, gate_bias), F.linear(x2, up_weight, up_bias)
    return packed_backward(grad2, x2, weight, g, u, ctx.activation, ctx.alpha, ctx.gate_first,
                           needs)


def _op_setup_context(ctx, inputs, output):
    x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, _ = inputs
    _, g, u = output
    ctx.mark_non_differentiable(g, u)
    _save_for_backward(ctx, x, (gate_weight, up_weight), (gate_bias, up_bias), activation, alpha,
                       g, u)


def _op_backward(ctx, grad_y, grad_g, grad_u):
    return (*_backward(ctx, grad_y), None, None, None)


gated_linear.register_autograd(_op_backward, setup_context=_op_setup_context)


def _packed_op_setup_context(ctx, inputs, output):
    x, weight, bias, activation, alpha, gate_first, _ = inputs
    _, g, u = output
    ctx.mark_non_differentiable(g, u)
    ctx.gate_first = gate_first
    _save_for_backward(ctx, x, (weight,), (bias,), activation, alpha, g, u)


def _packed_op_backward(ctx, grad_y, grad_g, grad_u):
    return (*_packed_backward(ctx, grad_y), None, None, None, None)


gated_linear_packed.register_autograd(_packed_op_backward, setup_context=_packed_op_setup_context)


# --------------------------------------------------------------------------------------------
# The autograd.Functions and the fronts used by fastmlp.functional
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
        sharding.check_gated_output(y2, "gated_linear")
        ctx.x_shape = x.shape
        _save_for_backward(ctx, x, (gate_weight, up_weight), (gate_bias, up_bias), activation,
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


class _GatedPackedFunction(torch.autograd.Function):
    """The packed form: (x, weight [2H, K], bias [2H] or None, activation, alpha, gate_first,
    save). One autograd node for the packed Parameter: its gradient is the packed tensor the
    grouped dW launch writes (no SliceBackward per half, no zero-filled buffers added). Called
    by fused_gated_packed only (it routes torch.func transforms and autocast)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, alpha, gate_first, save):
        check_packed_inputs(x, weight, bias, activation, alpha, gate_first)
        x2 = ops._rows(x)
        y2, g2, u2 = ops._call(gated_linear_packed, _gated_packed_impl, x2, weight, bias,
                               activation, float(alpha), gate_first, bool(save))
        sharding.check_gated_output(y2, "gated_linear_packed")
        ctx.x_shape, ctx.gate_first = x.shape, gate_first
        _save_for_backward(ctx, x, (weight,), (bias,), activation, float(alpha), g2, u2,
                           bias_on_ctx=not torch.compiler.is_compiling())
        return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], weight.shape[0] // 2)

    @staticmethod
    def backward(ctx, grad):
        dx, dw, db = _packed_backward(ctx, ops._rows(grad))
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None, None, None


def _needs_save(*tensors) -> bool:
    """Whether autograd will run the backward (so the forward must write G and U)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused_gated(x, gate_weight, up_weight, gate_bias=None, up_bias=None, activation="silu",
                alpha=0.0) -> torch.Tensor:
    """act(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u) with nn.Linear's autocast rules; activation a name.

    On the Triton backend (and whenever torch.compile traces) this is GatedLinearFunction, for
    DTensors too (the op's sharding rules, fastmlp/sharding.py, run the kernels on the shards).
    On the torch backend in eager mode, and under torch.func transforms or forward-mode AD, it
    is torch's composite (F.linear twice, the activation, the product) with autograd's own nodes.
    """
    check_tensors(x, gate_weight, up_weight, gate_bias, up_bias)
    cast = ops.autocast_caster(x.device.type)
    if cast is not None:
        x, gate_weight, up_weight, gate_bias, up_bias = (
            cast(t) for t in (x, gate_weight, up_weight, gate_bias, up_bias))
    if not torch.compiler.is_compiling() and (not backend.uses_triton(x.device, x.dtype)
                                              or ops.composite_only()):
        check_gated_inputs(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha)
        return torch_composite(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha)
    save = _needs_save(x, gate_weight, up_weight, gate_bias, up_bias)
    return _GatedFunction.apply(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha,
                                save)


def fused_gated_packed(x, weight, bias=None, activation="silu", alpha=0.0,
                       gate_first=True) -> torch.Tensor:
    """fused_gated with the gate and up weights packed in one [2H, K] weight (bias [2H]), the
    gate the first half of the rows if gate_first; the weight's gradient is one [2H, K] tensor.

    On the Triton backend (and whenever torch.compile traces) the packed op, whose backward
    writes that gradient (and the bias's) in one grouped launch. On the torch backend in eager
    mode, and under torch.func transforms or forward-mode AD, torch's composite as models write
    it (one F.linear with the packed weight, then chunk), whose weight gradient is one GEMM.
    A DTensor weight sharded on its rows (Shard(0) of 2H) holds the gate rows on some ranks and
    the up rows on others: it is replicated first (sharding.replicate_packed), with a warning.
    """
    check_packed(weight, bias, gate_first)
    _check_tensor_args("gated_linear_packed", (("input", x), ("weight", weight), ("bias", bias)))
    cast = ops.autocast_caster(x.device.type)
    if cast is not None:
        x, weight, bias = cast(x), cast(weight), cast(bias)
    if not torch.compiler.is_compiling() and (not backend.uses_triton(x.device, x.dtype)
                                              or ops.composite_only()):
        check_packed_inputs(x, weight, bias, activation, alpha, gate_first)
        return torch_packed_composite(x, weight, bias, activation, alpha, gate_first)
    dtensor = sharding._dtensor_class()
    if dtensor is not None and isinstance(weight, dtensor) and isinstance(x, dtensor):
        weight, bias = sharding.replicate_packed(weight, bias)
    save = _needs_save(x, weight, bias)
    return _GatedPackedFunction.apply(x, weight, bias, activation, alpha, gate_first, save)
