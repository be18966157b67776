"""The gated op act(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u) (fastmlp/gated.py, kernels/gated.py) against
torch in float64: forward and every gradient, for every activation, on both backends.

`impl` (tests/conftest.py) runs each case on the Triton kernels (through the interpreter on CPU,
outputs poisoned with NaN before each launch) and on the torch path. The reference is stock
torch (F.linear twice, the activation's torch op, the product; for a packed weight one F.linear
then ``.chunk(2, -1)``, as models write it) differentiated by autograd in float64; the
tolerance is the dtype's bar or 4x torch's own error in that dtype on the same inputs
(reference.tolerance).
"""

import warnings

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp import activations
from fastmlp import functional as F
from reference import TOLERANCE, assert_close, autograd_nodes, case_seed, rel_err, tolerance

FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPES = [FP32, FP16, BF16]

# Every activation as the public API takes it; leaky_relu with a positive slope (its torch
# backward reads act(G)) and a negative one (reads G).
ACTS = ["silu", "gelu", "gelu_tanh", "relu", "sigmoid", "tanh", "leaky_relu", nn.LeakyReLU(-0.3),
        None]
ACT_IDS = ["silu", "gelu", "gelu_tanh", "relu", "sigmoid", "tanh", "leaky_relu+", "leaky_relu-",
           "none"]


def test_every_activation_is_tested():
    assert {activations.resolve(a)[0] for a in ACTS} == set(fastmlp.ACTIVATIONS)


def _act(activation):
    name, alpha = activations.resolve(activation)
    return lambda t: activations.get(name).torch_forward(t, alpha)


def torch_separate(activation):
    """Stock torch's gated block with two weights."""
    act = _act(activation)

    def fn(x, wg, wu, bg=None, bu=None):
        return act(nn.functional.linear(x, wg, bg)) * nn.functional.linear(x, wu, bu)
    return fn


def torch_packed(activation, gate_first=True):
    """Stock torch's gated block with one packed weight: one Linear, then chunk."""
    act = _act(activation)

    def fn(x, w, b=None):
        first, second = nn.functional.linear(x, w, b).chunk(2, -1)
        return act(first) * second if gate_first else act(second) * first
    return fn


def fast_separate(activation):
    return lambda x, wg, wu, bg=None, bu=None: F.gated_linear(x, wg, wu, bg, bu, activation)


def fast_packed(activation, gate_first=True):
    return lambda x, w, b=None: F.gated_linear_packed(x, w, b, activation, gate_first)


def _run(fn, tensors, grad_out, dtype=None):
    """(y, grads of the tensors that require grad (None for the others)) of fn on fresh leaves
    (cast to dtype and moved to the CPU if given: the references)."""
    leaves = []
    for t in tensors:
        if t is None:
            leaves.append(None)
            continue
        leaf = t.detach()
        if dtype is not None:
            leaf = leaf.cpu().to(dtype)
        leaves.append(leaf.clone().requires_grad_(t.requires_grad) if dtype is not None
                      else leaf.requires_grad_(t.requires_grad))
    y = fn(*leaves)
    if any(t is not None and t.requires_grad for t in leaves):
        y.backward(grad_out.detach().to(y.device, y.dtype) if dtype is None
                   else grad_out.detach().cpu().to(dtype))
    return y.detach(), [t.grad if t is not None and t.requires_grad else None for t in leaves]


def check_against_torch(fast, stock, tensors, dtype, what, tol=None, grad_out=None):
    """Forward and every gradient of `fast` against `stock` in float64; the tolerance from
    torch's own error in `dtype`. Tensors may be views (packed halves, transposes): fastmlp gets
    them as they are, the references get contiguous float64 copies. Returns the output."""
    out_shape = stock(*[t.detach().cpu().double() if t is not None else None
                        for t in tensors]).shape
    if grad_out is None:
        gen = torch.Generator().manual_seed(case_seed("grad_out", what))
        grad_out = torch.randn(out_shape, generator=gen).to(tensors[0].device, dtype)
    y, grads = _run(fast, tensors, grad_out)
    ry, rgrads = _run(stock, tensors, grad_out, FP64)
    oy, ograds = _run(stock, tensors, grad_out, dtype)
    assert y.dtype == dtype and y.shape == ry.shape, (y.dtype, y.shape, ry.shape)
    assert_close(y, ry, dtype, f"{what} forward", tolerance(dtype, rel_err(oy, ry), tol))
    for i, (t, g, r, o) in enumerate(zip(tensors, grads, rgrads, ograds)):
        if t is None:
            continue
        if not t.requires_grad:
            assert g is None, f"{what}: gradient {i} of a tensor that requires none"
            continue
        assert g is not None and g.shape == t.shape, f"{what}: gradient {i} missing or misshapen"
        assert_close(g, r, dtype, f"{what} gradient {i}", tolerance(dtype, rel_err(o, r), tol))
    return y


def _separate_inputs(device, dtype, lead, K, H, gate_bias=True, up_bias=True, seed=()):
    gen = torch.Generator().manual_seed(case_seed("separate", lead, K, H, str(dtype), *seed))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    x = randn(*lead, K)
    wg, wu = randn(H, K, scale=max(K, 1) ** -0.5), randn(H, K, scale=max(K, 1) ** -0.5)
    bg = randn(H) if gate_bias else None
    bu = randn(H) if up_bias else None
    return [x, wg, wu, bg, bu]


def _packed_inputs(device, dtype, lead, K, H, bias=True, seed=()):
    gen = torch.Generator().manual_seed(case_seed("packed", lead, K, H, str(dtype), *seed))
    x = torch.randn(*lead, K, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(2 * H, K, generator=gen) * max(K, 1) ** -0.5).to(device, dtype)
    w.requires_grad_()
    b = torch.randn(2 * H, generator=gen).to(device, dtype).requires_grad_() if bias else None
    return [x, w, b]


# ---- forward and gradients against torch ------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS, ids=ACT_IDS)
def test_every_activation_matches_float64_reference(impl, dtype, activation):
    """3-D input, prime widths."""
    tensors = _separate_inputs(impl, dtype, (3, 5), 19, 11, seed=(str(activation),))
    check_against_torch(fast_separate(activation), torch_separate(activation), tensors, dtype,
                        f"{activation} {dtype}")


SHAPES = [((1,), 1, 1), ((1,), 13, 7), ((37,), 71, 45), ((67,), 33, 70), ((2, 3, 4), 5, 3)]


@pytest.mark.parametrize("lead,K,H", SHAPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_odd_shapes(impl, lead, K, H, activation):
    tensors = _separate_inputs(impl, FP32, lead, K, H, seed=(activation,))
    check_against_torch(fast_separate(activation), torch_separate(activation), tensors, FP32,
                        f"{activation} {lead}x{K}->{H}")


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("gate_first", [True, False], ids=["gate-first", "up-first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "sigmoid"])
def test_packed_weight(impl, dtype, gate_first, bias, activation):
    """One [2H, K] weight and a [2H] bias, split into views: the gradient comes back packed."""
    tensors = _packed_inputs(impl, dtype, (23,), 17, 13, bias, seed=(activation, gate_first))
    check_against_torch(fast_packed(activation, gate_first), torch_packed(activation, gate_first),
                        tensors, dtype, f"packed {activation} gate_first={gate_first}")


def test_packed_halves_are_not_copied(triton_backend, device, monkeypatch):
    """The packed Function saves the packed weight itself, and the forward and dX kernels read
    its halves in place (views at the halves' offsets, no .contiguous() copy). The kernels'
    path: on the torch backend torch's own nodes save what F.linear saves."""
    from fastmlp.kernels import gated as kernels

    weights_read = []
    for name, first in (("gated_forward", 1), ("gated_grad_input", 3)):
        original = getattr(kernels, name)

        def spy(*args, _original=original, _first=first, **kwargs):
            weights_read.append((args[_first].data_ptr(), args[_first + 1].data_ptr()))
            return _original(*args, **kwargs)
        monkeypatch.setattr(kernels, name, spy)
    x, w, b = _packed_inputs(device, FP32, (4,), 6, 5)
    y = F.gated_linear_packed(x, w, b, "silu", gate_first=False)
    assert isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)
    assert w.data_ptr() in {t.data_ptr() for t in y.grad_fn.saved_tensors if t is not None}
    y.sum().backward()
    up, gate = w.data_ptr(), w[5:].data_ptr()
    assert weights_read == [(gate, up), (gate, up)], weights_read


def _nodes_feeding(y, leaf):
    """(names of the autograd nodes with an edge to `leaf`'s AccumulateGrad, names of every
    node of y's graph)."""
    feeding, names = [], []
    for node, following in autograd_nodes(y):
        names.append(type(node).__name__)
        feeding += [type(node).__name__ for n in following
                    if n is not None and getattr(n, "variable", None) is leaf]
    return feeding, names


@pytest.mark.parametrize("gate_first", [True, False], ids=["gate-first", "up-first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_packed_gradient_comes_from_one_node(impl, gate_first, bias):
    """The packed weight's (and bias's) gradient reaches it from one autograd node, with no
    SliceBackward anywhere: no per-half [2H, K] buffer zero-filled and added to the other
    half's. (Passing the halves as views gave two SliceBackward nodes feeding the weight.)"""
    tensors = _packed_inputs(impl, FP32, (3, 7), 11, 5, bias, seed=(gate_first,))
    y = F.gated_linear_packed(*tensors, activation="gelu", gate_first=gate_first)
    for what, leaf in (("weight", tensors[1]), ("bias", tensors[2])):
        if leaf is None:
            continue
        feeding, names = _nodes_feeding(y, leaf)
        assert len(feeding) == 1, (what, feeding)
        assert not [n for n in names if n.startswith("SliceBackward")], names


@pytest.mark.parametrize("gate_first", [True, False], ids=["gate-first", "up-first"])
def test_packed_gradient_is_the_grouped_launch_output(triton_backend, device, monkeypatch,
                                                      gate_first):
    """The packed weight's .grad (and the bias's) is the very tensor the one grouped dW/db
    launch wrote: no copy, no add after it (outputs NaN-poisoned before the launch, so a half
    left unwritten would show), and it equals torch's in float64."""
    from fastmlp.kernels import gated as kernels

    written = []
    original = kernels.gated_grad_weight_packed

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        written.append(tuple(t.data_ptr() for t in out))
        return out
    monkeypatch.setattr(kernels, "gated_grad_weight_packed", spy)
    tensors = _packed_inputs(device, FP32, (19,), 9, 7, seed=(gate_first,))
    grad_out = torch.randn(19, 7, device=device)
    _, grads = _run(fast_packed("silu", gate_first), tensors, grad_out)
    assert written == [(grads[1].data_ptr(), grads[2].data_ptr())], written
    _, want = _run(torch_packed("silu", gate_first), tensors, grad_out, FP64)
    for got, expected, what in zip(grads, want, ("dX", "dW", "db")):
        assert_close(got, expected, FP32, what)


def test_packed_op_torch_implementation_writes_one_tensor(torch_backend, monkeypatch):
    """The op's torch implementation (the torch backend under torch.compile or DTensor, and
    the autotuner's torch candidate) writes both halves into one empty tensor: the gradient
    autograd hands the packed weight is that tensor."""
    from fastmlp import gated

    written = []
    original = gated.torch_grad_weight_packed

    def spy(*args):
        out = original(*args)
        written.append(tuple(t.data_ptr() for t in out))
        return out
    monkeypatch.setattr(gated, "torch_grad_weight_packed", spy)
    x, w, b = _packed_inputs("cpu", FP32, (6,), 5, 3)
    grad_out = torch.randn(6, 3)
    y, _, _ = torch.ops.fastmlp.gated_linear_packed(x, w, b, "tanh", 0.0, False, True)
    y.backward(grad_out)
    assert written == [(w.grad.data_ptr(), b.grad.data_ptr())], written
    _, want = _run(torch_packed("tanh", gate_first=False), [x, w, b], grad_out, FP64)
    for got, expected, what in zip((x.grad, w.grad, b.grad), want, ("dX", "dW", "db")):
        assert_close(got, expected, FP32, what)


PACKED_SHAPES = [((1,), 1, 1), ((1,), 13, 7), ((37,), 71, 45), ((2, 3, 4), 5, 3)]


@pytest.mark.parametrize("lead,K,H", PACKED_SHAPES, ids=str)
@pytest.mark.parametrize("gate_first", [True, False], ids=["gate-first", "up-first"])
def test_packed_odd_shapes(impl, lead, K, H, gate_first):
    tensors = _packed_inputs(impl, FP32, lead, K, H, seed=(gate_first,))
    check_against_torch(fast_packed("relu", gate_first), torch_packed("relu", gate_first),
                        tensors, FP32, f"packed {lead}x{K}->{H}")


def test_packed_empty_batch_and_zero_sizes(impl):
    """An empty batch (zero gradients, written by the launch), in_features = 0 (act(b_g) ⊙ b_u)
    and hidden = 0 (an empty output), as torch."""
    x, w, b = _packed_inputs(impl, FP32, (0,), 6, 4)
    y = F.gated_linear_packed(x, w, b)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    tensors = _packed_inputs(impl, FP32, (5,), 0, 3)
    y = check_against_torch(fast_packed("silu", False), torch_packed("silu", False), tensors,
                            FP32, "K=0")
    assert y.shape == (5, 3)
    x, w, b = _packed_inputs(impl, FP32, (2, 3), 4, 0)
    y = F.gated_linear_packed(x, w, b)
    assert y.shape == (2, 3, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == (0, 4)


@pytest.mark.parametrize("which", ["gate", "up", "neither"])
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_bias_on_one_side_only(impl, which, activation):
    tensors = _separate_inputs(impl, FP32, (9,), 10, 6, gate_bias=which == "gate",
                               up_bias=which == "up", seed=(which, activation))
    check_against_torch(fast_separate(activation), torch_separate(activation), tensors, FP32,
                        f"bias on {which}")


FROZEN = {"input": [0], "gate_weight": [1], "up_weight": [2], "weights": [1, 2],
          "biases": [3, 4], "all_but_up_bias": [0, 1, 2, 3]}


@pytest.mark.parametrize("frozen", list(FROZEN))
@pytest.mark.parametrize("activation", ["gelu", "sigmoid"])
def test_frozen_inputs_get_no_gradient(impl, frozen, activation):
    tensors = _separate_inputs(impl, FP32, (8,), 9, 7, seed=(frozen, activation))
    for i in FROZEN[frozen]:
        tensors[i].requires_grad_(False)
    check_against_torch(fast_separate(activation), torch_separate(activation), tensors, FP32,
                        f"frozen {frozen}")


def test_only_needed_gradients_are_computed(impl, monkeypatch):
    """A frozen block's backward asks for no weight-gradient work; a frozen input for no dX."""
    from fastmlp import gated

    calls = []
    for name in ("_grad_input_impl", "_grad_weight_impl"):
        original = getattr(gated, name)
        monkeypatch.setattr(gated, name,
                            lambda *a, _o=original, _n=name: calls.append((_n, a[-4:])) or _o(*a))
    x, wg, wu, bg, bu = _separate_inputs(impl, FP32, (5,), 4, 3)
    for t in (wg, wu, bg, bu):
        t.requires_grad_(False)
    fastmlp.GatedLinearFunction.apply(x, wg, wu, bg, bu, "silu").sum().backward()
    assert [c[0] for c in calls] == ["_grad_input_impl"]
    calls.clear()
    x.requires_grad_(False)
    wu.requires_grad_(True)
    fastmlp.GatedLinearFunction.apply(x, wg, wu, bg, bu, "silu").sum().backward()
    assert calls == [("_grad_weight_impl", (False, False, True, False))]


LAYOUTS = ["x_transposed", "x_sliced", "weights_transposed", "weights_sliced", "bias_strided",
           "x_expanded"]


def _layout_inputs(layout, device, dtype, M=21, K=18, H=11):
    gen = torch.Generator().manual_seed(case_seed("layout", layout, str(dtype)))

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    x, wg, wu = randn(M, K), randn(H, K, scale=max(K, 1) ** -0.5), randn(H, K, scale=max(K, 1) ** -0.5)
    bg, bu = randn(H), randn(H)
    if layout == "x_transposed":
        x = randn(K, M).t()
    elif layout == "x_sliced":
        x = randn(2 * M, 3 * K)[::2, 1::3]
    elif layout == "weights_transposed":
        wg, wu = randn(K, H, scale=K ** -0.5).t(), randn(K, H, scale=K ** -0.5).t()
    elif layout == "weights_sliced":
        wg, wu = randn(H, 2 * K, scale=K ** -0.5)[:, ::2], randn(3 * H, K, scale=K ** -0.5)[::3]
    elif layout == "bias_strided":
        bg, bu = randn(2 * H)[::2], randn(3 * H)[1::3]
    elif layout == "x_expanded":
        x = randn(1, K).expand(M, K)
    assert not all(t.is_contiguous() for t in (x, wg, wu, bg, bu))
    tensors = [x, wg, wu, bg, bu]
    for t in tensors:
        t.requires_grad_(layout != "x_expanded" or t is not x)
    return tensors


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_strided_and_transposed_inputs(impl, layout, dtype):
    """Kernels read every stride as it is (views, transposes, a stride-0 input)."""
    tensors = _layout_inputs(layout, impl, dtype)
    check_against_torch(fast_separate("silu"), torch_separate("silu"), tensors, dtype, layout)


@pytest.mark.parametrize("upstream", ["expanded", "transposed"])
def test_upstream_gradient_non_contiguous(impl, upstream):
    """y.sum() hands backward a stride-0 gradient; a loss on y.t() a transposed one."""
    tensors = _separate_inputs(impl, FP32, (13,), 8, 6, seed=(upstream,))
    if upstream == "expanded":
        grad_out = torch.ones(13, 6, device=impl)
    else:
        grad_out = torch.randn(6, 13, device=impl).t()
    y = F.gated_linear(*tensors, activation="gelu")
    (y.sum() if upstream == "expanded" else (y.t() * grad_out.t()).sum()).backward()
    grads = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    _, rgrads = _run(torch_separate("gelu"), tensors, grad_out, FP64)
    for i, (g, r) in enumerate(zip(grads, rgrads)):
        assert_close(g, r, FP32, f"{upstream} gradient {i}")


def test_float64(impl):
    tensors = _separate_inputs(impl, FP64, (7,), 12, 9)
    check_against_torch(fast_separate("silu"), torch_separate("silu"), tensors, FP64, "float64")


def test_one_dimensional_input(impl):
    tensors = _separate_inputs(impl, FP32, (), 6, 4)
    y = check_against_torch(fast_separate("silu"), torch_separate("silu"), tensors, FP32, "1-D")
    assert y.shape == (4,)


# ---- edge values -------------------------------------------------------------------------------
def _nonfinite_equal(actual, expected, what):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ from torch"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{what}: inf positions differ from torch"
    assert torch.equal(torch.sign(a[torch.isinf(a)]), torch.sign(e[torch.isinf(e)])), what
    finite = torch.isfinite(e)
    if finite.any():
        err = (a[finite] - e[finite]).norm() / e[finite].norm().clamp_min(1e-30)
        assert err < 1e-5, f"{what}: {err}"


@pytest.mark.parametrize("activation", ACTS, ids=ACT_IDS)
def test_nan_and_inf_propagate_like_torch(impl, activation):
    tensors = _separate_inputs(impl, FP32, (10,), 9, 6, seed=("nan", str(activation)))
    with torch.no_grad():
        tensors[0][2, 3] = float("nan")
        tensors[0][5, 1] = float("inf")
        tensors[0][7, 4] = float("-inf")
    grad_out = torch.randn(10, 6, device=impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the interpreter's numpy warns on inf - inf
        y, grads = _run(fast_separate(activation), tensors, grad_out)
    # The torch backend is torch's own CPU fp32 ops (whose fp32 GELU gives NaN at +inf where
    # float64 gives inf): compare it with torch in fp32.
    ref_dtype = FP32 if fastmlp.get_backend() == "torch" else FP64
    ry, rgrads = _run(torch_separate(activation), tensors, grad_out, ref_dtype)
    assert torch.isnan(y[2]).all()
    _nonfinite_equal(y, ry, "forward")
    for i, (g, r) in enumerate(zip(grads, rgrads)):
        _nonfinite_equal(g, r, f"gradient {i}")


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "sigmoid"])
def test_gradient_where_the_gate_is_exactly_zero(impl, activation):
    """Integer-valued inputs, a gate bias that zeroes row 0 of G: each activation's derivative
    at exactly 0 is torch's (relu's 0, leaky_relu's the slope, gelu's one half)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-3, 4, (12, 8), generator=gen).float()
    wg = torch.randint(-3, 4, (6, 8), generator=gen).float()
    wu = torch.randint(-3, 4, (6, 8), generator=gen).float()
    bg = -(x @ wg.t())[0].clone()
    bg[::2] += 1.0
    bu = torch.randn(6, generator=gen)
    tensors = [t.to(impl).requires_grad_() for t in (x, wg, wu, bg, bu)]
    assert ((x @ wg.t() + bg) == 0).sum() >= 3
    check_against_torch(fast_separate(activation), torch_separate(activation), tensors, FP32,
                        f"{activation} at 0")


def test_empty_batch(impl):
    x, wg, wu, bg, bu = _separate_inputs(impl, FP32, (0,), 10, 4)
    y = F.gated_linear(x, wg, wu, bg, bu)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 10)
    for t in (wg, wu, bg, bu):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_zero_in_features_and_zero_hidden(impl):
    """in_features = 0: act(b_g) ⊙ b_u, as torch; hidden = 0: an empty output."""
    tensors = _separate_inputs(impl, FP32, (5,), 0, 4)
    y = check_against_torch(fast_separate("silu"), torch_separate("silu"), tensors, FP32, "K=0")
    assert y.shape == (5, 4)
    x, wg, wu, bg, bu = _separate_inputs(impl, FP32, (2, 3), 4, 0)
    y = F.gated_linear(x, wg, wu, bg, bu)
    assert y.shape == (2, 3, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and wg.grad.shape == (0, 4)


# ---- autograd machinery ------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["silu", "relu", "sigmoid", None], ids=str)
def test_autograd_function_apply_directly(impl, activation):
    """GatedLinearFunction itself (the registered ops and both backward ops on either backend;
    the torch backend's front takes torch's own nodes instead)."""
    name, alpha = activations.resolve(activation)
    tensors = _separate_inputs(impl, FP32, (2, 5), 7, 6, seed=("apply", name))
    fast = lambda *a: fastmlp.GatedLinearFunction.apply(*a, name, alpha)  # noqa: E731
    y = check_against_torch(fast, torch_separate(activation), tensors, FP32, "apply")
    assert y.shape == (2, 5, 6)


def test_saves_what_backward_reads_and_only_when_needed(impl, monkeypatch):
    """G and U are written only when autograd will run the backward (not under no_grad, not with
    nothing requiring grad)."""
    from fastmlp import gated

    asked = []
    original = gated._gated_impl
    monkeypatch.setattr(gated, "_gated_impl", lambda *a: asked.append(a[-1]) or original(*a))
    x, wg, wu, bg, bu = _separate_inputs(impl, FP32, (4,), 5, 3)
    with torch.no_grad():
        F.gated_linear(x, wg, wu, bg, bu)
    F.gated_linear(*(t.detach() for t in (x, wg, wu, bg, bu)))
    y = fastmlp.GatedLinearFunction.apply(x, wg, wu, bg, bu, "silu", 0.0)
    assert asked == ([False, False, True] if fastmlp.get_backend() == "triton" else [True])
    shapes = sorted(tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None)
    assert shapes == sorted([(4, 5), (3, 5), (3, 5), (4, 3), (4, 3)])


def test_bias_changed_in_place_before_backward(impl):
    """As with nn.Linear, a bias changed in place between forward and a first-order backward is
    allowed (no gradient reads it); a create_graph backward, which recomputes from it, refuses."""
    x, wg, wu, bg, bu = _separate_inputs(impl, FP32, (4,), 5, 3)
    y = fastmlp.GatedLinearFunction.apply(x, wg, wu, bg, bu, "silu", 0.0)
    with torch.no_grad():
        bg.add_(1.0)
    y.sum().backward()
    assert bg.grad is not None
    y = fastmlp.GatedLinearFunction.apply(x, wg, wu, bg, bu, "silu", 0.0)
    with torch.no_grad():
        bu.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("activation", ACTS, ids=ACT_IDS)
def test_gradcheck_float64(impl, activation):
    """float64 runs the kernels under the interpreter (torch's ops on GPUs)."""
    x, wg, wu, bg, bu = _separate_inputs(impl, FP64, (4,), 3, 2, seed=("gradcheck",))
    fn = fast_separate(activation)
    assert torch.autograd.gradcheck(fn, (x, wg, wu, bg, bu))
    x, w, b = _packed_inputs(impl, FP64, (3,), 2, 2, bias=False)
    assert torch.autograd.gradcheck(fast_packed(activation, gate_first=False), (x, w))


def _gradient_loss(fn, tensors):
    """Gradients of a loss built from dL/dx (create_graph=True), as an eikonal or PINN loss."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    (gx,) = torch.autograd.grad(y, leaves[0], torch.ones_like(y), create_graph=True)
    loss = y.square().mean() + (gx ** 3).sum()
    return [y, gx, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("dtype", [FP32, FP64], ids=str)
@pytest.mark.parametrize("activation", ["silu", "relu", "gelu", "sigmoid"])
def test_create_graph_matches_torch(impl, dtype, activation):
    tensors = _separate_inputs(impl, dtype, (6,), 5, 4, seed=("create_graph", activation))
    got = _gradient_loss(fast_separate(activation), tensors)
    want = _gradient_loss(torch_separate(activation), [t.double() for t in tensors])
    assert got[1].requires_grad
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close(a, e, dtype, f"{activation} create_graph result {i}")


def test_create_graph_packed_matches_torch(impl):
    tensors = _packed_inputs(impl, FP32, (2, 3), 5, 4)
    got = _gradient_loss(fast_packed("gelu_tanh"), tensors)
    want = _gradient_loss(torch_packed("gelu_tanh"), [t.double() for t in tensors])
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close(a, e, FP32, f"packed create_graph result {i}")


def test_torch_func_and_batched_gradients(impl):
    """torch.func.grad / vmap / jacrev run torch's composite; a batched backward
    (is_grads_batched) takes the differentiable path."""
    x, wg, wu, bg, bu = [t.detach() for t in _separate_inputs(impl, FP32, (5,), 4, 3)]
    fast, stock = fast_separate("silu"), torch_separate("silu")
    d64 = [t.double() for t in (x, wg, wu, bg, bu)]
    g = torch.func.grad(lambda w: fast(x, w, wu, bg, bu).square().sum())(wg)
    e = torch.func.grad(lambda w: stock(d64[0], w, *d64[2:]).square().sum())(d64[1])
    assert_close(g, e, FP32, "func.grad")
    j = torch.func.vmap(torch.func.jacrev(lambda r: fast(r, wg, wu, bg, bu)))(x)
    e = torch.func.vmap(torch.func.jacrev(lambda r: stock(r, *d64[1:])))(d64[0])
    assert_close(j, e, FP32, "vmap(jacrev)")
    xr = x.clone().requires_grad_()
    y = fast(xr, wg, wu, bg, bu)
    basis = torch.eye(y.numel(), device=impl).view(-1, *y.shape)
    (jb,) = torch.autograd.grad(y, xr, basis, is_grads_batched=True)
    e = torch.autograd.functional.jacobian(lambda r: stock(r, *d64[1:]), d64[0])
    assert_close(jb, e.view(jb.shape), FP32, "is_grads_batched")


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
def test_autocast_keeps_the_autocast_dtype(impl, dtype):
    """Under autocast every fp32 input is cast as nn.Linear casts it."""
    x, wg, wu, bg, bu = [t.detach() for t in _separate_inputs(impl, FP32, (8,), 12, 5)]
    with torch.autocast(impl, dtype=dtype):
        y = F.gated_linear(x, wg, wu, bg, bu, "gelu")
        expected = torch_separate("gelu")(x, wg, wu, bg, bu)
    assert y.dtype == expected.dtype == dtype
    assert rel_err(y, expected.float()) < TOLERANCE[dtype]


def test_packed_torch_func_and_batched_gradients(impl):
    """The packed form under torch.func.grad (torch's composite) and with a batched backward
    (is_grads_batched: the Function's differentiable packed backward on the kernels' path)."""
    x, w, b = [t.detach() for t in _packed_inputs(impl, FP32, (5,), 4, 3)]
    fast, stock = fast_packed("silu", gate_first=False), torch_packed("silu", gate_first=False)
    x64, w64, b64 = x.double(), w.double(), b.double()
    got = torch.func.grad(lambda v: fast(x, v, b).square().sum())(w)
    want = torch.func.grad(lambda v: stock(x64, v, b64).square().sum())(w64)
    assert_close(got, want, FP32, "func.grad of the packed weight")
    wr = w.clone().requires_grad_()
    y = fast(x, wr, b)
    basis = torch.eye(y.numel(), device=impl).view(-1, *y.shape)
    (jb,) = torch.autograd.grad(y, wr, basis, is_grads_batched=True)
    want = torch.autograd.functional.jacobian(lambda v: stock(x64, v, b64), w64)
    assert_close(jb, want.view(jb.shape), FP32, "is_grads_batched, packed weight")


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=str)
def test_packed_autocast_keeps_the_autocast_dtype(impl, dtype):
    x, w, b = [t.detach() for t in _packed_inputs(impl, FP32, (8,), 12, 5)]
    with torch.autocast(impl, dtype=dtype):
        y = F.gated_linear_packed(x, w, b, "gelu", gate_first=False)
        expected = torch_packed("gelu", gate_first=False)(x, w, b)
    assert y.dtype == expected.dtype == dtype
    assert rel_err(y, expected.float()) < TOLERANCE[dtype]


def test_packed_bias_changed_in_place_before_backward(triton_backend, device):
    """As the separate form: a packed bias changed in place between forward and a first-order
    backward is allowed; a create_graph backward, which recomputes from it, refuses."""
    x, w, b = _packed_inputs(device, FP32, (4,), 5, 3)
    y = F.gated_linear_packed(x, w, b, "silu")
    with torch.no_grad():
        b.add_(1.0)
    y.sum().backward()
    assert b.grad is not None and b.grad.shape == (6,)
    y = F.gated_linear_packed(x, w, b, "silu")
    with torch.no_grad():
        b.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


# ---- registration: opcheck, torch.compile ------------------------------------------------------
def _op_cases(device, name, alpha):
    gen = torch.Generator().manual_seed(case_seed("opcheck", name))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    x, wg, wu, bg, bu = randn(6, 5), randn(4, 5), randn(4, 5), randn(4), randn(4)
    dy, g, u = randn(6, 4), randn(6, 4), randn(6, 4)
    packed, packed_bias = randn(8, 5), randn(8)
    grad = [t.clone().requires_grad_() for t in (x, wg, wu, bg, bu)]
    packed_grad = [t.clone().requires_grad_() for t in (x, packed, packed_bias)]
    o = torch.ops.fastmlp
    return [
        (o.gated_linear, (*grad, name, alpha, True)),
        (o.gated_linear, (x, packed[:4], packed[4:], None, bu, name, alpha, False)),
        (o.gated_linear_grad_input, (dy, g, u, wg, wu, name, alpha)),
        (o.gated_linear_grad_weight, (dy, g, u, x, name, alpha, True, True, True, True)),
        (o.gated_linear_grad_weight, (dy, g, u, x, name, alpha, False, True, True, False)),
        (o.gated_linear_packed, (*packed_grad, name, alpha, True, True)),
        (o.gated_linear_packed, (packed_grad[0], packed_grad[1], None, name, alpha, False, True)),
        (o.gated_linear_packed, (x, packed, packed_bias, name, alpha, False, False)),
        (o.gated_linear_packed_grad_weight, (dy, g, u, x, name, alpha, True, True, True)),
        (o.gated_linear_packed_grad_weight, (dy, g, u, x, name, alpha, False, False, True)),
    ]


@pytest.mark.parametrize("activation", ACTS, ids=ACT_IDS)
def test_opcheck(impl, activation):
    name, alpha = activations.resolve(activation)
    for op, args in _op_cases(impl, name, alpha):
        torch.library.opcheck(op, args)


def test_compile_fullgraph(impl):
    """Separate and packed weights, two activations, one graph (fullgraph raises on a break)."""
    torch._dynamo.reset()
    x, wg, wu, bg, bu = _separate_inputs(impl, FP32, (2, 3), 6, 5)
    _, w, b = _packed_inputs(impl, FP32, (1,), 5, 4)

    def block(fns):
        gated, packed = fns
        return lambda x, wg, wu, bg, bu, w, b: packed(gated(x, wg, wu, bg, bu), w, b)

    tensors = [x, wg, wu, bg, bu, w, b]
    compiled = torch.compile(block((fast_separate("silu"), fast_packed("gelu", False))),
                             fullgraph=True)
    check_against_torch(compiled, block((torch_separate("silu"), torch_packed("gelu", False))),
                        tensors, FP32, "compiled")


# ---- errors --------------------------------------------------------------------------------------
def _t(*shape, **kw):
    return torch.randn(*shape, **kw)


@pytest.mark.parametrize("args,error,words", [
    ((_t(4, 5), _t(3, 6), _t(3, 6)), ValueError, ["last dimension is 5", "in_features=6"]),
    ((_t(4, 5), _t(3, 5), _t(2, 5)), ValueError, ["gate_weight (3, 5)", "up_weight (2, 5)",
                                                   "same shape"]),
    ((_t(4, 5), _t(3, 5, 1), _t(3, 5, 1)), ValueError, ["gate_weight must be 2-D", "(3, 5, 1)"]),
    ((_t(4, 5), _t(3, 5), _t(3, 5), _t(4)), ValueError, ["gate_bias must have shape (3,)",
                                                          "(4,)"]),
    ((_t(4, 5), _t(3, 5), _t(3, 5), None, _t(3, 1)), ValueError, ["up_bias must have shape"]),
    ((torch.ones(4, 5, dtype=torch.int64), _t(3, 5), _t(3, 5)), TypeError,
     ["input has dtype torch.int64"]),
    ((_t(4, 5), _t(3, 5), _t(3, 5).half()), TypeError, ["dtypes differ", "up_weight torch.float16"]),
    ((_t(4, 5), _t(3, 5), _t(3, 5), _t(3).double()), TypeError, ["gate_bias torch.float64"]),
    ((_t(4, 5), _t(3, 5), _t(3, 5, device="meta")), ValueError, ["different devices", "meta"]),
    ((torch.tensor(1.0), _t(3, 5), _t(3, 5)), ValueError, ["at least 1 dimension"]),
    (([[1.0] * 5], _t(3, 5), _t(3, 5)), TypeError, ["input must be a torch.Tensor"]),
    ((_t(4, 5), _t(3, 5), "w"), TypeError, ["up_weight must be a torch.Tensor, got str"]),
])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_bad_input_is_named(backend_name, args, error, words):
    with fastmlp.use_backend(backend_name), pytest.raises(error) as info:
        F.gated_linear(*args)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("args,kwargs,error,words", [
    ((_t(4, 5), _t(7, 5)), {}, ValueError, ["even number of rows", "(7, 5)"]),
    ((_t(4, 5), _t(6, 5, 1)), {}, ValueError, ["must be 2-D"]),
    ((_t(4, 5), _t(6, 5), _t(3)), {}, ValueError, ["bias must have shape (6,)", "(3,)"]),
    ((_t(4, 5), _t(6, 5)), {"gate_first": "yes"}, TypeError, ["gate_first must be a bool"]),
    ((_t(4, 5), _t(6, 4)), {}, ValueError, ["in_features=4"]),
    ((_t(4, 5), None), {}, TypeError, ["weight must be a torch.Tensor"]),
])
def test_bad_packed_input_is_named(args, kwargs, error, words):
    with pytest.raises(error) as info:
        F.gated_linear_packed(*args, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("activation,error,words", [
    ("swish", ValueError, ["unknown activation 'swish'"]),
    (nn.ELU(), ValueError, ["is not one fastmlp fuses"]),
    (3, TypeError, ["got int"]),
])
def test_bad_activation_is_named(activation, error, words):
    with pytest.raises(error) as info:
        F.gated_linear(_t(2, 3), _t(4, 3), _t(4, 3), None, None, activation)
    for word in words:
        assert word in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        fastmlp.GatedLinearFunction.apply(_t(2, 3), _t(4, 3), _t(4, 3), None, None, "swish")


# ---- the kernels themselves ------------------------------------------------------------------
def test_triton_backend_runs_the_kernels(triton_backend, device, monkeypatch):
    """On the Triton backend no torch implementation is called: every result above came from
    kernels/gated.py (the torch functions are the autotuner's candidate only on GPUs)."""
    from fastmlp import gated

    def refuse(*args, **kwargs):
        raise AssertionError("the torch implementation ran on the Triton backend")

    for name in ("torch_forward", "torch_grad_input", "torch_grad_weight", "torch_gate_grads"):
        monkeypatch.setattr(gated, name, refuse)
    tensors = _separate_inputs(device, FP32, (9,), 10, 6)
    check_against_torch(fast_separate("silu"), torch_separate("silu"), tensors, FP32, "kernels")


@pytest.mark.parametrize("flags", [(True, True, True, True), (True, False, False, True),
                                   (False, True, False, False), (False, False, True, True)],
                         ids=str)
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_weight_gradients_split_and_flags(triton_backend, device, flags, split, activation):
    """The dW kernel's row chunks (fp32 partials summed in a fixed order) and each subset of
    the four gradients, against torch in float64 (outputs poisoned before launch)."""
    from fastmlp import activations as acts
    from fastmlp.kernels import gated as kernels

    gen = torch.Generator().manual_seed(case_seed("dw", flags, split, activation))
    M, N, K = 150, 19, 23
    dy, g, u = (torch.randn(M, N, generator=gen).to(device) for _ in range(3))
    x = torch.randn(M, K, generator=gen).to(device)
    got = kernels.gated_grad_weight(dy, g, u, x, activation, 0.0, *flags, False, split=split)
    row = acts.get(activation)
    g64, u64, dy64, x64 = (t.double() for t in (g, u, dy, x))
    a = row.torch_forward(g64, 0.0)
    saved = a if row.saves(0.0) == "output" else g64
    dg, du = row.torch_backward(dy64 * u64, saved, 0.0), dy64 * a
    want = (dg.t() @ x64, dg.sum(0), du.t() @ x64, du.sum(0))
    for flag, r, e, what in zip(flags, got, want, ("dW_g", "db_g", "dW_u", "db_u")):
        if flag:
            assert_close(r, e, FP32, what)
        else:
            assert r is None, what


@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("gate_first", [True, False], ids=["gate-first", "up-first"])
def test_packed_weight_gradients_split_and_flags(triton_backend, device, flags, split,
                                                 gate_first):
    """gated_grad_weight_packed writes dW_g, dW_u (db_g, db_u) into the halves of one [2N, K]
    ([2N]) output, in the gate_first order, with and without row chunks (fp32 partials reduced
    into the halves), against torch in float64 (outputs poisoned before launch)."""
    from fastmlp.kernels import gated as kernels

    gen = torch.Generator().manual_seed(case_seed("packed dw", flags, split, gate_first))
    M, N, K = 150, 19, 23
    dy, g, u = (torch.randn(M, N, generator=gen).to(device) for _ in range(3))
    x = torch.randn(M, K, generator=gen).to(device)
    dw, db = kernels.gated_grad_weight_packed(dy, g, u, x, "sigmoid", 0.0, gate_first, *flags,
                                              False, split=split)
    g64, u64, dy64, x64 = (t.double() for t in (g, u, dy, x))
    s = torch.sigmoid(g64)
    dg, du = dy64 * u64 * s * (1 - s), dy64 * s
    first, second = (dg, du) if gate_first else (du, dg)
    want = (torch.cat([first.t() @ x64, second.t() @ x64]), torch.cat([first.sum(0), second.sum(0)]))
    for flag, got, expected, what in zip(flags, (dw, db), want, ("dW", "db")):
        if flag:
            assert got.shape == expected.shape and got.is_contiguous(), what
            assert_close(got, expected, FP32, what)
        else:
            assert got is None, what


def test_grad_input_kernel_with_strided_saved_tensors(triton_backend, device):
    """dY, G and U of different layouts are brought to one set of strides; packed halves of
    one weight are read in place."""
    from fastmlp.kernels import gated as kernels

    gen = torch.Generator().manual_seed(case_seed("dx strides"))
    M, N, K = 33, 20, 17
    dy = torch.randn(N, M, generator=gen).t()
    g, u = torch.randn(M, N, generator=gen), torch.randn(M, N, generator=gen)
    w = torch.randn(2 * N, K, generator=gen)
    dy, g, u, w = (t.to(device) for t in (dy, g, u, w))
    got = kernels.gated_grad_input(dy, g, u, w[:N], w[N:], "silu", 0.0, False)
    g64, u64, dy64, w64 = (t.double() for t in (g, u, dy, w))
    s = torch.sigmoid(g64)
    dg = dy64 * u64 * s * (1 + g64 * (1 - s))
    want = dg @ w64[:N] + (dy64 * g64 * s) @ w64[N:]
    assert_close(got, want, FP32, "dX")


# ---- compiled code (no GPU needed) -------------------------------------------------------------
@pytest.mark.slow
def test_sm90_bf16_default_configs_compile_cleanly(tmp_path):
    """The three gated kernels' default sm_90 bf16 config with silu compile with 0 spills and no
    stack frame, within shared memory, on wgmma, with no NaN-dropping min/max (the
    interpreter shows none of this). In a subprocess: the interpreter cannot compile.
    ``python -m fastmlp.kernels.gated_aot --all`` compiles every list and activation."""
    import json
    import os
    import subprocess
    import sys

    from fastmlp.kernels.configs import SHARED_MEMORY_LIMIT

    out = tmp_path / "gated.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    kernels = ("gated_forward", "gated_grad_input", "gated_grad_weight")
    cases = [arg for k in kernels for arg in ("--case", f"{k},90,bf16,ieee")]
    subprocess.run([sys.executable, "-m", "fastmlp.kernels.gated_aot", *cases, "--json", str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL, timeout=600)
    reports = json.loads(out.read_text())
    assert [r["kernel"] for r in reports] == list(kernels)
    for r in reports:
        what = f"{r['kernel']}: {r['registers']} registers"
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, what
        assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[90], what
        assert r["hgmma"] > 0, f"{what}: no HGMMA (wgmma) in the Hopper SASS"
        assert r["float_minmax"] == 0, f"{what}: NaN-dropping float min/max in the PTX"


def test_config_lists_per_kernel_and_gpu():
    """Hopper's 16-bit dW takes its own list (32-row steps: 64 spilled); a derivative the row
    does not fuse before sm_90 leaves the backward to torch there; every GPU list ends in
    TORCH_GEMM; the interpreter takes its one config."""
    from fastmlp.kernels import configs

    def pick(kernel, capability, activation="relu", dtype=BF16):
        return configs.gated_candidates(dtype, "ieee", capability, kernel, activation, False)

    assert pick("dw", (9, 0)) == configs.GATED_DW_TENSOR_CORE_SM90 + [configs.TORCH_GEMM]
    assert pick("fwd", (9, 0)) == configs.GATED_TENSOR_CORE_SM90 + [configs.TORCH_GEMM]
    assert pick("dx", (8, 0)) == configs.GATED_TENSOR_CORE_SM80 + [configs.TORCH_GEMM]
    assert pick("dx", (8, 0), "silu") == [configs.TORCH_GEMM]
    assert pick("fwd", (8, 0), "silu")[0] == configs.GATED_TENSOR_CORE_SM80[0]
    assert pick("fwd", (9, 0), dtype=FP32)[0] == configs.GATED_IEEE_FP32[0]
    assert configs.gated_candidates(BF16, "ieee", (9, 0), "fwd", "relu", True) == configs.INTERPRETER


@pytest.mark.parametrize("activation", ["silu", "tanh"])
def test_function_without_saved_gate_and_up_recomputes_them(impl, activation):
    """GatedLinearFunction.apply(..., save=False) with inputs that need grad: backward recomputes
    G and U instead of reading the empty placeholders (out of bounds on a GPU)."""
    tensors = _separate_inputs(impl, FP32, (7,), 9, 5, seed=("no save", activation))
    fast = lambda x, wg, wu, bg, bu: fastmlp.GatedLinearFunction.apply(  # noqa: E731
        x, wg, wu, bg, bu, activation, 0.0, False)
    check_against_torch(fast, torch_separate(activation), tensors, FP32, "save=False")
