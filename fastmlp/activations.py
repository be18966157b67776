"""The activations fastmlp fuses into a Linear: one row each, everything said about it in one place.

Each row here is the torch side of a row of the kernels' table (kernels/activations.py, shipped
as ``fastmlp.kernels.activations``), which holds what the kernels need and fastmlp reads from
there, never restates: ``saves(alpha)`` (what backward keeps besides X and W: ``"output"``, Y,
which the layer returns anyway; ``"preact"``, the pre-activation Z, written by the forward as a
second output only when autograd will need it; or ``"nothing"``), ``default_alpha`` (the
parameter a name alone means), whether the derivative is a select or math, which GPUs fuse its
backward, and where its jit functions live (kernels/activation_jit.py). A row here says:

* ``name``: the public name (``fastmlp.ACTIVATIONS``), the kernels' row of the same name;
* ``torch_forward(z, alpha)`` / ``torch_backward(grad, saved, alpha)``: torch's own forward and
  backward ops, the reference the kernels are tested against and the implementation of fastmlp's
  torch backend (CPU, float64 on GPUs, meta tensors);
* ``torch_backward_graph(grad, saved, alpha)``, where it differs from ``torch_backward``: what
  torch's autograd computes instead when it builds a graph of the backward (create_graph=True).
  Every other row's backward op is differentiable in torch (threshold_backward,
  leaky_relu_backward, gelu_backward, sigmoid_backward, tanh_backward), and torch's own graph uses
  it then too; silu_backward is not, and torch then writes SiLU's derivative in plain ops;
* ``module`` and ``match_module(m)``: the nn module it replaces (``fuse``, ``FusedLinear(activation=nn.GELU())``),
  and ``make_module(alpha)``, the module that computes it (FusedMLP's children, the benchmarks'
  baselines; default ``module()``);
* ``functions``, ``methods`` and ``match_call(args, kwargs)``: the functional spellings that
  ``fuse`` finds in a traced ``forward`` (``F.gelu(h)``, ``torch.tanh(h)``, ``h.relu()``);
* ``epilogue``: the cuBLASLt GEMM epilogue that computes it (``torch._addmm_activation``:
  ``"relu"``, or ``"gelu"``, which is GELU's tanh form), or None;
* ``alpha_name``: the name of its parameter in torch's API, for repr (None: it takes none).

Adding an activation (CONTRIBUTING.md): its jit forward and derivative in
kernels/activation_jit.py, its row in kernels/activations.py, its row here, and its name in the
tests' parameter list. ``register`` adds a row at run time (tests, experiments), after its
kernels' row.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastmlp.kernels import activations as _kernel_table   # the kernels' rows: no triton import

aten = torch.ops.aten

# What a row's match functions return: the activation's parameter (alpha) if the module or call
# is this activation, else None.
_NO_MATCH = None


@dataclass(frozen=True)
class Activation:
    name: str
    torch_forward: Callable[[torch.Tensor, float], torch.Tensor]
    torch_backward: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    module: Optional[type] = None
    match_module: Callable[[nn.Module], Optional[float]] = lambda m: 0.0
    make_module: Optional[Callable[[float], nn.Module]] = None
    functions: Tuple[Callable, ...] = ()
    methods: Tuple[str, ...] = ()
    match_call: Callable[[tuple, dict], Optional[float]] = lambda args, kwargs: 0.0
    epilogue: Optional[str] = None
    alpha_name: Optional[str] = None
    torch_backward_graph: Optional[Callable[[torch.Tensor, torch.Tensor, float],
                                            torch.Tensor]] = None
    doc: str = field(default="", compare=False)

    def __post_init__(self):
        _kernel_table.get(self.name)   # a ValueError unless the kernels' table has the row

    @property
    def kernel(self) -> "_kernel_table.KernelActivation":
        """The kernels' row of the same name (kernels/activations.py)."""
        return _kernel_table.TABLE[self.name]

    @property
    def saves(self) -> Callable[[float], str]:
        """saves(alpha): "output", "preact" or "nothing" (the kernels' row says)."""
        return self.kernel.saves

    @property
    def default_alpha(self) -> float:
        return self.kernel.default_alpha

    def new_module(self, alpha: float) -> nn.Module:
        """The torch module computing this activation with parameter `alpha`."""
        return self.make_module(alpha) if self.make_module is not None else self.module()

    def differentiable_backward(self, grad, saved, alpha):
        """G ⊙ act'(Z) in ops autograd can differentiate again, as torch's graph computes it."""
        if self.torch_backward_graph is not None:
            return self.torch_backward_graph(grad, saved, alpha)
        return self.torch_backward(grad, saved, alpha)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default):
    """A call's argument after the input, by position (index counts from the input's neighbour)
    or by keyword."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _gelu_call(approximate: str):
    def match(args, kwargs):
        return 0.0 if _arg(args, kwargs, 0, "approximate", "none") == approximate else _NO_MATCH
    return match


def _silu_backward_graph(grad, z, alpha):
    """SiLU's derivative as torch's autograd computes it in grad mode (aten's silu_backward has
    no derivative of its own): G σ(z) (1 + z (1 − σ(z))), bit for bit."""
    s = torch.sigmoid(z)
    return grad * s * (1.0 + z * (1.0 - s))


def _leaky_slope_of_call(args, kwargs):
    slope = _arg(args, kwargs, 0, "negative_slope", 0.01)
    return float(slope) if isinstance(slope, (int, float)) else _NO_MATCH


_ROWS = (
    Activation(
        name="relu",
        torch_forward=lambda z, a: torch.relu(z),
        # threshold_backward: 0 where Y <= 0 (pre-activation exactly 0 included), NaN passes.
        torch_backward=lambda g, y, a: aten.threshold_backward(g, y, 0),
        module=nn.ReLU,
        functions=(F.relu, torch.relu, torch.relu_, F.relu_),
        methods=("relu", "relu_"),
        epilogue="relu",
        doc="max(z, 0), NaN kept"),
    Activation(
        name="leaky_relu",
        torch_forward=lambda z, a: F.leaky_relu(z, a),
        # With a positive slope Y > 0 exactly where Z > 0, so Y serves (self_is_result=True).
        torch_backward=lambda g, s, a: aten.leaky_relu_backward(g, s, a, a > 0),
        module=nn.LeakyReLU,
        match_module=lambda m: float(m.negative_slope),
        make_module=lambda a: nn.LeakyReLU(a),
        functions=(F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu),
        match_call=_leaky_slope_of_call,
        alpha_name="negative_slope",
        doc="z if z > 0 else negative_slope * z"),
    Activation(
        name="gelu",
        torch_forward=lambda z, a: F.gelu(z),
        torch_backward=lambda g, z, a: aten.gelu_backward(g, z),
        module=nn.GELU,
        match_module=lambda m: 0.0 if m.approximate == "none" else _NO_MATCH,
        functions=(F.gelu,),
        match_call=_gelu_call("none"),
        doc="z * Phi(z), erf form (torch's default)"),
    Activation(
        name="gelu_tanh",
        torch_forward=lambda z, a: F.gelu(z, approximate="tanh"),
        torch_backward=lambda g, z, a: aten.gelu_backward(g, z, approximate="tanh"),
        module=nn.GELU,
        match_module=lambda m: 0.0 if m.approximate == "tanh" else _NO_MATCH,
        make_module=lambda a: nn.GELU(approximate="tanh"),
        functions=(F.gelu,),
        match_call=_gelu_call("tanh"),
        epilogue="gelu",   # cuBLASLt's GELU epilogue is the tanh form
        doc="GELU's tanh approximation (approximate='tanh')"),
    Activation(
        name="silu",
        torch_forward=lambda z, a: F.silu(z),
        torch_backward=lambda g, z, a: aten.silu_backward(g, z),
        torch_backward_graph=_silu_backward_graph,
        module=nn.SiLU,
        functions=(F.silu,),
        doc="z * sigmoid(z)"),
    Activation(
        name="sigmoid",
        torch_forward=lambda z, a: torch.sigmoid(z),
        torch_backward=lambda g, y, a: aten.sigmoid_backward(g, y),
        module=nn.Sigmoid,
        functions=(torch.sigmoid, F.sigmoid),
        methods=("sigmoid",),
        doc="1 / (1 + exp(-z))"),
    Activation(
        name="tanh",
        torch_forward=lambda z, a: torch.tanh(z),
        torch_backward=lambda g, y, a: aten.tanh_backward(g, y),
        module=nn.Tanh,
        functions=(torch.tanh, F.tanh),
        methods=("tanh",),
        doc="tanh(z)"),
    Activation(
        name="none",
        torch_forward=lambda z, a: z,
        torch_backward=lambda g, s, a: g,
        module=nn.Identity,
        doc="no activation"),
)

TABLE = {row.name: row for row in _ROWS}
ACTIVATIONS = tuple(TABLE)   # the shipped rows (register() adds others at run time)


def get(name: str) -> Activation:
    """The row for `name` (a ValueError naming the choices otherwise)."""
    try:
        return TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"fastmlp: unknown activation {name!r}; expected one of {ACTIVATIONS} "
                         f"or None") from None


def register(row: Activation) -> Activation:
    """Add a row at run time (tests, experiments); its kernels' row must be registered first
    (fastmlp.kernels.activations.register). A ValueError if the name is taken."""
    return _kernel_table.add_row(TABLE, row)


def unregister(name: str) -> None:
    """Remove a row added by ``register`` (the shipped rows stay)."""
    _kernel_table.remove_row(TABLE, ACTIVATIONS, name)


def from_module(module: nn.Module) -> Optional[Tuple[str, float]]:
    """(name, alpha) if `module` is exactly one of the torch modules a row matches, else None.

    Exact types only: a subclass of nn.ReLU may compute something else. nn.Identity is not an
    activation to fuse (it matches "none" only through ``resolve``).
    """
    for row in TABLE.values():
        if row.module is not None and row.name != "none" and type(module) is row.module:
            alpha = row.match_module(module)
            if alpha is not _NO_MATCH:
                return row.name, alpha
    return None


def from_call(kind: str, target, args: tuple, kwargs: dict) -> Optional[Tuple[str, float]]:
    """(name, alpha) if a traced call applies a supported activation to its first argument.

    kind is torch.fx's node op: "call_function" (target a function such as F.gelu) or
    "call_method" (target a Tensor method name such as "relu"); args exclude the input.
    """
    for row in TABLE.values():
        if (kind == "call_function" and any(target is f for f in row.functions)) or \
                (kind == "call_method" and target in row.methods):
            alpha = row.match_call(args, kwargs)
            if alpha is not _NO_MATCH:
                return row.name, alpha
    return None


def resolve(activation) -> Tuple[str, float]:
    """(name, alpha) from what the public API takes: None, a name, a torch module instance, or
    a (name, alpha) pair (what fuse's rewritten forwards pass: leaky_relu's slope included)."""
    if activation is None:
        return "none", 0.0
    if isinstance(activation, tuple) and len(activation) == 2 and isinstance(activation[0], str):
        name, alpha = activation
        return check(name, alpha).name, float(alpha)
    if isinstance(activation, str):
        row = get(activation)
        return row.name, row.default_alpha
    if isinstance(activation, nn.Module):
        if type(activation) is nn.Identity:
            return "none", 0.0
        found = from_module(activation)
        if found is None:
            raise ValueError(
                f"fastmlp: activation module {activation!r} is not one fastmlp fuses; expected "
                f"one of nn.ReLU(), nn.LeakyReLU(slope), nn.GELU(), nn.GELU(approximate='tanh'), "
                f"nn.SiLU(), nn.Sigmoid(), nn.Tanh(), or a name from {ACTIVATIONS}")
        return found
    raise TypeError(f"fastmlp: activation must be None, a name from {ACTIVATIONS} or a torch "
                    f"activation module, got {type(activation).__name__}")


def check(name: str, alpha: float) -> Activation:
    """The row for a (name, alpha) pair that reached an op directly; clear errors otherwise."""
    row = get(name)
    if not isinstance(alpha, (int, float)) or alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise ValueError(f"fastmlp: activation parameter for {name!r} must be a finite float, "
                         f"got {alpha!r}")
    return row


def describe(name: str, alpha: float) -> str:
    """How repr shows an activation: "gelu", "leaky_relu(negative_slope=0.2)", "none"."""
    alpha_name = get(name).alpha_name
    return f"{name}({alpha_name}={alpha:g})" if alpha_name else name
