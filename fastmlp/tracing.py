"""Tracing one module's own forward with torch.fx, for fastmlp.fuse.

Every submodule call stays one ``call_module`` node: a child's forward is the business of its own
trace, so one untraceable block does not hide its children from fuse.

Two kinds of forward that torch.fx cannot trace as written are traced through a stand-in:

* a forward that takes ``**kwargs`` only to pass them on to its child modules
  (``self.self_attn(h, **kwargs)``, as transformers' decoder layers do): fx makes ``kwargs`` one
  opaque placeholder, and passing it on iterates it, which fails. When the forward's source does
  nothing with ``kwargs`` but pass it, as ``**kwargs``, to calls of ``self.<child module>``, the
  children are single nodes of the trace anyway, so the forward's dataflow is the same for
  every ``kwargs``; it is traced with none. A forward that reads its ``kwargs``, or passes them
  to anything else (a method or function, which the trace would run with none), is refused.
* a forward wrapped by a decorator fuse knows not to change the dataflow (transformers'
  ``deprecate_kwarg`` and gradient-checkpointing wrapper; torch's grad-mode and autocast
  decorators): fx patches the wrapper's code
  with the wrapped function's arguments and fails ("co_varnames is too small"). A forward with
  any other decorator is refused: what the decorator does is unknown.

The stand-in is the same module (same ``__dict__``: children, parameters, attributes) seen
through a subclass whose forward has the original's named parameters and calls the original
forward with them. The graph is what the original computes for calls without extra keyword
arguments; a graph is never used as the new forward of such a module (fuse refuses to rewrite a
forward that takes ``**kwargs``), only read.
"""

import ast
import inspect
import sys
import textwrap
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

__all__ = ["trace", "forward_optionals", "code", "untraceable_reason"]


class _ChildrenAsLeaves(fx.Tracer):
    """Traces only the root's forward: every submodule call stays one call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class NotTraceable(Exception):
    """A forward fuse will not trace (its message says why, in words)."""


# Decorators that leave a forward's dataflow as it is, known by the file their wrapper's code is
# in: transformers' deprecate_kwarg (renames keyword arguments) and GradientCheckpointingLayer's
# forward_with_checkpointing (runs the forward under activation checkpointing, setting use_cache
# / cache to their defaults, which the defaults' trace covers); torch's grad-mode and autocast
# decorators (set a mode: a forward traced through them is never rewritten, rewrite_hazard).
_KNOWN_DECORATOR_FILES = ("transformers/utils/deprecation.py", "transformers/modeling_layers.py",
                          "torch/utils/_contextlib.py", "torch/amp/autocast_mode.py")
# Code whose run during a trace means the forward sets grad or autocast mode (torch.no_grad,
# torch.autocast, ...), which fx does not record: a forward rewritten from such a trace would
# lose it.
_MODE_FILES = ("torch/autograd/grad_mode.py", "torch/amp/autocast_mode.py",
               "torch/utils/_contextlib.py")


def trace(module: nn.Module, training: bool, grad: bool, concrete_args=None) -> fx.Graph:
    """module's forward traced with module.training and grad mode set as asked (restored after).

    The graph's ``sets_modes`` attribute is True when the forward (or anything it ran) entered a
    grad-mode or autocast context: fx records neither, so such a graph must not become a forward.
    """
    if "forward" in vars(module):
        raise NotTraceable("its forward is replaced on the instance (as accelerate's hooks do), "
                           "so its class's forward is not what runs")
    root = _traceable(module)
    was = module.training
    module.training = training
    seen = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.replace("\\", "/").endswith(_MODE_FILES):
            seen.append(frame.f_code.co_name)
        elif event == "c_call" and arg is torch._C._set_grad_enabled:
            seen.append("_set_grad_enabled")

    try:
        with torch.set_grad_enabled(grad):
            previous = sys.getprofile()
            sys.setprofile(profile)
            try:
                graph = _ChildrenAsLeaves().trace(root, concrete_args=concrete_args)
            finally:
                sys.setprofile(previous)
    finally:
        module.training = was
    graph.sets_modes = bool(seen)
    return graph


def rewrite_hazard(module: nn.Module) -> Optional[str]:
    """Why a forward rebuilt from module's trace would not compute what its forward does (a
    decorator, which the graph would not have), or None."""
    forward = type(module).forward
    if inspect.unwrap(forward) is not forward:
        return "its forward is decorated, and a rewritten forward would not be"
    return None


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
def unknown_decorator(forward) -> Optional[str]:
    """The name of the first decorator around `forward` that is not one of the known ones
    (_KNOWN_DECORATOR_FILES), or None."""
    f = forward
    while hasattr(f, "__wrapped__"):
        code_ = getattr(f, "__code__", None)
        filename = code_.co_filename.replace("\\", "/") if code_ is not None else ""
        if not filename.endswith(_KNOWN_DECORATOR_FILES):
            return getattr(code_, "co_name", type(f).__name__)
        f = f.__wrapped__
    return None


def forward_definition(function) -> Optional[ast.FunctionDef]:
    """The ast of a function's own source (None when it cannot be read)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    definition = tree.body[0] if tree.body else None
    if isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)) and definition.args.args:
        return definition
    return None


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
    if decorated:
        unknown = unknown_decorator(forward)
        if unknown is not None:
            raise NotTraceable(f"its forward is wrapped by a decorator ({unknown}) whose effect "
                               f"fuse cannot know")
    if not var_keyword and not decorated:
        return module
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return module      # *args: no stand-in; fx's own error stands
    if var_keyword and not _only_passed_to_children(inner, var_keyword[0], module):
        raise NotTraceable(
            f"its forward reads its **{var_keyword[0]}, or passes them to something other than "
            f"its child modules, so one trace would not stand for every call")
    stand_in_class = type(type(module).__name__, (type(module),),
                          {"forward": _forward_calling(forward, params[1:]),
                           "__module__": type(module).__module__})
    stand_in = object.__new__(stand_in_class)
    stand_in.__dict__ = module.__dict__      # the same children, parameters and attributes
    return stand_in


_INTROSPECTION = frozenset({"locals", "vars", "eval", "exec", "globals"})


def _only_passed_to_children(function, name: str, module: nn.Module) -> bool:
    """Whether the function's source uses `name` only as ``**name`` in calls of
    ``self.<child module>`` (and never calls locals/vars/eval/exec, which could read it)."""
    definition = forward_definition(function)
    if definition is None:
        return False
    self_name = definition.args.args[0].arg
    parents = {child: node for node in ast.walk(definition)
               for child in ast.iter_child_nodes(node)}
    for node in ast.walk(definition):
        if isinstance(node, ast.Name) and node.id in _INTROSPECTION:
            return False
        if not (isinstance(node, ast.Name) and node.id == name):
            continue
        keyword, call = parents.get(node), parents.get(parents.get(node))
        if not (isinstance(keyword, ast.keyword) and keyword.arg is None
                and isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Name) and call.func.value.id == self_name
                and call.func.attr in module._modules):
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
    if isinstance(exc, NotTraceable):
        return str(exc)
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

