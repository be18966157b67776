"""The first pass of ``fastmlp.fuse(mlp=True)``: every nn.Sequential stack in a model that a
FusedMLP computes becomes one, over the same modules.

A model pass of its own (it walks the model and replaces children), apart from the module it
builds (fastmlp.nn.FusedMLP, whose ``from_sequential`` and ``hook_blocker`` decide what one
stack may become) and from fuse's pair pass (fastmlp/fusion.py), which runs after it on what
is left.
"""

from typing import List, Optional, Tuple

from torch import nn

from fastmlp.nn import FusedMLP, _linear_of, _parse, hook_blocker

__all__ = ["fuse_sequentials", "stacks_to_fused_mlps"]


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
