"""fit's CPU step without autograd (fastmlp/cpu_step.py) against autograd: same weights, same
gradients and optimizer state, for every activation it takes; clean fallbacks for what it does not."""

import copy

import pytest
import torch
from torch import nn

import fastmlp
from train_helpers import max_rel_err as _max_rel_err
from train_helpers import regression_data as _regression_data
from train_helpers import seed_like as _seed_like
from train_helpers import stock_loop as _stock_loop


def _mlp(bias=True, fused=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 20, bias=bias), nn.ReLU(), nn.Identity(),
                          nn.Linear(20, 16, bias=bias), nn.ReLU(inplace=True),
                          nn.Linear(16, 5, bias=bias))
    return fastmlp.fuse(model) if fused else model


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.MSELoss(reduction="sum"),
                                     nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"),
                                     nn.CrossEntropyLoss(ignore_index=2)],
                         ids=["mse-mean", "mse-sum", "ce-mean", "ce-sum", "ce-ignore"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_cpu_fast_path_matches_autograd(loss_fn, bias, fused, monkeypatch):
    from fastmlp.cpu_step import ManualMLP

    backward_calls = []
    original_backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward",
                        lambda self, *a, **k: backward_calls.append(1) or original_backward(self, *a, **k))

    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, 12, generator=g)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, 5, (100,), generator=g)
    else:
        y = torch.randn(100, 5, generator=g)
    models = [_mlp(bias, fused) for _ in range(2)]
    assert ManualMLP.build(models[0], loss_fn) is not None
    histories, autograd_steps, opts = [], [], []
    for model, fast in zip(models, (True, False)):
        opt = fastmlp.SGD(model.parameters(), lr=0.01, momentum=0.5)
        opts.append(opt)
        histories.append(fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=32), loss_fn,
                                     opt, epochs=2, progress=False, cpu_fast_path=fast)["loss"])
        autograd_steps.append(len(backward_calls))
    assert autograd_steps == [0, 8], "the fast path must skip autograd, the other must use it"
    assert _max_rel_err(models[0], models[1]) < 1e-6
    assert histories[0] == pytest.approx(histories[1], rel=1e-6)
    # both leave the last step's gradients in .grad and the same momentum buffers
    for p_fast, p_ref in zip(models[0].parameters(), models[1].parameters()):
        assert p_fast.grad is not None and p_fast.grad.is_contiguous()
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-5, atol=1e-7)
    buffers = [[opt.state[p]["momentum_buffer"] for p in model.parameters()]
               for model, opt in zip(models, opts)]
    for b_fast, b_ref in zip(*buffers):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-5, atol=1e-7)


def _optimizer_steps(monkeypatch):
    """Count calls of fastmlp.SGD.step (the lean CPU step must not go through it)."""
    calls = []
    original = fastmlp.SGD.step
    monkeypatch.setattr(fastmlp.SGD, "step",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    return calls


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lean_optimizer_step_on_the_cpu_fast_path(momentum, monkeypatch):
    """fit steps fastmlp.SGD without Optimizer.step's per-call machinery, to the same result."""
    calls = _optimizer_steps(monkeypatch)
    x, y = _regression_data()
    stock = _seed_like()
    ours = fastmlp.fuse(copy.deepcopy(stock))
    held = torch.full_like(ours[0].weight, 7.0)
    ours[0].weight.grad = held            # a gradient the caller holds must not be written
    stock_opt = torch.optim.SGD(stock.parameters(), lr=1e-3, momentum=momentum,
                                weight_decay=1e-2, nesterov=momentum > 0)
    _stock_loop(stock, x, y, nn.MSELoss(reduction="sum"), stock_opt, 3, 16)
    opt = fastmlp.SGD(ours.parameters(), lr=1e-3, momentum=momentum, weight_decay=1e-2,
                      nesterov=momentum > 0)
    fastmlp.fit(ours, fastmlp.TensorLoader(x, y, batch_size=16), nn.MSELoss(reduction="sum"),
                opt, epochs=3, progress=False)
    assert calls == [], "Optimizer.step ran on the lean path"
    assert _max_rel_err(ours, stock) < 1e-5
    assert torch.equal(held, torch.full_like(held, 7.0))
    if momentum:
        assert opt.state_dict()["state"].keys() == stock_opt.state_dict()["state"].keys()
        for p_ours, p_stock in zip(ours.parameters(), stock.parameters()):
            got = opt.state[p_ours]["momentum_buffer"]
            want = stock_opt.state[p_stock]["momentum_buffer"]
            assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_lean_optimizer_step_around_a_batch_it_does_not_take():
    """A batch the fast path refuses (here: inputs that require grad) goes through autograd and
    Optimizer.step, which makes the momentum buffers: the lean steps after it must use them."""
    x, y = _regression_data(n=64)
    stock = _seed_like()
    ours = fastmlp.fuse(copy.deepcopy(stock))
    stock_opt = torch.optim.SGD(stock.parameters(), lr=1e-2, momentum=0.9)
    _stock_loop(stock, x, y, nn.MSELoss(), stock_opt, 1, 16)

    class Loader:
        def __iter__(self):
            for i in range(0, 64, 16):
                xb = x[i:i + 16]
                yield [xb.clone().requires_grad_() if i == 0 else xb, y[i:i + 16]]

    fastmlp.fit(ours, Loader(), nn.MSELoss(), fastmlp.SGD(ours.parameters(), lr=1e-2, momentum=0.9),
                epochs=1, progress=False)
    assert _max_rel_err(ours, stock) < 1e-6


def test_lean_optimizer_step_with_an_lr_scheduler(monkeypatch):
    """A scheduler stepped between epochs: the lrs it sets are used, and it sees its optimizer
    as stepped (no 'lr_scheduler.step() before optimizer.step()' warning)."""
    calls = _optimizer_steps(monkeypatch)
    x, y = _regression_data()
    stock = _seed_like()
    ours = fastmlp.fuse(copy.deepcopy(stock))
    stock_opt = torch.optim.SGD(stock.parameters(), lr=0.05)
    opt = fastmlp.SGD(ours.parameters(), lr=0.05)
    stock_sched = torch.optim.lr_scheduler.StepLR(stock_opt, step_size=1, gamma=0.3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.3)
    for _ in range(3):
        _stock_loop(stock, x, y, nn.MSELoss(), stock_opt, 1, 32)
        stock_sched.step()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastmlp.fit(ours, fastmlp.TensorLoader(x, y, batch_size=32), nn.MSELoss(), opt,
                    epochs=3, progress=False, callbacks=[lambda epoch, logs: sched.step()])
    assert calls == []
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.3 ** 3)
    assert _max_rel_err(ours, stock) < 1e-5


def test_lean_optimizer_step_refuses_what_step_treats_differently():
    from fastmlp.cpu_step import ManualMLP
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model = _mlp()
    params = ManualMLP.build(model, nn.MSELoss()).params
    assert len(params) == 6

    def plan(**kwargs):
        return fastmlp.SGD(model.parameters(), lr=0.01, **kwargs)._cpu_step_plan(params)

    assert plan() is not None and plan(momentum=0.9) is not None
    assert plan(foreach=True) is None and plan(fused=True) is None
    assert plan(differentiable=True) is None
    assert fastmlp.SGD(model.parameters(), lr=torch.tensor(0.01))._cpu_step_plan(params) is None

    class MySGD(fastmlp.SGD):
        pass

    assert MySGD(model.parameters(), lr=0.01)._cpu_step_plan(params) is None
    opt = fastmlp.SGD(model.parameters(), lr=0.01)
    handle = opt.register_step_post_hook(lambda *a: None)
    assert opt._cpu_step_plan(params) is None
    handle.remove()
    assert opt._cpu_step_plan(params) is not None
    handle = register_optimizer_step_pre_hook(lambda *a: None)
    try:
        assert opt._cpu_step_plan(params) is None
    finally:
        handle.remove()
    opt.step = lambda closure=None: None    # a patched step that is not a scheduler's counter
    assert opt._cpu_step_plan(params) is None
    # parameters other than the model's, or only some of them
    assert fastmlp.SGD(params[:-1], lr=0.01)._cpu_step_plan(params) is None
    extra = nn.Parameter(torch.zeros(3))
    assert fastmlp.SGD([*params, extra], lr=0.01)._cpu_step_plan(params) is None
    # AMP's grad scaling, momentum buffers on some parameters only
    opt = fastmlp.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.grad_scale = torch.ones(())
    assert opt._cpu_step_plan(params) is None
    opt = fastmlp.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.state[params[0]]["momentum_buffer"] = torch.zeros_like(params[0])
    assert opt._cpu_step_plan(params) is None
    with fastmlp.use_backend("triton"):
        assert plan() is None


def test_cpu_fast_path_falls_back_when_it_must():
    from fastmlp.cpu_step import ManualMLP

    mse = nn.MSELoss()

    class MyReLU(nn.ReLU):   # a subclass may compute something else
        pass

    assert ManualMLP.build(nn.Sequential(nn.Linear(3, 3), nn.Softplus()), mse) is None
    assert ManualMLP.build(nn.Sequential(nn.Linear(3, 3), MyReLU()), mse) is None
    assert ManualMLP.build(nn.Sequential(nn.ReLU(), nn.Linear(3, 3)), mse) is None
    # one activation per layer (relu twice is relu: same values, same mask)
    assert ManualMLP.build(nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.Tanh()), mse) is None
    assert ManualMLP.build(nn.Sequential(fastmlp.FusedLinearReLU(3, 3), nn.Tanh()), mse) is None
    assert ManualMLP.build(nn.Sequential(fastmlp.FusedLinearReLU(3, 3), nn.ReLU()), mse) is not None
    unknown = fastmlp.FusedLinear(3, 3)
    unknown.activation = "softplus"        # a name the table does not have
    assert ManualMLP.build(nn.Sequential(unknown), mse) is None
    assert ManualMLP.build(_mlp(), nn.L1Loss()) is None
    assert ManualMLP.build(_mlp(), nn.CrossEntropyLoss(label_smoothing=0.1)) is None
    frozen = _mlp()
    frozen[0].weight.requires_grad_(False)
    assert ManualMLP.build(frozen, mse) is None
    with fastmlp.use_backend("triton"):
        assert ManualMLP.build(_mlp(), mse) is None
    # a forward hook must run: the model goes through autograd, and still trains the same
    calls = []
    hooked, plain = _mlp(), _mlp()
    hooked[3].register_forward_hook(lambda m, i, o: calls.append(1))
    assert ManualMLP.build(hooked, mse) is None
    x, y = torch.randn(64, 12), torch.randn(64, 5)
    for model in (hooked, plain):
        fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=16), mse,
                    fastmlp.SGD(model.parameters(), lr=0.01), epochs=1, progress=False)
    assert len(calls) == 4
    assert _max_rel_err(hooked, plain) < 1e-6


# ---------------------------------------------------------------------------------------------
# Activations: nn modules after a Linear, and fused layers
# ---------------------------------------------------------------------------------------------
ACTIVATION_MODULES = [nn.ReLU(), nn.LeakyReLU(), nn.LeakyReLU(0.2), nn.LeakyReLU(-0.1), nn.GELU(),
                      nn.GELU(approximate="tanh"), nn.SiLU(), nn.Sigmoid(), nn.Tanh()]


def _fused_layer(d_in, d_out, activation):
    try:
        return fastmlp.FusedLinear(d_in, d_out, activation=activation)
    except TypeError:   # a FusedLinear without activation=: the two classes it then has
        return {"relu": fastmlp.FusedLinearReLU, "none": fastmlp.FusedLinear}[activation](d_in, d_out)


def _fit_both_ways(make_model, loss_fn, monkeypatch, momentum=0.5):
    """Train two copies with fit, through the CPU step and through autograd (counted): the two
    models, and how many backward() calls each made."""
    backward_calls = []
    original_backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward",
                        lambda self, *a, **k: backward_calls.append(1) or original_backward(self, *a, **k))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(96, 12, generator=g)
    y = torch.randn(96, 5, generator=g)
    models, calls = [make_model(), make_model()], []
    for model, fast in zip(models, (True, False)):
        fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=32), loss_fn,
                    fastmlp.SGD(model.parameters(), lr=0.05, momentum=momentum), epochs=2,
                    progress=False, cpu_fast_path=fast)
        calls.append(len(backward_calls) - sum(calls))
    return models, calls


@pytest.mark.parametrize("act", ACTIVATION_MODULES, ids=repr)
@pytest.mark.parametrize("on_output", [False, True], ids=["hidden", "hidden+output"])
def test_cpu_step_trains_activation_modules_as_autograd(act, on_output, monkeypatch):
    """nn.Sequential(nn.Linear, <activation>, nn.Linear[, <activation>]): the CPU step takes it
    (no backward() call) and ends with autograd's weights and gradients."""
    from fastmlp.cpu_step import ManualMLP

    def make():
        torch.manual_seed(0)
        layers = [nn.Linear(12, 20), copy.deepcopy(act), nn.Linear(20, 5)]
        return nn.Sequential(*layers, *([copy.deepcopy(act)] if on_output else []))

    assert ManualMLP.build(make(), nn.MSELoss()) is not None
    (fast, ref), calls = _fit_both_ways(make, nn.MSELoss(), monkeypatch)
    assert calls == [0, 6]
    assert _max_rel_err(fast, ref) < 1e-6
    for p_fast, p_ref in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", fastmlp.ACTIVATIONS)
def test_cpu_step_trains_fused_activations_as_autograd(name, monkeypatch):
    """FusedLinear(activation=name) for every activation fastmlp has: the CPU step ends with the
    weights autograd (through FusedLinearFunction) gives."""
    from fastmlp.cpu_step import ManualMLP

    def make():
        torch.manual_seed(0)
        return nn.Sequential(_fused_layer(12, 20, name), _fused_layer(20, 16, name),
                             nn.Linear(16, 5))

    assert ManualMLP.build(make(), nn.MSELoss()) is not None
    (fast, ref), calls = _fit_both_ways(make, nn.MSELoss(), monkeypatch)
    assert calls == [0, 6]
    assert _max_rel_err(fast, ref) < 1e-6


def test_cpu_step_reads_a_fused_layers_activation_and_its_parameter():
    """The activation comes from the layer's .activation and .activation_alpha (leaky_relu's
    slope), and an nn module's from fastmlp.activations.from_module."""
    from fastmlp.cpu_step import ManualMLP

    layer = fastmlp.FusedLinear(4, 4)
    layer.activation, layer.activation_alpha = "leaky_relu", 0.2
    built = ManualMLP.build(nn.Sequential(layer, nn.Linear(4, 4), nn.LeakyReLU(-0.3)), nn.MSELoss())
    (_, _, first), (_, _, second) = built.layers
    assert (first.name, first.alpha, first.saves) == ("leaky_relu", 0.2, "output")
    assert (second.name, second.alpha, second.saves) == ("leaky_relu", -0.3, "preact")
