"""Fused ops with the signature of torch.nn.functional.linear: (input, weight, bias=None)."""

from typing import Optional

import torch

from fastmlp import activations
from fastmlp.ops import fused_linear


def linear_act(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation="relu") -> torch.Tensor:
    """act(input @ weight.T + bias) in one fused kernel, forward and backward.

    activation: None, a name from fastmlp.ACTIVATIONS (the rows of fastmlp/activations.py), or
    the matching torch module (``nn.LeakyReLU(0.2)``, ``nn.GELU(approximate="tanh")``, ...).
    Same shapes as ``act(F.linear(input, weight, bias))``: input [..., in_features], weight
    [out_features, in_features], bias [out_features] or None; also what else F.linear takes
    (fastmlp.ops._linear_layout): a bias of shape [1, out_features], [1] or (), a 1-D weight
    [in_features] (the output drops its last dimension), gradients in the callers' shapes.
    """
    name, alpha = activations.resolve(activation)
    return fused_linear(input, weight, bias, name, alpha)


def linear_relu(input: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(input @ weight.T + bias) in one fused kernel, forward and backward."""
    return fused_linear(input, weight, bias, "relu")


def linear(input: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """input @ weight.T + bias through the fastmlp kernels (no activation)."""
    return fused_linear(input, weight, bias, "none")
