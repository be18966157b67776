"""Fused ops with the signature of torch.nn.functional.linear: (input, weight, bias=None), and the
gated pair gated_linear / gated_linear_packed."""

from typing import Optional

import torch

from fastmlp import activations
from fastmlp.gated import check_packed, fused_gated, fused_gated_packed
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


def gated_linear(input: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
                 gate_bias: Optional[torch.Tensor] = None, up_bias: Optional[torch.Tensor] = None,
                 activation="silu") -> torch.Tensor:
    """act(input @ gate_weight.T + gate_bias) * (input @ up_weight.T + up_bias), fused.

    The gated block of Llama-style MLPs: silu gives SwiGLU, gelu / gelu_tanh GeGLU, relu ReGLU,
    sigmoid GLU (activation: None, a name from fastmlp.ACTIVATIONS or the torch module, as in
    linear_act). input [..., in_features], weights [hidden, in_features] (nn.Linear layout, any
    strides: views of another tensor are read in place), biases [hidden] or None; the output is
    [..., hidden]. Forward and backward are fastmlp/gated.py's op.
    """
    name, alpha = activations.resolve(activation)
    return fused_gated(input, gate_weight, up_weight, gate_bias, up_bias, name, alpha)


def gated_linear_packed(input: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, activation="silu",
                        gate_first: bool = True) -> torch.Tensor:
    """gated_linear with the gate and up weights packed in one [2 * hidden, in_features] weight
    (and bias [2 * hidden]), as models that apply one Linear and then ``.chunk(2, -1)`` hold them.

    gate_first: the first half of the rows is the gate (True) or the up projection (False). The
    halves are read in place, never copied; the weight's gradient (and the bias's) comes back as
    one [2 * hidden, in_features] tensor, written by the backward's one grouped launch (no
    per-half buffers added up). Forward and backward are fastmlp/gated.py's packed op.
    """
    check_packed(weight, bias, gate_first)
    name, alpha = activations.resolve(activation)
    return fused_gated_packed(input, weight, bias, name, alpha, gate_first)
