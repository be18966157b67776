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


__all__ = ["TF32_TOLERANCE", "TOLERANCE", "TORCH_ERROR_FACTOR", "assert_close", "case_seed",
           "reference", "rel_err", "runs_kernels", "tolerance", "tolerances_against_torch",
           "torch_in_dtype"]
