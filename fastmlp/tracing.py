"""Tracing one module's own forward with torch.fx, for fastmlp.fuse.

Every submodule call stays one ``call_module`` node: a child's forward is the business of its own
trace, so one untraceable block does not hide its children from fuse.

Two kinds of forward that torch.fx cannot trace as written are traced through a stand-in:

* a forward that takes ``**kwargs`` only to pass them on (``self.self_attn(h, **kwargs)``, as
  transformers' decoder layers do): fx makes ``kwargs`` one opaque placeholder, and passing it on
  iterates it, which fails. When the forward's code does nothing with ``kwargs`` but pass it on
  (read from its bytecode: every load of it goes straight into a ``**`` call), the children it is
  passed to are single nodes anyway, so the forward's dataflow is the same for every ``kwargs``;
  it is traced with none. A forward that reads its ``kwargs`` is refused (a trace would fix one
  branch).
* a forward wrapped by a decorator (``functools.wraps`` wrappers taking ``*args, **kwargs``, such
  as transformers' ``deprecate_kwarg``): fx patches the wrapper's code with the wrapped
  function's arguments and fails ("co_varnames is too small").

The stand-in is the same module (same ``__dict__``: children, parameters, attributes) seen
through a subclass whose forward has the original's named parameters and calls the original
forward with them. The graph is what the original computes for calls without extra keyword
arguments; a graph is never used as the new forward of such a module (fuse refuses to rewrite a
forward that takes ``**kwargs``), only read.
"""

import dis
import inspect
from typing import Dict, List, Tuple

import torch
import torch.fx as fx
from torch import nn

__all__ = ["trace", "forward_optionals", "code", "untraceable_reason"]


class _ChildrenAsLeaves(fx.Tracer):
    """Traces only the root's forward: every submodule call stays one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class ForwardReadsKwargs(Exception):
    """The forward reads its **kwargs: no single trace stands for every call."""


def trace(module: nn.Module, training: bool, grad: bool, concrete_args=None) -> fx.Graph:
    """module's forward traced with module.training and grad mode set as asked (restored after)."""
    root = _traceable(module)
    was = module.training
    module.training = training
    try:
        with torch.set_grad_enabled(grad):
            return _ChildrenAsLeaves().trace(root, concrete_args=concrete_args)
    finally:
        module.training = was


def forward_optionals(module: nn.Module) -> Tuple[Dict[str, object], List[str]]:
    """The forward's parameters with defaults ({name: default}) and its *args/**kwargs names."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return {}, []
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    varargs = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return defaults, varargs


def code(graph: fx.Graph) -> str:
    return graph.python_code("self").src


# --------------------------------------------------------------------------------------------
# The stand-in for forwards fx cannot trace as written
# --------------------------------------------------------------------------------------------
def _traceable(module: nn.Module) -> nn.Module:
    """module itself, or the stand-in (this module's docstring) when its forward needs one."""
    forward = type(module).forward
    inner = inspect.unwrap(forward)
    try:
        params = list(inspect.signature(inner).parameters.values())
    except (TypeError, ValueError):
        return module
    var_keyword = [p.name for p in params if p.kind is p.VAR_KEYWORD]
    decorated = inner is not forward
    if not var_keyword and not decorated:
        return module
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return module      # *args: no stand-in; fx's own error stands
    if var_keyword and not _only_passed_on(inner, var_keyword[0]):
        raise ForwardReadsKwargs(
            f"{type(module).__name__}.forward reads its **{var_keyword[0]} (not only passes it "
            f"on), so no one trace stands for every call")
    stand_in_class = type(type(module).__name__, (type(module),),
                          {"forward": _forward_calling(forward, params[1:]),
                           "__module__": type(module).__module__})
    stand_in = object.__new__(stand_in_class)
    stand_in.__dict__ = module.__dict__      # the same children, parameters and attributes
    return stand_in


def _only_passed_on(function, name: str) -> bool:
    """Whether every load of local `name` in function's bytecode goes straight into a ``**``
    call argument (DICT_MERGE / CALL_FUNCTION_EX), so its contents are never read there."""
    instructions = list(dis.get_instructions(function))
    for i, ins in enumerate(instructions):
        if ins.opname.startswith(("LOAD_FAST", "STORE_FAST", "DELETE_FAST", "LOAD_DEREF",
                                  "LOAD_CLOSURE")):
            names = ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)
            if name not in names:
                continue
            nxt = instructions[i + 1].opname if i + 1 < len(instructions) else ""
            if not ins.opname.startswith("LOAD_FAST") or len(names) != 1 or \
                    nxt not in ("DICT_MERGE", "CALL_FUNCTION_EX"):
                return False
    return True


def _forward_calling(forward, params: List[inspect.Parameter]):
    """A function with params (the forward's own, less self and **kwargs) that calls forward
    with them: positional ones by position, keyword-only ones by keyword."""
    kept = [p for p in params if p.kind is not p.VAR_KEYWORD]
    if any(p.name in ("_forward", "_defaults") for p in kept):
        return forward          # would shadow the stand-in's own names: fx's own error stands
    defaults = {p.name: p.default for p in kept if p.default is not inspect.Parameter.empty}
    signature, call, kw_only_started = ["self"], ["self"], False
    for p in kept:
        if p.kind is p.KEYWORD_ONLY and not kw_only_started:
            signature.append("*")
            kw_only_started = True
        signature.append(f"{p.name}=_defaults[{p.name!r}]" if p.name in defaults else p.name)
        call.append(f"{p.name}={p.name}" if p.kind is p.KEYWORD_ONLY else p.name)
    source = (f"def forward({', '.join(signature)}):\n"
              f"    return _forward({', '.join(call)})\n")
    namespace = {"_forward": forward, "_defaults": defaults}
    exec(compile(source, f"<fastmlp.tracing stand-in for {forward.__qualname__}>", "exec"),
         namespace)
    return namespace["forward"]


# --------------------------------------------------------------------------------------------
# Why a forward could not be traced, in words
# --------------------------------------------------------------------------------------------
_REASONS = (
    ("cannot be iterated", "its forward iterates over or unpacks a value computed from its inputs "
                           "(a loop over a tensor, or *args passed on)"),
    ("cannot be used as inputs to control flow", "its forward branches on a value computed from "
                                                 "its inputs (an if or while on a tensor or an "
                                                 "argument)"),
    ("co_varnames is too small", "torch.fx cannot trace the decorator around its forward"),
)


def untraceable_reason(exc: BaseException) -> str:
    """Why fuse could not read a forward, in words, with the error's first line after it."""
    if isinstance(exc, ForwardReadsKwargs):
        return ("its forward reads its **kwargs (not only passes them on), so one trace would "
                "not stand for every call")
    raw = _short(exc)
    for needle, words in _REASONS:
        if needle in str(exc):
            return f"{words} (torch.fx: {raw})"
    return f"torch.fx could not trace it ({raw})"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

