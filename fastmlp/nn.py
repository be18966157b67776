"""Drop-in modules: FusedLinear(activation=...) and FusedLinearReLU.

Both subclass nn.Linear: same constructor, same parameters (weight [out, in], bias [out]), same
initialisation, so state_dicts load both ways between them and nn.Linear. The activation is not
state: it is a constructor argument, shown by repr.
"""

import torch
from torch import nn

from fastmlp import activations
from fastmlp.ops import fused_linear


class FusedLinear(nn.Linear):
    """nn.Linear followed by an activation, computed by the fastmlp kernels: y = act(x Wᵀ + b).

    activation: None (no activation), a name from fastmlp.ACTIVATIONS, or an instance of the
    matching torch module (nn.ReLU(), nn.LeakyReLU(0.2), nn.GELU(), nn.GELU(approximate="tanh"),
    nn.SiLU(), nn.Sigmoid(), nn.Tanh()). Attributes ``activation`` (its name, "none" for none)
    and ``activation_alpha`` (leaky_relu's negative slope, 0 otherwise).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, activation=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation, self.activation_alpha = activations.resolve(activation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fused_linear(input, self.weight, self.bias, self.activation, self.activation_alpha)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, "
                f"activation={activations.describe(self.activation, self.activation_alpha)}")


class FusedLinearReLU(FusedLinear):
    """nn.Linear followed by nn.ReLU in one fused kernel: y = relu(x Wᵀ + b)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype, activation="relu")


def fused_from(linear: nn.Linear, activation=None, alpha=None) -> FusedLinear:
    """A FusedLinear that shares `linear`'s parameters (built on meta: no init, no copy).

    activation: what FusedLinear takes; alpha, if given, overrides the resolved parameter
    (a name plus the slope found in a traced call).
    """
    if activation == "relu":
        fused = FusedLinearReLU(linear.in_features, linear.out_features,
                                bias=linear.bias is not None, device="meta")
    else:
        fused = FusedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            device="meta", activation=activation)
        if alpha is not None:
            fused.activation_alpha = float(alpha)
    fused.weight = linear.weight
    fused.bias = linear.bias
    fused.train(linear.training)
    return fused

