"""fastmlp.SGD against torch.optim.SGD: trajectories, state_dicts, and the Triton multi-tensor kernel.

The Triton kernel runs through the interpreter on CPU (fixture ``triton_backend``, which also
NaN-poisons the momentum buffers the kernel must fill on a first step) and natively on CUDA.
"""

import itertools

import pytest
import torch

import fastmlp

# (momentum, dampening, weight_decay, nesterov, maximize): every combination torch accepts
OPTION_SETS = [
    (m, d, wd, nest, mx)
    for m, d, wd, nest, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [0.0, 0.05],
                                                 [False, True], [False, True])
    if not (nest and (m == 0 or d != 0)) and not (m == 0 and d != 0)
]
SHAPES = [(7, 5), (5,), (3000,), (2, 3, 4)]  # 3000 spans two kernel blocks (BLOCK=2048)


def _params(shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
            for s in shapes]


def _clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _set_grads(groups_of_params, step, skip=()):
    """The same fresh random gradient for the parameter at the same index in every list."""
    g = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in groups_of_params[0]]
    for params in groups_of_params:
        for i, (p, gr) in enumerate(zip(params, grads)):
            p.grad = None if i in skip else gr.to(p.dtype).to(p.device)


def _rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run_pair(opt_a, opt_b, pa, pb, steps, skip_at=None):
    for step in range(steps):
        skip = skip_at(step) if skip_at else ()
        _set_grads([pa, pb], step, skip)
        opt_a.step()
        opt_b.step()


def _assert_params_close(pa, pb, tol, what=""):
    for i, (a, b) in enumerate(zip(pa, pb)):
        err = _rel_err(a, b)
        assert err < tol, f"{what} param {i} shape {tuple(a.shape)}: rel error {err:.3e} >= {tol}"


@pytest.mark.parametrize("momentum,dampening,weight_decay,nesterov,maximize", OPTION_SETS)
def test_trajectory_matches_torch(momentum, dampening, weight_decay, nesterov, maximize):
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    ref = _params(SHAPES)
    ours = _clone(ref)
    opt_ref = torch.optim.SGD(ref, **kw)
    opt_ours = fastmlp.SGD(ours, **kw)
    _run_pair(opt_ours, opt_ref, ours, ref, 20)
    _assert_params_close(ours, ref, 1e-6)
    if momentum:
        for a, b in zip(ours, ref):
            assert _rel_err(opt_ours.state[a]["momentum_buffer"], opt_ref.state[b]["momentum_buffer"]) < 1e-6


@pytest.mark.parametrize("momentum,dampening,weight_decay,nesterov,maximize", OPTION_SETS)
def test_triton_kernel_trajectory_matches_torch(triton_backend, device, momentum, dampening,
                                                weight_decay, nesterov, maximize):
    kw = dict(lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    ref = _params(SHAPES, device=device)
    ours = _clone(ref)
    opt_ref = torch.optim.SGD(ref, **kw)
    opt_ours = fastmlp.SGD(ours, **kw)
    _run_pair(opt_ours, opt_ref, ours, ref, 20)
    assert opt_ours._launcher is not None, "the Triton kernel did not run"
    _assert_params_close(ours, ref, 1e-6)
    if momentum:
        for a, b in zip(ours, ref):
            assert _rel_err(opt_ours.state[a]["momentum_buffer"], opt_ref.state[b]["momentum_buffer"]) < 1e-6


@pytest.mark.parametrize("backend_name", ["triton", "auto"])
def test_missing_grads_and_late_buffers(backend_name, device, request):
    """Params without a grad are skipped; a buffer born at step 3 gets torch's first-step rule
    while the others continue theirs (all in one launch on the Triton path)."""
    if backend_name == "triton":
        request.getfixturevalue("triton_backend")
    kw = dict(lr=0.1, momentum=0.8, dampening=0.25, weight_decay=0.01)
    ref = _params(SHAPES, device=device, seed=3)
    ours = _clone(ref)
    opt_ref, opt_ours = torch.optim.SGD(ref, **kw), fastmlp.SGD(ours, **kw)
    _run_pair(opt_ours, opt_ref, ours, ref, 8, skip_at=lambda s: (1,) if s < 3 else ())
    _assert_params_close(ours, ref, 1e-6)
    assert set(opt_ours.state) == set(ours)


@pytest.mark.parametrize("dtype,ulps", [(torch.float16, 1), (torch.bfloat16, 1)])
def test_triton_half_precision_against_float64(triton_backend, device, dtype, ulps):
    """fp16/bf16: each step equals the float64 update of the stored values, rounded once."""
    kw = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.02, maximize=True)
    ps = _params(SHAPES, dtype=dtype, device=device, seed=5)
    opt = fastmlp.SGD(ps, **kw)
    bufs64 = [None] * len(ps)
    for step in range(4):
        _set_grads([ps], step)
        p64 = [p.detach().double() for p in ps]
        g64 = [p.grad.double() for p in ps]
        opt.step()
        for i, (p, p_old, g) in enumerate(zip(ps, p64, g64)):
            g = -g + kw["weight_decay"] * p_old
            b = g if bufs64[i] is None else kw["momentum"] * bufs64[i] + (1 - kw["dampening"]) * g
            got_b = opt.state[p]["momentum_buffer"]
            assert not torch.isnan(got_b).any(), "momentum buffer has unwritten (poisoned) elements"
            eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
            # fp32 in the kernel, fp64 here: the one rounding to `dtype` may differ by an ulp
            assert ((got_b.double() - b).abs() <= ulps * eps * b.abs().clamp_min(tiny)).all(), \
                f"{dtype} step {step} buffer {i}"
            bufs64[i] = got_b.double()
            want = p_old - kw["lr"] * got_b.double()  # the buffer as stored drives the update
            tol = ulps * eps * want.abs().clamp_min(tiny)
            assert ((p.double() - want).abs() <= tol).all(), f"{dtype} step {step} param {i}"


def _count_table_builds(monkeypatch):
    """A list that gets one entry per pointer table the SGD launcher builds."""
    from fastmlp.kernels import sgd as sgd_kernels

    builds, plan_cls = [], sgd_kernels._Plan

    def counted(*args, **kwargs):
        builds.append(1)
        return plan_cls(*args, **kwargs)

    monkeypatch.setattr(sgd_kernels, "_Plan", counted)
    return builds


def test_triton_table_is_reused_and_rebuilt(triton_backend, device, monkeypatch):
    builds = _count_table_builds(monkeypatch)
    ps = _params(SHAPES, device=device)
    opt = fastmlp.SGD(ps, lr=0.01, momentum=0.5)
    _set_grads([ps], 0)
    opt.step()          # first step: buffers born (first-step flags in the table)
    opt.step()          # flags cleared: a new table
    opt.step()          # same tensors: reused
    assert len(builds) == 2
    _set_grads([ps], 1)  # new gradient tensors: a new table, replacing the group's old one
    opt.step()
    assert len(builds) == 3
    assert len(opt._launcher._plans) == 1, "one table per (group, device, dtype)"


def test_triton_tables_of_many_groups_are_not_rebuilt(triton_backend, device, monkeypatch):
    """More param groups than the launcher once cached tables for (8): 9 single-parameter groups
    (per-layer lrs). Every step rebuilt every table then (a pinned allocation and a copy per
    group on CUDA, and a CUDA-graph capture failed on the rebuild); now a group's table is kept
    until its tensors change."""
    builds = _count_table_builds(monkeypatch)
    ps = _params([(3, 2)] * 9, device=device)
    opt = fastmlp.SGD([{"params": [p], "lr": 0.01 * (i + 1)} for i, p in enumerate(ps)],
                      lr=0.01, momentum=0.9)
    _set_grads([ps], 0)
    opt.step()          # the first-step tables (momentum buffers born)
    opt.step()          # the steady-state tables
    before = len(builds)
    assert before == 18
    opt.step()
    assert len(builds) == before, f"{len(builds) - before} tables rebuilt on a steady step"
    assert len(opt._launcher._plans) == 9


def test_triton_lr_tensor_and_lr_changes(triton_backend, device):
    ref = _params(SHAPES, device=device)
    ours = _clone(ref)
    lr = torch.tensor(0.05, device=device)
    opt_ref = torch.optim.SGD(ref, lr=0.05, momentum=0.9)
    opt_ours = fastmlp.SGD(ours, lr=lr, momentum=0.9)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, step_size=2, gamma=0.5)
    ours2 = _clone(ref)
    opt_ours2 = fastmlp.SGD(ours2, lr=0.05, momentum=0.9)  # float lr, changed by a scheduler
    sched2 = torch.optim.lr_scheduler.StepLR(opt_ours2, step_size=2, gamma=0.5)
    for step in range(6):
        _set_grads([ref, ours, ours2], step)
        opt_ref.step(); opt_ours.step(); opt_ours2.step()
        sched_ref.step(); sched2.step()
        lr.fill_(opt_ref.param_groups[0]["lr"])   # the tensor lr is written in place
    _assert_params_close(ours, ref, 1e-6, "tensor lr")
    _assert_params_close(ours2, ref, 1e-6, "scheduled float lr")


def test_sync_lr_follows_float_and_foreign_tensor_lrs():
    """sync_lr (called before a CUDA-graph replay) refreshes the device copies the kernel reads:
    from a float lr, and from an lr tensor on another device changed in place."""
    p = torch.nn.Parameter(torch.zeros(3))
    lr = torch.tensor(0.05)                       # a CPU tensor; the kernel's copy lives elsewhere
    opt = fastmlp.SGD([p], lr=lr)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1})
    elsewhere = torch.device("meta")              # stands for the GPU the kernel runs on
    copies = [torch.tensor([0.05]), torch.tensor([0.1])]
    opt._lr_cache = {(0, elsewhere): (0.05, copies[0]), (1, elsewhere): (0.1, copies[1])}
    lr.fill_(0.025)
    opt.param_groups[1]["lr"] = 0.2
    opt.sync_lr()
    assert copies[0].item() == pytest.approx(0.025) and copies[1].item() == pytest.approx(0.2)
    assert opt._lr_cache[(0, elsewhere)][0] == pytest.approx(0.025)


def test_load_state_dict_keeps_the_kernels_lr_tensors(triton_backend, device):
    """load_state_dict goes through __setstate__; the lr tensor the kernel reads (and a CUDA
    graph captured before may read) survives it, and takes the loaded lr."""
    ref = _params(SHAPES, device=device)
    ours = _clone(ref)
    opt_ref, opt = torch.optim.SGD(ref, lr=0.05), fastmlp.SGD(ours, lr=0.05)
    _run_pair(opt, opt_ref, ours, ref, 2)
    (read,) = opt.lr_tensors(0)
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.01
    opt.load_state_dict(state)
    opt_ref.load_state_dict(state)
    assert opt.lr_tensors(0)[0] is read
    opt.sync_lr()
    assert read.item() == pytest.approx(0.01)
    for step in range(2, 4):
        _set_grads([ours, ref], step)
        opt.step()
        opt_ref.step()
    assert opt.lr_tensors(0)[0] is read
    _assert_params_close(ours, ref, 1e-6)


def test_lr_tensors_says_which_groups_read_their_lr_from_the_device(triton_backend, device):
    """The groups the kernel updates read a device lr tensor; those torch's implementation
    updates (float64, non-contiguous, explicit foreach/fused) take a number: None."""
    def param(*shape, dtype=torch.float32, transposed=False):
        t = torch.randn(*shape, dtype=dtype, device=device)
        return torch.nn.Parameter(t.t() if transposed else t)

    lr = torch.tensor(0.1, device=device)
    groups = [{"params": [param(3, 4), param(4)]},
              {"params": [param(3, 4)], "lr": lr},
              {"params": [param(3, 4, dtype=torch.float64)]},
              {"params": [param(3, 4, transposed=True)]},
              {"params": [param(3, 4)], "foreach": True},
              {"params": [param(3, 4)], "fused": True}]
    opt = fastmlp.SGD(groups, lr=0.05)
    assert opt.lr_tensors(0) == (None,), "no kernel step yet: no lr tensor exists"
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    (cached,) = opt.lr_tensors(0)
    assert cached.device.type == torch.device(device).type and cached.item() == pytest.approx(0.05)
    assert opt.lr_tensors(1)[0] is lr
    assert [opt.lr_tensors(i) for i in range(2, 6)] == [None] * 4
    with fastmlp.use_backend("torch"):
        assert opt.lr_tensors(0) is None


@pytest.mark.parametrize("src,dst", [("fastmlp", "torch"), ("torch", "fastmlp")])
def test_state_dict_interchange(src, dst):
    classes = {"fastmlp": fastmlp.SGD, "torch": torch.optim.SGD}
    kw = dict(lr=0.03, momentum=0.7, dampening=0.1, weight_decay=0.01)
    ref = _params(SHAPES)
    p_src = _clone(ref)
    opt_ref = torch.optim.SGD(ref, **kw)
    opt_src = classes[src](p_src, **kw)
    _run_pair(opt_src, opt_ref, p_src, ref, 5)
    sd = opt_src.state_dict()
    assert set(sd["param_groups"][0]) == set(opt_ref.state_dict()["param_groups"][0])
    assert all("momentum_buffer" in s for s in sd["state"].values())
    p_dst = _clone(p_src)
    opt_dst = classes[dst](p_dst, lr=1.0)   # other hyperparameters: load_state_dict sets them
    opt_dst.load_state_dict(sd)
    assert opt_dst.param_groups[0]["momentum"] == 0.7
    for step in range(5, 10):
        _set_grads([p_dst, ref], step)
        opt_dst.step()
        opt_ref.step()
    _assert_params_close(p_dst, ref, 1e-6)


def test_tensor_lr_and_weight_decay_on_the_default_path():
    ref = _params(SHAPES)
    ours = _clone(ref)
    kw = lambda: dict(lr=torch.tensor(0.1), momentum=0.9, weight_decay=torch.tensor(0.01))
    opt_ref, opt_ours = torch.optim.SGD(ref, **kw()), fastmlp.SGD(ours, **kw())
    _run_pair(opt_ours, opt_ref, ours, ref, 10)
    _assert_params_close(ours, ref, 1e-6)


def test_is_a_torch_sgd_and_validates_like_it():
    p = _params([(3,)])
    assert isinstance(fastmlp.SGD(p, lr=0.1), torch.optim.SGD)
    import copy
    clone = copy.deepcopy(fastmlp.SGD(p, lr=0.1, momentum=0.5))  # caches rebuilt, still steps
    clone.param_groups[0]["params"][0].grad = torch.ones(3)
    clone.step()
    with pytest.raises(ValueError):
        fastmlp.SGD(p, lr=-1.0)
    with pytest.raises(ValueError):
        fastmlp.SGD(p, lr=0.1, nesterov=True)  # nesterov needs momentum
    with pytest.raises(ValueError):
        fastmlp.SGD(p, lr=0.1, momentum=-0.5)


def test_explicit_torch_implementations_are_obeyed():
    for kw in (dict(foreach=False), dict(fused=True)):
        ref = _params(SHAPES)
        ours = _clone(ref)
        opt_ref = torch.optim.SGD(ref, lr=0.1, momentum=0.9, **kw)
        opt_ours = fastmlp.SGD(ours, lr=0.1, momentum=0.9, **kw)
        _run_pair(opt_ours, opt_ref, ours, ref, 5)
        _assert_params_close(ours, ref, 1e-7, str(kw))
        assert opt_ours._launcher is None


def test_closure_and_param_groups():
    ref = _params(SHAPES)
    ours = _clone(ref)
    groups = lambda ps: [{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "momentum": 0.5}]
    opt_ref = torch.optim.SGD(groups(ref), lr=0.01)
    opt_ours = fastmlp.SGD(groups(ours), lr=0.01)

    def closure_for(ps):
        def closure():
            loss = sum((p ** 2).sum() for p in ps)
            for p in ps:
                p.grad = None
            loss.backward()
            return loss
        return closure

    for _ in range(5):
        la = opt_ours.step(closure_for(ours))
        lb = opt_ref.step(closure_for(ref))
        assert torch.allclose(la, lb)
    _assert_params_close(ours, ref, 1e-6)


@pytest.mark.gpu
def test_cuda_graph_step_with_lr_change():
    """The Triton step captured in a CUDA graph; lr changed between replays through sync_lr."""
    ref = _params(SHAPES, device="cuda")
    ours = _clone(ref)
    opt_ref = torch.optim.SGD(ref, lr=0.05, momentum=0.9)
    opt = fastmlp.SGD(ours, lr=0.05, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(p.shape, device="cuda", generator=g) for p in ours]
    for p, gr in zip(ours, grads):
        p.grad = gr
    for p, gr in zip(ref, grads):
        p.grad = gr.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()          # warm-up: compiles, makes the momentum buffers (first-step table)
        opt.step()          # the steady-state table, which the capture reuses
    torch.cuda.current_stream().wait_stream(s)
    opt_ref.step()
    opt_ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(6):
        if step == 3:
            opt.param_groups[0]["lr"] = opt_ref.param_groups[0]["lr"] = 0.01
            opt.sync_lr()
        graph.replay()
        opt_ref.step()
    torch.cuda.synchronize()
    _assert_params_close(ours, ref, 1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_cpu_parameters_are_updated_like_torch(dtype, momentum):
    """torch's fused CPU SGD kernel leaves most bf16/fp16 elements unchanged (torch 2.13): the
    half-precision CPU update must be torch's plain one, element for element."""
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(1000, generator=gen).to(dtype)
    grads = [torch.randn(1000, generator=gen).to(dtype) for _ in range(3)]
    ours = p0.clone().requires_grad_()
    ref = p0.clone().requires_grad_()
    opt = fastmlp.SGD([ours], lr=0.1, momentum=momentum)
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=momentum, foreach=False)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert (ours.detach() != p0).float().mean() > 0.9   # it trained
    assert torch.equal(ours.detach(), ref.detach())
