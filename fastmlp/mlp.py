"""``fastmlp.mlp``: the names FusedMLP's code had when it lived in this one file, kept importable.

The operator (checks, torch reference, the fastmlp::mlp ops, autograd, path choice) is
fastmlp/mlp_ops.py, the module fastmlp/nn.py (FusedMLP, hook_blocker), the Sequential-to-
FusedMLP pass fastmlp/mlp_stacks.py; this module re-exports what callers import from here.
"""

from fastmlp.mlp_ops import (  # noqa: F401
    PATHS, _backward_impl, _differentiable_backward, _forward_impl, _rows, _spec, _storage_width,
    _time_candidates, choose_path, fused_mlp, mlp_backward_op, mlp_op, prepare_inputs, use_path)
from fastmlp.mlp_stacks import fuse_sequentials, stacks_to_fused_mlps  # noqa: F401
from fastmlp.nn import FusedMLP, hook_blocker  # noqa: F401

__all__ = ["FusedMLP", "fuse_sequentials", "hook_blocker", "use_path", "PATHS"]
