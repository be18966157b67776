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
    assert step.graph is None and step.keepalive == () and step.captured_state is None
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
class FakeCuda:
    """torch.cuda's streams and graphs as the step uses them, stubbed for a CPU run.

    Streams record their device; ``torch.cuda.stream(s)`` makes s current until it exits, as
    torch does; a graph "capture" runs the recorded step eagerly (so real CPU training happens)
    with ``capturing`` set, and records the arguments torch.cuda.graph got. As torch's, its
    ``__exit__`` ends the capture before restoring the caller's stream, and ending a capture
    that an exception broke raises: then the capture stream stays current. Replays are counted.
    """

    def __init__(self, monkeypatch):
        fake = self
        self.made, self.captures, self.replays, self.entered = [], [], 0, []
        self.capturing = False
        self.current, self.defaults = {}, {}

        class Stream:
            def __init__(self, device=None, priority=0):
                self.device = torch.device(device if device is not None else "cpu")
                self.waited = []
                fake.made.append(self)

            def wait_stream(self, other):
                self.waited.append(other)

        class stream_context:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                fake.entered.append(self.stream)
                self.previous = current_stream(self.stream.device)
                set_stream(self.stream)

            def __exit__(self, *exc):
                set_stream(self.previous)
                return False

        class Graph:
            def replay(self):
                fake.replays += 1

        class graph_context:
            def __init__(self, graph, stream=None, **kwargs):
                self.kwargs = dict(kwargs, graph=graph, stream=stream)
                self.stream_ctx = stream_context(stream or fake.default_capture_stream)

            def __enter__(self):
                fake.captures.append(self.kwargs)
                self.stream_ctx.__enter__()
                fake.capturing = True

            def __exit__(self, exc_type, *exc):
                fake.capturing = False
                if exc_type is not None:   # capture_end() of a broken capture
                    raise RuntimeError("operation failed due to a previous error during capture")
                self.stream_ctx.__exit__(exc_type, *exc)
                return False

        # One device's streams: the tests' decisions ask about "cuda", their tensors are on the
        # CPU, and both stand for the same GPU.
        def default_stream(device=None):
            if "default" not in self.defaults:
                self.defaults["default"] = Stream("cpu")
            return self.defaults["default"]

        def current_stream(device=None):
            return self.current.get("current") or default_stream(device)

        def set_stream(stream):
            self.current["current"] = stream

        self.Stream, self.Graph = Stream, Graph
        self.current_stream = current_stream
        self.default_capture_stream = Stream("cpu")   # torch's class-wide capture stream
        self.made.clear()
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", stream_context)
        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
        monkeypatch.setattr(torch.cuda, "default_stream", default_stream)
        monkeypatch.setattr(torch.cuda, "set_stream", set_stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph_context)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


@pytest.fixture
def fake_cuda(monkeypatch):
    return FakeCuda(monkeypatch)


class _Eager:
    """The fallback fit gives GraphStep: the autograd step, gradients kept."""

    def __init__(self, model, loss_fn, optimizer):
        from fastmlp.train import AutogradStep

        self.inner = AutogradStep(model, loss_fn, optimizer, keep_grads=True)
        self.calls = 0

    def step(self, inputs, target):
        self.calls += 1
        return self.inner.step(inputs, target)


def _graph_strategy(model, optimizer, stream=None):
    loss_fn = nn.MSELoss()
    fallback = _Eager(model, loss_fn, optimizer)
    return GraphStep(model, loss_fn, optimizer, fallback, stream=stream), fallback


def test_capture_is_thread_local_on_the_warmup_stream_of_the_models_device(fake_cuda):
    """Capture in "thread_local" mode: in the default "global" mode a DataLoader's pin-memory
    thread allocating pinned memory (cudaHostAlloc) during the capture invalidates it. And on
    the stream the warm-ups ran on, made on the step's device: without ``stream=``,
    torch.cuda.graph captures on a class-wide stream made on whichever device was current at
    the process's first capture, and a capture for a model on another GPU records nothing."""
    model = _seed_like()
    strategy, fallback = _graph_strategy(model, fastmlp.SGD(model.parameters(), lr=0.01))
    x, y = _regression_data(n=16)
    strategy.start_epoch()
    for _ in range(4):                     # 3 warm-ups, then the capture and its first replay
        strategy.step([x], y)
    captured = strategy.captured
    assert fallback.calls == 3 and len(fake_cuda.captures) == 1 and fake_cuda.replays == 1
    side = captured.side_stream
    assert [t for t in fake_cuda.made if t is not fake_cuda.defaults["default"]] == [side]
    assert side.device == captured.device == x.device
    assert fake_cuda.entered[:3] == [side] * 3, "every warm-up runs on the side stream"
    seen = fake_cuda.captures[0]
    assert seen.get("stream") is side, "the capture must run on the warm-up stream"
    assert seen.get("capture_error_mode") == "thread_local"
    assert isinstance(seen["graph"], fake_cuda.Graph) and captured.graph is seen["graph"]


def test_a_failed_capture_leaves_no_graph_and_warms_up_again(fake_cuda):
    """An error inside the capture (out of memory, a sync, a table built inside it) leaves a
    half-recorded graph: it must not be kept, replayed, or compared against later."""
    model = _seed_like()

    class FailingInCapture(fastmlp.SGD):
        def step(self, closure=None):
            if fake_cuda.capturing and self.fail:
                raise RuntimeError("boom inside the capture")
            return super().step(closure)

    opt = FailingInCapture(model.parameters(), lr=0.01)
    opt.fail = True
    strategy, fallback = _graph_strategy(model, opt)
    x, y = _regression_data(n=16)
    strategy.start_epoch()
    for _ in range(3):
        strategy.step([x], y)
    caller = fake_cuda.current_stream(x.device)
    with pytest.raises(RuntimeError, match="previous error during capture") as raised:
        strategy.step([x], y)
    assert "boom inside the capture" in str(raised.value.__context__)
    captured = strategy.captured
    assert captured.graph is None and captured.captured_state is None and captured.keepalive == ()
    assert captured.warmup_left >= CapturedStep.REWARM_STEPS
    assert fake_cuda.current_stream(x.device) is caller, \
        "the capture stream must not stay current after a failed capture"
    strategy.start_epoch()                 # revalidate: nothing to compare, nothing raised
    assert strategy.step([x], y) is not None, "the next step must warm up, not replay"
    assert fallback.calls == 4 and fake_cuda.replays == 0
    opt.fail = False                       # the cause gone: warm-up ends, capture, replay
    while captured.warmup_left:
        strategy.step([x], y)
    assert strategy.step([x], y) is None and fake_cuda.replays == 1
    assert captured.graph is not None and captured.captured_state == captured.state()


def test_the_cached_step_is_per_device(monkeypatch):
    """The device is part of what a captured step is for: after ``model.to(another_gpu)``
    the next fit must not replay the old device's graph (its stream and loss sum live there);
    it warms up and captures a new step on the new device. (cpu and meta stand for two GPUs.)"""
    events = []

    def warmup_step(self, inputs, target, fallback):
        events.append(("warmup", self.device.type))
        self.warmup_left -= 1
        self.warm_state = self.state()
        return torch.zeros(())

    def capture(self, inputs, target):
        events.append(("capture", self.device.type))
        self.graph, self.captured_state = object(), self.state()

    monkeypatch.setattr(CapturedStep, "warmup_step", warmup_step)
    monkeypatch.setattr(CapturedStep, "capture", capture)
    monkeypatch.setattr(CapturedStep, "replay",
                        lambda self, i, t: events.append(("replay", self.device.type)))
    monkeypatch.setattr(CapturedStep, "revalidate", lambda self: None)
    model = _seed_like()
    opt = fastmlp.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.MSELoss()
    x, y = _regression_data(n=4)
    for device in ("cpu", "meta"):         # one fit call per device, same model and optimizer
        strategy = GraphStep(model, loss_fn, opt, fallback=None)
        strategy.start_epoch()
        for _ in range(5):
            strategy.step([x.to(device)], y.to(device))
        assert strategy.captured.device == torch.device(device)
    assert events == [("warmup", d) for d in ["cpu"] * 3] + [("capture", "cpu")] + \
        [("replay", "cpu")] * 2 + [("warmup", "meta")] * 3 + [("capture", "meta")] + \
        [("replay", "meta")] * 2


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


_CUDA = torch.device("cuda")   # graph_refusal's decisions only: nothing runs there


def ema_update(*args, **kwargs):   # the hook every case registers: its name must be reported
    return None


def _register(kind, model, loss_fn, opt):
    """Register ema_update as a `kind` hook; returns the handle."""
    from torch.nn.modules import module as torch_module
    from torch.optim import optimizer as torch_optimizer

    return {
        "module_forward": lambda: model[0].register_forward_hook(ema_update),
        "module_forward_pre": lambda: model.register_forward_pre_hook(ema_update),
        "module_full_backward": lambda: model[2].register_full_backward_hook(ema_update),
        "global_forward": lambda: torch_module.register_module_forward_hook(ema_update),
        "global_full_backward": lambda: torch_module.register_module_full_backward_hook(ema_update),
        "loss_forward": lambda: loss_fn.register_forward_hook(ema_update),
        "tensor": lambda: model[0].weight.register_hook(ema_update),
        "post_accumulate_grad":
            lambda: model[2].bias.register_post_accumulate_grad_hook(ema_update),
        "optimizer_step_pre": lambda: opt.register_step_pre_hook(ema_update),
        "optimizer_step_post": lambda: opt.register_step_post_hook(ema_update),
        "global_optimizer_step_post":
            lambda: torch_optimizer.register_optimizer_step_post_hook(ema_update),
    }[kind]()


@pytest.mark.parametrize("kind", ["module_forward", "module_forward_pre", "module_full_backward",
                                  "global_forward", "global_full_backward", "loss_forward",
                                  "tensor", "post_accumulate_grad", "optimizer_step_pre",
                                  "optimizer_step_post", "global_optimizer_step_post"])
def test_a_step_with_python_hooks_is_not_captured(kind):
    """A replay runs no Python: a hook (an EMA update in a step post-hook, say) would run once,
    at capture, never again. "auto" says why (fit warns with it and trains eagerly), True is a
    ValueError naming the hook; removed, the step is captured again."""
    from fastmlp.graph_step import graph_refusal

    model, loss_fn = _seed_like(), nn.MSELoss()
    opt = fastmlp.SGD(model.parameters(), lr=0.01)
    assert graph_refusal(model, opt, "auto", _CUDA, loss_fn) is None
    handle = _register(kind, model, loss_fn, opt)
    try:
        reason = graph_refusal(model, opt, "auto", _CUDA, loss_fn)
        assert reason and "ema_update" in reason and "at capture" in reason, reason
        with pytest.raises(ValueError, match="cannot be captured: the step runs .*ema_update"):
            graph_refusal(model, opt, True, _CUDA, loss_fn)
    finally:
        handle.remove()
    assert graph_refusal(model, opt, True, _CUDA, loss_fn) is None


def test_optimizers_with_a_non_capturable_group():
    """torch's capture health check raises if any param group has capturable=False: "auto"
    trains eagerly (silently when the optimizer was never made capturable, with the reason
    when only some groups are not), True is a ValueError naming the group."""
    from fastmlp.graph_step import graph_refusal

    model = _seed_like()
    mixed = torch.optim.Adam([{"params": model[0].parameters()},
                              {"params": model[2].parameters(), "capturable": False}],
                             lr=0.01, capturable=True)
    reason = graph_refusal(model, mixed, "auto", _CUDA)
    assert reason and "param group 1 of Adam has capturable=False" in reason, reason
    with pytest.raises(ValueError, match="param group 1 of Adam has capturable=False"):
        graph_refusal(model, mixed, True, _CUDA)
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    assert graph_refusal(model, plain, "auto", _CUDA) == ""
    with pytest.raises(ValueError, match="param group 0 of Adam has capturable=False"):
        graph_refusal(model, plain, True, _CUDA)
    mixed.param_groups[1]["capturable"] = True
    assert graph_refusal(model, mixed, "auto", _CUDA) is None


@pytest.fixture
def gloo_world_of_one():
    """A one-process gloo group, so a real DistributedDataParallel wraps a CPU model."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_is_captured_on_the_stream_fit_is_called_under(gloo_world_of_one, fake_cuda,
                                                            monkeypatch):
    """DDP's reducer keeps AccumulateGrad nodes bound to the stream DDP was constructed on, and
    PyTorch's notes require DDP be constructed under a side stream and captured there. So under
    True: on the default stream fit refuses with a ValueError saying how; under a side stream
    the 11 warm-ups and the capture run on that stream (none of fit's own), with DDP's runtime
    stats sampling turned off first (a capture must not land on a sampled iteration). "auto"
    still trains DDP eagerly."""
    from fastmlp.graph_step import graph_refusal
    from fastmlp.train import _StepChooser

    ddp = nn.parallel.DistributedDataParallel(_seed_like())
    opt = fastmlp.SGD(ddp.parameters(), lr=0.01)
    loss_fn = nn.MSELoss()
    assert graph_refusal(ddp, opt, "auto", _CUDA, loss_fn) == ""
    with pytest.raises(ValueError, match="default CUDA stream.*torch.cuda.stream"):
        graph_refusal(ddp, opt, True, _CUDA, loss_fn)
    rates = []
    real_set_rate = ddp._set_ddp_runtime_logging_sample_rate

    def set_rate(rate):
        rates.append((rate, len(fake_cuda.captures)))
        real_set_rate(rate)

    monkeypatch.setattr(ddp, "_set_ddp_runtime_logging_sample_rate", set_rate)
    x, y = _regression_data(n=8)
    user_stream = torch.cuda.Stream(device="cpu")   # (the fake: cpu stands for the GPU)
    with torch.cuda.stream(user_stream):
        assert graph_refusal(ddp, opt, True, _CUDA, loss_fn) is None
        chooser = _StepChooser(ddp, loss_fn, opt, _CUDA, True, cpu_fast_path=False)
        strategy = chooser.for_epoch()
        assert isinstance(strategy, GraphStep) and strategy.stream is user_stream
        strategy.start_epoch()
        for _ in range(13):                # 11 warm-ups, the capture and 2 replays
            strategy.step([x], y)
    assert fake_cuda.replays == 2 and len(fake_cuda.captures) == 1
    assert fake_cuda.captures[0]["stream"] is user_stream
    defaults = list(fake_cuda.defaults.values())
    assert [t for t in fake_cuda.made if t not in defaults] == [user_stream], \
        "no stream of fit's own for a DDP step"
    assert set(map(id, fake_cuda.entered)) == {id(user_stream)}
    assert rates and all(rate >= 1 << 30 and n_before == 0 for rate, n_before in rates)


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
        # fit's own warning only: torch's AccumulateGrad stream warning also says "CUDA graph"
        ours = [w for w in caught if "fastmlp.fit: training with eager steps" in str(w.message)]
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


def _needs_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")


def _fit_pair(make_model, x, y, device, epochs=2, **fit_kwargs):
    """(eager model, graphed model) after the same fit on `device`, from the same weights."""
    eager = make_model().to(device)
    graphed = copy.deepcopy(eager)
    for model, graph in ((eager, False), (graphed, True)):
        loader = fastmlp.TensorLoader(x, y, batch_size=16, device=device)
        fastmlp.fit(model, loader, nn.MSELoss(), fastmlp.SGD(model.parameters(), lr=0.01),
                    epochs=epochs, cuda_graph=graph, progress=False, **fit_kwargs)
    return eager, graphed


@pytest.mark.gpu
def test_cuda_graph_fit_on_a_second_gpu_after_the_first():
    """The process's first capture is on cuda:0; a model on cuda:1 must still be captured
    (on its own stream on cuda:1: torch's class-wide capture stream lives on cuda:0, where a
    capture for cuda:1 recorded nothing and replays did nothing, pytorch#87894)."""
    _needs_two_gpus()
    from fastmlp.graph_step import cached

    x, y = _regression_data(n=96)
    make = lambda: fastmlp.fuse(_seed_like())   # noqa: E731
    for device in ("cuda:0", "cuda:1"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*CUDA Graph is empty")
            eager, graphed = _fit_pair(make, x, y, device)
        assert cached(graphed).graph is not None and cached(graphed).device == torch.device(device)
        assert _max_rel_err(graphed, eager) < 1e-5, device


@pytest.mark.gpu
def test_cuda_graph_follows_the_model_to_another_gpu():
    """fit on cuda:0, model.to("cuda:1"), fit again with the same optimizer: a new capture on
    cuda:1 (stream and loss sum there too), the same weights as eager steps doing the same."""
    _needs_two_gpus()
    from fastmlp.graph_step import cached

    x, y = _regression_data(n=96)
    eager = fastmlp.fuse(_seed_like(device="cuda:0"))
    graphed = copy.deepcopy(eager)
    for model, graph in ((eager, False), (graphed, True)):
        # momentum 0: optimizer state does not follow model.to(), in eager steps either
        opt = fastmlp.SGD(model.parameters(), lr=0.01)
        loss_fn = nn.MSELoss()
        history = []
        for device in ("cuda:0", "cuda:1"):
            model.to(device)
            loader = fastmlp.TensorLoader(x, y, batch_size=16, device=device)
            history += fastmlp.fit(model, loader, loss_fn, opt, epochs=2, cuda_graph=graph,
                                   progress=False)["loss"]
        if graph:
            assert cached(model).device == torch.device("cuda:1")
            assert cached(model).graph is not None
            graphed_history = history
        else:
            eager_history = history
    assert _max_rel_err(graphed, eager) < 1e-5
    assert graphed_history == pytest.approx(eager_history, rel=1e-5)


@pytest.mark.gpu
def test_cuda_graph_with_a_param_group_per_tensor():
    """Per-tensor lr groups (10 of them, more than fastmlp.SGD's launcher once kept tables
    for): the capture must not rebuild a pointer table (it raised inside the capture)."""
    from fastmlp.graph_step import cached

    def deep():
        torch.manual_seed(0)
        layers = [nn.Linear(40, 24), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(24, 24), nn.ReLU()]
        return fastmlp.fuse(nn.Sequential(*layers, nn.Linear(24, 6)).cuda())

    x, y = _regression_data(n=96)
    models = {"eager": deep(), "graphed": deep()}
    for name, model in models.items():
        opt = fastmlp.SGD([{"params": [p], "lr": 0.002 * (i + 1)}
                           for i, p in enumerate(model.parameters())], lr=0.01, momentum=0.9)
        assert len(opt.param_groups) == 10
        fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=16, device="cuda"),
                    nn.MSELoss(), opt, epochs=2, progress=False,
                    cuda_graph=False if name == "eager" else "auto")
    assert cached(models["graphed"]).graph is not None
    assert _max_rel_err(models["graphed"], models["eager"]) < 1e-5


@pytest.mark.gpu
def test_cuda_graph_failed_capture_is_never_replayed():
    """A capture that fails (here a host sync inside it) raises, leaves no graph, and the next
    fit warms up and captures anew: the weights equal eager steps on the batches trained."""
    from fastmlp.graph_step import cached

    class SyncsWhileCapturing(nn.MSELoss):
        fail = True

        def forward(self, output, target):
            loss = super().forward(output, target)
            if self.fail and torch.cuda.is_current_stream_capturing():
                loss.item()   # a host sync: illegal inside a capture
            return loss

    x, y = _regression_data(n=96)
    eager = fastmlp.fuse(_seed_like(device="cuda"))
    graphed = copy.deepcopy(eager)
    loss_fn = SyncsWhileCapturing()
    opt = fastmlp.SGD(graphed.parameters(), lr=0.01)
    loader = fastmlp.TensorLoader(x, y, batch_size=16, device="cuda")
    with pytest.raises(RuntimeError):
        fastmlp.fit(graphed, loader, loss_fn, opt, cuda_graph=True, progress=False)
    step = cached(graphed)
    assert step.graph is None and step.captured_state is None and step.keepalive == ()
    loss_fn.fail = False
    fastmlp.fit(graphed, loader, loss_fn, opt, epochs=2, cuda_graph=True, progress=False)
    assert cached(graphed).graph is not None
    # eager: the failed fit's 3 warm-up batches, then the same 2 epochs
    opt_e = fastmlp.SGD(eager.parameters(), lr=0.01)
    fastmlp.fit(eager, fastmlp.TensorLoader(x[:48], y[:48], batch_size=16, device="cuda"),
                nn.MSELoss(), opt_e, cuda_graph=False, progress=False)
    fastmlp.fit(eager, loader, nn.MSELoss(), opt_e, epochs=2, cuda_graph=False, progress=False)
    assert _max_rel_err(graphed, eager) < 1e-5


@pytest.mark.gpu
def test_cuda_graph_auto_trains_eagerly_with_a_step_hook():
    """An optimizer step post-hook (an EMA of the weights): under "auto" one warning naming
    it, every step runs it, the weights equal eager steps; True refuses."""
    x, y = _regression_data(n=96)
    eager = fastmlp.fuse(_seed_like(device="cuda"))
    hooked = copy.deepcopy(eager)
    ema = [p.detach().clone() for p in hooked.parameters()]
    calls = []

    def ema_update(optimizer, args, kwargs):
        calls.append(1)
        with torch.no_grad():
            for e, p in zip(ema, hooked.parameters()):
                e.lerp_(p, 0.1)

    loader = fastmlp.TensorLoader(x, y, batch_size=16, device="cuda")
    fastmlp.fit(eager, loader, nn.MSELoss(), fastmlp.SGD(eager.parameters(), lr=0.01), epochs=2,
                cuda_graph=False, progress=False)
    opt = fastmlp.SGD(hooked.parameters(), lr=0.01)
    opt.register_step_post_hook(ema_update)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastmlp.fit(hooked, loader, nn.MSELoss(), opt, epochs=2, progress=False)
    ours = [w for w in caught if "fastmlp.fit: training with eager steps" in str(w.message)]
    assert len(ours) == 1 and "ema_update" in str(ours[0].message)
    assert len(calls) == 2 * len(loader)
    assert _max_rel_err(hooked, eager) < 1e-5
    with pytest.raises(ValueError, match="ema_update"):
        fastmlp.fit(hooked, loader, nn.MSELoss(), opt, cuda_graph=True, progress=False)


@pytest.mark.gpu
def test_cuda_graph_ddp_under_a_side_stream(tmp_path):
    """DDP (NCCL, one process) constructed under a side stream and fit called under it with
    cuda_graph=True: 11 warm-ups and the capture on that stream, the same weights as plain
    eager steps (a world of one averages nothing). On the default stream: a ValueError."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("needs NCCL")
    from fastmlp.graph_step import cached

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        x, y = _regression_data(n=200)   # 12 full batches per epoch: the capture in epoch 0
        eager = fastmlp.fuse(_seed_like(device="cuda"))
        inner = copy.deepcopy(eager)
        fastmlp.fit(eager, fastmlp.TensorLoader(x, y, batch_size=16, device="cuda"), nn.MSELoss(),
                    fastmlp.SGD(eager.parameters(), lr=0.01), epochs=3, cuda_graph=False,
                    progress=False)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            ddp = nn.parallel.DistributedDataParallel(
                inner, device_ids=[torch.cuda.current_device()])
            opt = fastmlp.SGD(ddp.parameters(), lr=0.01)
            loader = fastmlp.TensorLoader(x, y, batch_size=16, device="cuda")
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*CUDA Graph is empty")
                fastmlp.fit(ddp, loader, nn.MSELoss(), opt, epochs=3, cuda_graph=True,
                            progress=False)
        torch.cuda.synchronize()
        step = cached(ddp)
        assert step.graph is not None and step.side_stream == side
        assert _max_rel_err(inner, eager) < 1e-5
        with pytest.raises(ValueError, match="default CUDA stream"):
            fastmlp.fit(ddp, loader, nn.MSELoss(), opt, cuda_graph=True, progress=False)
    finally:
        dist.destroy_process_group()
