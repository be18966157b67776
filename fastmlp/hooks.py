"""Which Python hooks a module has, and which torch has registered for every module: one place
for the code that must not change what a hook sees (fastmlp.fuse, FusedMLP.from_sequential) and
the code that would skip a hook (fit's CPU step and CUDA-graph step, fastmlp.cpu_step).

A module's hooks live in dicts on the module (nn.Module's own attribute names):
* CALL_HOOKS run when the module is called or its output is differentiated: forward pre-hooks,
  forward hooks, backward pre-hooks, backward hooks. Whatever computes a module's work without
  calling it (a FusedMLP on the Triton path does, for its children) would skip them.
* STATE_HOOKS run in state_dict / load_state_dict. They go with the module object: replacing
  the module by another one drops them, keeping it (as a FusedMLP keeps its children) does not.
"""

from typing import List, Optional, Sequence

import torch

CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
ALL_HOOKS = CALL_HOOKS + STATE_HOOKS

# torch.nn.modules.module's globals: hooks run around every module's call.
_GLOBAL_MODULE_HOOKS = (
    ("_global_forward_pre_hooks", "global forward pre-hook (register_module_forward_pre_hook)"),
    ("_global_forward_hooks", "global forward hook (register_module_forward_hook)"),
    ("_global_backward_pre_hooks", "global backward pre-hook "
                                   "(register_module_full_backward_pre_hook)"),
    ("_global_backward_hooks", "global backward hook (register_module_full_backward_hook)"),
)


def registered(module: torch.nn.Module, which: Sequence[str] = ALL_HOOKS) -> List[str]:
    """The names of module's non-empty hook dicts among `which`, as a report shows them
    ("forward_hooks", "state_dict_pre_hooks", ...)."""
    return [name.strip("_") for name in which if getattr(module, name, None)]


def hook_name(hooks) -> str:
    """The first hook of a hook dict, by its function's qualified name (repr if it has none)."""
    hook = next(iter(hooks.values()))
    return getattr(hook, "__qualname__", None) or repr(hook)


def global_module_hook() -> Optional[str]:
    """The first of torch's global module hooks that is registered, described ("a global forward
    hook (register_module_forward_hook): my_hook"), or None. They run around every module's
    call, so they see every Linear and activation as the model computes them."""
    mod = torch.nn.modules.module
    for attr, what in _GLOBAL_MODULE_HOOKS:
        hooks = getattr(mod, attr, None)
        if hooks:
            return f"a {what}: {hook_name(hooks)}"
    return None
