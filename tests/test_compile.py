"""torch.library registration: opcheck on every op and activation, and torch.compile(fullgraph=True)
of fused models."""

import copy

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp import activations
from reference import assert_close


def _alpha(name):
    return 0.2 if name == "leaky_relu" else 0.0


def _op_cases(device, name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, generator=gen).to(device)
    w = torch.randn(6, 12, generator=gen).to(device)
    b = torch.randn(6, generator=gen).to(device)
    g = torch.randn(8, 6, generator=gen).to(device)
    z = torch.randn(8, 6, generator=gen).to(device)
    alpha = _alpha(name)
    row = activations.get(name)
    saves = row.saves(alpha)
    saved = {"output": row.torch_forward(z, alpha), "preact": z, "nothing": g}[saves]
    ops = torch.ops.fastmlp
    return [
        (ops.linear_act, (x.clone().requires_grad_(), w.clone().requires_grad_(),
                          b.clone().requires_grad_(), name, alpha, saves == "preact")),
        (ops.linear_act, (x, w, None, name, alpha, False)),
        (ops.linear_act_grad_input, (g, saved, w, name, alpha)),
        (ops.linear_act_grad_weight, (g, saved, x, name, alpha, True, True)),
        (ops.linear_act_grad_weight, (g, saved, x, name, alpha, False, True)),
    ]


@pytest.mark.parametrize("name", activations.ACTIVATIONS)
def test_opcheck(impl, name):
    for op, args in _op_cases(impl, name):
        torch.library.opcheck(op, args)


def _every_activation_model(device):
    """One Linear per activation, chained: a single compile covers all of them."""
    layers, width = [], 12
    for name in activations.ACTIVATIONS:
        act = nn.LeakyReLU(0.2) if name == "leaky_relu" else (
            nn.GELU(approximate="tanh") if name == "gelu_tanh" else
            {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
             "tanh": nn.Tanh, "none": nn.Identity}[name]())
        layers += [nn.Linear(width, 10), act]
        width = 10
    return nn.Sequential(*layers, nn.Linear(width, 4)).to(device)


def test_compile_fullgraph_fused_model_every_activation(impl):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _every_activation_model(impl)
    fused = fastmlp.fuse(copy.deepcopy(model))
    assert sum(isinstance(m, fastmlp.FusedLinear) for m in fused) == len(activations.ACTIVATIONS) - 1
    compiled = torch.compile(fused, fullgraph=True)  # raises on any graph break
    x = torch.randn(8, 12, device=impl, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = compiled(x)
    out.square().sum().backward()
    ref = model(x_ref)
    ref.square().sum().backward()
    assert_close(out, ref, torch.float32, "compiled forward")
    assert_close(x.grad, x_ref.grad, torch.float32, "compiled dX")
    for p, q in zip(fused.parameters(), model.parameters()):
        assert_close(p.grad, q.grad, torch.float32, "compiled parameter grad")


def test_compile_functional_with_frozen_weight(impl):
    torch._dynamo.reset()
    x = torch.randn(5, 7, device=impl, requires_grad=True)
    w = torch.randn(3, 7, device=impl)
    b = torch.randn(3, device=impl, requires_grad=True)
    compiled = torch.compile(lambda *a: fastmlp.functional.linear_act(*a, activation="gelu"),
                             fullgraph=True)
    compiled(x, w, b).sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    nn.functional.gelu(nn.functional.linear(x2, w, b2)).sum().backward()
    assert_close(x.grad, x2.grad, torch.float32, "dX")
    assert_close(b.grad, b2.grad, torch.float32, "db")

