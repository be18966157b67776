"""The tests' references, error measure, tolerances and stable seeds: fastmlp.testing's (one
definition, shared with the GPU check and open to users), plus what only the tests need."""

import torch

from fastmlp.testing import (   # re-exported for the test files (__all__)
    TF32_TOLERANCE,
    TOLERANCE,
    TORCH_ERROR_FACTOR,
    assert_close,
    case_seed,
    reference,
    rel_err,
    tolerance,
    tolerances_against_torch,
    torch_in_dtype,
)


def runs_kernels(device, dtype) -> bool:
    """Whether fastmlp's Triton kernels compute for tensors of `dtype` on `device` under the
    current backend (float64 on a GPU and the torch backend take torch's ops): what a test
    expects FusedMLP.path() to say."""
    import fastmlp.backend

    return fastmlp.backend.uses_triton(torch.device(device), dtype)


def autograd_nodes(y):
    """Every node of y's autograd graph, once each, as (node, its next nodes) pairs."""
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        following = [n for n, _ in node.next_functions]
        yield node, following
        stack.extend(following)


__all__ = ["TF32_TOLERANCE", "autograd_nodes", "TOLERANCE", "TORCH_ERROR_FACTOR", "assert_close", "case_seed",
           "reference", "rel_err", "runs_kernels", "tolerance", "tolerances_against_torch",
           "torch_in_dtype"]
