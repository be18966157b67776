"""FusedMLP against float64 torch on the equivalent nn.Sequential, through the fused kernels
(interpreter on CPU, outputs NaN-poisoned before every launch), the per-layer kernels and the
torch path.

The axes (depth 1-8, hidden widths 16/32/64/100/128 and one past the fused limit, in/out widths
1/3/1000, batches 1/primes/300/3-D/empty, bias, every activation, output activation, fp32 / fp16
/ bf16 / fp64, frozen input or layers) are covered pairwise by the CASES table rather than as a
cross product: the interpreter needs ~0.1-1 s per case. Half-precision results are held to the
error torch's own eager Sequential makes in that dtype (measured per test against the same
float64 reference), times a small factor, rather than to a fixed number.
"""

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp import mlp as fmlp
from fastmlp import mlp_ops
from fastmlp.mlp import FusedMLP
from reference import assert_close, case_seed, rel_err, runs_kernels, tolerance

FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _equivalent_sequential(model: FusedMLP) -> nn.Sequential:
    """A deep copy of the model's children as the nn.Sequential it stands for."""
    return nn.Sequential(OrderedDict((n, copy.deepcopy(m)) for n, m in model.named_children()))


def _run(model, x, grad_out):
    """Forward + backward; (y, dX or None, grads of every parameter, in order)."""
    y = model(x)
    y.backward(grad_out)
    return y, x.grad, [p.grad for p in model.parameters()]


def _reference(seq, x, grad_out, dtype=FP64):
    """The same computation by torch's nn.Sequential in `dtype` on CPU (float64: the reference)."""
    ref = copy.deepcopy(seq).to("cpu", dtype)
    xr = x.detach().to("cpu", dtype).requires_grad_(x.requires_grad)
    return _run(ref, xr, grad_out.detach().to("cpu", dtype))


def _tolerances(seq, x, grad_out, expected, dtype):
    """Per output tensor: reference.tolerance from the error torch's eager Sequential makes in
    that dtype on the same inputs (never under the dtype's fixed bar)."""
    y, dx, grads = _reference(seq, x, grad_out, dtype)
    errs = [rel_err(y, expected[0])] + ([rel_err(dx, expected[1])] if dx is not None else [0.0])
    errs += [rel_err(g, e) if g is not None else 0.0 for g, e in zip(grads, expected[2])]
    return [tolerance(dtype, e) for e in errs]


def check_against_reference(model, lead, dtype, device, x_grad=True, seed=0, what=""):
    """model(x) and its gradients vs float64 torch on the equivalent Sequential."""
    gen = torch.Generator().manual_seed(seed)
    in_features = next(iter(model.parameters())).shape[1]
    x = torch.randn(*lead, in_features, generator=gen).to(device, dtype).requires_grad_(x_grad)
    seq = _equivalent_sequential(model)
    grad_out = _grad_like(model, x, gen)
    y, dx, grads = _run(model, x, grad_out)
    expected = _reference(seq, x, grad_out)
    tols = _tolerances(seq, x, grad_out, expected, dtype)
    assert y.dtype == dtype and y.shape == expected[0].shape
    assert_close(y, expected[0], dtype, f"{what} forward", tols[0])
    if x_grad:
        assert_close(dx, expected[1], dtype, f"{what} dX", tols[1])
    else:
        assert dx is None
    for (name, p), g, e, tol in zip(model.named_parameters(), grads, expected[2], tols[2:]):
        if p.requires_grad:
            assert g is not None, f"{what}: no gradient for {name}"
            assert g.dtype == p.dtype and g.shape == p.shape
            assert_close(g, e, dtype, f"{what} d{name}", tol)
        else:
            assert g is None, f"{what}: a gradient for frozen {name}"
    return y


def _grad_like(model, x, gen):
    out = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    shape = (*x.shape[:-1], out)
    return torch.randn(*shape, generator=gen).to(x.device, x.dtype)


def _build(in_f, hidden, out_f, act, out_act, bias, dtype, device, seed=0):
    torch.manual_seed(seed)
    return FusedMLP(in_f, hidden, out_f, activation=act, output_activation=out_act, bias=bias,
                    device=device, dtype=dtype)


# (id, in, hidden, out, leading dims, activation, output activation, bias, dtype)
CASES = [
    ("seed", 1000, [100], 10, (64,), "relu", None, True, FP32),
    ("tcnn-64x4", 32, [64] * 4, 16, (37,), "relu", None, True, FP16),
    ("deep-16x8", 3, [16] * 8, 1, (300,), "tanh", None, True, FP32),
    ("w32-3d", 1, [32, 32], 3, (5, 7), "gelu", "sigmoid", True, BF16),
    ("w128-nobias", 3, [128] * 3, 3, (31,), "silu", "tanh", False, FP32),
    ("mixed-widths", 13, [16, 100, 64], 1000, (1,), nn.LeakyReLU(0.2), "relu", True, FP16),
    ("w100", 1000, [100, 100], 1, (67,), "gelu_tanh", "gelu", True, BF16),
    ("sigmoid-3d", 3, [64] * 2, 3, (2, 3, 5), "sigmoid", nn.LeakyReLU(0.1), False, FP16),
    ("linear-chain", 7, [32] * 5, 5, (13,), None, None, True, FP32),
    ("leaky-negative", 5, [64] * 3, 2, (29,), nn.LeakyReLU(-0.1), "silu", True, FP32),
    ("w128-bf16", 1, [128, 128], 1000, (3,), "relu", "gelu_tanh", True, BF16),
    ("fp64-gelu", 3, [16] * 6, 1, (7,), "gelu", "tanh", True, FP64),
    ("fp64-relu", 1, [32] * 7, 3, (11,), "relu", None, False, FP64),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_sequential(impl, case):
    name, in_f, hidden, out_f, lead, act, out_act, bias, dtype = case
    model = _build(in_f, hidden, out_f, act, out_act, bias, dtype, impl, seed=case_seed("model", name))
    x = torch.zeros(*lead, in_f, device=impl, dtype=dtype)
    expected_path = "fused" if runs_kernels(impl, dtype) else "torch"
    assert model.path(x) == expected_path
    check_against_reference(model, lead, dtype, impl, seed=case_seed("inputs", name), what=name)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_empty_batch(impl, lead):
    model = _build(5, [16, 16], 3, "gelu", "sigmoid", True, FP32, impl)
    x = torch.randn(*lead, 5, device=impl, requires_grad=True)
    y = model(x)
    assert y.shape == (*lead, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in model.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


FROZEN = [  # (id, x needs grad, indices of frozen parameters)
    ("frozen-input", False, []),
    ("frozen-first-layer", True, [0, 1]),
    ("frozen-middle", False, [2, 3, 5]),
    ("frozen-last", True, [6, 7]),
    ("only-input", True, list(range(8))),
]


@pytest.mark.parametrize("case", FROZEN, ids=[c[0] for c in FROZEN])
def test_frozen_input_or_layers(triton_backend, case):
    name, x_grad, frozen = case
    model = _build(9, [32, 48, 32], 4, "silu", "sigmoid", True, FP32, "cpu")
    params = list(model.parameters())
    for i in frozen:
        params[i].requires_grad_(False)
    check_against_reference(model, (23,), FP32, "cpu", x_grad=x_grad, what=name)


def test_inference_saves_nothing_and_matches(triton_backend):
    model = _build(6, [32, 32], 2, "gelu", "gelu", True, FP32, "cpu")
    x = torch.randn(19, 6)
    with torch.no_grad():
        y = model(x)
    assert not y.requires_grad
    assert_close(y, _equivalent_sequential(model).double()(x.double()), FP32, "no_grad forward")


def test_nan_propagates_like_torch(triton_backend):
    """NaN in one input row reaches that output row (relu keeps NaN, as torch) and no other."""
    model = _build(4, [16, 16], 3, "relu", "relu", True, FP32, "cpu")
    x = torch.randn(9, 4)
    x[4, 2] = float("nan")
    y = model(x)
    ref = _equivalent_sequential(model)(x)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(y[4]).all() and not torch.isnan(y[torch.arange(9) != 4]).any()


@pytest.mark.parametrize("out_act", [None, "tanh"])
def test_strided_input_and_expanded_grad(triton_backend, out_act):
    """A transposed X (read through its strides, also by the first layer's dW) and the stride-0
    gradient that y.sum().backward() sends."""
    model = _build(12, [32, 32], 3, "relu", out_act, True, FP32, "cpu")
    seq = _equivalent_sequential(model)
    x = torch.randn(12, 37).t().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    model(x).sum().backward()
    seq(xr).sum().backward()
    assert_close(x.grad, xr.grad, FP32, "dX")
    for p, q in zip(model.parameters(), seq.parameters()):
        assert_close(p.grad, q.grad, FP32, "parameter grad")


def test_from_a_per_layer_fused_sequential(triton_backend):
    """FusedLinear children (what fastmlp.fuse leaves in a Sequential) parse as Linear + act."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 2))
    ref = copy.deepcopy(seq)
    model = fmlp.fuse_sequentials(fastmlp.fuse(seq))
    assert type(model) is FusedMLP and model.path(torch.zeros(1, 5)) == "fused"
    x = torch.randn(9, 5)
    assert_close(model(x), ref(x), FP32, "forward")


def test_infinities_like_torch(triton_backend):
    """An infinite input and an infinite output gradient give torch's ±inf / NaN pattern, with
    padded widths (100 -> 128; 64 packed as 100): the padding units must stay finite (a 0 weight
    times inf is NaN, which would reach every real unit). Positive weights and sigmoid keep
    torch's results infinite rather than NaN, so a NaN from the padding would show."""
    model = _build(5, [100, 64, 100], 3, "sigmoid", None, True, FP32, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    seq = _equivalent_sequential(model)
    x = torch.rand(6, 5)
    x[2, 1] = float("inf")
    x.requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, ref = model(x), seq(xr)
    g = torch.rand(6, 3)
    g[4, 0] = float("inf")
    y.backward(g)
    ref.backward(g)
    pairs = [("y", y, ref), ("dX", x.grad, xr.grad)] + [
        (name, p.grad, q.grad) for (name, p), q in zip(model.named_parameters(), seq.parameters())]
    for what, got, want in pairs:
        for check in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(check(got), check(want)), f"{what}: {check.__name__} differs"
        finite = torch.isfinite(want)
        assert_close(got[finite], want[finite], FP32, f"{what} (finite part)")
    assert torch.isposinf(xr.grad[4]).all() and torch.isposinf(ref[2]).sum() == 0


def test_past_the_fused_limit_takes_the_per_layer_path(triton_backend):
    model = _build(3, [16, 256], 2, "relu", None, True, FP32, "cpu")
    assert model.path(torch.zeros(1, 3)) == "per-layer"
    check_against_reference(model, (17,), FP32, "cpu", what="width 256")


def test_mixed_activations_take_the_per_layer_path(triton_backend):
    seq = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    model = FusedMLP.from_sequential(seq)
    assert model.path(torch.zeros(1, 5)) == "per-layer"
    check_against_reference(model, (13,), FP32, "cpu", what="relu then tanh")


def test_forced_per_layer_path_matches(triton_backend):
    model = _build(7, [32, 32], 3, "relu", None, True, FP32, "cpu")
    with fmlp.use_path("per-layer"):
        assert model.path(torch.zeros(1, 7)) == "per-layer"
        check_against_reference(model, (29,), FP32, "cpu", what="forced per-layer")
    with pytest.raises(ValueError, match="unknown FusedMLP path"):
        with fmlp.use_path("fast"):
            pass


# ---- kernels directly: the split-row weight gradients ------------------------------------------
@pytest.mark.parametrize("split", [1, 3])
def test_weight_gradient_row_splits(triton_backend, split):
    """dW/db through 1 and 3 row chunks (fp32 partial sums added in a fixed order) agree with
    the torch implementation of the same backward."""
    from fastmlp.kernels import mlp as kmlp

    gen = torch.Generator().manual_seed(3)
    M, dims = 200, (6, 32, 20, 32, 5)
    x = torch.randn(M, dims[0], generator=gen)
    ws = [torch.randn(n, k, generator=gen) / k ** 0.5 for k, n in zip(dims[:-1], dims[1:])]
    bs = [torch.randn(n, generator=gen) for n in dims[1:]]
    g = torch.randn(M, dims[-1], generator=gen)
    y, saved, z_out = kmlp.mlp_forward(x, ws, bs, "gelu", 0.0, "silu", 0.0, True, True, True, False)
    got = kmlp.mlp_backward(g, x, ws, saved, z_out, "gelu", 0.0, "silu", 0.0, True, (True,) * 7,
                            False, split=split)
    with fastmlp.use_backend("torch"):
        want = mlp_ops._backward_impl(g, x, ws, saved, z_out, "gelu", 0.0, "silu", 0.0, [True] * 7)
    for a, b, what in zip(got, want, ("dx", "dw_in", "db_in", "dw_mid", "db_mid", "dw_out", "db_out")):
        assert_close(a, b, FP32, what)


# ---- module structure, state, construction ------------------------------------------------------
def test_init_and_state_dict_match_sequential():
    torch.manual_seed(5)
    model = FusedMLP(10, [20, 30], 4, activation="tanh", output_activation=nn.Sigmoid())
    torch.manual_seed(5)
    seq = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 30), nn.Tanh(),
                        nn.Linear(30, 4), nn.Sigmoid())
    ours, theirs = model.state_dict(), seq.state_dict()
    assert list(ours) == list(theirs) == ["0.weight", "0.bias", "2.weight", "2.bias",
                                          "4.weight", "4.bias"]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.hidden_features == [20, 30] and model.in_features == 10 and model.out_features == 4


def test_state_dict_round_trips_both_ways():
    model = FusedMLP(6, [8, 8], 3, activation=None, bias=False)
    seq = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Identity(), nn.Linear(8, 8, bias=False),
                        nn.Identity(), nn.Linear(8, 3, bias=False))
    model.load_state_dict(seq.state_dict())  # strict: same keys and shapes
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), seq.parameters()))
    fresh = FusedMLP(6, [8, 8], 3, activation=None, bias=False)
    seq.load_state_dict(fresh.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), seq.parameters()))
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), seq(x))


def test_from_sequential_shares_parameters_and_names():
    seq = nn.Sequential(nn.Linear(4, 16), nn.GELU(approximate="tanh"), nn.Identity(),
                        nn.Linear(16, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 2))
    model = FusedMLP.from_sequential(seq)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in seq.named_parameters()]
    assert all(p is q for p, q in zip(model.parameters(), seq.parameters()))
    assert model.hidden_features == [16, 16] and len(model) == len(seq)
    assert type(model[1]) is nn.GELU


@pytest.mark.parametrize("bad,match", [
    (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)), "'1'.*Dropout"),
    (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), "'0'.*before the first Linear"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 2)), "'2'.*second activation"),
    (nn.Sequential(nn.Linear(4, 5), nn.Linear(4, 2)), "out_features=5.*in_features=4"),
    (nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2))), "'1'.*Sequential"),
    (nn.Linear(4, 2), "expected an nn.Sequential"),
])
def test_from_sequential_errors_name_the_module(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        FusedMLP.from_sequential(bad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(hidden_features=16), TypeError, "list of ints"),
    (dict(hidden_features=[16, 2.0]), TypeError, "list of ints"),
    (dict(hidden_features=[16, -1]), ValueError, "non-negative.*hidden_features=\\[16, -1\\]"),
    (dict(hidden_features=[16], activation="swish"), ValueError, "unknown activation 'swish'"),
    (dict(hidden_features=[16], activation=nn.Softplus()), ValueError, "Softplus"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedMLP(4, out_features=2, **kwargs)
    with pytest.raises(ValueError, match="non-negative.*in_features=-4"):
        FusedMLP(-4, [8], 2)
    with pytest.raises(TypeError, match="widths must be ints.*out_features=2.0"):
        FusedMLP(4, [8], 2.0)


# Widths nn.Linear allows and FusedMLP must too: 0 anywhere (nn.Linear(0, n) is a layer whose
# output is its bias), and no hidden layer at all (one Linear, as from_sequential takes).
# (id, in, hidden, out, output activation)
DEGENERATE = [
    ("in0", 0, [8], 3, None), ("in0-deep", 0, [16, 16], 3, "tanh"), ("hidden0", 5, [0], 3, None),
    ("hidden-8-0-8", 5, [8, 0, 8], 3, "sigmoid"), ("out0", 5, [8], 0, None),
    ("no-hidden", 5, [], 3, None), ("no-hidden-act", 5, [], 3, "tanh"), ("no-hidden-in0", 0, [], 3, None),
]


@pytest.mark.parametrize("case", DEGENERATE, ids=[c[0] for c in DEGENERATE])
def test_zero_widths_and_no_hidden_layer_match_sequential(impl, case):
    """Forward and every gradient (zero-size ones of the right shape) against torch on the
    equivalent nn.Sequential, in float64 (the kernels run it under the interpreter); random
    biases, so an in_features=0 output is a chain of act(bias) terms."""
    name, in_f, hidden, out_f, out_act = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # nn.Linear's init warns on zero-element weights
        model = FusedMLP(in_f, hidden, out_f, activation="gelu", output_activation=out_act,
                         device=impl, dtype=FP64)
    gen = torch.Generator().manual_seed(case_seed("degenerate", name))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=FP64) / max(p.shape[-1], 1) ** 0.5)
    expected_path = "per-layer" if runs_kernels(impl, FP64) else "torch"
    assert model.path(torch.zeros(2, in_f, device=impl, dtype=FP64)) == expected_path
    assert model.hidden_features == hidden and model.in_features == in_f
    for lead in ((7,), (2, 3)):
        check_against_reference(model, lead, FP64, impl, seed=case_seed("x", name, lead),
                                what=f"{name} {lead}")
        model.zero_grad(set_to_none=True)


def test_no_hidden_layer_is_the_same_rule_both_ways():
    """FusedMLP(in, [], out) and from_sequential(Sequential(Linear, act)) build the same module:
    same children, keys and parameters after the same seed."""
    torch.manual_seed(0)
    built = FusedMLP(5, [], 3, output_activation="tanh")
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 3), nn.Tanh())
    converted = FusedMLP.from_sequential(seq)
    assert [type(m) for m in built] == [type(m) for m in converted] == [nn.Linear, nn.Tanh]
    assert list(built.state_dict()) == list(converted.state_dict()) == ["0.weight", "0.bias"]
    assert all(torch.equal(a, b) for a, b in zip(built.parameters(), converted.parameters()))
    assert built.hidden_features == converted.hidden_features == []


def _stack():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("register,words", [
    (lambda s: s[0].register_forward_hook(lambda m, a, o: o), "module '0' (Linear) has forward_hooks"),
    (lambda s: s[2].register_forward_pre_hook(lambda m, a: None),
     "module '2' (Linear) has forward_pre_hooks"),
    (lambda s: s[4].register_full_backward_hook(lambda m, gi, go: None),
     "module '4' (Linear) has backward_hooks"),
    (lambda s: s[4].register_full_backward_pre_hook(lambda m, go: None),
     "module '4' (Linear) has backward_pre_hooks"),
    (lambda s: s[3].register_forward_hook(lambda m, a, o: o), "module '3' (ReLU) has forward_hooks"),
    (lambda s: s.register_forward_hook(lambda m, a, o: o),
     "the nn.Sequential itself has forward_hooks"),
    (lambda s: s.register_load_state_dict_post_hook(lambda m, k: None),
     "the nn.Sequential itself has load_state_dict_post_hooks"),
])
def test_from_sequential_refuses_hooks_it_would_skip(register, words):
    seq = _stack()
    register(seq)
    with pytest.raises(ValueError) as info:
        FusedMLP.from_sequential(seq)
    message = str(info.value)
    assert words in message and "FusedMLP.from_sequential" in message, message
    assert "without calling its children" in message


def test_from_sequential_refuses_under_a_global_module_hook():
    from torch.nn.modules import module as torch_module

    def watch(m, args, out):
        return None

    handle = torch_module.register_module_forward_hook(watch)
    try:
        with pytest.raises(ValueError, match="a global forward hook "
                                             r"\(register_module_forward_hook\): .*watch"):
            FusedMLP.from_sequential(_stack())
    finally:
        handle.remove()
    assert type(FusedMLP.from_sequential(_stack())) is FusedMLP


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_a_hook_registered_after_the_build_runs(impl, kind):
    """A call hook put on a child of a built FusedMLP runs, as in nn.Sequential: the stack then
    takes the torch path (its children called in turn), on the kernels' backend too."""
    torch.manual_seed(case_seed("late hook", kind))
    model = FusedMLP(6, [16, 16], 4, activation="tanh", device=impl)
    stock = nn.Sequential(OrderedDict((n, copy.deepcopy(m)) for n, m in model.named_children()))
    seen = {}
    hooks = {
        "forward": lambda net: net[2].register_forward_hook(
            lambda m, a, o: seen.setdefault(id(net), []).append("f") or o * 2),
        "forward_pre": lambda net: net[2].register_forward_pre_hook(
            lambda m, a: seen.setdefault(id(net), []).append("p") or (a[0] + 1,)),
        "full_backward": lambda net: net[2].register_full_backward_hook(
            lambda m, gi, go: seen.setdefault(id(net), []).append("b") or (gi[0] * 3,)),
    }
    x = torch.randn(5, 6, device=impl)
    fused_path = model.path(x)
    handles = [hooks[kind](net) for net in (model, stock)]
    assert model.path(x) == "torch"
    outs = []
    for net in (model, stock):
        xi = x.clone().requires_grad_()
        y = net(xi)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad))
    assert seen[id(model)] == seen[id(stock)] and len(seen[id(model)]) == 1
    assert_close(outs[0][0], outs[1][0], FP32, "output")
    assert_close(outs[0][1], outs[1][1], FP32, "dX")
    for h in handles:
        h.remove()
    assert model.path(x) == fused_path


def test_from_sequential_keeps_childrens_state_dict_hooks():
    """A child's state_dict hooks go with the child, which the FusedMLP holds: they still run."""
    seq = _stack()
    calls = []
    seq[0].register_load_state_dict_post_hook(lambda m, keys: calls.append(m))
    model = FusedMLP.from_sequential(seq)
    model.load_state_dict(_stack().state_dict())
    assert calls == [seq[0]]


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_input_errors(backend_name):
    model = FusedMLP(4, [16], 2)
    with fastmlp.use_backend(backend_name):
        with pytest.raises(ValueError, match="last dimension is 5.*in_features=4"):
            model(torch.randn(3, 5))
        with pytest.raises(TypeError, match="dtypes differ.*float64.*float32"):
            model(torch.randn(3, 4, dtype=FP64))
        with pytest.raises(TypeError, match="dtype torch.int64"):
            model(torch.ones(3, 4, dtype=torch.int64))
        with pytest.raises(ValueError, match="0-d"):
            model(torch.tensor(1.0))
        with pytest.raises(ValueError, match="different devices.*meta"):
            model(torch.randn(3, 4, device="meta"))


# ---- fuse, autocast, compile, opcheck, training ----------------------------------------------
def test_fuse_sequentials_replaces_qualifying_sequentials_keys_unchanged(triton_backend):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                      nn.Linear(16, 3))
            self.single = nn.Sequential(nn.Linear(3, 3), nn.ReLU())  # one Linear: left alone
            self.other = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0), nn.Linear(3, 3))

        def forward(self, x):
            return self.other(self.single(self.body(x)))

    net = Net()
    ref = copy.deepcopy(net)
    keys = list(net.state_dict())
    out = fmlp.fuse_sequentials(net)
    assert out is net and type(net.body) is FusedMLP
    assert type(net.single) is nn.Sequential and type(net.other) is nn.Sequential
    assert list(net.state_dict()) == keys
    x = torch.randn(7, 5)
    assert_close(net(x), ref(x), FP32, "fused net")
    root = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    assert type(fmlp.fuse_sequentials(root)) is FusedMLP


def test_autocast_like_nn_linear(triton_backend):
    model = _build(12, [32, 32], 3, "gelu", "sigmoid", True, FP32, "cpu")
    seq = _equivalent_sequential(model)
    x = torch.randn(21, 12)
    with torch.autocast("cpu", dtype=BF16):
        y = model(x)
        ref = seq(x)
    assert y.dtype == ref.dtype == BF16
    with torch.autocast("cpu", dtype=BF16):
        low = _equivalent_sequential(model).to(BF16)(x.to(BF16))
    tol = tolerance(BF16, rel_err(low, seq.double()(x.double())))
    assert_close(y, seq.double()(x.double()), BF16, "autocast forward", tol)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == FP32 for p in model.parameters())


def test_autocast_half_input_to_float_model(triton_backend):
    """Under autocast a bf16 input meets fp32 parameters, as nn.Linear allows (autocast casts
    both): the dtype check must look at what autocast gives the kernels (it raised "dtypes
    differ ... or run under torch.autocast" under autocast)."""
    model = _build(12, [32, 32], 3, "relu", None, True, FP32, "cpu")
    seq = _equivalent_sequential(model)
    x = torch.randn(21, 12).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        y, ref = model(x), seq(x)
    assert y.dtype == ref.dtype == BF16
    assert_close(y, seq.double()(x.double()), BF16, "autocast bf16 input",
                 tolerance(BF16, rel_err(ref, seq.double()(x.double()))))


def _check_compiled(device, backend):
    torch._dynamo.reset()
    model = _build(6, [32, 32, 32], 3, "silu", "tanh", True, FP32, device)
    seq = _equivalent_sequential(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # raises on a graph break
    x = torch.randn(2, 9, 6, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = compiled(x)
    y.square().sum().backward()
    ref = seq(xr)
    ref.square().sum().backward()
    assert_close(y, ref, FP32, "compiled forward")
    assert_close(x.grad, xr.grad, FP32, "compiled dX")
    for p, q in zip(model.parameters(), seq.parameters()):
        assert_close(p.grad, q.grad, FP32, "compiled parameter grad")


def test_compile_fullgraph(impl):
    """Dynamo captures FusedMLP whole (the fused op an opaque node with its autograd formula);
    aot_eager: the graph and AOT autograd without inductor's C++ code generation."""
    _check_compiled(impl, "aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor(impl):
    _check_compiled(impl, "inductor")


def _op_args(device, activation, out_activation, bias=True):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 5, generator=gen).to(device)
    dims = (5, 16, 20, 16, 3)
    ws = [(torch.randn(n, k, generator=gen) / k ** 0.5).to(device) for k, n in zip(dims[:-1], dims[1:])]
    bs = [torch.randn(n, generator=gen).to(device) for n in dims[1:]] if bias else []
    return x, ws, bs


@pytest.mark.parametrize("acts", [("relu", "none"), ("gelu", "sigmoid"), ("leaky_relu", "silu")])
def test_opcheck(impl, acts):
    activation, out_activation = acts
    x, ws, bs = _op_args(impl, activation, out_activation, bias=activation != "relu")
    args = (x.requires_grad_(), [w.requires_grad_() for w in ws], [b.requires_grad_() for b in bs],
            activation, -0.1 if activation == "leaky_relu" else 0.0, out_activation, 0.0, True)
    torch.library.opcheck(torch.ops.fastmlp.mlp, args)


def test_fit_trains_to_the_sequentials_weights(triton_backend):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(48, 8, generator=gen), torch.randn(48, 3, generator=gen)
    model = _build(8, [32, 32], 3, "relu", None, True, FP32, "cpu", seed=4)
    seq = _equivalent_sequential(model)
    initial = [p.detach().clone() for p in model.parameters()]
    with fastmlp.use_backend("torch"):
        fastmlp.fit(seq, fastmlp.TensorLoader(x, y, batch_size=16), nn.MSELoss(),
                    torch.optim.SGD(seq.parameters(), lr=0.05, momentum=0.9), epochs=2,
                    progress=False)
    assert model.path(x) == "fused"
    fastmlp.fit(model, fastmlp.TensorLoader(x, y, batch_size=16), nn.MSELoss(),
                fastmlp.SGD(model.parameters(), lr=0.05, momentum=0.9), epochs=2, progress=False)
    for p, q, p0 in zip(model.parameters(), seq.parameters(), initial):
        assert rel_err(p, p0) > 1e-3, "training did not move the weights"
        assert_close(p, q, FP32, "trained weights")


def test_ddp_single_process(triton_backend, tmp_path):
    """DDP wraps a FusedMLP unchanged: its reducer hooks fire on the fused backward's gradients."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = _build(5, [16, 16], 2, "tanh", None, True, FP32, "cpu")
        seq = _equivalent_sequential(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(11, 5)
        ddp(x).square().sum().backward()
        seq(x).square().sum().backward()
        for p, q in zip(model.parameters(), seq.parameters()):
            assert_close(p.grad, q.grad, FP32, "DDP grad")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_dispatcher_times_both_paths_and_keeps_one(monkeypatch):
    from fastmlp.kernels import tuning

    model = _build(32, [64] * 4, 16, "relu", None, True, FP16, "cuda")
    x = torch.randn(4096, 32, device="cuda", dtype=FP16, requires_grad=True)
    monkeypatch.setattr(tuning, "_best", {})   # the autotuner's cache, path choices included
    path = model.path(x)  # times both on the first call of this bucket
    picks = {k: v for k, v in tuning.chosen_configs().items() if k[0] == "mlp-path"}
    assert path in ("fused", "per-layer") and list(picks.values()) == [path]
    assert model.path(x) == path
    check_against_reference(model, (4096,), FP16, "cuda", what="dispatched")


# ---- what only a GPU would show, made visible on the CPU ----------------------------------------
class _RecordingKernel:
    """Stands in for a Triton kernel: records each launch's keyword (constexpr) arguments, then
    launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_every_width_runs_the_kernel_its_padded_width_compiles(triton_backend, monkeypatch):
    """Hidden widths 100 and 128 launch the fused kernels with the same constexprs: the kernel
    mlp_aot compiles (and checks for spills) at H = 128 is the one a width-100 model runs. With
    the true width a constexpr of its own (masked, unaligned rows of 100), the sm_90 16-bit
    GELU-tanh backward default spilled 228 bytes, and at odd widths most backward tiles did."""
    from fastmlp.kernels import mlp as kmlp

    fwd, bwd = _RecordingKernel(kmlp.mlp_fwd_kernel), _RecordingKernel(kmlp.mlp_bwd_kernel)
    monkeypatch.setattr(kmlp, "mlp_fwd_kernel", fwd)
    monkeypatch.setattr(kmlp, "mlp_bwd_kernel", bwd)
    for hidden in ([100, 100], [128, 128], [16, 100, 64]):
        model = _build(5, hidden, 3, "gelu_tanh", None, True, FP32, "cpu")
        model(torch.randn(9, 5)).sum().backward()
    for recorded in (fwd.launches, bwd.launches):
        assert len(recorded) == 3 and recorded[0] == recorded[1], "100 and 128 compile apart"
        assert {k: v for k, v in recorded[2].items()} == recorded[0]
        assert recorded[0]["H"] == 128 and "HIDDEN" not in recorded[0]


def test_storage_width_is_the_kernels_padded_width():
    """The op's fake kernels and torch path size saved / dW_mid at the width the launchers
    allocate: the kernels' padded width of the widest hidden layer."""
    from fastmlp.kernels import mlp as kmlp

    for width in (1, 15, 16, 17, 31, 64, 65, 100, 127, 128, 129, 256):
        assert mlp_ops._storage_width([width]) == kmlp.padded_width(width)
        assert mlp_ops._storage_width([3, width, 16]) == kmlp.padded_width(max(width, 16))


@pytest.mark.parametrize("row_stride,expected", [(16, "int32"), (2**22, "int64")])
def test_weight_gradient_lane_offsets(triton_backend, monkeypatch, row_stride, expected):
    """The dW kernel's lane offsets are int32 unless a stride that lanes multiply is too large:
    a layer's group stride (M * H for the stacked dZ, M * K_IN for x.unsqueeze(0)) is multiplied
    by a program id in int64 and must not count (it did: every batch past ~4K rows at K_IN 1000
    ran int64 lanes, a kernel the ahead-of-time checks never compiled). A row stride of 2**22
    does need int64, and gets it, with the right result."""
    from fastmlp.kernels import mlp as kmlp

    gen = torch.Generator().manual_seed(0)
    M, N, K = 40, 16, 8
    a = torch.randn(M * N, generator=gen).as_strided((1, M, N), (2**23, N, 1))
    store = torch.zeros((M - 1) * row_stride + K)
    b = store.as_strided((1, M, K), (2**23, row_stride, 1))
    b.copy_(torch.randn(1, M, K, generator=gen))
    kernel = _RecordingKernel(kmlp.mlp_grad_weight_kernel)
    monkeypatch.setattr(kmlp, "mlp_grad_weight_kernel", kernel)
    dw, db = kmlp._grad_weight(a, b, "none", 0.0, True, True, False, 1)
    assert str(kernel.launches[0]["OFFSET_DTYPE"]) == expected
    assert_close(dw[0], a[0].t() @ b[0], FP32, "dW")
    assert_close(db[0], a[0].sum(0), FP32, "db")


def test_dispatcher_times_what_the_call_runs(triton_backend, monkeypatch):
    """The first CUDA call of a shape bucket times both paths (faked here: do_bench runs each
    once). Under no_grad / inference_mode it must time the forward alone (the parameters still
    have requires_grad set; it timed forward + backward, and under inference_mode the backward
    raised "Inference tensors cannot be saved for backward"); with grad mode on, forward and
    backward; always with the inputs' device current (do_bench's events and synchronisation
    are the current device's)."""
    import triton.testing
    from fastmlp.kernels import launch

    backwards, devices = [], []
    current = []
    real_grad = torch.autograd.grad

    def fake_bench(fn, warmup=0, rep=0, **kwargs):
        devices.append(list(current))
        fn()
        return 1.0

    def counting_grad(*args, **kwargs):
        backwards.append(1)
        return real_grad(*args, **kwargs)

    class guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(launch, "device_guard", guard)
    model = _build(5, [16, 16], 3, "relu", None, True, FP32, "cpu")

    def timed(x):
        xx, ws, bs, acts = model._prepare(x)
        return mlp_ops._time_candidates(mlp_ops._rows(xx), ws, bs, acts, mlp_ops._spec(acts))

    with torch.no_grad():
        assert timed(torch.randn(7, 5)) in ("fused", "per-layer")
    assert backwards == []
    with torch.inference_mode():
        assert timed(torch.randn(7, 5)) in ("fused", "per-layer")
    assert backwards == []
    assert timed(torch.randn(7, 5)) in ("fused", "per-layer")
    assert len(backwards) == 2  # one backward per path
    assert devices == [[torch.device("cpu")]] * 6


def test_path_choice_is_an_entry_of_the_autotuners_cache(triton_backend, monkeypatch):
    """The path choice is kept where the tile picks are (fastmlp.kernels.tuning, one cache, one
    set of rules): a pick cached for the bucket is what the stack runs, and FASTMLP_AUTOTUNE=0
    means the default ("fused") whatever was cached, as it does for tile configs. (Timing itself
    needs CUDA: test_dispatcher_times_what_the_call_runs fakes it.)"""
    from fastmlp.kernels import tuning

    model = _build(5, [16, 16], 3, "tanh", None, True, FP32, "cpu")
    x = torch.randn(7, 5)
    xx, ws, bs, acts = model._prepare(x)
    key = mlp_ops._path_key(mlp_ops._rows(xx), ws, bs, acts)
    assert key[0] == "mlp-path"
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "_best", {})
    assert model.path(x) == "fused" and tuning.chosen_configs() == {}   # no timing off CUDA
    tuning._best[key] = "per-layer"
    assert model.path(x) == "per-layer"
    check_against_reference(model, (7,), FP32, "cpu", x_grad=False, what="cached per-layer")
    monkeypatch.setenv("FASTMLP_AUTOTUNE", "0")
    assert model.path(x) == "fused"


@pytest.mark.parametrize("capability,shared,fused", [
    ((9, 0), 232448, True), ((8, 0), 166912, True), ((8, 7), 166912, True),
    ((8, 6), 101376, False), ((8, 9), 101376, False), ((12, 0), 101376, False),
    ((7, 5), 65536, False)])
def test_fused_tables_only_where_they_were_checked(monkeypatch, capability, shared, fused):
    """The tables were compiled for A100 / H100 shared memory; the TF32 tiles at H = 128 take
    up to ~147 KB, so an L4, A10 or RTX (~99 KB) would fail to launch every one of them
    (OutOfResources at FASTMLP_AUTOTUNE=0, "no kernel config fits" when autotuning)."""
    from fastmlp.kernels import mlp as kmlp
    from fastmlp.kernels import tuning

    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(kmlp, "_capability", lambda device: capability)
    monkeypatch.setattr(kmlp, "_shared_memory", lambda device: shared)
    found = kmlp.fused_candidates(FP32, True, 100, torch.device("cuda", 0), "relu")
    assert (found is not None) == fused
    if fused:
        assert kmlp.fused_candidates(BF16, False, 128, torch.device("cuda", 0), "gelu")
