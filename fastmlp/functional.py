"""Fused ops with the signature of torch.nn.functional.linear: (input, weight, bias=None)."""

from typing import Optional

import torch

from fastmlp.ops import fused_linear


def linear_relu(input: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(input @ weight.T + bias) in one fused kernel, forward and backward.

    Same shapes as ``F.relu(F.linear(input, weight, bias))``: input [..., in_features], weight
    [out_features, in_features], bias [out_features] or None.
    """
    return fused_linear(input, weight, bias, "relu")


def linear(input: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """input @ weight.T + bias through the fastmlp kernels (no activation)."""
    return fused_linear(input, weight, bias, "none")
