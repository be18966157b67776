"""fit's CUDA-graph step (fastmlp/graph_step.py).

Without a GPU: its decisions, when a captured graph is still right, what it records and holds,
how it captures, when a step cannot be captured, and the strategy's order of warm-up, capture,
replay and eager steps (graphs faked where CUDA would run). With a GPU (marked ``gpu``): the
captured step itself, against eager steps, through the changes that the decisions cover.
"""

import contextlib
import copy
import threading
import warnings

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp.graph_step import CapturedStep, GraphStep, uncapturable_reason
from train_helpers import max_rel_err as _max_rel_err
from train_helpers import regression_data as _regression_data
from train_helpers import seed_like as _seed_like


def _pretend_captured(step):
    step.graph = object()                 # stands for a captured graph
    step.warmup_left = 0
    step.captured_state = step.warm_state = step.state()
    step.keepalive = step._held_by_graph()


def _captured(opt_cls=fastmlp.SGD, device="cpu", dtype=torch.float32, params=None, **opt_kwargs):
    """A CapturedStep as after warm-up and capture, for a seed-like model and one real step."""
    model = _seed_like(device=device).to(dtype)
    opt = opt_cls(model.parameters() if params is None else params(model), **{"lr": 0.01, **opt_kwargs})
    x, y = _regression_data(n=16)
    nn.MSELoss()(model(x.to(device, dtype)), y.to(device, dtype)).backward()
    opt.step()
    step = CapturedStep(model, nn.MSELoss(), opt, key=None)
    _pretend_captured(step)
    return step, model, opt


# ---------------------------------------------------------------------------------------------
# When a captured graph is still right
# ---------------------------------------------------------------------------------------------
def test_graph_is_kept_while_nothing_it_baked_in_changes(triton_backend, device):
    step, model, opt = _captured(device=device)
    step.revalidate()
    assert step.graph is not None
    opt.param_groups[0]["lr"] = 0.5       # the kernel reads lr from device memory: kept
    step.revalidate()
    assert step.graph is not None and step.captured_state == step.state()
    (lr_read,) = opt.lr_tensors(0)
    assert lr_read.item() == 0.5, "sync_lr must have written the new lr where the graph reads it"
    for p in model.parameters():           # in-place changes keep the addresses
        p.data.mul_(0.5)
        p.grad.zero_()
    step.revalidate()
    assert step.graph is not None


def test_graph_follows_an_lr_tensor_changed_in_place(triton_backend, device):
    """A CPU tensor lr: on CPU the kernel reads it directly, on a GPU a copy that sync_lr
    refreshes from it; either way an in-place change reaches the graph without a re-capture."""
    lr = torch.tensor(0.01)
    step, model, opt = _captured(device=device, lr=lr)
    lr.fill_(0.25)
    step.revalidate()
    assert step.graph is not None
    assert opt.lr_tensors(0)[0].item() == 0.25


@pytest.mark.parametrize("change", ["zero_grad_to_none", "momentum_on", "swap_data",
                                    "torch_sgd_lr", "load_optimizer_state",
                                    "cpu_tensor_weight_decay"])
def test_graph_is_dropped_and_rewarmed_when_its_inputs_change(change):
    opt_cls = torch.optim.SGD if change in ("torch_sgd_lr", "cpu_tensor_weight_decay") else fastmlp.SGD
    kwargs = {"momentum": 0.9} if change == "load_optimizer_state" else {}
    if change == "cpu_tensor_weight_decay":
        kwargs["weight_decay"] = torch.tensor(0.01)
    step, model, opt = _captured(opt_cls, **kwargs)
    if change == "zero_grad_to_none":
        opt.zero_grad(set_to_none=True)   # the graph would write freed memory
    elif change == "momentum_on":
        opt.param_groups[0]["momentum"] = 0.9
    elif change == "swap_data":
        model[0].weight.data = model[0].weight.data.clone()
    elif change == "torch_sgd_lr":
        opt.param_groups[0]["lr"] = 0.5   # a float kernel argument inside torch's captured step
    elif change == "cpu_tensor_weight_decay":
        opt.param_groups[0]["weight_decay"].fill_(0.5)   # read as a number, at capture
    else:
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # new momentum buffers
    step.revalidate()
    assert step.graph is None and step.keepalive == ()
    assert step.warmup_left >= 2, "a first step may build state: two warm-up steps before capture"


def _with_a_non_contiguous_weight(model):
    model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())
    assert not model[0].weight.is_contiguous()
    return model.parameters()


@pytest.mark.parametrize("update", ["float64", "foreach", "fused", "non_contiguous",
                                    "backend_torch"])
def test_lr_change_of_a_group_torch_updates_means_a_new_capture(update, device, request):
    """fastmlp.SGD groups its kernel does not take get torch's update, whose lr is a number
    frozen in the graph: a scheduler's new lr must not be accepted without a re-capture."""
    if update != "backend_torch":
        request.getfixturevalue("triton_backend")
    kwargs, dtype, params = {}, torch.float32, None
    if update == "float64":
        dtype = torch.float64
    elif update in ("foreach", "fused"):
        kwargs[update] = True
    elif update == "non_contiguous":
        params = _with_a_non_contiguous_weight
    scope = fastmlp.use_backend("torch") if update == "backend_torch" else contextlib.nullcontext()
    with scope:
        step, model, opt = _captured(device=device, dtype=dtype, params=params, **kwargs)
        assert opt.lr_tensors(0) is None
        opt.param_groups[0]["lr"] = 0.5
        step.revalidate()
    assert step.graph is None


def test_lr_changes_are_accepted_per_group(triton_backend, device):
    """One group on the kernel, one on torch's foreach update: an lr change is kept for the
    first, re-captured for the second."""
    def groups(model):
        return [{"params": model[0].parameters()},
                {"params": model[2].parameters(), "foreach": True}]

    step, model, opt = _captured(device=device, params=groups)
    assert opt.lr_tensors(0) is not None and opt.lr_tensors(1) is None
    opt.param_groups[0]["lr"] = 0.5
    step.revalidate()
    assert step.graph is not None
    opt.param_groups[1]["lr"] = 0.5
    step.revalidate()
    assert step.graph is None


def test_load_state_dict_keeps_the_graph_and_the_lr_tensor_it_reads(triton_backend, device):
    """Optimizer.load_state_dict goes through __setstate__: fastmlp.SGD keeps its lr tensors, so
    with momentum 0 (no state address changes) the graph stays valid and a loaded lr reaches
    the very tensor it reads."""
    step, model, opt = _captured(device=device)
    (read,) = opt.lr_tensors(0)
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.02
    opt.load_state_dict(state)
    step.revalidate()
    assert step.graph is not None
    assert opt.lr_tensors(0)[0] is read and read.item() == pytest.approx(0.02)


def test_graph_is_dropped_when_the_lr_tensor_it_reads_is_gone(triton_backend, device):
    """The device lr tensors are part of what a graph points into: recorded, held, compared.
    If the optimizer no longer has the one the graph reads (its cache rebuilt), sync_lr
    cannot reach the graph: it must be captured again."""
    step, model, opt = _captured(device=device)
    (read,) = opt.lr_tensors(0)
    assert any(t is read for t in step.keepalive)
    opt._init_runtime()                    # what __setstate__ did before it kept the caches
    step.revalidate()
    assert step.graph is None


def test_capture_waits_for_a_second_warmup_after_a_change():
    step, model, opt = _captured()
    step.graph = None
    step.rewarm_if_changed()
    assert step.warmup_left == 0           # nothing changed since the warm-up: capture
    opt.zero_grad(set_to_none=True)        # e.g. a callback between warm-up and capture
    step.rewarm_if_changed()
    assert step.warmup_left == 2


def test_graph_keeps_its_tensors_and_sgd_tables_alive(triton_backend, device):
    step, model, opt = _captured(device=device, momentum=0.9)
    assert opt._launcher is not None and opt._launcher._plans
    held = step._held_by_graph()
    for p in model.parameters():
        assert any(t is p.grad for t in held)
        assert any(t is opt.state[p]["momentum_buffer"] for t in held)
    assert all(any(t is plan for t in held) for plan in opt._launcher._plans.values())
    assert all(any(t is lr for t in held) for lr in opt.lr_tensors(0))


# ---------------------------------------------------------------------------------------------
# How it captures, and what cannot be captured
# ---------------------------------------------------------------------------------------------
def test_capture_is_thread_local(monkeypatch):
    """Capture in "thread_local" mode: in the default "global" mode a DataLoader's pin-memory
    thread allocating pinned memory (cudaHostAlloc) during the capture invalidates it."""
    seen = {}

    class FakeGraph:
        pass

    class fake_graph_context:
        def __init__(self, graph, **kwargs):
            seen.update(kwargs, graph=graph)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph_context)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    step, model, _ = _captured()           # (the step holds the model weakly)
    x, y = _regression_data(n=16)
    step.capture([x], y)                   # the recorded step runs eagerly here: no CUDA
    assert isinstance(seen["graph"], FakeGraph)
    assert seen.get("capture_error_mode") == "thread_local"


def test_uncapturable_optimizer_steps():
    """GPU tensors (meta stands for one) that an SGD update reads back as numbers; CPU tensors
    and numbers are fine, and other optimizers are taken at their word."""
    gpu = lambda v: torch.tensor(v, device="meta")   # noqa: E731
    params = [nn.Parameter(torch.zeros(3))]
    for cls in (torch.optim.SGD, fastmlp.SGD):
        for key, value in (("lr", 0.1), ("momentum", 0.9), ("weight_decay", 0.01),
                           ("dampening", 0.1)):
            opt = cls(params, lr=0.1, momentum=0.5)
            assert uncapturable_reason(opt) is None
            opt.param_groups[0][key] = torch.tensor(value)          # CPU: no sync
            assert uncapturable_reason(opt) is None
            opt.param_groups[0][key] = gpu(value)
            reason = uncapturable_reason(opt)
            assert reason is not None and f"{key} is a tensor on meta" in reason, reason
    # torch's fused SGD loads a tensor lr on its parameters' device, not one elsewhere
    fused = torch.optim.SGD(params, lr=0.1, fused=True)
    fused.param_groups[0]["lr"] = gpu(0.1)
    assert "lr is a tensor on meta" in uncapturable_reason(fused)
    adam = torch.optim.Adam(params, lr=0.1, capturable=True)
    adam.param_groups[0]["lr"] = gpu(0.1)
    assert uncapturable_reason(adam) is None


# ---------------------------------------------------------------------------------------------
# The strategy: warm-up, capture, replay, eager steps
# ---------------------------------------------------------------------------------------------
def test_graph_step_order_of_warmup_capture_replay_and_eager_steps(monkeypatch):
    """Per epoch: batches of the first batch's shape warm up (3 steps), then one capture and
    replays; other shapes (the short last batch) go to the fallback; the next epoch
    re-validates the graph first and replays."""
    events = []

    def warmup_step(self, inputs, target, fallback):
        events.append("warmup")
        self.warmup_left -= 1
        self.warm_state = self.state()
        return fallback.step(inputs, target)

    def capture(self, inputs, target):
        events.append("capture")
        self.graph = object()
        self.captured_state = self.state()

    class Fallback:
        def step(self, inputs, target):
            events.append("eager")
            return torch.zeros(())

    monkeypatch.setattr(CapturedStep, "warmup_step", warmup_step)
    monkeypatch.setattr(CapturedStep, "capture", capture)
    monkeypatch.setattr(CapturedStep, "replay", lambda self, i, t: events.append("replay"))
    monkeypatch.setattr(CapturedStep, "revalidate", lambda self: events.append("revalidate"))
    model = _seed_like()
    opt = fastmlp.SGD(model.parameters(), lr=0.01)
    strategy = GraphStep(model, nn.MSELoss(), opt, Fallback())
    x, y = _regression_data(n=16)
    batches = [(x[:4], y[:4])] * 5 + [(x[:2], y[:2])]
    for _ in range(2):
        strategy.start_epoch()
        results = [strategy.step([xb], yb) for xb, yb in batches]
    assert events == (["warmup", "eager"] * 3 + ["capture", "replay", "replay", "eager"]
                      + ["revalidate"] + ["replay"] * 5 + ["eager"])
    assert [r is None for r in results] == [True] * 5 + [False]
    from fastmlp.graph_step import cached
    assert cached(model) is strategy.captured
    # the cache is for this optimizer and loss: another one starts afresh
    assert GraphStep(model, nn.MSELoss(), opt, Fallback()).captured is None
    assert GraphStep(model, strategy.loss_fn, opt, Fallback()).captured is strategy.captured


# ---------------------------------------------------------------------------------------------
# CUDA: the captured step against the eager one
# ---------------------------------------------------------------------------------------------
_OPTIMIZERS = {
    "fastmlp": (fastmlp.SGD, {}, torch.float32),
    "torch": (torch.optim.SGD, {}, torch.float32),
    # groups fastmlp.SGD gives torch's update: their lr is frozen in the graph
    "fastmlp-fp64": (fastmlp.SGD, {}, torch.float64),
    "fastmlp-foreach": (fastmlp.SGD, {"foreach": True}, torch.float32),
}


@pytest.mark.gpu
@pytest.mark.parametrize("opt_name", list(_OPTIMIZERS))
def test_cuda_graph_fit_matches_eager(opt_name):
    """An lr schedule (halved every epoch) through captured steps, for the kernel and for
    torch's updates (which need a re-capture per new lr)."""
    x, y = _regression_data(n=200)  # 200 = 12*16 + 8: a short last batch runs eagerly
    make_opt, kwargs, dtype = _OPTIMIZERS[opt_name]
    eager = fastmlp.fuse(_seed_like(device="cuda")).to(dtype)
    graphed = copy.deepcopy(eager)
    opt_e = make_opt(eager.parameters(), lr=0.01, momentum=0.9, **kwargs)
    opt_g = make_opt(graphed.parameters(), lr=0.01, momentum=0.9, **kwargs)
    sched_e = torch.optim.lr_scheduler.StepLR(opt_e, step_size=1, gamma=0.5)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=1, gamma=0.5)
    loader = fastmlp.TensorLoader(x.to(dtype), y.to(dtype), batch_size=16, device="cuda")
    h_e = fastmlp.fit(eager, loader, nn.MSELoss(), opt_e, epochs=3, cuda_graph=False,
                      progress=False, callbacks=[lambda e, logs: sched_e.step()])
    h_g = fastmlp.fit(graphed, loader, nn.MSELoss(), opt_g, epochs=3, cuda_graph=True,
                      progress=False, callbacks=[lambda e, logs: sched_g.step()])
    from fastmlp.graph_step import cached
    assert cached(graphed).graph is not None
    assert _max_rel_err(graphed, eager) < 1e-5
    for a, b in zip(h_g["loss"], h_e["loss"]):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("opt_name", ["fastmlp", "torch"])
def test_cuda_graph_survives_changes_between_fit_calls(opt_name):
    """Changes a graph bakes in, made between fit calls or epochs, each right where the next
    batch would be captured or replayed: an lr schedule when the warm-up ends at an epoch's
    end (3 full batches), an optimizer state_dict with another lr loaded with momentum 0 (no
    state address changes: fastmlp.SGD keeps the graph and its lr tensor), momentum turned on,
    gradients set to None, an optimizer state_dict loaded (new momentum buffers). The graphed
    run must train exactly like the eager one."""
    x, y = _regression_data(n=48)            # 3 full batches of 16: warm-up ends with epoch 0
    make_opt = {"fastmlp": fastmlp.SGD, "torch": torch.optim.SGD}[opt_name]
    models = [fastmlp.fuse(_seed_like(device="cuda")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    loader = fastmlp.TensorLoader(x, y, batch_size=16, device="cuda")
    from fastmlp.graph_step import cached
    for model, graphed in zip(models, (False, True)):
        opt = make_opt(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        loss_fn = nn.MSELoss()   # one module: the graph is cached per (model, optimizer, loss)

        def run(epochs):
            fastmlp.fit(model, loader, loss_fn, opt, epochs=epochs, cuda_graph=graphed,
                        progress=False, callbacks=[lambda e, logs: sched.step()])

        run(2)
        graph_before = cached(model).graph if graphed else None
        state = opt.state_dict()
        state["param_groups"][0]["lr"] = 0.003
        opt.load_state_dict(state)
        run(1)
        if graphed and opt_name == "fastmlp":
            assert cached(model).graph is graph_before, "an lr-only change needs no re-capture"
        opt.param_groups[0]["momentum"] = 0.9
        run(2)
        opt.zero_grad(set_to_none=True)
        run(1)
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        run(2)
    assert cached(models[1]).graph is not None
    assert _max_rel_err(models[1], models[0]) < 1e-5


@pytest.mark.gpu
def test_cuda_graph_with_cuda_tensor_lrs():
    """torch.optim.SGD's default (foreach) step calls .item() on a CUDA tensor lr: auto trains
    eagerly and says so once; True refuses. fastmlp.SGD's kernel and torch's fused SGD read
    such an lr in place: captured, and an in-place change reaches the graph."""
    x, y = _regression_data(n=80)
    loader = fastmlp.TensorLoader(x, y, batch_size=16, device="cuda")
    ref = fastmlp.fuse(_seed_like(device="cuda"))
    models = {name: copy.deepcopy(ref) for name in ("torch", "torch-fused", "fastmlp")}
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01)
    halve_ref = lambda e, logs: ref_opt.param_groups[0].update(lr=ref_opt.param_groups[0]["lr"] / 2)  # noqa: E731
    fastmlp.fit(ref, loader, nn.MSELoss(), ref_opt, epochs=3, cuda_graph=False, progress=False,
                callbacks=[halve_ref])
    from fastmlp.graph_step import cached
    for name, model in models.items():
        lr = torch.tensor(0.01, device="cuda")
        if name == "fastmlp":
            opt = fastmlp.SGD(model.parameters(), lr=lr)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, fused=name == "torch-fused")
        def halve(epoch, logs, lr=lr):   # in place; returns None (a true value stops fit)
            lr.mul_(0.5)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = fastmlp.fit(model, loader, nn.MSELoss(), opt, epochs=3, progress=False,
                                  callbacks=[halve])
        assert len(history["loss"]) == 3
        ours = [w for w in caught if "CUDA graph" in str(w.message)]
        if name == "torch":
            assert len(ours) == 1 and cached(model) is None
            with pytest.raises(ValueError, match="cannot be captured"):
                fastmlp.fit(model, loader, nn.MSELoss(), opt, cuda_graph=True, progress=False)
        else:
            assert ours == [] and cached(model).graph is not None
        assert _max_rel_err(model, ref) < 1e-5, name


@pytest.mark.gpu
def test_cuda_graph_capture_while_another_thread_pins_memory():
    """A thread allocating pinned memory (what a DataLoader's pin-memory thread does for each
    batch) while the step is being captured: neither the capture nor the thread fails."""
    errors, captured_with_thread = [], []

    def pin():
        try:
            for i in range(4):   # fresh sizes: the pinned allocator has to call cudaHostAlloc
                torch.empty((1 << 20) + 4096 * i, dtype=torch.uint8, pin_memory=True)
        except Exception as e:   # noqa: BLE001 - recorded and asserted on below
            errors.append(e)

    class MSEWithPinningThread(nn.MSELoss):
        def forward(self, output, target):
            if torch.cuda.is_current_stream_capturing():
                thread = threading.Thread(target=pin)
                thread.start()
                thread.join()
                captured_with_thread.append(True)
            return super().forward(output, target)

    x, y = _regression_data(n=96)
    loader = fastmlp.TensorLoader(x, y, batch_size=16, device="cuda")
    eager = fastmlp.fuse(_seed_like(device="cuda"))
    graphed = copy.deepcopy(eager)
    for model, graph in ((eager, False), (graphed, True)):
        fastmlp.fit(model, loader, MSEWithPinningThread(), fastmlp.SGD(model.parameters(), lr=0.01),
                    epochs=2, cuda_graph=graph, progress=False)
    assert captured_with_thread == [True] and errors == []
    assert _max_rel_err(graphed, eager) < 1e-5


@pytest.mark.gpu
def test_cuda_graph_fit_with_a_pinning_dataloader():
    """End to end: DataLoader(pin_memory=True, num_workers=2) (its pin-memory thread runs while
    fit captures), CPU batches moved to the GPU by fit, the same weights as eager steps."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _regression_data(n=640)
    eager = fastmlp.fuse(_seed_like(device="cuda"))
    graphed = copy.deepcopy(eager)
    for model, graph in ((eager, False), (graphed, True)):
        loader = DataLoader(TensorDataset(x, y), batch_size=32, pin_memory=True, num_workers=2)
        fastmlp.fit(model, loader, nn.MSELoss(), fastmlp.SGD(model.parameters(), lr=0.01),
                    epochs=2, cuda_graph=graph, progress=False)
    from fastmlp.graph_step import cached
    assert cached(graphed).graph is not None
    assert _max_rel_err(graphed, eager) < 1e-5
