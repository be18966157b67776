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
   X, W and the one tensor the activation's derivative needs (its row's ``saves``,
   kernels/activations.py): the output Y, or the pre-activation Z (the forward writes it only
   when autograd will need it), or nothing more ("none"), and b (the parameter itself: no
   memory). Backward computes only the gradients autograd asks for: with the kernels, or, when
   autograd builds a graph of the backward (create_graph=True), with torch's differentiable ops
   recomputed from X, W and b (``differentiable_backward``), so higher derivatives are torch's.
   Under torch.func transforms and forward-mode AD the layer is torch's composite
   (``composite_only``).
5. ``fused_linear``: the front used by fastmlp.functional and the modules; applies autocast the
   way nn.Linear does (every float16/bfloat16/float32 input cast to the autocast dtype).
"""

import contextlib
import functools
import math
from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad

from fastmlp import activations, backend, sharding

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
    sharding.check_mixed("linear", input=x, weight=weight, bias=bias)   # DTensors with plain ones


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
    """Import the Triton launchers only when a Triton path runs (importing triton is slow:
    bench/NOTES.md)."""
    from fastmlp.kernels import linear_act
    return linear_act


def saved_for_backward(activation: str, alpha: float, y, z):
    """The tensor an activation's derivative reads (fastmlp/activations.py): Y, Z or None."""
    saves = activations.get(activation).saves(alpha)
    return y if saves == "output" else (z if saves == "preact" else None)


# --------------------------------------------------------------------------------------------
# The torch implementation (torch backend; the autotuner's torch candidate)
# --------------------------------------------------------------------------------------------
# cuBLASLt's GEMM epilogues, through torch._addmm_activation, for the activations whose row names
# one (``epilogue``: "relu", or "gelu", GELU's tanh form). They compute the activation on the fp32
# accumulator (one rounding, as the kernels do).


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
    epilogue = activations.get(activation).epilogue
    if epilogue is None or bias is None or x.device.type != "cuda" or x.dtype == torch.float64:
        return False
    if epilogue == "relu":
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
                                       use_gelu=activations.get(activation).epilogue == "gelu"), None
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

    The op's Python dispatch costs more per call than the kernel takes on the seed's
    launch-bound shapes (bench/NOTES.md). Whenever something traces (torch.compile, or make_fx /
    AOT autograd, whose tensors are FakeTensor or FunctionalTensor subclasses) the op must be
    used: it is an opaque node with a fake kernel, and a Triton launch cannot run on fake tensors.
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


# --------------------------------------------------------------------------------------------
# The differentiable backward (create_graph=True): torch's ops, recomputed from the inputs
# --------------------------------------------------------------------------------------------
# The kernels compute the first-order gradients, but autograd cannot see inside them: a graph of
# those gradients (dL/dx in an eikonal or PINN loss, gradient penalties, Hessian-vector products)
# needs them as torch ops. When a backward runs with grad mode on (create_graph=True), the
# layer's gradients are therefore computed again from the saved *inputs* (which keep their
# autograd history when unpacked: the saved Y or Z is not an input and has none) with the ops
# torch's own nn.Linear + activation graph runs: Z = F.linear(X, W, b), Y = act(Z), and the
# activation's torch backward op (threshold_backward, tanh_backward, gelu_backward, ...: each
# differentiable in torch, so any order of derivative is torch's own, ReLU's 0 at exactly 0
# included). One extra GEMM per layer, and only on that path.
def torch_preact(x, weight, bias, activation, alpha):
    """(Z, Y) of one layer with torch's differentiable ops (the forward torch's graph records)."""
    z = torch.nn.functional.linear(x, weight, bias)
    return z, activations.get(activation).torch_forward(z, alpha)


def torch_activation_grad(grad, z, y, activation, alpha):
    """G ⊙ act'(Z) with the activation's torch backward op, given Z and Y = act(Z) (both with
    their history, so this is differentiable in G, and through Z and Y in X, W and b)."""
    row = activations.get(activation)
    saves = row.saves(alpha)
    if saves == "nothing":
        return grad
    return row.differentiable_backward(grad, y if saves == "output" else z, alpha)


def torch_linear_grads(dz, x, weight, needs_x, needs_w, needs_b):
    """(dX, dW, db) of Z = X Wᵀ + b for 2-D dZ = dL/dZ and X, each only if needed (else None)."""
    return ((dz.mm(weight) if needs_x else None), (dz.t().mm(x) if needs_w else None),
            (dz.sum(0) if needs_b else None))


def _autocast_off(device_type: str):
    """A context with autocast off on device_type: the recomputed forward must run in the dtype
    the layer ran in, even if backward is called inside an autocast region."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def differentiable_backward(grad2, x2, weight, bias, activation, alpha, needs_x, needs_w, needs_b):
    """(dX, dW, db) of Y = act(X Wᵀ + b) for 2-D tensors, in differentiable torch ops."""
    with _autocast_off(x2.device.type):
        z, y = torch_preact(x2, weight, bias, activation, alpha)
        dz = torch_activation_grad(grad2, z, y, activation, alpha)
        return torch_linear_grads(dz, x2, weight, needs_x, needs_w, needs_b)


def _save_for_backward(ctx, x, weight, bias, activation, alpha, y2, z2, bias_on_ctx=False):
    """Save X (as the caller got it: an input of the Function, so it keeps its history for the
    differentiable backward), W, b and the tensor the activation's derivative reads.

    Only the differentiable backward reads b. With bias_on_ctx (the eager Function) b is kept
    as a ctx attribute with its version instead of being saved, so that, as with nn.Linear, an
    in-place change to the bias between forward and a first-order backward is allowed; the
    differentiable backward refuses a changed bias (unchanged_bias). The registered op
    (dispatched for DTensors) and the Function while dynamo traces it (a tensor's version is
    no value there: it would become an unbacked symbol) save it like the others."""
    ctx.activation = activation
    ctx.alpha = alpha
    ctx.has_bias = bias is not None
    ctx.bias_on_ctx = bias_on_ctx
    saved = saved_for_backward(activation, alpha, y2, z2)
    if bias_on_ctx:
        ctx.bias, ctx.bias_version = bias, (bias._version if bias is not None else None)
        ctx.save_for_backward(x, weight, saved)
    else:
        ctx.save_for_backward(x, weight, bias, saved)


def unchanged_bias(bias, version, what="fused layer"):
    """The bias kept on ctx, refused if it was changed in place since forward (its old value,
    which the recomputed forward needs, is gone)."""
    if bias is not None and bias._version != version:
        raise RuntimeError(
            f"fastmlp {what}: its bias was modified in place after the forward, and a backward "
            f"with create_graph=True recomputes the layer from it. Change it after the backward "
            f"(or out of place)")
    return bias


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def batched_gradient(grad: torch.Tensor) -> bool:
    """Whether a backward's incoming gradient is one of the batched tensors of
    autograd.grad(is_grads_batched=True) or autograd.functional.jacobian(vectorize=True): they
    vmap the backward with torch's legacy batching, which no functorch transform flag shows, and
    a Triton launch cannot read their storage, so the backward takes torch's ops. (Not while
    dynamo traces: it cannot trace the check, and a traced backward gets no such gradient.)"""
    return not torch.compiler.is_compiling() and _is_legacy_batched(grad)


def _backward(ctx, grad2):
    """(dX, dW, db) for the 2-D gradient of Y, from what _save_for_backward kept: the kernels'
    first-order backward, or the differentiable one when grad mode is on (create_graph=True;
    autograd runs a backward with grad mode on exactly then), a torch.func transform is active,
    or the gradient is batched (batched_gradient)."""
    if ctx.bias_on_ctx:
        x, weight, saved = ctx.saved_tensors
        bias = ctx.bias
    else:
        x, weight, bias, saved = ctx.saved_tensors
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() or composite_only() or batched_gradient(grad2):
        if ctx.bias_on_ctx:
            bias = unchanged_bias(bias, ctx.bias_version)
        return differentiable_backward(grad2, _rows(x), weight, bias, ctx.activation, ctx.alpha,
                                       needs_x, needs_w, needs_b and ctx.has_bias)
    x2 = _rows(x)
    if saved is None and activations.get(ctx.activation).saves(ctx.alpha) == "preact":
        # The forward was told not to save Z (save_preact=False) although autograd runs this
        # backward: recompute it rather than differentiate at the wrong point.
        with torch.no_grad(), _autocast_off(x2.device.type):
            saved = torch.nn.functional.linear(x2, weight, bias)
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
class _LinearActFunction(torch.autograd.Function):
    """FusedLinearFunction's forward and backward (its docstring says what they compute), without
    its routing of torch.func transforms: fused_linear checks those itself, inline, and calls
    this class, which spares the per-layer hot path the Python frame of an overridden
    ``apply`` (bench/NOTES.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias=None, activation="relu", alpha=0.0, save_preact=None):
        check_linear_inputs(x, weight, bias, activation, alpha)
        if save_preact is None:
            save_preact = any(ctx.needs_input_grad[:3])
        save_preact = bool(save_preact) and activations.get(activation).saves(alpha) == "preact"
        x2 = _rows(x)
        y2, z2 = _call(linear_act, _linear_act_impl, x2, weight, bias, activation, float(alpha),
                       save_preact)
        if type(y2) is not torch.Tensor and type(y2).__name__ == "DTensor":
            sharding.check_activated_output(y2, activation)
        ctx.x_shape = x.shape
        _save_for_backward(ctx, x, weight, bias, activation, float(alpha), y2,
                           z2 if save_preact else None,
                           bias_on_ctx=not torch.compiler.is_compiling())   # see below
        return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        dx, dw, db = _backward(ctx, _rows(grad))
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None, None


class FusedLinearFunction(_LinearActFunction):
    """Y = act(X Wᵀ + b) with fused Triton forward and backward kernels.

    ``FusedLinearFunction.apply(x, weight, bias, activation[, alpha[, save_preact]])``: x of any
    shape [..., K], weight [N, K] (nn.Linear layout), bias [N] or None, activation a name from
    fastmlp.ACTIVATIONS, alpha leaky_relu's negative slope (ignored by the others). For an
    activation whose derivative reads the pre-activation (its row's ``saves``) the forward also
    writes it for backward; save_preact None
    (the default) decides from which inputs require grad, which cannot see ``torch.no_grad()``:
    call fastmlp.functional.linear_act instead to get that, and autocast, handled as nn.Linear
    does. Backward computes only the gradients autograd asks for.

    Higher derivatives: backward is the kernels' when autograd builds no graph of it, and torch's
    differentiable ops, recomputed from the saved inputs, when it does (create_graph=True; see
    differentiable_backward), so double backward gives torch's results. Under torch.func
    transforms (grad, jacrev, jvp, vmap, ...) and forward-mode AD the layer is torch's composite
    (F.linear, then the activation's torch op; see composite_only).
    """

    @classmethod
    def apply(cls, *args, **kwargs):
        # A functorch transform or forward-mode AD is active: route to the composite before
        # autograd.Function.apply refuses this (ctx-style, jvp-less) Function. torch.compile
        # never runs this method (dynamo traces forward and backward itself).
        if composite_only():
            return _functorch_linear(*args, **kwargs)
        return super().apply(*args, **kwargs)


def composite_only() -> bool:
    """Whether something the kernels' autograd Functions cannot serve is active: a torch.func
    transform (grad, jacrev, jvp, vmap, ...: functorch batches and differentiates torch's ops, a
    Triton launch has no batching rule) or a forward-mode AD level (torch.autograd.forward_ad:
    the Functions have no jvp). Then the layers run torch's composite, which both handle."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _functorch_linear(x, weight, bias=None, activation="relu", alpha=0.0, save_preact=None):
    """FusedLinearFunction's value where composite_only(): torch's composite, checked as the
    Function checks its inputs (save_preact has no meaning here: autograd saves what it
    needs)."""
    check_linear_inputs(x, weight, bias, activation, alpha)
    return torch_preact(x, weight, bias, activation, float(alpha))[1]


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
        if weight.dim() != 2 or (isinstance(bias, torch.Tensor) and (bias.dim() != 1
                                                       or bias.shape[0] != weight.shape[0])):
            weight_1d = weight.dim() == 1
            weight, bias = _linear_layout(x, weight, bias)
            if weight_1d:  # F.linear with a 1-D weight drops the output's last dimension
                return fused_linear(x, weight, bias, activation, alpha).squeeze(-1)
        x, weight, bias = _autocast_inputs(x, weight, bias)
        if not torch.compiler.is_compiling() and (
                not backend.uses_triton(x.device, x.dtype)
                or torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0):
            # torch's ops: the torch backend, and (composite_only, written out: this is the
            # per-layer hot path) torch.func transforms and forward-mode AD on any backend
            check_linear_inputs(x, weight, bias, activation, alpha)
            y = torch.nn.functional.linear(x, weight, bias)
            if activation == "relu":
                # in place on a fresh plain tensor; a DTensor may be a Partial sum (row-parallel),
                # which DTensor must all-reduce first: out of place
                return torch.relu_(y) if type(y) is torch.Tensor else torch.relu(y)
            return activations.get(activation).torch_forward(y, alpha)
        save_preact = _needs_preact(x, weight, bias)
        return _LinearActFunction.apply(x, weight, bias, activation, alpha, save_preact)
    return FusedLinearFunction.apply(x, weight, bias, activation, alpha)


def _linear_layout(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """(weight as [N, K], bias as [N] or None) for the other shapes torch.nn.functional.linear
    takes, as views made by differentiable torch ops outside the kernels' Function, so autograd
    gives each gradient the caller's shape (the bias gradient summed back by expand's backward).

    Accepted, as F.linear accepts them for every input: a 2-D weight [N, K] with a bias of shape
    [N], [1, N], [1] or () (broadcast over the N outputs); a 1-D weight [K] (the output drops its
    last dimension; fused_linear squeezes it) without bias, or with a 0-d bias when the input is
    not 2-D (F.linear refuses a bias with a 1-D weight for a 2-D input). Refused with a
    ValueError: a 0-d or 3-D+ weight (F.linear refuses them), a bias that does not broadcast to
    [N] alone (a [M, N] bias, which F.linear's addmm path would add per row, is not a bias the
    kernels add), and the rarer biases F.linear takes only for some input ranks or layouts.
    """
    if weight.dim() not in (1, 2):
        raise ValueError(f"fastmlp linear: weight must be 2-D [out_features, in_features] (or "
                         f"1-D [in_features], as F.linear takes), got shape {tuple(weight.shape)}")
    if weight.dim() == 1:
        if bias is not None and (bias.dim() != 0 or x.dim() == 2):
            raise ValueError(
                f"fastmlp linear: with a 1-D weight {tuple(weight.shape)} the bias must be None or "
                f"0-d, and the input not 2-D (F.linear refuses the others), got bias "
                f"{tuple(bias.shape)} with input {tuple(x.shape)}")
        return weight.unsqueeze(0), (bias.reshape(1) if bias is not None else None)
    n = weight.shape[0]
    if bias is None:
        return weight, None
    shape = tuple(bias.shape)
    if shape not in ((), (1,), (n,), (1, n)):
        raise ValueError(f"fastmlp linear: bias must have shape ({n},), (1, {n}), (1,) or () to "
                         f"match weight {tuple(weight.shape)} (one value per output feature, "
                         f"broadcast as F.linear does), got {shape}")
    return weight, bias.reshape(-1).expand(n)
