"""The fused op against torch in float64: forward, dX, dW, db, for every activation, on every
backend and device here.

`impl` (tests/conftest.py) runs each case on the Triton kernels (through the interpreter on CPU,
outputs poisoned with NaN before launch) and on the torch path; with a GPU, on CUDA too.
"""

import warnings

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp import activations
from fastmlp import functional as F
from reference import TOLERANCE, assert_close, case_seed, reference, rel_err, tolerances_against_torch

# Every activation, as the public API takes it. leaky_relu three ways: its default slope by name,
# a positive slope (saves Y) and a negative one (saves Z: Y no longer tells Z's sign).
ACTS = [
    pytest.param("relu", id="relu"),
    pytest.param("leaky_relu", id="leaky_relu"),
    pytest.param(nn.LeakyReLU(0.2), id="leaky_relu0.2"),
    pytest.param(nn.LeakyReLU(-0.3), id="leaky_relu-0.3"),
    pytest.param("gelu", id="gelu"),
    pytest.param(nn.GELU(approximate="tanh"), id="gelu_tanh"),
    pytest.param("silu", id="silu"),
    pytest.param("sigmoid", id="sigmoid"),
    pytest.param(nn.Tanh(), id="tanh"),
    pytest.param(None, id="none"),
]
# One activation per kind of saved tensor, for the layout and edge-case tests.
ACTS_BY_SAVED = [pytest.param("relu", id="relu"), pytest.param("gelu", id="gelu"),
                 pytest.param("sigmoid", id="sigmoid"), pytest.param(None, id="none")]


def test_every_activation_is_tested():
    """The parameter list above covers the whole table (a new activation must join it)."""
    tested = {activations.resolve(p.values[0])[0] for p in ACTS}
    assert tested == set(activations.ACTIVATIONS)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(M_shape, K, N, dtype, device, bias=True, gen=None):
    x = torch.randn(*M_shape, K, dtype=torch.float32, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=gen).to(device=device, dtype=dtype) if bias else None
    return x, w, b


def _run(x, w, b, activation, grad_out):
    """Forward + backward through fastmlp; returns (y, dx, dw, db) (None where no grad)."""
    if activation == "relu":
        y = F.linear_relu(x, w, b)
    elif activation is None:
        y = F.linear(x, w, b)
    else:
        y = F.linear_act(x, w, b, activation)
    y.backward(grad_out)
    return y, x.grad, w.grad, (b.grad if b is not None else None)


def _check_all(x, w, b, activation, dtype, what, tol=None):
    grad_out = torch.randn(*x.shape[:-1], w.shape[0], device=x.device).to(dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    y, dx, dw, db = _run(x, w, b, activation, grad_out)
    expected = reference(x, w, b, activation, grad_out)
    ry, rdx, rdw, rdb = expected
    ty, tdx, tdw, tdb = tolerances_against_torch(x, w, b, activation, grad_out, expected, dtype, tol)
    assert y.dtype == dtype and y.shape == ry.shape
    assert_close(y, ry, dtype, f"{what} forward", ty)
    assert_close(dx, rdx, dtype, f"{what} dX", tdx)
    assert_close(dw, rdw, dtype, f"{what} dW", tdw)
    if b is not None:
        assert_close(db, rdb, dtype, f"{what} db", tdb)


SHAPES = [  # (leading dims of X, K, N)
    ((64,), 1000, 100),  # the seed's first layer
    ((64,), 100, 10),  # the seed's second layer
    ((1,), 1, 1),
    ((1,), 13, 7),
    ((37,), 71, 45),  # primes, no multiple of any block
    ((67,), 33, 131),
    ((5, 7), 19, 23),  # 3-D input
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("activation", ["relu", None], ids=["relu", "none"])
def test_matches_float64_reference(impl, dtype, lead, K, N, activation):
    torch.manual_seed(case_seed(lead, K, N, str(dtype), activation))
    x, w, b = _inputs(lead, K, N, dtype, impl)
    _check_all(x, w, b, activation, dtype, f"{lead}x{K}->{N}")


# The odd shapes for every activation (the seed's shapes above are relu's and none's).
ODD_SHAPES = [((1,), 13, 7), ((37,), 71, 45), ((5, 7), 19, 23)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", ODD_SHAPES)
@pytest.mark.parametrize("activation", ACTS)
def test_every_activation_matches_float64_reference(impl, dtype, lead, K, N, activation):
    torch.manual_seed(case_seed(lead, K, N, str(dtype), str(activation)))
    x, w, b = _inputs(lead, K, N, dtype, impl)
    _check_all(x, w, b, activation, dtype, f"{activation} {lead}x{K}->{N}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_without_bias(impl, dtype, activation):
    x, w, _ = _inputs((29,), 41, 19, dtype, impl, bias=False)
    _check_all(x, w, None, activation, dtype, "no bias")


LAYOUTS = ["x_transposed", "x_sliced", "w_transposed", "w_sliced", "bias_strided"]


def _layout_inputs(layout, device, dtype, M=33, K=40, N=21):
    """Fresh random x [M, K], w [N, K], b [N] of `dtype`, one of them in the given layout."""
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    x, w, b = randn(M, K), randn(N, K, scale=K ** -0.5), randn(N)
    if layout == "x_transposed":
        x = randn(K, M).t()
    elif layout == "x_sliced":
        x = randn(M * 2, K * 3)[::2, 1::3]
    elif layout == "w_transposed":
        w = randn(K, N, scale=K ** -0.5).t()
    elif layout == "w_sliced":
        w = randn(N, 2 * K, scale=K ** -0.5)[:, ::2]
    elif layout == "bias_strided":
        b = randn(2 * N)[::2]
    assert not (x.is_contiguous() and w.is_contiguous() and b.is_contiguous())
    return x, w, b


@pytest.mark.parametrize("activation", ACTS_BY_SAVED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_and_transposed_inputs(impl, layout, activation):
    x, w, b = _layout_inputs(layout, impl, torch.float32)
    _check_all(x, w, b, activation, torch.float32, f"{layout} {activation}")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("mode", ["tf32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_and_transposed_inputs_on_matrix_units(impl, layout, mode, activation):
    """The same layouts through the paths a GPU runs on its matrix units: fp32 with TF32
    allowed, and bf16 (wgmma on Hopper, which takes a column-major operand through a transpose
    of its own)."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    x, w, b = _layout_inputs(layout, impl, dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        # TF32 keeps 10 mantissa bits: ~3e-4 relative error at this size, under 2e-3.
        _check_all(x, w, b, activation, dtype, f"{layout} {mode} {activation}",
                   tol=2e-3 if mode == "tf32" else None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _act_module(activation):
    """The torch module computing `activation` (for references built from nn modules)."""
    name, alpha = activations.resolve(activation)
    return lambda t: activations.get(name).torch_forward(t, alpha)


@pytest.mark.parametrize("activation", ACTS_BY_SAVED)
@pytest.mark.parametrize("upstream", ["expanded", "transposed"])
def test_upstream_gradient_non_contiguous(impl, upstream, activation):
    """y.sum() hands backward a stride-0 gradient; a loss on y.t() hands it a transposed one
    (whose strides differ from the saved Y or Z)."""
    x, w, b = _inputs((23,), 17, 11, torch.float32, impl)
    for t in (x, w, b):
        t.requires_grad_(True)
    y = F.linear_act(x, w, b, activation)
    if upstream == "expanded":
        y.sum().backward()
        grad_out = torch.ones(23, 11)
    else:
        weights = torch.randn(11, 23)
        (y.t() * weights.to(impl)).sum().backward()
        grad_out = weights.t()
    ry, rdx, rdw, rdb = reference(x, w, b, activation, grad_out)
    assert_close(x.grad, rdx, torch.float32, "dX")
    assert_close(w.grad, rdw, torch.float32, "dW")
    assert_close(b.grad, rdb, torch.float32, "db")


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("frozen", ["x", "weight", "bias", "weight_and_bias"])
def test_only_needed_gradients(impl, frozen, activation):
    x, w, b = _inputs((31,), 26, 18, torch.float32, impl)
    grads = {"x": frozen != "x", "weight": frozen not in ("weight", "weight_and_bias"),
             "bias": frozen not in ("bias", "weight_and_bias")}
    x.requires_grad_(grads["x"])
    w.requires_grad_(grads["weight"])
    b.requires_grad_(grads["bias"])
    grad_out = torch.randn(31, 18, device=impl)
    y = F.linear_act(x, w, b, activation)
    y.backward(grad_out)
    ry, rdx, rdw, rdb = reference(x, w, b, activation, grad_out)
    assert_close(y, ry, torch.float32, "forward")
    for name, tensor, ref in (("x", x, rdx), ("weight", w, rdw), ("bias", b, rdb)):
        if grads[name]:
            assert_close(tensor.grad, ref, torch.float32, name)
        else:
            assert tensor.grad is None


def test_only_needed_gradients_are_computed(impl, monkeypatch):
    """A frozen layer's backward launches no weight-gradient work; no input grad, no dX work."""
    from fastmlp import ops

    calls = []
    for name in ("_grad_input_impl", "_grad_weight_impl"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    x, w, b = _inputs((8,), 6, 5, torch.float32, impl)
    w.requires_grad_(True)
    fastmlp.FusedLinearFunction.apply(x, w, None, "relu").sum().backward()
    assert calls == ["_grad_weight_impl"]
    calls.clear()
    x.requires_grad_(True)
    w.requires_grad_(False)
    fastmlp.FusedLinearFunction.apply(x, w, b, "gelu").sum().backward()
    assert calls == ["_grad_input_impl"]


def _saved_shapes(y):
    return sorted(tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None)


@pytest.mark.parametrize("activation", ACTS)
def test_saves_x_weight_and_what_the_derivative_needs(impl, activation):
    """X, W, and Y (relu, leaky_relu with slope > 0, sigmoid, tanh), the pre-activation Z
    (gelu, gelu_tanh, silu, leaky_relu with slope <= 0), or nothing more ("none"). b is not
    saved (kept on ctx for the create_graph backward: an in-place change to it before a
    first-order backward is allowed, as with nn.Linear)."""
    name, alpha = activations.resolve(activation)
    saves = activations.get(name).saves(alpha)
    x, w, b = _inputs((9,), 12, 7, torch.float32, impl)
    for t in (x, w, b):
        t.requires_grad_(True)
    y = fastmlp.FusedLinearFunction.apply(x, w, b, name, alpha)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    expected = [(9, 12), (7, 12)] + ([(9, 7)] if saves != "nothing" else [])
    assert _saved_shapes(y) == sorted(expected)
    assert any(t.data_ptr() == w.data_ptr() for t in saved)
    if saves == "output":
        assert any(t.data_ptr() == y.data_ptr() for t in saved)
    if saves == "preact":
        (z,) = [t for t in saved if t.shape == (9, 7)]
        assert z.data_ptr() != y.data_ptr()
        expected_z = nn.functional.linear(x.double(), w.double(), b.double())
        assert_close(z, expected_z, torch.float32, "saved pre-activation")


def test_relu_saves_y_and_no_copy_through_functional(impl):
    x, w, b = _inputs((9,), 12, 7, torch.float32, impl)
    for t in (x, w, b):
        t.requires_grad_(True)
    y = F.linear_relu(x, w, b)
    if not isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction):
        # torch backend, eager: torch's own linear + relu nodes; they keep X, W and Y too.
        assert torch.equal(y.grad_fn._saved_result, y)
        return
    assert _saved_shapes(y) == sorted([(9, 12), (7, 12), (9, 7)])


@pytest.mark.parametrize("activation", ["gelu", "silu", nn.LeakyReLU(-0.5)], ids=str)
def test_no_preactivation_is_written_unless_autograd_needs_it(triton_backend, monkeypatch,
                                                             activation):
    """gelu/silu save Z for backward: the forward kernel writes it only when a backward will run
    (not under no_grad, not for frozen inputs and parameters)."""
    from fastmlp import ops

    asked = []
    original = ops._linear_act_impl

    def spy(*args):
        asked.append(args[-1])
        return original(*args)

    monkeypatch.setattr(ops, "_linear_act_impl", spy)
    x, w, b = _inputs((6,), 5, 4, torch.float32, "cpu")
    layer = fastmlp.FusedLinear(5, 4, activation=activation)
    with torch.no_grad():
        layer(x)
    F.linear_act(x, w, b, activation)            # nothing requires grad
    assert asked == [False, False]
    y = layer(x)                                  # parameters require grad
    assert asked == [False, False, True]
    y.sum().backward()
    assert layer.weight.grad is not None


def test_empty_batch(impl):
    for activation in ("relu", "gelu"):
        x, w, b = _inputs((0,), 10, 4, torch.float32, impl)
        for t in (x, w, b):
            t.requires_grad_(True)
        y = F.linear_act(x, w, b, activation)
        assert y.shape == (0, 4)
        y.sum().backward()
        assert x.grad.shape == (0, 10)
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("activation", ACTS)
def test_gradient_where_preactivation_is_exactly_zero(impl, activation):
    """Integer-valued inputs make exact pre-activations; the bias zeroes a chosen set of them.
    Each activation's gradient there is torch's (relu's is 0, leaky_relu's the slope, gelu's
    one half, ...)."""
    gen = torch.Generator().manual_seed(7)
    M, K, N = 12, 8, 6
    x = torch.randint(-3, 4, (M, K), generator=gen).float()
    w = torch.randint(-3, 4, (N, K), generator=gen).float()
    pre = x @ w.t()
    b = -pre[0].clone()  # row 0 of the pre-activation becomes exactly 0
    b[::2] += 1.0
    x, w, b = (t.to(impl).requires_grad_() for t in (x, w, b))
    grad_out = torch.randn(M, N, generator=gen).to(impl)
    y = F.linear_act(x, w, b, activation)
    y.backward(grad_out)
    ry, rdx, rdw, rdb = reference(x, w, b, activation, grad_out)
    zero = (x.detach().double().cpu() @ w.detach().double().cpu().t() + b.detach().double().cpu()) == 0
    assert zero.sum() >= N // 2
    name, _ = activations.resolve(activation)
    if name in ("relu", "none"):  # integer-valued: exact
        assert torch.equal(y.detach().cpu().double(), ry)
    else:
        assert_close(y, ry, torch.float32, "forward")
    assert_close(x.grad, rdx, torch.float32, "dX")
    assert_close(w.grad, rdw, torch.float32, "dW")
    assert_close(b.grad, rdb, torch.float32, "db")


def _nonfinite_equal(actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "NaN positions differ from torch"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), "inf positions differ from torch"
    finite = torch.isfinite(e)
    assert torch.equal(torch.sign(a[torch.isinf(a)]), torch.sign(e[torch.isinf(e)]))
    if finite.any():
        err = (a[finite] - e[finite]).norm() / e[finite].norm().clamp_min(1e-30)
        assert err < 1e-5, err


def _same_dtype_torch(x, w, b, activation, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = _act_module(activation)(nn.functional.linear(*leaves))
    y.backward(grad_out)
    return (y.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("activation", ACTS)
def test_nan_and_inf_propagate_like_torch(impl, activation):
    x, w, b = _inputs((10,), 9, 6, torch.float32, impl)
    x[2, 3] = float("nan")
    x[5, 1] = float("inf")
    x[7, 4] = float("-inf")
    grad_out = torch.randn(10, 6, device=impl)
    for t in (x, w, b):
        t.requires_grad_(True)
    y = F.linear_act(x, w, b, activation)
    y.backward(grad_out)
    ry, rdx, rdw, rdb = reference(x, w, b, activation, grad_out)
    if fastmlp.get_backend() == "torch" and impl == "cpu":
        # The torch backend is torch's own ops, whose CPU fp32 GELU gives NaN at +inf (its
        # vectorised erf) where float64 and CUDA give inf: compare with torch in fp32 there.
        ry, rdx, rdw, rdb = _same_dtype_torch(x, w, b, activation, grad_out)
    assert torch.isnan(y[2]).all()  # act(NaN) is NaN, as in torch (relu's too)
    for got, ref in ((y, ry), (x.grad, rdx), (w.grad, rdw), (b.grad, rdb)):
        _nonfinite_equal(got, ref)


@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_float64(impl, activation):
    """float64 runs the same kernels under the interpreter (torch on GPUs): gradcheck them."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(impl).requires_grad_()
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(impl).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).to(impl).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: F.linear_act(*a, activation=activation), (x, w, b))
    assert torch.autograd.gradcheck(lambda a, c: F.linear_act(a, c, activation=activation), (x, w))


def test_relu_and_plain_linear_gradcheck_float64(impl):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(impl).requires_grad_()
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(impl).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).to(impl).requires_grad_()
    assert torch.autograd.gradcheck(F.linear_relu, (x, w, b))
    assert torch.autograd.gradcheck(F.linear, (x, w, b))


@pytest.mark.parametrize("activation", ACTS)
def test_float64_kernels_match(impl, activation):
    x, w, b = _inputs((17,), 23, 13, torch.float64, impl)
    _check_all(x, w, b, activation, torch.float64, "float64")


@pytest.mark.parametrize("activation", ACTS_BY_SAVED)
def test_autograd_function_apply_directly(impl, activation):
    name, alpha = activations.resolve(activation)
    x, w, b = _inputs((4, 3), 10, 6, torch.float32, impl)
    for t in (x, w, b):
        t.requires_grad_(True)
    y = fastmlp.FusedLinearFunction.apply(x, w, b, name, alpha)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    ry, rdx, rdw, rdb = reference(x, w, b, activation, grad_out)
    assert_close(y, ry, torch.float32, "apply forward")
    assert_close(x.grad, rdx, torch.float32, "apply dX")
    assert_close(w.grad, rdw, torch.float32, "apply dW")
    assert_close(b.grad, rdb, torch.float32, "apply db")


def test_one_dimensional_input(impl):
    for activation in ("relu", "silu"):
        x, w, b = _inputs((), 11, 5, torch.float32, impl)
        _check_all(x, w, b, activation, torch.float32, f"1-D input {activation}")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_keeps_the_autocast_dtype(impl, dtype, activation):
    x, w, b = _inputs((16,), 24, 8, torch.float32, impl)
    lin = torch.nn.Linear(24, 8, device=impl)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    act = _act_module(activation)
    with torch.autocast(impl, dtype=dtype):
        y = F.linear_act(x, w, b, activation)
        expected = act(lin(x))
    assert y.dtype == expected.dtype == dtype
    assert rel_err(y, expected.float()) < TOLERANCE[dtype]


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
def test_zero_in_features_and_zero_out_features(impl, activation):
    """in_features = 0 gives act(bias); out_features = 0 gives an empty output, as nn.Linear."""
    x = torch.randn(6, 0, device=impl, requires_grad=True)
    w = torch.randn(5, 0, device=impl, requires_grad=True)
    b = torch.randn(5, device=impl, requires_grad=True)
    grad_out = torch.randn(6, 5, device=impl)
    with warnings.catch_warnings(record=True) as caught:  # the interpreter warns on x / 0
        warnings.simplefilter("always")
        y = F.linear_act(x, w, b, activation)
        y.backward(grad_out)
    assert not [w for w in caught if "divide by zero" in str(w.message)]
    ry, rdx, rdw, rdb = reference(x, w, b, activation, grad_out)
    assert_close(y, ry, torch.float32, "forward")
    assert x.grad.shape == (6, 0) and w.grad.shape == (5, 0)
    assert_close(b.grad, rdb, torch.float32, "db")
    x2 = torch.randn(4, 3, device=impl, requires_grad=True)
    w2 = torch.randn(0, 3, device=impl, requires_grad=True)
    y2 = F.linear_act(x2, w2, torch.randn(0, device=impl), activation)
    assert y2.shape == (4, 0)
    y2.sum().backward()
    assert torch.equal(x2.grad, torch.zeros_like(x2))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_empty_three_dimensional_inputs(impl, activation):
    """Leading dimensions with an empty feature dimension: [2, 3, 0] inputs, and [2, 3, K]
    inputs into 0 outputs, reshape like nn.Linear's (reshape(-1, 0) cannot)."""
    x = torch.randn(2, 3, 0, device=impl, requires_grad=True)
    w = torch.randn(5, 0, device=impl, requires_grad=True)
    b = torch.randn(5, device=impl, requires_grad=True)
    grad_out = torch.randn(2, 3, 5, device=impl)
    y = F.linear_act(x, w, b, activation)
    y.backward(grad_out)
    assert y.shape == (2, 3, 5) and x.grad.shape == (2, 3, 0)
    ry, _, _, rdb = reference(x, w, b, activation, grad_out)
    assert_close(y, ry, torch.float32, "forward")
    assert_close(b.grad, rdb, torch.float32, "db")
    x2 = torch.randn(2, 3, 4, device=impl, requires_grad=True)
    w2 = torch.randn(0, 4, device=impl, requires_grad=True)
    y2 = F.linear_act(x2, w2, torch.randn(0, device=impl), activation)
    assert y2.shape == (2, 3, 0)
    y2.sum().backward()
    assert torch.equal(x2.grad, torch.zeros_like(x2)) and w2.grad.shape == (0, 4)


def test_expanded_input_with_stride_zero(impl):
    """A broadcast (stride-0) input is read as is, no copy needed."""
    row = torch.randn(1, 21, device=impl)
    x = row.expand(9, 21)
    assert x.stride(0) == 0
    for activation in ("relu", "tanh"):
        _, w, b = _inputs((9,), 21, 8, torch.float32, impl)
        _check_all(x.detach(), w, b, activation, torch.float32, f"expanded {activation}")


# What F.linear takes besides weight [N, K] and bias [N]: a bias broadcast over the N outputs
# ([1, N], [1], 0-d) and a 1-D weight [K] (the output drops its last dimension), with a 0-d bias
# where F.linear takes one. (lead dims of X, weight shape, bias shape or None); K = 7, N = 5.
F_LINEAR_SHAPES = [
    ((3,), (5, 7), (1, 5)), ((3,), (5, 7), ()), ((3,), (5, 7), (1,)),
    ((2, 3), (5, 7), (1, 5)), ((2, 3), (5, 7), ()), ((), (5, 7), (1, 5)), ((), (5, 7), ()),
    ((3,), (1, 7), ()), ((3,), (7,), None), ((2, 3), (7,), None), ((2, 3), (7,), ()),
    ((), (7,), None), ((), (7,), ()),
]


@pytest.mark.parametrize("lead,w_shape,b_shape", F_LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "tanh", None], ids=["relu", "tanh", "none"])
def test_bias_and_weight_shapes_f_linear_takes(impl, lead, w_shape, b_shape, activation):
    """Forward and every gradient, each of the caller's shape, against F.linear + activation in
    float64 (the bias gradient summed over the outputs it was broadcast to)."""
    gen = torch.Generator().manual_seed(case_seed(lead, w_shape, b_shape, activation))
    x = torch.randn(*lead, 7, generator=gen, dtype=torch.float64).to(impl).requires_grad_()
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64).to(impl).requires_grad_()
    b = (torch.randn(b_shape, generator=gen, dtype=torch.float64).to(impl).requires_grad_()
         if b_shape is not None else None)
    expected_shape = nn.functional.linear(x.detach(), w.detach(),
                                          b.detach() if b is not None else None).shape
    grad_out = torch.randn(expected_shape, generator=gen, dtype=torch.float64).to(impl)
    y, dx, dw, db = _run(x, w, b, activation, grad_out)
    ry, rdx, rdw, rdb = reference(x, w, b, activation, grad_out)
    assert y.shape == ry.shape == expected_shape
    assert_close(y, ry, torch.float64, "forward")
    assert dx.shape == x.shape and dw.shape == w.shape
    assert_close(dx, rdx, torch.float64, "dX")
    assert_close(dw, rdw, torch.float64, "dW")
    if b is not None:
        assert db.shape == b.shape
        assert_close(db, rdb, torch.float64, "db")


# Double backward (create_graph=True), torch.func and gradgradcheck: tests/test_double_backward.py.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_torch_candidate_matches_torch_with_nan(dtype, activation):
    """The autotuner's torch candidate (ops.torch_forward, cuBLASLt's epilogue where it keeps
    NaN) gives torch's values, NaN rows included."""
    from fastmlp import ops

    x, w, b = _inputs((64,), 32, 48, dtype, "cuda")
    x[3, 5] = float("nan")
    y, _ = ops.torch_forward(x, w, b, activation, 0.0, False)
    expected = _act_module(activation)(nn.functional.linear(x.double(), w.double(), b.double()))
    assert torch.isnan(y[3]).all()
    assert_close(y[torch.arange(64) != 3], expected[torch.arange(64) != 3], dtype, "torch candidate")
