"""Linear -> activation pairs read from a forward's source, for blocks torch.fx cannot trace.

BART's, mBART's, Marian's and Whisper's encoder layers (transformers 5) branch on a dtype after
their MLP (``if hidden_states.dtype == torch.float16: clamp``), so fx cannot trace them, yet the
MLP itself is written ``self.activation_fn(self.fc1(hidden_states))``. When the source says, for
every call, that the Linear's output goes straight into the activation module and nowhere else,
the pair can be fused in place (the Linear becomes a FusedLinear, the activation nn.Identity) and
the forward left as it is. The source must say it unambiguously:

* ``self.act(self.lin(x))``, or ``v = self.lin(x)`` directly followed by ``v = self.act(v)``
  (the same name: the Linear's output is dead after);
* ``self.lin`` and ``self.act`` each appear exactly once in the forward;
* ``self`` is used only as ``self.<attribute>`` (never passed on, never reflected on:
  ``getattr(self, ...)``, ``self._modules``), no attribute of it is assigned, and no attribute
  read is a method or a stored function (code outside the forward's text, which could call the
  activation again), nor is ``super()`` (the same) or ``locals``/``vars``/``eval``/``exec``;
* the forward has no decorator, or only ones that leave its dataflow as it is
  (fastmlp.tracing.unknown_decorator).

Anything else, or a forward whose source is not available, gives no pairs.
"""

import ast
import inspect
from collections import Counter
from typing import List, Tuple

from torch import nn

from fastmlp import tracing

__all__ = ["source_pairs"]

_REFLECTIVE = frozenset({"_modules", "__dict__", "modules", "named_modules", "children",
                         "named_children", "get_submodule", "apply", "forward", "__call__",
                         "_call_impl", "register_module", "add_module"})


def source_pairs(module: nn.Module) -> List[Tuple[str, str]]:
    """(linear attribute, activation attribute) pairs the forward's source fixes (module
    docstring); the caller checks what the attributes hold."""
    if "forward" in module.__dict__:
        return []                           # an instance-level forward: not the class's source
    if tracing.unknown_decorator(type(module).forward) is not None:
        return []
    definition = tracing.forward_definition(inspect.unwrap(type(module).forward))
    if definition is None:
        return []
    self_name = definition.args.args[0].arg
    attributes = _self_attributes(definition, self_name)
    if attributes is None or any(_is_code(module, attr) for attr in attributes):
        return []
    if any(isinstance(node, ast.Name) and node.id in _FORBIDDEN_NAMES
           for node in ast.walk(definition)):
        return []
    pairs = []
    for node in ast.walk(definition):
        pair = _nested_pair(node, self_name)
        if pair is not None:
            pairs.append(pair)
        for body in _bodies(node):
            pairs.extend(_consecutive_pairs(body, self_name))
    return [(lin, act) for lin, act in pairs if attributes[lin] == 1 and attributes[act] == 1]


_FORBIDDEN_NAMES = frozenset({"super", "locals", "vars", "eval", "exec", "globals"})


def _is_code(module: nn.Module, attr: str) -> bool:
    """Whether self.<attr> is a method or a stored function (not a child module, parameter,
    buffer or plain value): code the source does not show."""
    if attr in module._modules or attr in module._parameters or attr in module._buffers:
        return False
    value = getattr(module, attr, None)
    return callable(value)


def _self_attributes(definition, self_name):
    """How often each ``self.<attr>`` is read; None if self is used any other way."""
    parents = {}
    for node in ast.walk(definition):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    counts = Counter()
    for node in ast.walk(definition):
        if isinstance(node, ast.Name) and node.id == self_name:
            parent = parents.get(node)
            if isinstance(parent, ast.arguments) or isinstance(parent, ast.arg):
                continue
            if not (isinstance(parent, ast.Attribute) and parent.value is node):
                return None
            if not isinstance(parent.ctx, ast.Load) or parent.attr in _REFLECTIVE:
                return None
            counts[parent.attr] += 1
    return counts


def _self_call(node, self_name):
    """attr for ``self.attr(one positional argument)``, else None."""
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords \
            and not isinstance(node.args[0], ast.Starred) \
            and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
            and node.func.value.id == self_name:
        return node.func.attr
    return None


def _nested_pair(node, self_name):
    outer = _self_call(node, self_name)
    if outer is None:
        return None
    inner = _self_call(node.args[0], self_name)
    return (inner, outer) if inner is not None else None


def _bodies(node):
    for name in ("body", "orelse", "finalbody"):
        body = getattr(node, name, None)
        if isinstance(body, list):
            yield body


def _assigned_call(statement, self_name):
    """(target name, attr, argument) for ``name = self.attr(argument)``, else None."""
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
            and isinstance(statement.targets[0], ast.Name):
        attr = _self_call(statement.value, self_name)
        if attr is not None:
            return statement.targets[0].id, attr, statement.value.args[0]
    return None


def _consecutive_pairs(body, self_name):
    found = []
    for first, second in zip(body, body[1:]):
        a, b = _assigned_call(first, self_name), _assigned_call(second, self_name)
        if a is None or b is None:
            continue
        name, lin, _ = a
        name2, act, argument = b
        if name2 == name and isinstance(argument, ast.Name) and argument.id == name:
            found.append((lin, act))
    return found
