"""torch.library registration: opcheck on every op, and torch.compile(fullgraph=True) of a fused model."""

import copy

import torch
from torch import nn

import fastmlp
from reference import assert_close


def _op_cases(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, generator=gen).to(device)
    w = torch.randn(6, 12, generator=gen).to(device)
    b = torch.randn(6, generator=gen).to(device)
    g = torch.randn(8, 6, generator=gen).to(device)
    y = torch.relu(torch.randn(8, 6, generator=gen)).to(device)
    ops = torch.ops.fastmlp
    return [
        (ops.linear_act, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), "relu")),
        (ops.linear_act, (x.detach(), w.detach(), None, "none")),
        (ops.linear_act_grad_input, (g, y, w.detach(), "relu")),
        (ops.linear_act_grad_weight, (g, y, x.detach(), "relu", True, True)),
        (ops.linear_act_grad_weight, (g, y, x.detach(), "none", False, True)),
    ]


def test_opcheck(impl):
    for op, args in _op_cases(impl):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_fused_model(impl):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(impl)
    fused = fastmlp.fuse(copy.deepcopy(model))
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
    compiled = torch.compile(fastmlp.functional.linear_relu, fullgraph=True)
    compiled(x, w, b).sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.relu(nn.functional.linear(x2, w, b2)).sum().backward()
    assert_close(x.grad, x2.grad, torch.float32, "dX")
    assert_close(b.grad, b2.grad, torch.float32, "db")
