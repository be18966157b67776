"""The whole-MLP operator behind FusedMLP: checks, torch reference, torch.library ops, autograd,
path choice.

A stack of Linears, Linear → act → … → Linear [→ output act], computed as one operator where
it can be. Its module is fastmlp.nn.FusedMLP (children named as in nn.Sequential); this file
is what the module calls on the Triton backend, in the layers fastmlp/ops.py has for one
Linear+activation:

1. ``prepare_inputs``: every bad input (type, dtype, shape, device, a tensor-parallel plan on
   the layers) becomes a ValueError/TypeError naming the problem before any kernel sees it,
   and the inputs are cast as nn.Linear casts them under autocast.
2. The torch implementation (``torch_forward``, ``torch_backward``): the same math as the
   kernels with torch's ops and the same outputs, padding included (the torch backend of the
   ops, meta tensors), and ``_differentiable_backward``, the stack's gradients in
   differentiable torch ops.
3. Two ``torch.library`` custom ops with fake kernels, ``fastmlp::mlp`` and
   ``fastmlp::mlp_backward``, so ``torch.compile(fullgraph=True)`` sees the stack as opaque
   nodes with known shapes; each dispatches per call to the Triton launchers
   (kernels/mlp.py) or to the torch implementation (fastmlp.backend decides).
4. One autograd formula, used by the registered op (``register_autograd``) and by
   ``_MLPFunction``, its eager form.
5. The path choice (``choose_path``) and the front (``fused_mlp``):

   * ``"fused"``: the whole stack in one autograd node: one kernel streams each row tile
     through every layer with its activations kept in registers; backward walks the layers
     top down per row tile (each layer's activation derivative applied in the epilogue of the
     layer above's dX GEMM) and then computes every weight gradient as a plain GEMM of the
     masked gradients, all middle layers in one launch (kernels/mlp_kernels.py). Taken when
     the hidden layers share one activation and one bias setting and the widest hidden layer
     is within the fully fused limit for the dtype and GPU (``fused_candidates`` in
     kernels/mlp.py: the widths every shipped config compiles for without register spills).
   * ``"per-layer"``: fastmlp.ops.fused_linear per layer through autograd, the fused
     Linear+activation kernels. Taken past the fused limit, for mixed activations, and on a
     GPU wherever it times faster: the first call of each shape bucket times both candidates
     (forward, plus backward when gradients are needed) and keeps the faster, so the fused
     path is never slower than the per-layer one by more than timing noise. The timing and
     its cache are the kernels' autotuner's (fastmlp.kernels.tuning.pick, one entry per
     bucket), so a given choice is deterministic, FASTMLP_AUTOTUNE=0 means "fused", and so
     does a multi-rank DTensor program (tuning.ranks_must_agree).

Higher derivatives: the fused path's backward is the kernels' unless autograd builds a graph of
it (create_graph=True); then the stack is recomputed from its inputs with torch's ops and each
layer's gradient taken with the activation's torch backward op (``_differentiable_backward``),
so every derivative is nn.Sequential's. Under torch.func transforms and forward-mode AD the
module takes its torch path on either backend (fastmlp.ops.composite_only).
"""

import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastmlp import activations, backend, ops, sharding
from fastmlp.kernels.configs import padded_width

__all__ = ["PATHS", "use_path", "prepare_inputs", "torch_forward", "torch_backward", "mlp_op",
           "mlp_backward_op", "choose_path", "fused_mlp"]

PATHS = ("auto", "fused", "per-layer")
_TIMED_PATHS = ("fused", "per-layer")   # what the path choice times, its default first
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
    """The Triton launchers, imported only when a Triton path runs (importing triton is slow:
    bench/NOTES.md)."""
    from fastmlp.kernels import mlp
    return mlp


def _tuning():
    """The kernels' autotuner, imported when the path choice first needs it: it reads
    TRITON_INTERPRET when imported, which must happen no earlier than the kernels' import."""
    from fastmlp.kernels import tuning
    return tuning


_rows = ops._rows   # t [..., C] as a matrix [prod(...), C]


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


def prepare_inputs(x, weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]]):
    """(x, weights, biases) as the stack computes them: checked (a clear error for anything the
    kernels cannot take, and for weights sharded by a tensor-parallel plan, whose hooks the
    stack would not run: fastmlp.sharding.check_fused_mlp), then cast as nn.Linear casts under
    autocast. biases: one per weight, None for a layer without one."""
    _check_inputs(x, weights, biases)
    sharding.check_fused_mlp(weights, biases, x)
    x, weights, biases = _autocast(x, weights, biases)
    _check_same(x, weights, biases)
    return x, weights, biases


# --------------------------------------------------------------------------------------------
# The whole-stack computation: Triton kernels, or the same math with torch ops
# --------------------------------------------------------------------------------------------
def _saves(name: str, alpha: float) -> str:
    return activations.get(name).saves(alpha)


def _storage_width(widths) -> int:
    """The width of saved's and dW_mid's rows: the widest hidden layer padded to the tile width
    the fused kernels compute at (fastmlp.kernels.configs.padded_width), so one compiled kernel
    serves every width that pads to it. Both implementations use it: the op's outputs have one
    shape whichever backend runs them."""
    return padded_width(max(widths))


def torch_forward(x, weights, biases, activation, alpha, out_activation, out_alpha, save,
                  save_preact, save_out_preact):
    """mlp_forward's outputs (kernels/mlp.py) computed with torch's ops: (Y, saved [L, M, H] or
    (0,), Z_out or (0,)) for 2-D x, biases a list or None; units of saved past a layer's width
    hold 0."""
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


def torch_backward(grad, x, weights, saved, s_out, activation, alpha, out_activation, out_alpha,
                   saved_is_preact, needs):
    """mlp_backward's outputs (kernels/mlp.py) computed with torch's ops: (dX, dW_in, db_in,
    dW_mid [L-1, H, H], db_mid [L-1, H], dW_out, db_out), None where `needs` says no; the
    padding of dW_mid and db_mid holds 0."""
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


def _forward_impl(x, weights, biases, activation, alpha, out_activation, out_alpha, save):
    """(Y, saved [L, M, H] or (0,), Z_out or (0,)) for 2-D x; biases a list or None;
    H = _storage_width(hidden widths); units past a layer's width hold finite filler (act(0)
    from the kernels, 0 from torch), which every backward multiplies by a zero gradient.

    saved holds each hidden layer's output Y_l, or its pre-activation Z_l when the activation's
    derivative needs it; Z_out is saved only when the output activation needs it.
    """
    save_preact = _saves(activation, alpha) == "preact"
    save_out_preact = save and _saves(out_activation, out_alpha) == "preact"
    if backend.uses_triton(x.device, x.dtype):
        return _kernels().mlp_forward(x, weights, biases, activation, alpha, out_activation,
                                      out_alpha, save, save_preact, save_out_preact,
                                      ops._allow_tf32())
    return torch_forward(x, weights, biases, activation, alpha, out_activation, out_alpha, save,
                         save_preact, save_out_preact)


def _backward_impl(grad, x, weights, saved, s_out, activation, alpha, out_activation, out_alpha,
                   needs):
    """(dX, dW_in, db_in, dW_mid [L-1, H, H], db_mid [L-1, H], dW_out, db_out), None where
    `needs` (seven flags, in that order) says no; H = _storage_width(hidden widths)."""
    saved_is_preact = _saves(activation, alpha) == "preact"
    if backend.uses_triton(grad.device, grad.dtype):
        return _kernels().mlp_backward(grad, x, weights, saved, s_out, activation, alpha,
                                       out_activation, out_alpha, saved_is_preact, tuple(needs),
                                       ops._allow_tf32())
    return torch_backward(grad, x, weights, saved, s_out, activation, alpha, out_activation,
                          out_alpha, saved_is_preact, needs)


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
    """The eager form of fastmlp::mlp + its autograd: the same formula without the op dispatch,
    whose Python cost shows on launch-bound shapes (bench/NOTES.md). apply(spec, n, x, *W, *b)."""

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
    h = x
    for i, (w, (name, alpha)) in enumerate(zip(weights, acts)):
        h = ops.fused_linear(h, w, biases[i] if biases is not None else None, name, alpha)
    return h


# --------------------------------------------------------------------------------------------
# The path choice and the front
# --------------------------------------------------------------------------------------------
def _fusable(x, weights, biases, acts) -> bool:
    """Whether the fused kernels can take this stack (one hidden activation, one bias setting,
    widest hidden layer within the fused limit for this dtype and device).

    While torch.compile traces, torch's TF32 switch cannot be read (dynamo cannot trace its
    getter; the op reads it when it runs): fp32 then takes the fused path only at widths that
    both fp32 modes fuse.

    A stack with a width of 0 anywhere (nn.Linear allows in_features=0 and out_features=0)
    takes the per-layer path: it computes only bias terms, which is no work to fuse, and the
    per-layer launchers skip every empty GEMM outright (kernels/linear_act.py), whereas the
    fused kernels would run with zero-size operands and padded tiles of nothing, a case only
    the interpreter checks.
    """
    if len(weights) < 2 or len(set(acts[:-1])) != 1:
        return False
    if any(0 in w.shape for w in weights):
        return False
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return False
    hidden = max(w.shape[0] for w in weights[:-1])
    allow_tf32 = None if torch.compiler.is_compiling() else ops._allow_tf32()
    candidates = _kernels().fused_candidates(x.dtype, allow_tf32, hidden, x.device, acts[0][0])
    return candidates is not None


def _time_candidates(x2, weights, biases, acts, spec) -> str:
    """Time both Triton paths on these inputs and return the faster (tuning.fastest); nothing a
    caller holds is touched (inputs are detached copies).

    What is timed is what the call being dispatched runs: forward and backward when grad mode
    is on and something needs a gradient (the grads part of _path_key), the forward alone
    otherwise (no_grad, inference_mode: parameters still have requires_grad set there, and an
    inference-mode tensor cannot enter a backward at all). Both paths run under the inputs'
    device: do_bench's events and synchronisation work on the current device, while the
    launchers switch to the tensors' device, so timing from another device would measure nothing.
    """
    from fastmlp.kernels import launch

    training = torch.is_grad_enabled()
    with torch.enable_grad() if training else torch.no_grad():
        xs = x2.detach().requires_grad_(training and x2.requires_grad)
        ws = [w.detach().requires_grad_(training and w.requires_grad) for w in weights]
        bs = [b.detach().requires_grad_(training and b.requires_grad)
              for b in biases if b is not None]
        leaves = [t for t in [xs] + ws + bs if t.requires_grad]
        grad = torch.randn(x2.shape[0], weights[-1].shape[0], device=x2.device, dtype=x2.dtype)

    def run(path):
        with torch.enable_grad() if leaves else torch.no_grad():
            y = (_run_fused(xs, ws, bs, spec) if path == "fused"
                 else _run_per_layer(xs, ws, bs or None, acts))
            if leaves:
                torch.autograd.grad(y, leaves, grad)

    with launch.device_guard(x2.device):
        return _tuning().fastest(_TIMED_PATHS, run, "a FusedMLP")


def _path_key(x2, weights, biases, acts):
    """The path choice's entry in the autotuner's cache: one per shape bucket, dtype, fp32 mode,
    activations and which tensors need gradients."""
    grads = torch.is_grad_enabled() and (x2.requires_grad, tuple(w.requires_grad for w in weights),
                                         tuple(b.requires_grad for b in biases if b is not None))
    return ("mlp-path", x2.device, x2.dtype, ops._allow_tf32(), _tuning().bucket(x2.shape[0]),
            tuple(tuple(w.shape) for w in weights), biases[0] is not None, tuple(acts), grads)


def _spec(acts):
    return acts[0] + acts[-1]  # (activation, alpha, out_activation, out_alpha)


def choose_path(x2, weights, biases, acts) -> str:
    """Which computation the stack takes for 2-D x2: "torch" (the torch backend), "per-layer"
    (a stack the fused kernels cannot take, or the faster one), or "fused" (see the module
    docstring); prepared inputs, biases one per weight (None for none), acts (name, alpha) per
    layer."""
    if not backend.uses_triton(x2.device, x2.dtype):
        return "torch"
    if not _fusable(x2, weights, biases, acts):
        return "per-layer"
    if _forced_path != "auto":
        return _forced_path
    if torch.compiler.is_compiling() or type(x2) is not torch.Tensor:
        # a static choice while tracing (no timing, no TF32 switch to read), and for tensor
        # subclasses (FakeTensor, ...: the op path of _run_fused; there is nothing to time)
        return "fused"
    return _tuning().pick(_path_key(x2, weights, biases, acts), _TIMED_PATHS, x2.device,
                          lambda: _time_candidates(x2, weights, biases, acts, _spec(acts)))


def fused_mlp(x, weights, biases, acts):
    """The stack of prepared inputs (prepare_inputs) on the Triton backend, by the path
    choose_path picks: x [..., in_features] -> [..., out_features]."""
    x2 = _rows(x)
    if choose_path(x2, weights, biases, acts) == "per-layer":
        y2 = _run_per_layer(x2, weights, biases, acts)
    else:
        y2 = _run_fused(x2, weights, biases if biases[0] is not None else [], _spec(acts))
    return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], y2.shape[-1])
