"""Drop-in modules (FusedLinearReLU, FusedLinear) and fuse(), which rewrites existing models.

Both modules subclass nn.Linear: same constructor, same parameters (weight [out, in], bias [out]),
same initialisation, so state_dicts load both ways between them and nn.Linear.
"""

import torch
from torch import nn

from fastmlp.ops import fused_linear


class FusedLinear(nn.Linear):
    """nn.Linear computed by the fastmlp kernels: y = x Wᵀ + b."""

    activation = "none"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fused_linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class FusedLinearReLU(FusedLinear):
    """nn.Linear followed by nn.ReLU in one fused kernel: y = relu(x Wᵀ + b)."""

    activation = "relu"


def _fused_from(linear: nn.Linear) -> FusedLinearReLU:
    """A FusedLinearReLU that shares `linear`'s parameters (built on meta: no init, no copy)."""
    fused = FusedLinearReLU(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            device="meta")
    fused.weight = linear.weight
    fused.bias = linear.bias
    fused.train(linear.training)
    return fused


def fuse(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear (or FusedLinear) directly followed by nn.ReLU inside an nn.Sequential.

    The Linear slot becomes a FusedLinearReLU sharing the original parameters and the ReLU slot
    becomes nn.Identity, so state_dict keys stay the same. Only exact nn.Linear / FusedLinear
    instances are fused (a user's subclass of nn.Linear may compute something else). Works in
    place on any module tree and returns `module`.
    """
    for sub in module.modules():
        if not isinstance(sub, nn.Sequential):
            continue
        names = list(sub._modules.keys())
        for first, second in zip(names, names[1:]):
            lin, act = sub._modules[first], sub._modules[second]
            if type(lin) in (nn.Linear, FusedLinear) and type(act) is nn.ReLU:
                sub._modules[first] = _fused_from(lin)
                sub._modules[second] = nn.Identity()
    return module
