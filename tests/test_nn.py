"""Modules and fuse(): nn.Linear compatibility, state_dicts, fused models training like stock ones."""

import copy

import pytest
import torch
from torch import nn

import fastmlp
from reference import assert_close


def test_init_matches_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(30, 7)
    torch.manual_seed(0)
    ours = fastmlp.FusedLinearReLU(30, 7)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    assert ours.weight.shape == (7, 30) and ours.bias.shape == (7,)


def test_constructor_arguments_and_repr():
    m = fastmlp.FusedLinearReLU(5, 3, bias=False, device="cpu", dtype=torch.float64)
    assert m.bias is None and m.weight.dtype == torch.float64
    assert repr(m) == "FusedLinearReLU(in_features=5, out_features=3, bias=False, activation=relu)"
    assert "activation=none" in repr(fastmlp.FusedLinear(5, 3))


@pytest.mark.parametrize("cls", [fastmlp.FusedLinearReLU, fastmlp.FusedLinear])
def test_state_dict_both_ways(cls):
    lin = nn.Linear(9, 4)
    fused = cls(9, 4)
    fused.load_state_dict(lin.state_dict())
    assert torch.equal(fused.weight, lin.weight) and torch.equal(fused.bias, lin.bias)
    fused2 = cls(9, 4)
    lin2 = nn.Linear(9, 4)
    lin2.load_state_dict(fused2.state_dict())
    assert torch.equal(lin2.weight, fused2.weight)
    assert set(fused.state_dict()) == set(lin.state_dict())


@pytest.mark.parametrize("cls,act", [(fastmlp.FusedLinearReLU, torch.relu), (fastmlp.FusedLinear, lambda t: t)])
def test_module_matches_torch(impl, cls, act):
    torch.manual_seed(1)
    lin = nn.Linear(21, 13, device=impl)
    fused = cls(21, 13, device=impl)
    fused.load_state_dict(lin.state_dict())
    x = torch.randn(2, 6, 21, device=impl)
    expected = act(nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double()))
    assert_close(fused(x), expected, torch.float32, "module")


def _seed_model(device="cpu"):
    return nn.Sequential(nn.Linear(1000, 100), nn.ReLU(), nn.Linear(100, 10)).to(device)


def test_fuse_replaces_pairs_and_keeps_state_dict_keys():
    model = nn.Sequential(
        nn.Linear(8, 8), nn.ReLU(),
        nn.Sequential(nn.Linear(8, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.ELU()),
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    keys = list(model.state_dict())
    params = [p for p in model.parameters()]
    fastmlp.fuse(model)
    assert list(model.state_dict()) == keys
    assert [p for p in model.parameters()] == params  # the very same Parameter objects
    assert isinstance(model[0], fastmlp.FusedLinearReLU) and isinstance(model[1], nn.Identity)
    assert isinstance(model[2][0], fastmlp.FusedLinearReLU) and isinstance(model[2][1], nn.Identity)
    assert type(model[2][2]) is nn.Linear and isinstance(model[2][3], nn.ELU)  # ELU: not fused
    assert isinstance(model[3], fastmlp.FusedLinearReLU)
    assert type(model[5]) is nn.Linear  # the last Linear has no ReLU after it


def test_fuse_nested_custom_module_and_idempotent():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.body(x))

    net = Net()
    assert fastmlp.fuse(net) is net
    assert isinstance(net.body[0], fastmlp.FusedLinearReLU)
    fastmlp.fuse(net)  # fusing twice changes nothing
    assert isinstance(net.body[0], fastmlp.FusedLinearReLU) and isinstance(net.body[1], nn.Identity)


def test_fuse_skips_linear_subclasses():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(3, 3), nn.ReLU())
    fastmlp.fuse(model)
    assert type(model[0]) is Scaled and type(model[1]) is nn.ReLU


def test_fused_model_same_outputs_and_gradients(impl):
    torch.manual_seed(2)
    model = _seed_model(impl)
    fused = fastmlp.fuse(copy.deepcopy(model))
    x = torch.randn(64, 1000, device=impl)
    target = torch.randn(64, 10, device=impl)
    loss_fn = nn.MSELoss(reduction="sum")
    loss_ref = loss_fn(model(x), target)
    loss_ref.backward()
    loss = loss_fn(fused(x), target)
    loss.backward()
    assert_close(loss.detach().reshape(1), loss_ref.detach().reshape(1), torch.float32, "loss")
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        assert_close(p.grad, q.grad, torch.float32, name)


def test_seed_network_sgd_steps_match_stock_torch(impl):
    """A few SGD steps of the seed's two-layer network (MSE sum, lr 1e-4) give stock torch's weights."""
    torch.manual_seed(3)
    stock = _seed_model(impl)
    fused = fastmlp.fuse(copy.deepcopy(stock))
    opt_stock = torch.optim.SGD(stock.parameters(), lr=1e-4)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=1e-4)
    loss_fn = nn.MSELoss(reduction="sum")
    for _ in range(4):
        x = torch.randn(64, 1000, device=impl)
        y = torch.randn(64, 10, device=impl)
        for model, opt in ((stock, opt_stock), (fused, opt_fused)):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    for (name, p), q in zip(fused.named_parameters(), stock.parameters()):
        assert_close(p, q, torch.float32, name)


def test_state_dict_of_fused_model_loads_into_stock_model():
    fused = fastmlp.fuse(_seed_model())
    stock = _seed_model()
    stock.load_state_dict(fused.state_dict())
    for p, q in zip(stock.parameters(), fused.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_meta_device_shape_inference(backend):
    """Models built on the meta device (shape inference, deferred init) run forward and backward."""
    with fastmlp.use_backend(backend):
        model = fastmlp.fuse(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))).to("meta")
        x = torch.randn(5, 3, 8, device="meta", requires_grad=True)
        out = model(x)
        assert out.shape == (5, 3, 2) and out.device.type == "meta"
        out.sum().backward()
        assert x.grad.shape == x.shape and model[0].weight.grad.shape == (6, 8)
