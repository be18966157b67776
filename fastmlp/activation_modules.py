"""Which supported activation a module computes, for fastmlp.fuse (and GatedMLP.from_module).

Three ways, tried in order:

1. torch's own activation modules, by exact type (``fastmlp.activations.from_module``);
2. a parameterless wrapper whose forward is one supported call on its input, the same in
   training and eval mode (Hugging Face's ``GELUActivation``, ``GELUTanh``, ``SiLUActivation``);
3. a parameterless module whose forward is a formula of pointwise ops on its input that computes
   a supported activation: transformers' ``gelu_new`` / ``gelu_fast`` / ``gelu_accurate`` /
   ``gelu_python`` spellings, minGPT's ``NewGELU``. The formula's ops are read from its trace
   (pointwise ops and Python numbers only, so it is an elementwise function of its input); which
   activation it is, is measured: on float64 points (a grid over [-10, 10], points off it,
   magnitudes 1e-8 to 1e4, 0, ±inf and NaN), its values and autograd derivative must agree with the row's torch ops to within 2⁻²⁴
   relative (below float32's rounding, so within every dtype the kernels take), with NaN and
   ±inf where torch's op has them. gelu_new's formula is torch's tanh-GELU written out, and
   agrees to float64 rounding; gelu_fast's rounded constant 0.7978845608 moves it by about 1e-11,
   which only float64 inputs could see.
"""

import math
import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fastmlp import activations, tracing

__all__ = ["module_activation", "is_torch_module", "has_own_forward", "uses"]

# A formula module's trace may hold only these (elementwise, deterministic) ops.
_POINTWISE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.square,
    torch.tanh, torch.sigmoid, torch.erf, torch.exp, torch.sqrt, torch.rsqrt, torch.abs,
    torch.special.erf, torch.special.expit, F.gelu, F.silu, F.relu, F.sigmoid, F.tanh, torch.relu,
})
_POINTWISE_METHODS = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "square", "tanh", "sigmoid", "erf", "exp", "sqrt",
    "rsqrt", "abs", "relu",
})
_TOLERANCE = 2.0 ** -24
# Where the activation is ~0 (tails), formulas and torch's vectorised ops round differently
# (-4e-16 against -0.0 at -7.2): below float32's rounding of the input's own size squared.
_FLOOR = 2.0 ** -48


def is_torch_module(m: nn.Module) -> bool:
    """One of torch's own module classes (its forward is torch's, often with fast paths that a
    trace would freeze). An fx.GraphModule is code fx wrote: fuse traces it like a user's."""
    return type(m).__module__.split(".")[0] == "torch" and not isinstance(m, fx.GraphModule)


def has_own_forward(m: nn.Module) -> bool:
    return getattr(type(m), "forward", None) is not nn.Module.forward


def module_activation(m: nn.Module) -> Optional[Tuple[str, float]]:
    """(name, alpha) of the supported activation that module `m` computes, or None (this
    module's docstring says how it is recognised)."""
    if "forward" in vars(m):
        return None          # its forward replaced on the instance: not what its class computes
    found = activations.from_module(m)
    if found is not None:
        return found
    graph = _single_input_graph(m)
    if graph is None:
        return None
    return _wrapper_activation(graph) or _formula_activation(m, graph)


def _single_input_graph(m: nn.Module) -> Optional[fx.Graph]:
    """The trace of a user's parameterless, stateless module with one input, if it is the same
    in training and eval mode; else None."""
    if (is_torch_module(m) or not has_own_forward(m) or m._modules or m._parameters
            or m._buffers or tracing.forward_optionals(m) != ({}, [])):
        return None
    state = dict(vars(m))
    try:
        graphs = [tracing.trace(m, True, True), tracing.trace(m, False, False)]
    except Exception:  # noqa: BLE001 - untraceable: not an activation fuse can see
        return None
    changed = vars(m).keys() != state.keys() or any(vars(m)[k] is not v for k, v in state.items())
    if changed:
        return None          # its forward changes the module's own state: not a plain function
    if tracing.code(graphs[0]) != tracing.code(graphs[1]):
        return None
    placeholders = [n for n in graphs[0].nodes if n.op == "placeholder"]
    return graphs[0] if len(placeholders) == 1 else None


def _wrapper_activation(graph: fx.Graph) -> Optional[Tuple[str, float]]:
    """A forward that is one supported call on its input (e.g. GELUActivation)."""
    nodes = list(graph.nodes)
    if len(nodes) != 3 or nodes[0].op != "placeholder" or nodes[2].op != "output":
        return None
    x, call, out = nodes
    if call.op in ("call_function", "call_method") and call.args and call.args[0] is x \
            and out.args == (call,) and not uses(call.args[1:], call.kwargs, x):
        return activations.from_call(call.op, call.target, tuple(call.args[1:]),
                                     dict(call.kwargs))
    return None


def uses(args, kwargs, node: fx.Node) -> bool:
    """Whether node appears among args/kwargs (nested containers included)."""
    seen = []
    fx.node.map_arg((tuple(args), dict(kwargs)), lambda n: seen.append(n) or n)
    return any(n is node for n in seen)


# --------------------------------------------------------------------------------------------
# A formula of pointwise ops, measured against the table's rows
# --------------------------------------------------------------------------------------------
def _is_pointwise_formula(graph: fx.Graph) -> bool:
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS:
            pass
        elif node.op == "call_method" and node.target in _POINTWISE_METHODS:
            pass
        else:
            return False
        constants = []
        fx.node.map_aggregate((node.args, node.kwargs), lambda a: constants.append(a) or a)
        for a in constants:
            if not isinstance(a, (fx.Node, int, float, bool, str, type(None))):
                return False
    return True


def _probe() -> torch.Tensor:
    """A grid over [-10, 10], seeded points off it over [-20, 20], magnitudes from 1e-8 to 1e4
    of both signs, and 0, ±inf, NaN. A sample: a formula built to differ from an activation
    only between these points would pass (none of the activations' spellings does)."""
    special = [0.0, -0.0, math.inf, -math.inf, math.nan]
    magnitudes = torch.logspace(-8, 4, 241, dtype=torch.float64)
    off_grid = torch.rand(4000, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64) * 40 - 20
    return torch.cat([torch.linspace(-10.0, 10.0, 2001, dtype=torch.float64), off_grid,
                      magnitudes, -magnitudes, torch.tensor(special, dtype=torch.float64)])


def _agree(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, finite_only: bool) -> bool:
    """got within _TOLERANCE of want relative, plus _FLOOR times max(|x|, 1); the same NaN and
    ±inf (unless finite_only)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    finite = torch.isfinite(want)
    if not finite_only and not torch.equal(torch.isnan(got), torch.isnan(want)):
        return False
    if not finite_only and not torch.equal(got[torch.isinf(want)], want[torch.isinf(want)]):
        return False
    g, w, scale = got[finite], want[finite], x[finite].abs().clamp(min=1.0)
    if not torch.isfinite(g).all():
        return False
    return bool(((g - w).abs() <= _TOLERANCE * w.abs() + _FLOOR * scale).all())


def _formula_activation(m: nn.Module, graph: fx.Graph) -> Optional[Tuple[str, float]]:
    if not _is_pointwise_formula(graph):
        return None
    # Run the traced formula, not the module: no hooks of it (or torch's global ones) see the
    # probe, and nothing of the module runs a third time.
    formula = fx.GraphModule(nn.Module(), graph).forward   # .forward: no module call hooks
    x = _probe()
    try:
        with torch.no_grad():
            y = formula(x)
        xg = x[torch.isfinite(x)].clone().requires_grad_(True)
        (dy,) = torch.autograd.grad(formula(xg).sum(), xg)
    except Exception:  # noqa: BLE001 - a formula that fails on float64 input is not one of ours
        return None
    for row in activations.TABLE.values():
        if row.name == "none" or row.alpha_name is not None:
            continue   # a parameter (leaky_relu's slope) cannot be read off a formula here
        alpha = row.default_alpha
        with torch.no_grad():
            want = row.torch_forward(x, alpha)
            z = xg.detach()
            saved = row.torch_forward(z, alpha) if row.saves(alpha) == "output" else z
            want_grad = row.torch_backward(torch.ones_like(z), saved, alpha)
        if _agree(y, want, x, finite_only=False) and _agree(dy, want_grad, z, finite_only=True):
            return row.name, alpha
    return None
