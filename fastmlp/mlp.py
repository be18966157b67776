"""FusedMLP: a whole narrow MLP (Linear, act, Linear, act, ..., Linear[, out act]) in one module.

What it computes is exactly the equivalent ``nn.Sequential``; how, is decided per call:

* ``"torch"``: the child modules' own forward, in order (what nn.Sequential does). This is the
  torch backend (CPU by default, float64 on GPUs), as everywhere in fastmlp.
* ``"fused"`` (Triton backend): the whole stack in one autograd node, ``fastmlp::mlp`` and
  ``fastmlp::mlp_backward`` (kernels/mlp_kernels.py): one kernel streams each row tile through
  every layer with its activations kept in registers; backward walks the layers top down per row
  tile (each layer's activation derivative applied in the epilogue of the layer above's dX GEMM)
  and then computes every weight gradient as a plain GEMM of the masked gradients, all middle
  layers in one launch. Taken when the hidden layers share one activation and one bias setting
  and the widest hidden layer is within the fully fused limit for the dtype and GPU
  (fastmlp.kernels.mlp.fused_candidates: the widths every shipped config compiles for without
  register spills).
* ``"per-layer"`` (Triton backend): fastmlp.ops.fused_linear per layer through autograd, the
  fused Linear+activation kernels. Taken past the fused limit, for mixed activations, and on a
  GPU wherever it times faster: the first call of each shape bucket times both candidates
  (forward, plus backward when gradients are needed) and keeps the faster, so the fused path is
  never slower than the per-layer one by more than timing noise. A given choice is deterministic.

Higher derivatives: the fused path's backward is the kernels' unless autograd builds a graph of
it (create_graph=True); then the stack is recomputed from its inputs with torch's ops and each
layer's gradient taken with the activation's torch backward op (``_differentiable_backward``), so
every derivative is nn.Sequential's. Under torch.func transforms and forward-mode AD the module
takes the torch path on either backend (fastmlp.ops.composite_only).

State: the children are named as in the equivalent nn.Sequential ("0" Linear, "1" activation,
"2" Linear, ...), so ``state_dict`` keys and shapes are the Sequential's and either loads the
other's. ``FusedMLP.from_sequential(seq)`` keeps seq's own child names and modules (parameters
shared, not copied). Hooks registered on the children do not run on the Triton paths (the
children are parameter holders there); hooks on the FusedMLP itself do. So ``from_sequential``
refuses a Sequential whose children (or itself, or torch's global module hooks) have hooks that
would be skipped, and ``fastmlp.fuse(mlp=True)`` leaves such a stack to the per-pair pass, which
leaves a hooked Linear as it is. While a child has a call hook registered after the FusedMLP
was built, or a global module hook is registered, the stack takes the torch path (its children
called in turn), so the hooks run as in nn.Sequential (``FusedMLP._hooked``).
"""

import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastmlp import activations, backend, hooks, ops, sharding

__all__ = ["FusedMLP", "fuse_sequentials", "hook_blocker", "use_path", "PATHS"]

PATHS = ("auto", "fused", "per-layer")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_forced_path = "auto"


@contextlib.contextmanager
def use_path(path: str):
    """Run FusedMLPs on the Triton backend by one path ("fused", "per-layer") instead of the
    dispatcher's choice ("auto"): for tests and benchmarks. "fused" still falls back to the
    per-layer path where the stack cannot be fully fused."""
    global _forced_path
    if path not in PATHS:
        raise ValueError(f"fastmlp: unknown FusedMLP path {path!r}; expected one of {PATHS}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def _kernels():
    """The Triton launchers, imported only when a Triton path runs (importing triton costs ~1 s)."""
    from fastmlp.kernels import mlp
    return mlp


def _allow_tf32() -> bool:
    from fastmlp.ops import _allow_tf32
    return _allow_tf32()


# --------------------------------------------------------------------------------------------
# The plan: which Linears, which activation after each (parsed from the children every call)
# --------------------------------------------------------------------------------------------
def _linear_of(module: nn.Module):
    """(the module as a linear layer, its built-in activation or None) or None if it is not one."""
    if type(module) is nn.Linear:
        return module, None
    from fastmlp.nn import FusedLinear, FusedLinearReLU

    if type(module) in (FusedLinear, FusedLinearReLU):
        name = getattr(module, "activation", "none")
        alpha = float(getattr(module, "activation_alpha", 0.0))
        return module, (None if name == "none" else (name, alpha))
    return None


def _parse(named: Sequence[Tuple[str, nn.Module]], where: str):
    """(linears, acts) from Sequential-ordered children: acts[i] = (name, alpha) after linears[i].

    nn.Identity is skipped anywhere; every other module must be a linear layer (nn.Linear or
    fastmlp's FusedLinear) or one supported activation directly after one.
    """
    linears: List[nn.Linear] = []
    acts: List[Tuple[str, float]] = []
    for name, module in named:
        if type(module) is nn.Identity:
            continue
        found = _linear_of(module)
        if found is not None:
            linears.append(found[0])
            acts.append(found[1] or ("none", 0.0))
            continue
        act = activations.from_module(module)
        if act is None:
            raise TypeError(
                f"fastmlp {where}: module {name!r} ({module!r}) is not nn.Linear, a supported "
                f"activation module ({', '.join(activations.ACTIVATIONS)}) or nn.Identity")
        if not linears:
            raise ValueError(f"fastmlp {where}: module {name!r} ({module!r}) is an activation "
                             f"before the first Linear")
        if acts[-1][0] != "none":
            raise ValueError(f"fastmlp {where}: module {name!r} ({module!r}) is a second "
                             f"activation after the same Linear")
        acts[-1] = act
    if not linears:
        raise ValueError(f"fastmlp {where}: no Linear layer")
    for prev, nxt in zip(linears, linears[1:]):
        if nxt.in_features != prev.out_features:
            raise ValueError(f"fastmlp {where}: a Linear with out_features={prev.out_features} is "
                             f"followed by one with in_features={nxt.in_features}")
    return linears, acts


def _module_for(name: str, alpha: float) -> nn.Module:
    """The torch module of an activation (name, alpha); nn.Identity for "none"."""
    return activations.get(name).new_module(alpha)


# --------------------------------------------------------------------------------------------
# Input checks and autocast
# --------------------------------------------------------------------------------------------
def _check_inputs(x, weights, biases) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastmlp FusedMLP: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fastmlp FusedMLP: input has dtype {x.dtype}; expected one of float16, "
                        f"bfloat16, float32, float64")
    if x.dim() < 1:
        raise ValueError("fastmlp FusedMLP: input must have at least 1 dimension, got a 0-d tensor")
    in_features = weights[0].shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"fastmlp FusedMLP: input's last dimension is {x.shape[-1]} (input shape "
                         f"{tuple(x.shape)}) but the first Linear expects in_features={in_features}")


def _check_same(x, weights, biases) -> None:
    """Every tensor in x's dtype and on x's device (checked after autocast's casts, as
    nn.Linear's own check runs on what autocast gives it)."""
    for i, (w, b) in enumerate(zip(weights, biases)):
        for what, t in (("weight", w), ("bias", b)):
            if t is None:
                continue
            if t.dtype != x.dtype:
                raise TypeError(f"fastmlp FusedMLP: dtypes differ (input {x.dtype}, layer {i} {what} "
                                f"{t.dtype}); cast the model or the input, or run under torch.autocast")
            if t.device != x.device:
                raise ValueError(f"fastmlp FusedMLP: tensors are on different devices (input on "
                                 f"{x.device}, layer {i} {what} on {t.device})")


def _autocast(x, weights, biases):
    """Cast like nn.Linear under autocast (the cast fastmlp.ops.autocast_caster gives)."""
    cast = ops.autocast_caster(x.device.type)
    if cast is None:
        return x, weights, biases
    return cast(x), [cast(w) for w in weights], [cast(b) for b in biases]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as a matrix [prod(...), C]; reshape(-1, C) cannot do it when t is empty."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# --------------------------------------------------------------------------------------------
# The whole-stack computation: Triton kernels, or the same math with torch ops
# --------------------------------------------------------------------------------------------
def _saves(name: str, alpha: float) -> str:
    return activations.get(name).saves(alpha)


def _storage_width(widths: Sequence[int]) -> int:
    """The width of saved's and dW_mid's rows: the widest hidden layer padded to the tile width
    the fused kernels compute at (fastmlp.kernels.mlp.padded_width: the next power of two, at
    least 16), so one compiled kernel serves every width that pads to it. Both implementations
    use it: the op's outputs have one shape whichever backend runs them."""
    hidden = max(widths)
    return max(16, 1 << (hidden - 1).bit_length())


def _forward_impl(x, weights, biases, activation, alpha, out_activation, out_alpha, save):
    """(Y, saved [L, M, H] or (0,), Z_out or (0,)) for 2-D x; biases a list or None;
    H = _storage_width(hidden widths); units past a layer's width hold finite filler (act(0)
    from the kernels, 0 here), which every backward multiplies by a zero gradient.

    saved holds each hidden layer's output Y_l, or its pre-activation Z_l when the activation's
    derivative needs it; Z_out is saved only when the output activation needs it.
    """
    save_preact = _saves(activation, alpha) == "preact"
    save_out_preact = save and _saves(out_activation, out_alpha) == "preact"
    if backend.uses_triton(x.device, x.dtype):
        return _kernels().mlp_forward(x, weights, biases, activation, alpha, out_activation,
                                      out_alpha, save, save_preact, save_out_preact, _allow_tf32())
    row, out_row = activations.get(activation), activations.get(out_activation)
    widths = [w.shape[0] for w in weights[:-1]]
    saved = x.new_zeros((len(widths), x.shape[0], _storage_width(widths)) if save else (0,))
    h = x
    for i, w in enumerate(weights[:-1]):
        z = F.linear(h, w, biases[i] if biases else None)
        h = row.torch_forward(z, alpha)
        if save:
            saved[i, :, :w.shape[0]] = z if save_preact else h
    z = F.linear(h, weights[-1], biases[-1] if biases else None)
    y = out_row.torch_forward(z, out_alpha)
    return y, saved, (z if save_out_preact else x.new_empty((0,)))


def _backward_impl(grad, x, weights, saved, s_out, activation, alpha, out_activation, out_alpha,
                   needs):
    """(dX, dW_in, db_in, dW_mid [L-1, H, H], db_mid [L-1, H], dW_out, db_out), None where
    `needs` (seven flags, in that order) says no; H = _storage_width(hidden widths)."""
    saved_is_preact = _saves(activation, alpha) == "preact"
    if backend.uses_triton(grad.device, grad.dtype):
        return _kernels().mlp_backward(grad, x, weights, saved, s_out, activation, alpha,
                                       out_activation, out_alpha, saved_is_preact, tuple(needs),
                                       _allow_tf32())
    row, out_row = activations.get(activation), activations.get(out_activation)
    widths = [w.shape[0] for w in weights[:-1]]
    L, hidden = len(widths), _storage_width(widths)
    stored = [saved[i, :, :n] for i, n in enumerate(widths)]
    inputs = [x] + [row.torch_forward(s, alpha) if saved_is_preact else s for s in stored]
    dz = out_row.torch_backward(grad, s_out, out_alpha) if out_activation != "none" else grad
    dws, dbs = [None] * (L + 1), [None] * (L + 1)
    dx = None
    for layer in range(L, -1, -1):
        dws[layer] = dz.t() @ inputs[layer]
        dbs[layer] = dz.sum(0)
        if layer == 0:
            dx = dz @ weights[0] if needs[0] else None
        else:
            dy = dz @ weights[layer]
            dz = row.torch_backward(dy, stored[layer - 1], alpha) if activation != "none" else dy
    dw_mid = grad.new_zeros((L - 1, hidden, hidden))
    db_mid = grad.new_zeros((L - 1, hidden))
    for i in range(L - 1):
        dw_mid[i, :widths[i + 1], :widths[i]] = dws[i + 1]
        db_mid[i, :widths[i + 1]] = dbs[i + 1]
    out = (dx, dws[0], dbs[0], dw_mid, db_mid, dws[-1], dbs[-1])
    return tuple(t if need else None for t, need in zip(out, needs))


# --------------------------------------------------------------------------------------------
# torch.library ops (opaque nodes for torch.compile) and the autograd formula
# --------------------------------------------------------------------------------------------
def _empty_if_none(t, like):
    return t if t is not None else like.new_empty((0,))


@torch.library.custom_op("fastmlp::mlp", mutates_args=())
def mlp_op(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
           activation: str, alpha: float, out_activation: str, out_alpha: float,
           save: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y, saved, Z_out) of the stack; biases an empty list for bias-free layers."""
    y, saved, z_out = _forward_impl(x, list(weights), list(biases) or None, activation, alpha,
                                    out_activation, out_alpha, save)
    return y, saved, z_out


@mlp_op.register_fake
def _(x, weights, biases, activation, alpha, out_activation, out_alpha, save):
    widths = [w.shape[0] for w in weights[:-1]]
    M = x.shape[0]
    save_out_preact = save and _saves(out_activation, out_alpha) == "preact"
    return (x.new_empty((M, weights[-1].shape[0])),
            x.new_empty((len(widths), M, _storage_width(widths)) if save else (0,)),
            x.new_empty((M, weights[-1].shape[0]) if save_out_preact else (0,)))


@torch.library.custom_op("fastmlp::mlp_backward", mutates_args=())
def mlp_backward_op(grad: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor],
                    saved: torch.Tensor, s_out: Optional[torch.Tensor], activation: str,
                    alpha: float, out_activation: str, out_alpha: float, needs: List[bool]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seven gradients of _backward_impl; an empty (0,) tensor where not needed."""
    out = _backward_impl(grad, x, list(weights), saved, s_out, activation, alpha, out_activation,
                         out_alpha, needs)
    return tuple(_empty_if_none(t, grad) for t in out)


@mlp_backward_op.register_fake
def _(grad, x, weights, saved, s_out, activation, alpha, out_activation, out_alpha, needs):
    widths = [w.shape[0] for w in weights[:-1]]
    L, hidden, M = len(widths), _storage_width(widths), grad.shape[0]
    shapes = [(M, x.shape[1]), tuple(weights[0].shape), (widths[0],), (L - 1, hidden, hidden),
              (L - 1, hidden), tuple(weights[-1].shape), (weights[-1].shape[0],)]
    return tuple(grad.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _s_out(out_activation, out_alpha, y, z_out):
    """What the output activation's derivative reads: Y, Z_out, or nothing."""
    saves = _saves(out_activation, out_alpha)
    return y if saves == "output" else (z_out if saves == "preact" else None)


def _needs(needs_x, needs_w, needs_b):
    """The seven flags of the backward from per-tensor requires-grad flags."""
    return [bool(needs_x), bool(needs_w[0]), bool(needs_b and needs_b[0]), any(needs_w[1:-1]),
            bool(needs_b) and any(needs_b[1:-1]), bool(needs_w[-1]), bool(needs_b and needs_b[-1])]


def _split_grads(grads, weights, has_bias):
    """Per-layer (dW list, db list) from the backward's seven outputs (None where not needed)."""
    dx, dw_in, db_in, dw_mid, db_mid, dw_out, db_out = grads
    dws, dbs = [dw_in], [db_in]
    for i, w in enumerate(weights[1:-1]):
        n, k = w.shape
        dws.append(dw_mid[i, :n, :k] if dw_mid is not None else None)
        dbs.append(db_mid[i, :n] if db_mid is not None else None)
    dws.append(dw_out)
    dbs.append(db_out)
    return dx, dws, (dbs if has_bias else [])


def _backward(spec, x, weights, saved, s_out, grad, needs_x, needs_w, needs_b, use_op):
    activation, alpha, out_activation, out_alpha = spec
    needs = _needs(needs_x, needs_w, needs_b)
    if use_op:
        grads = torch.ops.fastmlp.mlp_backward(grad, x, weights, saved, s_out, activation, alpha,
                                               out_activation, out_alpha, needs)
        grads = [g if need else None for g, need in zip(grads, needs)]
    else:
        grads = _backward_impl(grad, x, weights, saved, s_out, activation, alpha, out_activation,
                               out_alpha, needs)
    dx, dws, dbs = _split_grads(grads, weights, bool(needs_b))
    dws = [g if n else None for g, n in zip(dws, needs_w)]
    dbs = [g if n else None for g, n in zip(dbs, needs_b)]
    return dx, dws, dbs


def _differentiable_backward(spec, x, weights, biases, grad, needs_x, needs_w, needs_b):
    """(dX, [dW], [db]) of the stack in torch's differentiable ops, for a backward that runs with
    grad mode on (create_graph=True): the forward recomputed from the inputs (which keep their
    history; the kernels' saved activations have none), then each layer's gradients as
    fastmlp.ops.differentiable_backward computes one layer's (the activation's torch backward
    op, so every derivative is torch's). Gradients not asked for are None; the walk down stops
    at the lowest layer anything is asked of."""
    activation, alpha, out_activation, out_alpha = spec
    L = len(weights)
    acts = [(activation, alpha)] * (L - 1) + [(out_activation, out_alpha)]
    needs_b = list(needs_b) if biases else [False] * L
    asked = [needs_w[i] or needs_b[i] for i in range(L)]
    lowest = 0 if needs_x else (asked.index(True) if True in asked else L)
    dws, dbs, dx = [None] * L, [None] * len(biases), None
    with ops._autocast_off(x.device.type):
        inputs, layers = [x], []
        for i, (w, (name, a)) in enumerate(zip(weights, acts)):
            z, h = ops.torch_preact(inputs[-1], w, biases[i] if biases else None, name, a)
            layers.append((z, h))
            inputs.append(h)
        g = grad
        for i in range(L - 1, lowest - 1, -1):
            name, a = acts[i]
            dz = ops.torch_activation_grad(g, *layers[i], name, a)
            g, dws[i], db = ops.torch_linear_grads(dz, inputs[i], weights[i],
                                                   i > lowest or needs_x, needs_w[i], needs_b[i])
            if biases:
                dbs[i] = db
        if needs_x:
            dx = g
    return dx, dws, dbs


def _op_setup_context(ctx, inputs, output):
    x, weights, biases, activation, alpha, out_activation, out_alpha, save = inputs
    y, saved, z_out = output
    ctx.spec = (activation, alpha, out_activation, out_alpha)
    ctx.num_weights = len(weights)
    ctx.save_for_backward(x, saved, _s_out(out_activation, out_alpha, y, z_out), *weights,
                          *biases)


def _op_backward(ctx, grad_y, grad_saved, grad_z_out):
    x, saved, s_out, *params = ctx.saved_tensors
    weights, biases = params[:ctx.num_weights], params[ctx.num_weights:]
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() or ops.composite_only() or ops.batched_gradient(grad_y):
        # create_graph=True, a torch.func transform, or a batched gradient (see ops._backward)
        dx, dws, dbs = _differentiable_backward(ctx.spec, x, weights, biases, grad_y, needs_x,
                                                needs_w, needs_b)
    else:
        dx, dws, dbs = _backward(ctx.spec, x, weights, saved, s_out, grad_y, needs_x, needs_w,
                                 needs_b, use_op=True)
    return dx, dws, dbs, None, None, None, None, None


mlp_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class _MLPFunction(torch.autograd.Function):
    """The eager form of fastmlp::mlp + its autograd: the same formula without the op dispatch
    (its Python dispatch costs more than the kernels on launch-bound shapes: bench/NOTES.md). apply(spec, n, x, *W, *b)."""

    @staticmethod
    def forward(ctx, spec, num_weights, x, *params):
        weights, biases = list(params[:num_weights]), list(params[num_weights:])
        activation, alpha, out_activation, out_alpha = spec
        y, saved, z_out = _forward_impl(x, weights, biases or None, activation, alpha,
                                        out_activation, out_alpha, True)
        ctx.spec, ctx.num_weights, ctx.has_bias = spec, num_weights, bool(biases)
        # The biases only feed the differentiable backward: kept on ctx with their versions (as
        # ops._save_for_backward does for one layer), so that changing one in place before a
        # first-order backward is allowed, as with nn.Linear.
        ctx.biases, ctx.bias_versions = biases, [b._version for b in biases]
        ctx.save_for_backward(x, saved, _s_out(out_activation, out_alpha, y, z_out), *weights)
        return y

    @staticmethod
    def backward(ctx, grad):
        # The kernels' backward, or (grad mode on: create_graph=True) torch's differentiable ops.
        x, saved, s_out, *weights = ctx.saved_tensors
        n = ctx.num_weights
        flags = ctx.needs_input_grad[2:]
        needs_x, needs_w = flags[0], list(flags[1:1 + n])
        needs_b = list(flags[1 + n:]) if ctx.has_bias else []
        if torch.is_grad_enabled() or ops.composite_only() or ops.batched_gradient(grad):
            # see ops._backward
            biases = [ops.unchanged_bias(b, v, "FusedMLP")
                      for b, v in zip(ctx.biases, ctx.bias_versions)]
            dx, dws, dbs = _differentiable_backward(ctx.spec, x, weights, biases, grad,
                                                    needs_x, needs_w, needs_b)
        else:
            dx, dws, dbs = _backward(ctx.spec, x, weights, saved, s_out, grad, needs_x, needs_w,
                                     needs_b, use_op=False)
        return (None, None, dx, *dws, *dbs)


def _run_fused(x2, weights, biases, spec):
    """Y of the stack through the fused kernels: the op when tracing, the Function in eager."""
    params_need_grad = torch.is_grad_enabled() and (
        x2.requires_grad or any(t.requires_grad for t in weights + biases))
    activation, alpha, out_activation, out_alpha = spec
    if torch.compiler.is_compiling() or type(x2) is not torch.Tensor:
        y, _, _ = torch.ops.fastmlp.mlp(x2, weights, biases, activation, alpha, out_activation,
                                        out_alpha, params_need_grad)
        return y
    if params_need_grad:
        return _MLPFunction.apply(spec, len(weights), x2, *weights, *biases)
    y, _, _ = _forward_impl(x2, weights, biases or None, activation, alpha, out_activation,
                            out_alpha, False)
    return y


def _run_per_layer(x, weights, biases, acts):
    from fastmlp.ops import fused_linear

    h = x
    for i, (w, (name, alpha)) in enumerate(zip(weights, acts)):
        h = fused_linear(h, w, biases[i] if biases is not None else None, name, alpha)
    return h


# --------------------------------------------------------------------------------------------
# The dispatcher
# --------------------------------------------------------------------------------------------
_choices = {}  # shape bucket -> "fused" or "per-layer", the faster one timed on this GPU


def _fusable(x, weights, biases, acts) -> bool:
    """Whether the fused kernels can take this stack (one hidden activation, one bias setting,
    widest hidden layer within the fused limit for this dtype and device).

    While torch.compile traces, torch's TF32 switch cannot be read (dynamo cannot trace its
    getter; the op reads it when it runs): fp32 then takes the fused path only at widths that
    both fp32 modes fuse.

    A stack with a width of 0 anywhere (nn.Linear allows in_features=0 and out_features=0)
    takes the per-layer path: it computes only bias terms, which is no work to fuse, and the
    per-layer launchers skip every empty GEMM outright (kernels/linear_act.py), whereas
    the fused kernels would run with zero-size operands and padded tiles of nothing, a case the
    interpreter can check but no GPU run has.
    """
    if len(weights) < 2 or len(set(acts[:-1])) != 1:
        return False
    if any(0 in w.shape for w in weights):
        return False
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return False
    hidden = max(w.shape[0] for w in weights[:-1])
    allow_tf32 = None if torch.compiler.is_compiling() else _allow_tf32()
    candidates = _kernels().fused_candidates(x.dtype, allow_tf32, hidden, x.device, acts[0][0])
    return candidates is not None


def _time_candidates(x2, weights, biases, acts, spec) -> str:
    """Time both Triton paths on these inputs and return the faster; nothing a caller holds is
    touched (inputs are detached copies).

    What is timed is what the call being dispatched runs: forward and backward when grad mode
    is on and something needs a gradient (the grads part of _bucket_key), the forward alone
    otherwise (no_grad, inference_mode: parameters still have requires_grad set there, and an
    inference-mode tensor cannot enter a backward at all). Both paths run under the inputs'
    device: do_bench's events and synchronisation work on the current device, while the
    launchers switch to the tensors' device, so timing from another device would measure nothing.
    """
    import triton.testing

    from fastmlp.kernels.launch import device_guard

    training = torch.is_grad_enabled()
    with torch.enable_grad() if training else torch.no_grad():
        xs = x2.detach().requires_grad_(training and x2.requires_grad)
        ws = [w.detach().requires_grad_(training and w.requires_grad) for w in weights]
        bs = [b.detach().requires_grad_(training and b.requires_grad)
              for b in biases if b is not None]
        leaves = [t for t in [xs] + ws + bs if t.requires_grad]
        grad = torch.randn(x2.shape[0], weights[-1].shape[0], device=x2.device, dtype=x2.dtype)

    def call(path):
        def run():
            with torch.enable_grad() if leaves else torch.no_grad():
                y = (_run_fused(xs, ws, bs, spec) if path == "fused"
                     else _run_per_layer(xs, ws, bs or None, acts))
                if leaves:
                    torch.autograd.grad(y, leaves, grad)
        return run

    with device_guard(x2.device):
        times = {path: triton.testing.do_bench(call(path), warmup=5, rep=20)
                 for path in ("fused", "per-layer")}
    return min(times, key=times.get)


def _choose(x2, weights, biases, acts) -> str:
    if not backend.uses_triton(x2.device, x2.dtype):
        return "torch"
    if not _fusable(x2, weights, biases, acts):
        return "per-layer"
    if _forced_path != "auto":
        return _forced_path
    from fastmlp.kernels import tuning

    if torch.compiler.is_compiling() or type(x2) is not torch.Tensor:
        # a static choice while tracing (no timing, no TF32 switch to read), and for tensor
        # subclasses (FakeTensor, ...: the op path of _run_fused; there is nothing to time)
        return "fused"
    if x2.device.type != "cuda" or not tuning.autotune_enabled() or tuning.ranks_must_agree():
        return _choices.get(_bucket_key(x2, weights, biases, acts), "fused")
    key = _bucket_key(x2, weights, biases, acts)
    choice = _choices.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return "fused"  # no timing inside a CUDA-graph capture (fit warms up before it)
        choice = _choices[key] = _time_candidates(
            x2, weights, biases, acts, _spec(acts))
    return choice


def _bucket_key(x2, weights, biases, acts):
    from fastmlp.kernels import tuning

    grads = torch.is_grad_enabled() and (x2.requires_grad, tuple(w.requires_grad for w in weights),
                                         tuple(b.requires_grad for b in biases if b is not None))
    return (x2.device, x2.dtype, _allow_tf32(), tuning.bucket(x2.shape[0]),
            tuple(tuple(w.shape) for w in weights), biases[0] is not None, tuple(acts), grads)


def _spec(acts):
    return acts[0] + acts[-1]  # (activation, alpha, out_activation, out_alpha)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------
class FusedMLP(nn.Module):
    """Linear → act → … → Linear [→ output_activation], computed as one fused op where it can be.

    Args:
        in_features, out_features: the first layer's input and the last layer's output width.
        hidden_features: the hidden widths, one per hidden layer. An empty list is one Linear
            (then ``output_activation``): ``nn.Sequential(nn.Linear)`` is an MLP too, and
            ``from_sequential`` takes it, so the constructor does. Every width may be 0, as
            nn.Linear's may (in_features=0: the output is the bias, through the activations).
        activation: after every hidden layer: None, a name from fastmlp.ACTIVATIONS, or a torch
            activation module (nn.ReLU(), nn.LeakyReLU(0.2), nn.GELU(), ...).
        bias: whether every Linear has a bias.
        output_activation: after the last Linear, the same choices (default None).
        device, dtype: of the parameters, as nn.Linear.

    Children and state_dict keys are those of ``nn.Sequential(nn.Linear, act, nn.Linear, act,
    ..., nn.Linear[, output act])``: "0.weight", "0.bias", "2.weight", ...; an activation slot
    is nn.Identity when activation is None. Parameters are initialised as nn.Linear does, in
    the same order, so a FusedMLP and that Sequential built after the same torch.manual_seed
    hold the same values.
    """

    def __init__(self, in_features: int, hidden_features: Sequence[int], out_features: int, *,
                 activation="relu", bias: bool = True, output_activation=None, device=None,
                 dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_features, int) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hidden_features):
            raise TypeError(f"fastmlp FusedMLP: hidden_features must be a list of ints, got "
                            f"{hidden_features!r}")
        widths = [in_features, *hidden_features, out_features]
        got = (f"in_features={in_features!r}, hidden_features={list(hidden_features)!r}, "
               f"out_features={out_features!r}")
        if any(not isinstance(n, int) or isinstance(n, bool) for n in widths):
            raise TypeError(f"fastmlp FusedMLP: widths must be ints, got {got}")
        if any(n < 0 for n in widths):
            raise ValueError(f"fastmlp FusedMLP: widths must be non-negative (0 is allowed, as "
                             f"in nn.Linear), got {got}")
        act, out_act = activations.resolve(activation), activations.resolve(output_activation)
        modules: List[nn.Module] = []
        for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
            modules.append(nn.Linear(k, n, bias=bias, device=device, dtype=dtype))
            if i < len(widths) - 2:
                modules.append(_module_for(*act))
        if output_activation is not None:
            modules.append(_module_for(*out_act))
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "FusedMLP":
        """A FusedMLP over seq's own modules (parameters shared, not copied), same child names.

        seq may hold nn.Linear (or fastmlp.FusedLinear), supported activation modules (at most
        one after each Linear) and nn.Identity; anything else is an error naming the module. A
        single Linear (with or without an activation after it) is an MLP without hidden layers,
        as ``FusedMLP(in, [], out)`` is.

        Hooks: a hook the FusedMLP would not run (on a child, on seq itself, or one of torch's
        global module hooks; see ``hook_blocker``) is a ValueError naming the module and the
        hook, rather than a model that silently computes something else on the Triton backend.
        """
        if not isinstance(seq, nn.Sequential):
            raise TypeError(f"fastmlp FusedMLP.from_sequential: expected an nn.Sequential, got "
                            f"{type(seq).__name__}")
        _parse(list(seq.named_children()), "FusedMLP.from_sequential")
        why = hook_blocker(seq)
        if why is not None:
            raise ValueError(
                f"fastmlp FusedMLP.from_sequential: {why}: a FusedMLP stands in for the "
                f"nn.Sequential and computes the stack without calling its children on the Triton "
                f"backend. Remove the hook, register it on the FusedMLP, or keep the nn.Sequential")
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        for name, module in seq.named_children():
            mlp.add_module(name, module)
        mlp.train(seq.training)
        return mlp

    # Sequential-style access to the children
    def __getitem__(self, index: int) -> nn.Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def _plan(self):
        """(linears, acts) of the current children, parsed again whenever a child or an
        activation's parameter changed (a key of a few dozen attribute reads, far cheaper than the parse: bench/NOTES.md)."""
        key = tuple((m, getattr(m, "negative_slope", None), getattr(m, "approximate", None),
                     getattr(m, "activation", None), getattr(m, "activation_alpha", None))
                    for m in self._modules.values())
        cached = self.__dict__.get("_plan_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = _parse(list(self._modules.items()), "FusedMLP")
        if not torch.compiler.is_compiling():
            self.__dict__["_plan_cache"] = (key, plan)
        return plan

    @property
    def in_features(self) -> int:
        return self._plan()[0][0].in_features

    @property
    def out_features(self) -> int:
        return self._plan()[0][-1].out_features

    @property
    def hidden_features(self) -> List[int]:
        return [lin.out_features for lin in self._plan()[0][:-1]]

    def reset_parameters(self) -> None:
        for lin in self._plan()[0]:
            lin.reset_parameters()

    def _prepare(self, input):
        linears, acts = self._plan()
        weights = [lin.weight for lin in linears]
        biases = [lin.bias for lin in linears]
        _check_inputs(input, weights, biases)
        sharding.check_fused_mlp(weights, biases, input)   # a TP plan on the layers: an error
        x, weights, biases = _autocast(input, weights, biases)
        _check_same(x, weights, biases)
        return x, weights, biases, acts

    def _hooked(self) -> bool:
        """Whether a child has a call hook (registered after this FusedMLP was built: fuse and
        from_sequential leave hooked stacks alone) or torch has a global module hook. The
        kernels would skip them, so the stack then runs module by module, as nn.Sequential
        runs it, and every hook sees what it would see there."""
        if hooks.global_module_hook() is not None:
            return True
        return any(getattr(m, name) for m in self._modules.values() for name in hooks.CALL_HOOKS)

    def path(self, input: torch.Tensor) -> str:
        """Which computation forward(input) takes now: "torch", "fused" or "per-layer"."""
        x, weights, biases, acts = self._prepare(input)
        if self._hooked():
            return "torch"
        return _choose(_rows(x), weights, biases, acts)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and (
                not backend.uses_triton(input.device, input.dtype)
                or ops.composite_only() or self._hooked()):
            # The torch path is the children's own forward, as nn.Sequential runs it; the input
            # checks run only to turn a failure into fastmlp's error message. torch.func
            # transforms and forward-mode AD take it on the Triton backend too (see
            # fastmlp.ops.composite_only), and so does a stack with a hook (_hooked).
            sharding.check_fused_mlp_module(self)   # as on the Triton path (_prepare)
            try:
                h = input
                for module in self._modules.values():
                    h = module(h)
                return h
            except (RuntimeError, TypeError, ValueError):
                self._prepare(input)
                raise
        x, weights, biases, acts = self._prepare(input)
        x2 = _rows(x)
        path = _choose(x2, weights, biases, acts)
        if path == "per-layer":
            y2 = _run_per_layer(x2, weights, biases, acts)
        else:
            y2 = _run_fused(x2, weights, biases if biases[0] is not None else [], _spec(acts))
        return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], y2.shape[-1])


def fuse_sequentials(model: nn.Module) -> nn.Module:
    """Replace every nn.Sequential in `model` that FusedMLP.from_sequential accepts and that has
    at least two Linear layers by a FusedMLP over the same modules: parameters shared, state_dict
    keys unchanged. A stack with hooks that a FusedMLP would not run (see ``hook_blocker``) is
    left as it is. Returns the model (a FusedMLP if `model` itself is such a Sequential)."""
    return stacks_to_fused_mlps(model)[0]


def stacks_to_fused_mlps(model: nn.Module) -> Tuple[nn.Module, List[Tuple[str, str]]]:
    """fuse_sequentials(model) and what it did with each stack: (qualified name, outcome) for
    every exact nn.Sequential with two or more Linear children, outcome "FusedMLP" or why it
    was left (not a stack FusedMLP computes, or hooks it would not run). fastmlp.fuse(mlp=True)
    puts these in its report."""
    outcomes: List[Tuple[str, str]] = []

    def convert(module, name):
        if sum(_linear_of(m) is not None for m in module.children()) < 2:
            return None
        if type(module) is not nn.Sequential:
            why = _not_a_stack(module)
            if why is not None:
                outcomes.append((name, why))
            return None
        try:
            _parse(list(module.named_children()), "fuse")
        except (TypeError, ValueError) as exc:
            outcomes.append((name, str(exc).replace("fastmlp fuse: ", "", 1)))
            return None
        why = hook_blocker(module)
        if why is not None:
            outcomes.append((name, why))
            return None
        outcomes.append((name, "FusedMLP"))
        return FusedMLP.from_sequential(module)

    root = convert(model, "")
    if root is not None:
        return root, outcomes
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            replacement = convert(child, f"{parent_name}.{name}" if parent_name else name)
            if replacement is not None:
                parent._modules[name] = replacement
    return model, outcomes


def _not_a_stack(module: nn.Module) -> Optional[str]:
    """Why an MLP-looking module that is not an exact nn.Sequential (a Sequential subclass, or a
    module with two or more Linear children and an activation child) is not made a FusedMLP;
    None for other modules (attention blocks: not MLPs, nothing to say)."""
    kind = type(module).__name__
    if isinstance(module, nn.Sequential):
        return (f"a subclass of nn.Sequential ({kind}): only nn.Sequential itself becomes a "
                f"FusedMLP (a subclass may compute something else)")
    from fastmlp.activation_modules import module_activation

    if any(module_activation(m) is not None for m in module.children()):
        return (f"not an nn.Sequential ({kind}, a forward of its own): FusedMLP takes only "
                f"nn.Sequential stacks, so its layers go through the pair pass")
    return None


def hook_blocker(seq: nn.Sequential) -> Optional[str]:
    """Why a FusedMLP over seq's modules would not run a hook that seq runs, or None.

    A FusedMLP on the Triton backend computes the stack without calling its children, so their
    call hooks (forward pre-, forward, backward pre-, backward hooks: fastmlp.hooks.CALL_HOOKS)
    would not run, nor would torch's global module hooks see the layers; and it stands in for
    seq, so every hook on seq itself (its state_dict hooks too) would be gone. The children's
    state_dict hooks still run: the FusedMLP holds the very same child modules. The check is
    fastmlp.hooks', the one fastmlp.fuse applies to each Linear it fuses.
    """
    found = hooks.global_module_hook()
    if found is not None:
        return f"{found} is registered (a FusedMLP would hide the stack's layers from it)"
    found = hooks.registered(seq, hooks.ALL_HOOKS)
    if found:
        return (f"the nn.Sequential itself has {', '.join(found)} registered (a FusedMLP would "
                f"stand in for it without them)")
    for name, module in seq.named_children():
        found = hooks.registered(module, hooks.CALL_HOOKS)
        if found:
            return (f"module {name!r} ({type(module).__name__}) has {', '.join(found)} registered "
                    f"(a FusedMLP would not run them)")
    return None
