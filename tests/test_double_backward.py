"""Derivatives of derivatives: create_graph=True (eikonal / PINN losses, gradient penalties,
Hessian-vector products), torch.func transforms, gradcheck and gradgradcheck.

On the kernels' path the forward and the first-order backward are Triton kernels, which autograd
cannot look into. A backward run with create_graph=True recomputes the layer's gradients with
torch's differentiable ops from the saved inputs (fastmlp.ops.differentiable_backward,
fastmlp.mlp._differentiable_backward), and torch.func transforms route to torch's composite. Each
test compares against stock torch (nn.Linear + the activation's module, nn.Sequential) computed
in float64 from the same parameters, for the fastmlp model in float32 and float64 (float64 runs
the kernels under the interpreter), on both backends. Before the fix the kernels' path returned
a dL/dx that did not require grad and trained on wrong weight gradients, silently.
"""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp import activations
from fastmlp import functional as F
from reference import assert_close, case_seed, runs_kernels

FP32, FP64 = torch.float32, torch.float64
DTYPES = [pytest.param(FP32, id="float32"), pytest.param(FP64, id="float64")]

# Every activation as the public API takes it; leaky_relu with a positive slope (saves Y) and a
# negative one (saves Z).
ACTS = ["relu", nn.LeakyReLU(0.2), nn.LeakyReLU(-0.3), "gelu", "gelu_tanh", "silu", "sigmoid",
        "tanh", None]
ACT_IDS = ["relu", "leaky_relu+", "leaky_relu-", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh",
           "none"]


def test_every_activation_is_covered():
    assert {activations.resolve(a)[0] for a in ACTS} == set(fastmlp.ACTIVATIONS)


def _torch_module(activation) -> nn.Module:
    """The stock torch module of an activation as FusedLinear takes it."""
    name, alpha = activations.resolve(activation)
    if name == "leaky_relu":
        return nn.LeakyReLU(alpha)
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return activations.get(name).module()


def _stock_linear(layer: nn.Linear, activation) -> nn.Sequential:
    """nn.Linear + the activation's module holding copies of layer's parameters, in float64."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    dtype=FP64)
    lin.load_state_dict({k: v.detach().double() for k, v in layer.state_dict().items()})
    for p, q in zip(lin.parameters(), layer.parameters()):
        p.requires_grad_(q.requires_grad)
    return nn.Sequential(lin, _torch_module(activation))


def _stock_mlp(model: fastmlp.FusedMLP) -> nn.Sequential:
    """The nn.Sequential a FusedMLP stands for, deep-copied to float64."""
    children = OrderedDict((n, copy.deepcopy(m)) for n, m in model.named_children())
    return nn.Sequential(children).double()


def _gradient_loss(model, x, v, wrt, seed_loss=True):
    """(y, g, g.requires_grad, grads of the combined loss wrt x and every trainable parameter).

    g = d(y·v)/d(wrt) with create_graph=True, wrt "x" (dL/dx: eikonal, PINN residuals) or
    "weight" (the first parameter: a gradient penalty on the weights); the loss combines y and g
    as an SDF's or PINN's does, and its gradients need the derivative of the backward itself.
    """
    x = x.detach().clone().requires_grad_(wrt == "x")
    params = [p for p in model.parameters() if p.requires_grad]
    y = model(x)
    target = x if wrt == "x" else params[0]
    (g,) = torch.autograd.grad(y, target, v.to(y.dtype), create_graph=True)
    loss = y.square().mean() + ((g.norm(dim=-1) - 1) ** 2).mean() + (g ** 3).sum()
    leaves = ([x] if wrt == "x" else []) + params
    grads = torch.autograd.grad(loss, leaves) if g.requires_grad else None
    return y, g, g.requires_grad, grads


def _check_gradient_loss(model, stock, x, v, wrt, dtype, what):
    y, g, g_grad, grads = _gradient_loss(model, x, v, wrt)
    ry, rg, rg_grad, rgrads = _gradient_loss(stock, x.double(), v.double(), wrt)
    assert rg_grad
    assert g_grad, f"{what}: dL/d{wrt} does not require grad (the backward built no graph)"
    assert_close(y, ry, dtype, f"{what} forward")
    assert_close(g, rg, dtype, f"{what} d/d{wrt}")
    assert len(grads) == len(rgrads)
    for i, (a, e) in enumerate(zip(grads, rgrads)):
        assert_close(a, e, dtype, f"{what} gradient {i} of the loss of a gradient")


# ---- FusedLinear / functional, every activation ---------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS, ids=ACT_IDS)
def test_fused_linear_gradient_loss_matches_torch(impl, dtype, activation):
    """3-D input, odd widths: the eikonal loss of a FusedLinear as a model's last layer."""
    gen = torch.Generator().manual_seed(case_seed("linear", str(dtype), str(activation)))
    layer = fastmlp.FusedLinear(7, 3, activation=activation, dtype=dtype, device=impl)
    x = torch.randn(2, 5, 7, generator=gen).to(impl, dtype)
    v = torch.randn(2, 5, 3, generator=gen).to(impl, dtype)
    _check_gradient_loss(layer, _stock_linear(layer, activation), x, v, "x", dtype,
                         f"FusedLinear {activation}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", nn.LeakyReLU(-0.3)],
                         ids=["relu", "gelu", "tanh", "leaky_relu-"])
@pytest.mark.parametrize("variant", ["no-bias", "frozen-weight", "frozen-input", "frozen-bias"])
def test_fused_linear_gradient_loss_variants(impl, dtype, activation, variant):
    """Bias off; weight frozen (only x and b train); input frozen (a penalty on dL/dW instead
    of dL/dx); bias frozen."""
    gen = torch.Generator().manual_seed(case_seed("variant", str(dtype), str(activation), variant))
    layer = fastmlp.FusedLinear(5, 4, bias=variant != "no-bias", activation=activation,
                                dtype=dtype, device=impl)
    if variant == "frozen-weight":
        layer.weight.requires_grad_(False)
    if variant == "frozen-bias":
        layer.bias.requires_grad_(False)
    wrt = "weight" if variant == "frozen-input" else "x"
    x = torch.randn(11, 5, generator=gen).to(impl, dtype)
    v = torch.randn(11, 4, generator=gen).to(impl, dtype)
    _check_gradient_loss(layer, _stock_linear(layer, activation), x, v, wrt, dtype,
                         f"FusedLinear {activation} {variant}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "silu", "sigmoid"])
def test_hessian_vector_product_matches_torch(impl, dtype, activation):
    """An upstream gradient that itself requires grad (d(y²)/dy = 2y), then a second backward:
    the Hessian-vector product of every input, as torch.autograd.functional.hvp would take it."""
    gen = torch.Generator().manual_seed(case_seed("hvp", str(dtype), activation))
    x0 = torch.randn(6, 5, generator=gen).to(impl, dtype)
    w0 = (torch.randn(3, 5, generator=gen) / 5 ** 0.5).to(impl, dtype)
    b0 = torch.randn(3, generator=gen).to(impl, dtype)
    vs = [torch.randn(t.shape, generator=gen).to(impl, dtype) for t in (x0, w0, b0)]

    def hvp(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        grads = torch.autograd.grad(fn(*leaves).square().sum(), leaves, create_graph=True)
        dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, vs))
        return grads, torch.autograd.grad(dot, leaves)

    act = _torch_module(activation)
    got = hvp(lambda x, w, b: F.linear_act(x, w, b, activation), (x0, w0, b0))
    want = hvp(lambda x, w, b: act(nn.functional.linear(x, w, b)),
               [t.double() for t in (x0, w0, b0)])
    for kind, a, e in zip(["gradient", "Hessian-vector product"], got, want):
        for name, ai, ei in zip("xWb", a, e):
            assert_close(ai, ei, dtype, f"{activation} {kind} of {name}")


def test_relu_second_derivative_is_torch_at_exactly_zero(impl):
    """Pre-activations exactly 0 (integer-valued inputs): ReLU's derivative there is 0 in torch
    (threshold_backward), in the first-order pass and in the graph of it."""
    x = torch.tensor([[1.0, -1.0], [2.0, -2.0], [1.0, 1.0], [0.5, 0.0]], device=impl)
    layer = fastmlp.FusedLinearReLU(2, 3, device=impl)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]))
        layer.bias.zero_()
    z = x @ layer.weight.t()
    assert (z == 0).sum() >= 3
    v = torch.ones(4, 3, device=impl)
    _check_gradient_loss(layer, _stock_linear(layer, "relu"), x, v, "x", FP32, "relu at 0")


@pytest.mark.parametrize("front", ["FusedLinearReLU", "linear_relu", "linear", "linear_act",
                                   "FusedLinearFunction"])
def test_every_front_gives_a_differentiable_backward(impl, front):
    gen = torch.Generator().manual_seed(case_seed("front", front))
    w = (torch.randn(4, 6, generator=gen) / 6 ** 0.5).to(impl)
    b = torch.randn(4, generator=gen).to(impl)
    x = torch.randn(9, 6, generator=gen).to(impl)
    v = torch.randn(9, 4, generator=gen).to(impl)
    name = {"linear": None, "linear_act": "gelu", "FusedLinearFunction": "tanh"}.get(front, "relu")
    layer = fastmlp.FusedLinear(6, 4, activation=name, device=impl)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)

    class Front(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = layer.weight, layer.bias

        def forward(self, x):
            if front == "FusedLinearReLU":
                m = fastmlp.FusedLinearReLU(6, 4, device="meta")
                m.weight, m.bias = self.weight, self.bias
                return m(x)
            if front == "FusedLinearFunction":
                return fastmlp.FusedLinearFunction.apply(x, self.weight, self.bias, name)
            fn = {"linear_relu": F.linear_relu, "linear": F.linear,
                  "linear_act": lambda *a: F.linear_act(*a, activation=name)}[front]
            return fn(x, self.weight, self.bias)

    _check_gradient_loss(Front(), _stock_linear(layer, name), x, v, "x", FP32, front)


def test_registered_op_backward_is_differentiable(impl):
    """fastmlp::linear_act called directly (its register_autograd formula, which torch.compile
    and tensor subclasses reach): the same create_graph results."""
    gen = torch.Generator().manual_seed(case_seed("op"))
    layer = fastmlp.FusedLinear(5, 4, activation="silu", device=impl)
    x = torch.randn(7, 5, generator=gen).to(impl)
    v = torch.randn(7, 4, generator=gen).to(impl)

    class Op(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = layer.weight, layer.bias

        def forward(self, x):
            return torch.ops.fastmlp.linear_act(x, self.weight, self.bias, "silu", 0.0, True)[0]

    _check_gradient_loss(Op(), _stock_linear(layer, "silu"), x, v, "x", FP32, "fastmlp::linear_act")


# ---- FusedMLP: fused path and per-layer path ------------------------------------------------
MLP_CASES = [  # (activation, output activation, bias, input leading dims)
    ("tanh", None, True, (32,)),
    ("relu", None, True, (17,)),
    ("silu", "sigmoid", True, (3, 5)),
    ("gelu_tanh", None, False, (13,)),
    (nn.LeakyReLU(-0.3), "tanh", True, (9,)),
]
MLP_IDS = ["tanh", "relu", "silu-sigmoid-3d", "gelu_tanh-nobias", "leaky_relu-"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["fused", "per-layer"])
@pytest.mark.parametrize("case", MLP_CASES, ids=MLP_IDS)
def test_fused_mlp_eikonal_matches_sequential(impl, dtype, path, case):
    """The issue's eikonal loss: y, g = dy/dx (requires grad, as with nn.Sequential) and every
    weight gradient of y.square().mean() + ((|g| - 1)²).mean() + Σg³."""
    activation, out_activation, bias, lead = case
    torch.manual_seed(case_seed("mlp", str(dtype), path, str(activation), str(out_activation)))
    model = fastmlp.FusedMLP(3, [16, 16], 1, activation=activation, bias=bias,
                             output_activation=out_activation, dtype=dtype, device=impl)
    x = torch.randn(*lead, 3, device=impl, dtype=dtype)
    v = torch.randn(*lead, 1, device=impl, dtype=dtype)
    with fastmlp.mlp.use_path(path):
        if runs_kernels(impl, x.dtype):
            assert model.path(x) == path
        _check_gradient_loss(model, _stock_mlp(model), x, v, "x", dtype, f"FusedMLP {path}")


@pytest.mark.parametrize("path", ["fused", "per-layer"])
def test_fused_mlp_weight_penalty_with_frozen_layer(impl, path):
    """A penalty on dL/dW of the first layer, the input frozen, the last layer frozen: the
    differentiable backward asks only for what autograd needs."""
    torch.manual_seed(case_seed("mlp-frozen", path))
    model = fastmlp.FusedMLP(4, [8, 8], 2, activation="tanh", device=impl)
    for p in model[4].parameters():
        p.requires_grad_(False)
    x = torch.randn(10, 4, device=impl)
    v = torch.randn(10, 2, device=impl)
    with fastmlp.mlp.use_path(path):
        _check_gradient_loss(model, _stock_mlp(model), x, v, "weight", FP32, f"frozen {path}")


def test_registered_mlp_op_backward_is_differentiable(impl):
    """fastmlp::mlp called directly: its register_autograd formula builds the graph too."""
    torch.manual_seed(case_seed("mlp-op"))
    model = fastmlp.FusedMLP(3, [16, 16], 2, activation="tanh", device=impl)
    x = torch.randn(9, 3, device=impl)
    v = torch.randn(9, 2, device=impl)

    class Op(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            ws = [self.inner[i].weight for i in (0, 2, 4)]
            bs = [self.inner[i].bias for i in (0, 2, 4)]
            return torch.ops.fastmlp.mlp(x, ws, bs, "tanh", 0.0, "none", 0.0, True)[0]

    _check_gradient_loss(Op(), _stock_mlp(model), x, v, "x", FP32, "fastmlp::mlp")


def test_compiled_double_backward_is_refused_not_wrong(impl):
    """Under torch.compile, AOT autograd refuses a double backward (as for a compiled
    nn.Linear): an error, never a silently wrong gradient."""
    torch._dynamo.reset()
    layer = fastmlp.FusedLinear(3, 4, activation="tanh", device=impl)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(5, 3, device=impl, requires_grad=True)
    (g,) = torch.autograd.grad(compiled(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.square().sum().backward()


# ---- the first-order pass keeps the kernels --------------------------------------------------
def test_first_order_backward_still_runs_the_kernels(triton_backend, device, monkeypatch):
    """create_graph=False: the kernels' dX and dW + db (no recompute); create_graph=True: none
    of them (torch's ops build the graph)."""
    from fastmlp.kernels import linear_act as kl
    from fastmlp.kernels import mlp as km

    calls = []
    for module, name in ((kl, "linear_act_grad_input"), (kl, "linear_act_grad_weight"),
                         (km, "mlp_backward")):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    layer = fastmlp.FusedLinear(5, 4, activation="tanh", device=device)
    model = fastmlp.FusedMLP(5, [8], 3, activation="tanh", device=device)
    x = torch.randn(6, 5, device=device, requires_grad=True)
    for m, expected in ((layer, ["linear_act_grad_input", "linear_act_grad_weight"]),
                        (model, ["mlp_backward"])):
        with fastmlp.mlp.use_path("fused"):
            calls.clear()
            torch.autograd.grad(m(x).sum(), [x, *m.parameters()])
            assert sorted(calls) == sorted(expected)
            calls.clear()
            grads = torch.autograd.grad(m(x).sum(), [x, *m.parameters()], create_graph=True)
            assert calls == [] and grads[0].requires_grad


# ---- torch.func ----------------------------------------------------------------------------
def _func_models(device, dtype):
    torch.manual_seed(case_seed("func", str(dtype)))
    return [fastmlp.FusedLinear(3, 4, activation="gelu", device=device, dtype=dtype),
            fastmlp.FusedMLP(3, [16, 16], 2, activation="tanh", device=device, dtype=dtype),
            fastmlp.FusedMLP(3, [16, 8], 2, activation="silu", output_activation="sigmoid",
                             device=device, dtype=dtype)]


def _stock(model):
    if isinstance(model, fastmlp.FusedMLP):
        return _stock_mlp(model)
    return _stock_linear(model, model.activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["fused", "per-layer"])
def test_torch_func_transforms_match_torch(impl, dtype, path):
    """grad, jacrev, jacfwd, vmap(jacrev), vmap(hessian) and grad over parameters with
    functional_call: the same values as the stock model's (before the fix jacrev raised 'must
    override the setup_context staticmethod')."""
    from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

    for model in _func_models(impl, dtype):
        stock = _stock(model)
        x = torch.randn(5, 3, device=impl, dtype=dtype)
        what = type(model).__name__
        with fastmlp.mlp.use_path(path):
            for name, transform in (
                    ("grad", lambda m: grad(lambda x: m(x).square().sum())),
                    ("jacrev", lambda m: jacrev(m)),
                    ("jacfwd", lambda m: jacfwd(m)),
                    ("vmap(jacrev)", lambda m: vmap(jacrev(m))),
                    ("vmap(hessian)", lambda m: vmap(hessian(lambda xi: m(xi).square().sum())))):
                got, want = transform(model)(x), transform(stock)(x.double())
                assert_close(got, want, dtype, f"{what} {name}")
            params = {k: p.detach() for k, p in model.named_parameters()}
            stock_key = (lambda k: k) if isinstance(model, fastmlp.FusedMLP) else "0.{}".format
            got = grad(lambda p: functional_call(model, p, (x,), strict=True).square().sum())(
                params)
            want = grad(lambda p: functional_call(stock, p, (x.double(),), strict=True)
                        .square().sum())({stock_key(k): p.double() for k, p in params.items()})
            for k in params:
                assert_close(got[k], want[stock_key(k)], dtype, f"{what} grad over parameter {k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_mode_ad_matches_torch(impl, dtype):
    """Dual tensors (torch.autograd.forward_ad): the tangent of every model is the stock one's
    (before, the kernels' Functions had no jvp and refused)."""
    import torch.autograd.forward_ad as fwAD

    for model in _func_models(impl, dtype):
        stock = _stock(model)
        x = torch.randn(5, 3, device=impl, dtype=dtype)
        t = torch.randn(5, 3, device=impl, dtype=dtype)
        with fwAD.dual_level():
            y, ty = fwAD.unpack_dual(model(fwAD.make_dual(x, t)))
            ry, rty = fwAD.unpack_dual(stock(fwAD.make_dual(x.double(), t.double())))
        what = type(model).__name__
        assert_close(y, ry, dtype, f"{what} forward")
        assert_close(ty, rty, dtype, f"{what} tangent")


def test_fused_linear_function_under_a_transform_checks_its_inputs():
    """The direct Function call routed to the composite still refuses bad input clearly."""
    with pytest.raises(ValueError, match="in_features"):
        torch.func.grad(lambda x: fastmlp.FusedLinearFunction.apply(
            x, torch.randn(4, 3), None, "relu").sum())(torch.randn(5))


# ---- gradcheck / gradgradcheck in float64 (the kernels' own code under the interpreter) ------
@pytest.mark.parametrize("activation", ACTS, ids=ACT_IDS)
def test_gradcheck_and_gradgradcheck_linear(impl, activation):
    gen = torch.Generator().manual_seed(case_seed("gradcheck", str(activation)))
    name, alpha = activations.resolve(activation)
    x = torch.randn(2, 2, 3, generator=gen, dtype=FP64).to(impl).requires_grad_()
    w = torch.randn(2, 3, generator=gen, dtype=FP64).to(impl).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=FP64).to(impl).requires_grad_()

    def fn(x, w, b):
        return fastmlp.FusedLinearFunction.apply(x, w, b, name, alpha)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("path", ["fused", "per-layer"])
def test_gradcheck_and_gradgradcheck_mlp(impl, path):
    """Every parameter of a three-layer stack; fast mode (a random projection of the Jacobian,
    torch's own option) keeps the interpreter's launches per check to a few dozen."""
    torch.manual_seed(case_seed("gradcheck-mlp", path))
    model = fastmlp.FusedMLP(2, [3, 3], 2, activation="tanh", output_activation="silu",
                             dtype=FP64, device=impl)
    names = [k for k, _ in model.named_parameters()]
    x = torch.randn(3, 2, dtype=FP64, device=impl, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in model.parameters()))
    with fastmlp.mlp.use_path(path):
        if runs_kernels(impl, x.dtype):
            assert model.path(x) == path
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


# ---- what the differentiable backward must not change -------------------------------------
def _bias_models(device, path_name):
    torch.manual_seed(case_seed("bias models", path_name))
    if path_name == "layer":
        model = fastmlp.FusedLinear(6, 5, activation="tanh", device=device)
        return model, _stock_linear(model, "tanh").float()
    model = fastmlp.FusedMLP(6, [8, 8], 5, activation="gelu", output_activation="tanh",
                             device=device)
    return model, nn.Sequential(OrderedDict((n, copy.deepcopy(m))
                                            for n, m in model.named_children()))


@pytest.mark.parametrize("which", ["layer", "fused", "per-layer"])
def test_in_place_bias_change_before_a_first_order_backward(impl, which):
    """As with nn.Linear, a bias changed in place between forward and an ordinary backward is
    allowed (the first-order backward does not read it) and gives the stock model's gradients;
    a create_graph backward, which recomputes the layer from the bias, refuses it on the
    kernels' path rather than differentiating the new value."""
    model, stock = _bias_models(impl, which)
    x = torch.randn(7, 6, device=impl)
    with fastmlp.mlp.use_path("fused" if which == "layer" else which):
        for net in (model, stock):
            y = net(x)
            with torch.no_grad():
                for name, p in net.named_parameters():
                    if name.endswith("bias"):
                        p.add_(0.5)
            y.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), stock.parameters()):
            assert_close(p.grad, q.grad, FP32, f"{which} {name}")
        if not runs_kernels(impl, FP32):
            return
        x = x.clone().requires_grad_()
        y = model(x)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if n.endswith("bias")).add_(0.5)
        with pytest.raises(RuntimeError, match="bias was modified in place"):
            torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("which", ["layer", "fused", "per-layer"])
def test_batched_backward_matches_torch(impl, which):
    """autograd.grad(is_grads_batched=True) vmaps the backward: a Triton launch has no batching
    rule, so the layers' backward takes torch's ops there, as under torch.func."""
    model, stock = _bias_models(impl, which)
    x = torch.randn(4, 6, device=impl)
    v = torch.randn(3, 4, 5, device=impl)   # 3 vectors in one batched backward
    with fastmlp.mlp.use_path("fused" if which == "layer" else which):
        got = []
        for net in (model, stock):
            xi = x.clone().requires_grad_()
            got.append(torch.autograd.grad(net(xi), xi, v, is_grads_batched=True)[0])
    assert got[0].shape == (3, 4, 6)
    assert_close(got[0], got[1], FP32, f"{which} batched dX")


def test_a_non_tensor_bias_is_a_type_error():
    with pytest.raises(TypeError, match="bias"):
        F.linear_act(torch.randn(3, 4), torch.randn(5, 4), [0.0] * 5, activation="relu")


@pytest.mark.parametrize("activation", ["gelu", "silu", nn.LeakyReLU(-0.3)], ids=str)
def test_function_told_not_to_save_preact_still_differentiates_at_z(impl, activation):
    """FusedLinearFunction.apply(..., save_preact=False) for an activation whose derivative reads
    Z, with inputs that need grad: backward recomputes Z (it used to read nothing and
    differentiate at the wrong point, silently)."""
    name, alpha = activations.resolve(activation)
    torch.manual_seed(case_seed("no preact", name, alpha))
    layer = fastmlp.FusedLinear(6, 5, activation=activation, device=impl)
    stock = _stock_linear(layer, activation).float()
    x = torch.randn(7, 6, device=impl)
    grads = []
    for fn in (lambda xi: fastmlp.FusedLinearFunction.apply(xi, layer.weight, layer.bias, name,
                                                             alpha, False),
               stock):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        grads.append(torch.autograd.grad(y, [xi], torch.ones_like(y))[0])
    assert_close(grads[0], grads[1], FP32, "dX")
