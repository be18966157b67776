"""The kernels' activation table: one row per activation, every fact the kernels' side needs.

A row says, for one activation:

* ``name``: the public name (``fastmlp.ACTIVATIONS``; fastmlp/activations.py adds the torch side
  of the same row);
* ``saves(alpha)``: what its derivative reads, the one tensor backward keeps besides X and W:
  ``"output"`` (Y, which the layer returns anyway), ``"preact"`` (the pre-activation Z, which the
  forward kernels then write as a second output) or ``"nothing"``;
* ``derivative``: ``"select"`` (a comparison and a select, or a multiply by a constant: no
  temporaries beyond the tile itself) or ``"math"`` (transcendental or polynomial math in fp32).
  The fused MLP's tile tables (kernels/configs.py) give "math" activations smaller tiles where
  the default ones spill;
* ``fused_backward_from``: the first GPU generation (compute capability major x 10) whose
  per-layer dX and dW + db kernels take this activation; before it those GEMMs run as torch's
  backward op and cuBLAS (kernels/configs.py), because the compiled kernels need more registers
  than the GPU has (bench/NOTES.md). Its forward is fused everywhere;
* ``default_alpha``: the activation parameter a name alone means (leaky_relu's negative slope,
  nn.LeakyReLU's default; 0 for the rest): what the ahead-of-time checks compile and the GPU
  check runs;
* ``jit_module``: the module holding its jit forward ``<name>(z, ALPHA)`` and derivative
  ``<name>_grad(g, saved, ALPHA)`` (kernels/activation_jit.py for every shipped row), or None
  for an activation that applies nothing ("none").

This module imports neither triton nor fastmlp: fastmlp's own table (fastmlp/activations.py,
imported with ``import fastmlp``) builds on it, and importing triton is slow (bench/NOTES.md).
``register`` adds a row at run time (tests, experiments): such a row is usable by name
everywhere the kernels are, but is not one of the shipped ``ACTIVATIONS``.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

SELECT, MATH = "select", "math"
JIT_MODULE = "fastmlp.kernels.activation_jit"


@dataclass(frozen=True)
class KernelActivation:
    name: str
    saves: Callable[[float], str]
    derivative: str
    fused_backward_from: int = 80
    default_alpha: float = 0.0
    jit_module: Optional[str] = JIT_MODULE

    def __post_init__(self):
        if self.derivative not in (SELECT, MATH):
            raise ValueError(f"activation {self.name!r}: derivative must be {SELECT!r} or "
                             f"{MATH!r}, got {self.derivative!r}")
        if self.saves(self.default_alpha) not in ("output", "preact", "nothing"):
            raise ValueError(f"activation {self.name!r}: saves() must give 'output', 'preact' "
                             f"or 'nothing'")

    def fuses_backward_on(self, capability: Tuple[int, int]) -> bool:
        """Whether the per-layer dX and dW + db kernels take this activation on a GPU of
        `capability` (major, minor)."""
        return capability[0] * 10 >= self.fused_backward_from


def _always(what: str) -> Callable[[float], str]:
    return lambda alpha: what


_ROWS = (
    KernelActivation("relu", saves=_always("output"), derivative=SELECT),
    # With a positive slope Y > 0 exactly where Z > 0, so Y tells the derivative; with a slope
    # <= 0 it no longer tells the sign of Z.
    KernelActivation("leaky_relu", saves=lambda a: "output" if a > 0 else "preact",
                     derivative=SELECT, default_alpha=0.01),
    KernelActivation("gelu", saves=_always("preact"), derivative=MATH, fused_backward_from=90),
    KernelActivation("gelu_tanh", saves=_always("preact"), derivative=MATH, fused_backward_from=90),
    KernelActivation("silu", saves=_always("preact"), derivative=MATH, fused_backward_from=90),
    KernelActivation("sigmoid", saves=_always("output"), derivative=MATH),
    KernelActivation("tanh", saves=_always("output"), derivative=MATH),
    KernelActivation("none", saves=_always("nothing"), derivative=SELECT, jit_module=None),
)

TABLE: Dict[str, KernelActivation] = {row.name: row for row in _ROWS}
ACTIVATIONS = tuple(TABLE)   # the shipped rows, in table order


def get(name: str) -> KernelActivation:
    """The row for `name` (a ValueError naming the choices otherwise)."""
    try:
        return TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"fastmlp: unknown activation {name!r}; expected one of {names()}") from None


def names() -> Tuple[str, ...]:
    """Every row's name, the shipped ones first, then those registered at run time."""
    return tuple(TABLE)


def register(row: KernelActivation) -> KernelActivation:
    """Add a row (its jit functions must exist in ``row.jit_module``); a ValueError if the name
    is taken."""
    return add_row(TABLE, row)


def unregister(name: str) -> None:
    """Remove a row added by ``register`` (the shipped rows stay)."""
    remove_row(TABLE, ACTIVATIONS, name)


def add_row(table: dict, row):
    """table[row.name] = row, refused if the name is taken (this table's and fastmlp's
    activations.register)."""
    if row.name in table:
        raise ValueError(f"fastmlp: activation {row.name!r} is already in the table")
    table[row.name] = row
    return row


def remove_row(table: dict, shipped: Tuple[str, ...], name: str) -> None:
    """Drop a row added at run time from table; the shipped rows cannot be removed."""
    if name in shipped:
        raise ValueError(f"fastmlp: {name!r} is a shipped activation")
    table.pop(name, None)


# The jit functions this module held before they moved to activation_jit.py (whose import needs
# triton, which this table must not): still reachable here, loaded on first use.
_MOVED_TO_JIT = ("activate", "activation_grad", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu",
                 "sigmoid", "tanh", "relu_grad", "leaky_relu_grad", "gelu_grad", "gelu_tanh_grad",
                 "silu_grad", "sigmoid_grad", "tanh_grad")


def __getattr__(name: str):
    if name in _MOVED_TO_JIT:
        import importlib

        return getattr(importlib.import_module(JIT_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
