"""fastmlp.fit: same weights as the stock loop, learns, no per-step syncs, callbacks, checkpoints,
and (on a GPU) the CUDA-graph step against the eager one."""

import copy
import io
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastmlp


def _seed_like(d_in=40, h=24, d_out=6, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, d_out)).to(device)


def _regression_data(n=200, d_in=40, d_out=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)


def _stock_loop(model, x, y, loss_fn, optimizer, epochs, batch_size):
    """The seed's loop, with each batch's loss recorded."""
    losses = []
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    for _ in range(epochs):
        epoch_losses = []
        for inputs, labels in loader:
            loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_losses.append(loss.item())
        losses.append(sum(epoch_losses) / len(epoch_losses))
    return losses


def _max_rel_err(model_a, model_b):
    return max(((a - b).norm() / b.norm()).item()
               for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fit_matches_stock_loop(fused, reduction, momentum):
    x, y = _regression_data()
    stock = _seed_like()
    ours = copy.deepcopy(stock)
    if fused:
        fastmlp.fuse(ours)
    lr = 1e-3 if reduction == "sum" else 0.05
    stock_losses = _stock_loop(stock, x, y, nn.MSELoss(reduction=reduction),
                               torch.optim.SGD(stock.parameters(), lr=lr, momentum=momentum), 3, 16)
    history = fastmlp.fit(ours, fastmlp.TensorLoader(x, y, batch_size=16),  # 200 = 12*16 + 8
                          nn.MSELoss(reduction=reduction),
                          fastmlp.SGD(ours.parameters(), lr=lr, momentum=momentum),
                          epochs=3, progress=False)
    assert _max_rel_err(ours, stock) < 1e-5
    assert len(history["loss"]) == 3 and len(history["samples_per_s"]) == 3
    for got, want in zip(history["loss"], stock_losses):
        assert got == pytest.approx(want, rel=1e-5)
    assert all(r > 0 for r in history["samples_per_s"])
    assert stock_losses[-1] < stock_losses[0]


def test_fit_with_dataloader_and_torch_sgd():
    x, y = _regression_data()
    stock = _seed_like()
    ours = copy.deepcopy(stock)
    _stock_loop(stock, x, y, nn.MSELoss(), torch.optim.SGD(stock.parameters(), lr=0.05), 2, 32)
    fastmlp.fit(ours, DataLoader(TensorDataset(x, y), batch_size=32), nn.MSELoss(),
                torch.optim.SGD(ours.parameters(), lr=0.05), epochs=2, progress=False)
    assert _max_rel_err(ours, stock) < 1e-5


def _blobs(n=600, d=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    return centers[labels] + torch.randn(n, d, generator=g), labels


@pytest.mark.parametrize("fused", [False, True])
def test_cross_entropy_classification_learns(fused):
    x, labels = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    if fused:
        fastmlp.fuse(model)
    loader = fastmlp.TensorLoader(x[:500], labels[:500], batch_size=32, shuffle=True)
    history = fastmlp.fit(model, loader, nn.CrossEntropyLoss(),
                          fastmlp.SGD(model.parameters(), lr=0.05, momentum=0.9), epochs=8,
                          progress=False)
    with torch.no_grad():
        acc = (model(x[500:]).argmax(1) == labels[500:]).float().mean().item()
    assert acc > 0.95, f"held-out accuracy {acc:.3f}"
    assert history["loss"][-1] < 0.5 * history["loss"][0]


def test_no_host_sync_per_step(monkeypatch):
    """Reading a value back (item/tolist/float) happens per epoch, never per step."""
    calls = {"n": 0}
    for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            calls["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    x, y = _regression_data(n=320)
    model = fastmlp.fuse(_seed_like())
    epochs, steps_per_epoch = 3, 20
    loader = fastmlp.TensorLoader(x, y, batch_size=16, shuffle=True)
    assert len(loader) == steps_per_epoch
    fastmlp.fit(model, loader, nn.MSELoss(), fastmlp.SGD(model.parameters(), lr=0.01),
                epochs=epochs, progress=False)
    # per epoch: the loader's two seed draws (DataLoader parity, CPU) and the one stats read
    assert calls["n"] <= 3 * epochs, f"{calls['n']} read-backs for {epochs * steps_per_epoch} steps"


def test_callbacks_stop_early_and_see_logs():
    x, y = _regression_data()
    model = _seed_like()
    seen = []

    class Recorder:
        def on_epoch_end(self, epoch, logs):
            seen.append(dict(logs))

    history = fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=50), nn.MSELoss(),
                          fastmlp.SGD(model.parameters(), lr=0.01), epochs=10, progress=False,
                          callbacks=[Recorder(), lambda epoch, logs: epoch == 2])
    assert len(history["loss"]) == 3
    assert [s["epoch"] for s in seen] == [0, 1, 2]
    assert seen[-1]["loss"] == history["loss"][-1]
    assert set(seen[0]) >= {"epoch", "loss", "samples_per_s", "time_s"}


def test_set_epoch_is_called():
    x, y = _regression_data(n=64)
    loader = fastmlp.TensorLoader(x, y, batch_size=8, shuffle=True, rank=0, world_size=2)
    model = _seed_like()
    fastmlp.fit(model, loader, nn.MSELoss(), fastmlp.SGD(model.parameters(), lr=0.01), epochs=3,
                start_epoch=4, progress=False)
    assert loader.epoch == 6


def test_progress_bar_only_on_a_terminal(monkeypatch):
    x, y = _regression_data(n=64)
    model = _seed_like()
    opt = fastmlp.SGD(model.parameters(), lr=0.01)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for tty, progress in ((False, True), (True, False), (True, True)):
        stream = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=8), nn.MSELoss(), opt,
                    epochs=2, progress=progress)
        out = stream.getvalue()
        if tty and progress:
            assert "epoch 2/2" in out and "loss=" in out and "samples_per_s=" in out
        else:
            assert out == ""


def test_checkpoint_round_trip(tmp_path):
    x, y = _regression_data()
    loss_fn = nn.MSELoss()

    def make():
        model = fastmlp.fuse(_seed_like())
        return model, fastmlp.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-3)

    loader = fastmlp.TensorLoader(x, y, batch_size=32)
    model_a, opt_a = make()
    fastmlp.fit(model_a, loader, loss_fn, opt_a, epochs=2, progress=False)
    fastmlp.save_checkpoint(tmp_path / "ckpt.pt", model_a, opt_a, epoch=2)
    fastmlp.fit(model_a, loader, loss_fn, opt_a, epochs=2, start_epoch=2, progress=False)

    model_b, opt_b = make()
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    for p in model_b.parameters():
        p.data.normal_()
    state = fastmlp.load_checkpoint(tmp_path / "ckpt.pt", model_b, opt_b)
    assert state["epoch"] == 2
    assert opt_b.state_dict()["state"].keys() == opt_a.state_dict()["state"].keys()
    fastmlp.fit(model_b, loader, loss_fn, opt_b, epochs=2, start_epoch=2, progress=False)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)
    # the checkpoint also loads into plain nn.Linear models and torch.optim.SGD
    plain = _seed_like()
    torch_opt = torch.optim.SGD(plain.parameters(), lr=1.0)
    fastmlp.load_checkpoint(tmp_path / "ckpt.pt", plain, torch_opt)
    assert torch_opt.param_groups[0]["momentum"] == 0.9


def test_argument_errors():
    x, y = _regression_data(n=16)
    model = _seed_like()
    opt = fastmlp.SGD(model.parameters(), lr=0.01)
    loader = fastmlp.TensorLoader(x, y, batch_size=8)
    with pytest.raises(ValueError, match="cuda_graph"):
        fastmlp.fit(model, loader, nn.MSELoss(), opt, cuda_graph="yes", progress=False)
    with pytest.raises(ValueError, match="CUDA"):
        fastmlp.fit(model, loader, nn.MSELoss(), opt, cuda_graph=True, progress=False)
    with pytest.raises(TypeError, match="list or tuple"):
        fastmlp.fit(model, [x[:8]], nn.MSELoss(), opt, progress=False)


# ---------------------------------------------------------------------------------------------
# The captured step's bookkeeping (no GPU needed: it decides when a graph is still valid)
# ---------------------------------------------------------------------------------------------
def _graph_step(opt_cls=fastmlp.SGD, device="cpu", **opt_kwargs):
    from fastmlp.train import _GraphStep

    model = _seed_like(device=device)
    opt = opt_cls(model.parameters(), lr=0.01, **opt_kwargs)
    x, y = _regression_data(n=16)
    nn.MSELoss()(model(x.to(device)), y.to(device)).backward()
    opt.step()
    step = _GraphStep(model, nn.MSELoss(), opt, key=None)
    step.graph = object()                 # stands for a captured graph
    step.warmup_left = 0
    step.captured_state = step.warm_state = step.state()
    return step, model, opt


def test_graph_is_kept_while_nothing_it_baked_in_changes():
    step, model, opt = _graph_step()
    step.revalidate()
    assert step.graph is not None
    opt.param_groups[0]["lr"] = 0.5       # fastmlp.SGD reads lr from device memory: kept
    step.revalidate()
    assert step.graph is not None and step.captured_state == step.state()
    for p in model.parameters():           # in-place changes keep the addresses
        p.data.mul_(0.5)
        p.grad.zero_()
    step.revalidate()
    assert step.graph is not None


@pytest.mark.parametrize("change", ["zero_grad_to_none", "momentum_on", "swap_data",
                                    "torch_sgd_lr", "load_optimizer_state"])
def test_graph_is_dropped_and_rewarmed_when_its_inputs_change(change):
    opt_cls = torch.optim.SGD if change == "torch_sgd_lr" else fastmlp.SGD
    kwargs = {"momentum": 0.9} if change == "load_optimizer_state" else {}
    step, model, opt = _graph_step(opt_cls, **kwargs)
    if change == "zero_grad_to_none":
        opt.zero_grad(set_to_none=True)   # the graph would write freed memory
    elif change == "momentum_on":
        opt.param_groups[0]["momentum"] = 0.9
    elif change == "swap_data":
        model[0].weight.data = model[0].weight.data.clone()
    elif change == "torch_sgd_lr":
        opt.param_groups[0]["lr"] = 0.5   # a float kernel argument inside torch's captured step
    else:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # new momentum buffers
    step.revalidate()
    assert step.graph is None and step.keepalive == ()
    assert step.warmup_left >= 2, "a first step may build state: two warm-up steps before capture"


def test_capture_waits_for_a_second_warmup_after_a_change():
    step, model, opt = _graph_step()
    step.graph = None
    step.rewarm_if_changed()
    assert step.warmup_left == 0           # nothing changed since the warm-up: capture
    opt.zero_grad(set_to_none=True)        # e.g. a callback between warm-up and capture
    step.rewarm_if_changed()
    assert step.warmup_left == 2


def test_graph_keeps_its_tensors_and_sgd_tables_alive(triton_backend, device):
    step, model, opt = _graph_step(device=device, momentum=0.9)
    assert opt._launcher is not None and opt._launcher._plans
    held = step._held_by_graph()
    for p in model.parameters():
        assert any(t is p.grad for t in held)
        assert any(t is opt.state[p]["momentum_buffer"] for t in held)
    assert all(any(t is plan for t in held) for plan in opt._launcher._plans.values())


# ---------------------------------------------------------------------------------------------
# CUDA: the captured step against the eager one
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("opt_name", ["fastmlp", "torch"])
def test_cuda_graph_fit_matches_eager(opt_name):
    x, y = _regression_data(n=200)  # 200 = 12*16 + 8: a short last batch runs eagerly
    make_opt = {"fastmlp": fastmlp.SGD, "torch": torch.optim.SGD}[opt_name]
    eager = fastmlp.fuse(_seed_like(device="cuda"))
    graphed = copy.deepcopy(eager)
    opt_e = make_opt(eager.parameters(), lr=0.01, momentum=0.9)
    opt_g = make_opt(graphed.parameters(), lr=0.01, momentum=0.9)
    sched_e = torch.optim.lr_scheduler.StepLR(opt_e, step_size=1, gamma=0.5)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=1, gamma=0.5)
    loader = fastmlp.TensorLoader(x, y, batch_size=16, device="cuda")
    h_e = fastmlp.fit(eager, loader, nn.MSELoss(), opt_e, epochs=3, cuda_graph=False,
                      progress=False, callbacks=[lambda e, logs: sched_e.step()])
    h_g = fastmlp.fit(graphed, loader, nn.MSELoss(), opt_g, epochs=3, cuda_graph=True,
                      progress=False, callbacks=[lambda e, logs: sched_g.step()])
    from fastmlp.train import _graph_cache
    assert _graph_cache[graphed].graph is not None
    assert _max_rel_err(graphed, eager) < 1e-5
    for a, b in zip(h_g["loss"], h_e["loss"]):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("opt_name", ["fastmlp", "torch"])
def test_cuda_graph_survives_changes_between_fit_calls(opt_name):
    """Changes a graph bakes in, made between fit calls or epochs, each right where the next
    batch would be captured or replayed: an lr schedule when the warm-up ends at an epoch's
    end (3 full batches), momentum turned on, gradients set to None, an optimizer state_dict
    loaded (new momentum buffers). The graphed run must train exactly like the eager one."""
    x, y = _regression_data(n=48)            # 3 full batches of 16: warm-up ends with epoch 0
    make_opt = {"fastmlp": fastmlp.SGD, "torch": torch.optim.SGD}[opt_name]
    models = [fastmlp.fuse(_seed_like(device="cuda")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    loader = fastmlp.TensorLoader(x, y, batch_size=16, device="cuda")
    for model, graphed in zip(models, (False, True)):
        opt = make_opt(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

        def run(epochs):
            fastmlp.fit(model, loader, nn.MSELoss(), opt, epochs=epochs, cuda_graph=graphed,
                        progress=False, callbacks=[lambda e, logs: sched.step()])

        run(2)
        opt.param_groups[0]["momentum"] = 0.9
        run(2)
        opt.zero_grad(set_to_none=True)
        run(1)
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        run(2)
    from fastmlp.train import _graph_cache
    assert _graph_cache[models[1]].graph is not None
    assert _max_rel_err(models[1], models[0]) < 1e-5


# ---------------------------------------------------------------------------------------------
# CPU: the autograd-free step for plain MLPs against autograd
# ---------------------------------------------------------------------------------------------
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
    from fastmlp.train import _ManualMLPStep

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
    assert _ManualMLPStep.build(models[0], loss_fn) is not None
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
    from fastmlp.train import _ManualMLPStep
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model = _mlp()
    params = _ManualMLPStep.build(model, nn.MSELoss()).params
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
    from fastmlp.train import _ManualMLPStep

    mse = nn.MSELoss()
    assert _ManualMLPStep.build(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), mse) is None
    assert _ManualMLPStep.build(nn.Sequential(nn.ReLU(), nn.Linear(3, 3)), mse) is None
    assert _ManualMLPStep.build(_mlp(), nn.L1Loss()) is None
    assert _ManualMLPStep.build(_mlp(), nn.CrossEntropyLoss(label_smoothing=0.1)) is None
    frozen = _mlp()
    frozen[0].weight.requires_grad_(False)
    assert _ManualMLPStep.build(frozen, mse) is None
    with fastmlp.use_backend("triton"):
        assert _ManualMLPStep.build(_mlp(), mse) is None
    # a forward hook must run: the model goes through autograd, and still trains the same
    calls = []
    hooked, plain = _mlp(), _mlp()
    hooked[3].register_forward_hook(lambda m, i, o: calls.append(1))
    assert _ManualMLPStep.build(hooked, mse) is None
    x, y = torch.randn(64, 12), torch.randn(64, 5)
    for model in (hooked, plain):
        fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=16), mse,
                    fastmlp.SGD(model.parameters(), lr=0.01), epochs=1, progress=False)
    assert len(calls) == 4
    assert _max_rel_err(hooked, plain) < 1e-6


def test_fit_through_triton_kernels_matches_torch(triton_backend):
    """The whole fastmlp stack through its Triton kernels (interpreter on CPU, native on CUDA):
    fused layers forward/backward and the multi-tensor SGD, against the same fit on torch ops."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(24, 8, generator=g), torch.randn(24, 3, generator=g)
    ref = _seed_like(8, 16, 3, device=device)
    ours = fastmlp.fuse(copy.deepcopy(ref))
    with fastmlp.use_backend("torch"):
        fastmlp.fit(ref, fastmlp.TensorLoader(x, y, batch_size=8, device=device), nn.MSELoss(),
                    torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), epochs=2,
                    progress=False, cuda_graph=False)
    opt = fastmlp.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    fastmlp.fit(ours, fastmlp.TensorLoader(x, y, batch_size=8, device=device), nn.MSELoss(), opt,
                epochs=2, progress=False, cuda_graph=False)
    assert opt._launcher is not None, "the Triton SGD kernel did not run"
    assert _max_rel_err(ours, ref) < 1e-5
