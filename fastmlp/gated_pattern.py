"""Finding gated products in a traced forward, for fastmlp.fuse: act(a(x)) * b(x) and its packed
form, in the spellings today's model code uses.

Two shapes, each in either operand order of the product and with the activation as a module
call or a functional call (whatever ``fastmlp.activation_modules`` / ``activations.from_call``
recognise):

* separate: ``act(gate(x)) * up(x)`` (Llama's ``act_fn(gate_proj(x)) * up_proj(x)``, T5's
  ``act(wi_0(h)) * wi_1(h)``, timm's SwiGLU), gate and up two Linears called on the same node;
* packed: ``g, u = proj(x).chunk(2, dim=-1)`` then ``act(g) * u`` or ``u * act(g)``, either half
  the gate (Phi-3's ``gate_up_proj``, timm's GluMlp / SwiGLUPacked), ``torch.chunk`` as well.

Every intermediate value must have the pattern's user as its only user (else the fused op would
hide a value something else reads). What fuse does with a match (its blockers, the rewrite) is
fastmlp/fusion.py's business.
"""

import operator
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

__all__ = ["GatedMatch", "find_gated"]

_MUL_FUNCTIONS = (operator.mul, torch.mul)
_CHUNK_FUNCTIONS = (torch.chunk,)


@dataclass
class GatedMatch:
    """One gated product: ``gate`` / ``up`` are Linear paths in the block (``up`` None when
    packed: ``gate`` is then the packed Linear, gate_first saying which half is the gate)."""

    gate: str
    up: Optional[str]
    act: Tuple[str, float]
    act_path: Optional[str]          # the activation module's path, None for a function call
    gate_first: bool
    input: fx.Node
    product: fx.Node
    nodes: List[fx.Node] = field(default_factory=list)   # what the fused call replaces

    @property
    def packed(self) -> bool:
        return self.up is None

    @property
    def signature(self):
        """What makes two traces' matches the same match."""
        return (self.gate, self.up, self.act, self.act_path, self.gate_first,
                self.product.op, self.product.target)


ActivationOf = Callable[[fx.Node], Optional[Tuple[Tuple[str, float], Optional[str], fx.Node]]]


def find_gated(m: nn.Module, graph: fx.Graph, activation_of: ActivationOf,
               is_linear: Callable[[nn.Module], bool]) -> List[GatedMatch]:
    """Every gated product in m's traced graph. activation_of(node) gives (act, module path or
    None, the node it is applied to) for an activation call, else None; is_linear says which
    modules count as a Linear fuse may take over."""
    found = []
    for node in graph.nodes:
        operands = _product_operands(node)
        if operands is None:
            continue
        for act_side, up_side in (operands, operands[::-1]):
            match = (_separate(m, node, act_side, up_side, activation_of, is_linear)
                     or _packed(m, node, act_side, up_side, activation_of, is_linear))
            if match is not None:
                found.append(match)
                break
    return found


def _product_operands(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    if (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or \
            (node.op == "call_method" and node.target == "mul"):
        return node.args[0], node.args[1]
    return None


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _linear_call(m, node, is_linear) -> Optional[nn.Module]:
    """The Linear that call_module `node` calls on one positional input, else None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    lin = m.get_submodule(node.target)
    return lin if is_linear(lin) else None


def _separate(m, product, act_side, up_side, activation_of, is_linear) -> Optional[GatedMatch]:
    found = activation_of(act_side)
    if found is None:
        return None
    act, act_path, gate_node = found
    gate = _linear_call(m, gate_node, is_linear)
    up = _linear_call(m, up_side, is_linear)
    if gate is None or up is None or gate is up or gate_node.args[0] is not up_side.args[0]:
        return None
    if gate.weight.shape != up.weight.shape:
        return None
    if not (_only_user(gate_node, act_side) and _only_user(act_side, product)
            and _only_user(up_side, product)):
        return None
    return GatedMatch(gate_node.target, up_side.target, act, act_path, True, gate_node.args[0],
                      product, [product, act_side, gate_node, up_side])


def _chunk_halves(node: fx.Node) -> Optional[fx.Node]:
    """The input of a ``chunk(2, dim=-1)`` node (method or torch.chunk), else None."""
    if node.op == "call_method" and node.target == "chunk":
        pass
    elif node.op == "call_function" and node.target in _CHUNK_FUNCTIONS:
        pass
    else:
        return None
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if not args or not isinstance(args[0], fx.Node):
        return None
    chunks = args[1] if len(args) > 1 else kwargs.pop("chunks", None)
    dim = args[2] if len(args) > 2 else kwargs.pop("dim", 0)
    if len(args) > 3 or kwargs or chunks != 2 or dim != -1:
        return None
    return args[0]


def _half(node: fx.Node) -> Optional[Tuple[fx.Node, int]]:
    """(chunk node, index) for ``chunk_node[0]`` / ``[1]``, else None."""
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 \
            and isinstance(node.args[0], fx.Node) and node.args[1] in (0, 1):
        return node.args[0], node.args[1]
    return None


def _packed(m, product, act_side, up_side, activation_of, is_linear) -> Optional[GatedMatch]:
    found = activation_of(act_side)
    if found is None:
        return None
    act, act_path, gate_half = found
    gate_item, up_item = _half(gate_half), _half(up_side)
    if gate_item is None or up_item is None or gate_item[0] is not up_item[0] \
            or gate_item[1] == up_item[1]:
        return None
    chunk = gate_item[0]
    proj_node = _chunk_halves(chunk)
    if proj_node is None:
        return None
    proj = _linear_call(m, proj_node, is_linear)
    if proj is None or proj.out_features % 2:
        return None
    if not (_only_user(proj_node, chunk) and set(chunk.users) == {gate_half, up_side}
            and _only_user(gate_half, act_side) and _only_user(act_side, product)
            and _only_user(up_side, product)):
        return None
    return GatedMatch(proj_node.target, None, act, act_path, gate_item[1] == 0,
                      proj_node.args[0], product,
                      [product, act_side, gate_half, up_side, chunk, proj_node])
