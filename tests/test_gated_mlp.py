"""fastmlp.GatedMLP (fastmlp/nn.py): a whole gated MLP block, down(dropout(act(gate(x)) * up(x))).

Each layout is checked against a look-alike of the model family's block written here (a
Llama-style one with gate_proj / up_proj / down_proj, a Phi-3-style one with a packed
gate_up_proj, a T5-style one with wi_0 / wi_1 / wo and dropout): the same state_dict keys, and
the same forward and gradients (input, every weight and bias) as the look-alike computed by
torch in float64, with the tolerance the dtype's bar or 4x torch's own error in that dtype
(reference.tolerance). `impl` (tests/conftest.py) runs each case on the kernels (the Triton
interpreter on CPU, outputs poisoned with NaN) and on the torch backend.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp import GatedMLP, activations
from optional_packages import import_transformers
from reference import assert_close, case_seed, rel_err, tolerance

FP32, FP16, BF16, FP64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
IN, HIDDEN, OUT, LEAD = 13, 24, 7, (3, 5)
LAYOUTS = ["llama", "phi3", "t5"]


# ---- look-alikes of the model families' blocks ------------------------------------------------
class LlamaStyleMLP(nn.Module):
    def __init__(self, d_in, hidden, d_out, bias=False, act=None, gate_bias=None, up_bias=None):
        super().__init__()
        self.gate_proj = nn.Linear(d_in, hidden, bias if gate_bias is None else gate_bias)
        self.up_proj = nn.Linear(d_in, hidden, bias if up_bias is None else up_bias)
        self.down_proj = nn.Linear(hidden, d_out, bias)
        self.act_fn = nn.SiLU() if act is None else act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Phi3StyleMLP(nn.Module):
    def __init__(self, d_in, hidden, d_out, bias=False, act=None):
        super().__init__()
        self.gate_up_proj = nn.Linear(d_in, 2 * hidden, bias)
        self.down_proj = nn.Linear(hidden, d_out, bias)
        self.activation_fn = nn.SiLU() if act is None else act

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


class T5StyleMLP(nn.Module):
    def __init__(self, d_in, hidden, d_out, bias=False, act=None, p=0.0):
        super().__init__()
        self.wi_0 = nn.Linear(d_in, hidden, bias)
        self.wi_1 = nn.Linear(d_in, hidden, bias)
        self.wo = nn.Linear(hidden, d_out, bias)
        self.dropout = nn.Dropout(p)
        self.act = nn.GELU(approximate="tanh") if act is None else act

    def forward(self, x):
        h = self.dropout(self.act(self.wi_0(x)) * self.wi_1(x))
        if h.dtype != self.wo.weight.dtype:   # the block keeps wo in float32 for fp16 models
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


LOOK_ALIKES = {"llama": LlamaStyleMLP, "phi3": Phi3StyleMLP, "t5": T5StyleMLP}


class SiLUWrapper(nn.Module):
    """A parameterless module whose forward is one supported call (as Hugging Face's are)."""

    def forward(self, x):
        return F.silu(x)


def _act_module(activation):
    name, alpha = activations.resolve(activation)
    return activations.get(name).new_module(alpha)


def _look_alike(layout, bias=False, activation="silu", seed=()):
    torch.manual_seed(case_seed("look-alike", layout, bias, str(activation), *seed))
    return LOOK_ALIKES[layout](IN, HIDDEN, OUT, bias, _act_module(activation))


# ---- the comparison ---------------------------------------------------------------------------
def _run(model, x, grad_out):
    """(y, dX, {parameter name: gradient}) of model on a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(leaf)
    y.backward(grad_out.to(y.device, y.dtype))
    grads = {n: p.grad for n, p in getattr(model, "_orig_mod", model).named_parameters()}
    return y.detach(), leaf.grad, grads


def check_against_block(fast, block, x, dtype, what):
    """fast's forward, dX and every parameter's gradient against `block` run by torch in float64
    on the CPU (same parameter values; the names are the same state_dict keys), the tolerance
    from block's own error in `dtype` (block run in dtype as it is)."""
    gen = torch.Generator().manual_seed(case_seed("grad_out", what))
    grad_out = torch.randn(*x.shape[:-1], fast.out_features, generator=gen)
    block64 = copy.deepcopy(block).cpu().double()
    y, dx, grads = _run(fast, x, grad_out)
    ry, rdx, rgrads = _run(block64, x.detach().cpu().double(), grad_out.double())
    oy, odx, ograds = _run(block, x, grad_out)
    assert y.dtype == dtype and y.shape == ry.shape, (y.dtype, y.shape, ry.shape)
    assert_close(y, ry, dtype, f"{what} forward", tolerance(dtype, rel_err(oy, ry)))
    assert_close(dx, rdx, dtype, f"{what} dX", tolerance(dtype, rel_err(odx, rdx)))
    assert set(grads) == set(rgrads), (set(grads), set(rgrads))
    for name, g in grads.items():
        assert g is not None and g.shape == rgrads[name].shape, f"{what}: d{name} missing"
        assert_close(g, rgrads[name], dtype, f"{what} d{name}",
                     tolerance(dtype, rel_err(ograds[name], rgrads[name])))
    return y


def _input(device, dtype, *seed, lead=LEAD, features=IN):
    gen = torch.Generator().manual_seed(case_seed("x", *seed))
    return torch.randn(*lead, features, generator=gen).to(device, dtype)


# ---- state_dict and initialisation --------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_is_the_blocks_and_loads_both_ways(layout, bias):
    block = _look_alike(layout, bias)
    fast = GatedMLP(IN, HIDDEN, OUT, bias, layout=layout)
    assert [(k, v.shape) for k, v in fast.state_dict().items()] == \
        [(k, v.shape) for k, v in block.state_dict().items()]
    fast.load_state_dict(block.state_dict())
    for k, v in block.state_dict().items():
        assert torch.equal(fast.state_dict()[k], v), k
    other = LOOK_ALIKES[layout](IN, HIDDEN, OUT, bias)
    other.load_state_dict(GatedMLP(IN, HIDDEN, OUT, bias, layout=layout).state_dict())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_initialisation_is_nn_linears(layout):
    """Same children, same order, same shapes: the same draws as the block's own nn.Linears."""
    torch.manual_seed(7)
    block = LOOK_ALIKES[layout](IN, HIDDEN, OUT, True)
    torch.manual_seed(7)
    fast = GatedMLP(IN, HIDDEN, OUT, True, layout=layout)
    for k, v in block.state_dict().items():
        assert torch.equal(fast.state_dict()[k], v), k


def test_constructor_arguments_and_repr():
    m = GatedMLP(5, 8, bias=True, dtype=FP64, activation=nn.LeakyReLU(0.2), layout="t5",
                 dropout=0.1)
    assert (m.in_features, m.hidden_features, m.out_features) == (5, 8, 5)
    assert m.wo.weight.shape == (5, 8) and m.wi_0.bias.dtype == FP64
    assert (m.activation, m.activation_alpha) == ("leaky_relu", 0.2)
    assert m.dropout.p == 0.1 and "dropout.p" not in m.state_dict()
    assert repr(m).splitlines()[1].strip() == (
        "in_features=5, hidden_features=8, out_features=5, "
        "activation=leaky_relu(negative_slope=0.2), layout=t5")
    assert GatedMLP(5, 8, 3).activation == "silu"


# ---- forward and gradients against torch ------------------------------------------------------
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_the_block_in_float64(impl, layout, bias, dtype):
    block = _look_alike(layout, bias, seed=(str(dtype),)).to(impl, dtype)
    fast = GatedMLP(IN, HIDDEN, OUT, bias, device=impl, dtype=dtype, layout=layout)
    fast.load_state_dict(block.state_dict())
    check_against_block(fast, block, _input(impl, dtype, layout, bias, str(dtype)), dtype,
                        f"{layout} bias={bias} {dtype}")


@pytest.mark.parametrize("activation", ["gelu", "relu", "sigmoid", nn.LeakyReLU(-0.3), None],
                         ids=["gelu", "relu", "sigmoid", "leaky_relu-", "none"])
def test_other_activations(impl, activation):
    block = _look_alike("phi3", True, activation)
    fast = GatedMLP(IN, HIDDEN, OUT, True, activation=activation, layout="phi3")
    fast.load_state_dict(block.state_dict())
    check_against_block(fast.to(impl), block.to(impl), _input(impl, FP32, str(activation)),
                        FP32, f"phi3 {activation}")


@pytest.mark.parametrize("lead", [(), (1,), (2, 1, 3)], ids=str)
def test_leading_dimensions(impl, lead):
    block = _look_alike("llama", True).to(impl)
    fast = GatedMLP.from_module(block)
    y = check_against_block(fast, block, _input(impl, FP32, lead, lead=lead), FP32, f"{lead}")
    assert y.shape == (*lead, OUT)


def test_the_kernels_compute_on_the_triton_backend(triton_backend, device, monkeypatch):
    """Without hooks no child is called: the gated op and fastmlp's linear compute the block
    (nn.Linear's forward refuses here), and the result is still the block's."""
    block = _look_alike("t5", True).to(device)
    fast = GatedMLP.from_module(block)
    block64 = copy.deepcopy(block).double()
    x = _input(device, FP32, "kernels")

    def refuse(self, input):
        raise AssertionError("nn.Linear.forward ran: the block was not fused")

    monkeypatch.setattr(nn.Linear, "forward", refuse)
    y = fast(x)
    monkeypatch.undo()
    assert_close(y, block64(x.double()), FP32, "fused forward")


def test_packed_weight_goes_to_the_packed_op_as_it_is(monkeypatch):
    """The phi3 layout hands the packed gated op gate_up_proj's own Parameters (the kernels read
    the halves in place), so its weight gradient comes back as one [2H, K] tensor."""
    import fastmlp.nn as fnn

    fast = GatedMLP(IN, HIDDEN, OUT, True, layout="phi3")
    seen = []

    def record(x, weight, bias, *rest):
        seen.append((weight, bias, rest))
        return real(x, weight, bias, *rest)

    real = fnn.fused_gated_packed
    monkeypatch.setattr(fnn, "fused_gated_packed", record)
    fast(_input("cpu", FP32, "views")).sum().backward()
    (weight, bias, rest), = seen
    assert weight is fast.gate_up_proj.weight and bias is fast.gate_up_proj.bias
    assert rest[-1] is True                                   # gate rows first, as Phi-3's chunk
    assert fast.gate_up_proj.weight.grad.shape == (2 * HIDDEN, IN)


@pytest.mark.parametrize("lead", [(0,), (3, 0)], ids=str)
@pytest.mark.parametrize("layout", ["llama", "phi3"])
def test_empty_batch(impl, layout, lead):
    fast = GatedMLP(IN, HIDDEN, OUT, True, device=impl, layout=layout)
    x = torch.randn(*lead, IN, device=impl, requires_grad=True)
    y = fast(x)
    assert y.shape == (*lead, OUT)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in fast.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_meta_device_shapes():
    fast = GatedMLP(IN, HIDDEN, OUT, device="meta", layout="phi3")
    assert fast(torch.empty(*LEAD, IN, device="meta")).shape == (*LEAD, OUT)


# ---- dropout ------------------------------------------------------------------------------------
def test_dropout_in_training_is_the_blocks(impl):
    """Same RNG state, same mask: the dropout is applied to the product before wo, as T5 does;
    in eval mode it is the identity."""
    torch.manual_seed(case_seed("dropout block"))
    block = T5StyleMLP(IN, HIDDEN, OUT, False, nn.ReLU(), p=0.4).to(impl)
    fast = GatedMLP.from_module(block)
    assert fast.dropout.p == 0.4 and fast.training
    x = _input(impl, FP32, "dropout")
    gen = torch.Generator().manual_seed(case_seed("dropout grad"))
    grad_out = torch.randn(*LEAD, OUT, generator=gen)
    results = []
    for model in (fast, block):
        torch.manual_seed(11)
        results.append(_run(model, x, grad_out))
    (y, dx, grads), (ry, rdx, rgrads) = results
    assert_close(y, ry, FP32, "dropout forward")
    assert_close(dx, rdx, FP32, "dropout dX")
    for name in grads:
        assert_close(grads[name], rgrads[name], FP32, f"dropout d{name}")
    fast.eval()
    block64 = copy.deepcopy(block).double().eval()
    y_eval = fast(x)
    assert_close(y_eval, block64(x.double()), FP32, "eval forward")
    assert rel_err(y, y_eval) > 0.05, "dropout changed nothing in training mode"


# ---- from_module --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_from_module_shares_parameters_and_matches(impl, layout):
    block = _look_alike(layout, True).to(impl)
    fast = GatedMLP.from_module(block)
    assert fast.layout == layout and type(fast) is GatedMLP
    assert list(fast.state_dict()) == list(block.state_dict())
    block_params = dict(block.named_parameters())
    for name, p in fast.named_parameters():
        assert p is block_params[name], name
    assert (fast.in_features, fast.hidden_features, fast.out_features) == (IN, HIDDEN, OUT)
    check_against_block(fast, block, _input(impl, FP32, "from_module", layout), FP32,
                        f"from_module {layout}")


def test_from_module_takes_each_bias_as_it_is(impl):
    """A gate bias, no up bias, a down bias: each goes to the op as it is."""
    torch.manual_seed(case_seed("mixed biases"))
    block = LlamaStyleMLP(IN, HIDDEN, OUT, True, nn.GELU(), gate_bias=True, up_bias=False).to(impl)
    fast = GatedMLP.from_module(block)
    assert fast.up_proj.bias is None and fast.gate_proj.bias is block.gate_proj.bias
    assert (fast.activation, fast.activation_alpha) == ("gelu", 0.0)
    check_against_block(fast, block, _input(impl, FP32, "mixed"), FP32, "mixed biases")


@pytest.mark.parametrize("act,expected", [
    (nn.LeakyReLU(0.25), ("leaky_relu", 0.25)),
    (nn.GELU(approximate="tanh"), ("gelu_tanh", 0.0)),
    (SiLUWrapper(), ("silu", 0.0)),
    (nn.Identity(), ("none", 0.0)),
], ids=["leaky_relu", "gelu_tanh", "wrapper", "identity"])
def test_from_module_reads_the_activation(act, expected):
    torch.manual_seed(0)
    block = LlamaStyleMLP(IN, HIDDEN, OUT, act=act)
    fast = GatedMLP.from_module(block)
    assert (fast.activation, fast.activation_alpha) == expected
    x = _input("cpu", FP32, "act", expected)
    assert_close(fast(x), copy.deepcopy(block).double()(x.double()), FP32, str(expected))


def test_from_module_keeps_the_training_flags():
    block = T5StyleMLP(IN, HIDDEN, OUT, p=0.2)
    block.eval()
    fast = GatedMLP.from_module(block)
    assert not fast.training and not fast.dropout.training and not fast.wo.training
    block.train()
    block.dropout.eval()
    fast = GatedMLP.from_module(block)
    assert fast.training and not fast.dropout.training


def test_from_module_keeps_t5s_float32_wo(impl):
    """T5 keeps wo in float32 when the rest is 16-bit and casts the product to it: so does the
    GatedMLP (no autocast here), and the output is float32 as the block's."""
    block = _look_alike("t5", False, "gelu_tanh").to(impl)
    block.wi_0.to(BF16)
    block.wi_1.to(BF16)
    fast = GatedMLP.from_module(block)
    x = _input(impl, BF16, "t5 fp32 wo")
    y, ref = fast(x), block(x)
    assert y.dtype == ref.dtype == FP32
    expected = copy.deepcopy(block).double()(x.double())
    assert_close(y, expected, BF16, "fp32 wo", tolerance(BF16, rel_err(ref, expected)))


# ---- hooks ---------------------------------------------------------------------------------------
HOOKS = {
    "forward": lambda net, seen: net.down_proj.register_forward_hook(
        lambda m, a, o: seen.append(("f", a[0].detach().clone())) or o * 2),
    "forward_pre": lambda net, seen: net.up_proj.register_forward_pre_hook(
        lambda m, a: seen.append(("p", a[0].detach().clone())) or (a[0] + 1,)),
    "full_backward": lambda net, seen: net.gate_proj.register_full_backward_hook(
        lambda m, gi, go: seen.append(("b", go[0].detach().clone())) or (gi[0] * 3,)),
    "dropout": lambda net, seen: net.dropout.register_forward_hook(
        lambda m, a, o: seen.append(("d", a[0].detach().clone())) or o - 1),
}


class LlamaWithDropout(LlamaStyleMLP):
    """The Llama look-alike with an identity dropout child, where GatedMLP has it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


@pytest.mark.parametrize("kind", list(HOOKS))
def test_a_hook_on_a_child_runs_and_sees_the_blocks_values(impl, kind):
    torch.manual_seed(case_seed("hook", kind))
    stock = LlamaWithDropout(IN, HIDDEN, OUT, True).to(impl)
    fast = GatedMLP(IN, HIDDEN, OUT, True, device=impl)
    fast.load_state_dict(stock.state_dict())
    assert not fast._hooked()
    seen = {id(net): [] for net in (fast, stock)}
    handles = [HOOKS[kind](net, seen[id(net)]) for net in (fast, stock)]
    assert fast._hooked()
    x = _input(impl, FP32, "hook", kind)
    outs = []
    for net in (fast, stock):
        xi = x.clone().requires_grad_()
        y = net(xi)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, net.gate_proj.weight.grad))
    got, want = seen[id(fast)], seen[id(stock)]
    assert [k for k, _ in got] == [k for k, _ in want] and len(got) == 1
    assert_close(got[0][1], want[0][1], FP32, f"{kind} hook's view")
    for a, e, what in zip(outs[0], outs[1], ("output", "dX", "dW_gate")):
        assert_close(a, e, FP32, f"{kind} {what}")
    for h in handles:
        h.remove()
    assert not fast._hooked()


def test_a_global_module_hook_sees_the_children(impl):
    block = _look_alike("phi3", True).to(impl)
    fast = GatedMLP.from_module(block)
    called = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: called.append(type(m).__name__))
    try:
        assert fast._hooked()
        x = _input(impl, FP32, "global")
        y = fast(x)
    finally:
        handle.remove()
    assert called == ["Linear", "Dropout", "Linear", "GatedMLP"]
    assert_close(y, copy.deepcopy(block).double()(x.double()), FP32, "global hook forward")
    assert not fast._hooked()


# ---- autocast, compile ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_autocast_bf16_keeps_bf16(impl, layout):
    block = _look_alike(layout, True, "gelu").to(impl)
    fast = GatedMLP.from_module(block)
    x = _input(impl, FP32, "autocast", layout)
    with torch.autocast(impl, dtype=BF16):
        y, ref = fast(x), block(x)
    assert y.dtype == ref.dtype == BF16
    expected = copy.deepcopy(block).double()(x.double())
    assert_close(y, expected, BF16, f"autocast {layout}", tolerance(BF16, rel_err(ref, expected)))


@pytest.mark.parametrize("layout", ["llama", "phi3"])
def test_compile_fullgraph(impl, layout):
    """Dynamo captures the block whole (the gated op an opaque node, fastmlp's linear, the hook
    check); aot_eager: the graph and AOT autograd without inductor's code generation."""
    torch._dynamo.reset()
    block = _look_alike(layout, True).to(impl)
    fast = GatedMLP.from_module(copy.deepcopy(block))
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")  # raises on a break
    check_against_block(compiled, block, _input(impl, FP32, "compile", layout), FP32,
                        f"compiled {layout}")


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["gpt2", None, "Llama"])
def test_unknown_layout_lists_the_known_ones(layout):
    with pytest.raises(ValueError, match=r"unknown layout .*'llama', 'phi3', 't5'"):
        GatedMLP(IN, HIDDEN, layout=layout)


@pytest.mark.parametrize("activation,error,words", [
    ("swish", ValueError, "unknown activation 'swish'"),
    (nn.ELU(), ValueError, "is not one fastmlp fuses"),
    (3, TypeError, "got int"),
])
def test_bad_activation_is_named(activation, error, words):
    with pytest.raises(error, match=words):
        GatedMLP(IN, HIDDEN, activation=activation)


def test_bad_input_is_named():
    fast = GatedMLP(IN, HIDDEN, OUT)
    with pytest.raises(ValueError, match="last dimension is 12"):
        fast(torch.randn(2, 12))
    with pytest.raises(TypeError, match="dtypes differ"):
        fast(torch.randn(2, IN, dtype=FP64))


def _with(block, **changes):
    for name, value in changes.items():
        setattr(block, name, value)
    return block


def _llama(**changes):
    return _with(LlamaStyleMLP(IN, HIDDEN, OUT), **changes)


class Plain(nn.Module):
    pass


class BothLayouts(LlamaStyleMLP):
    def __init__(self):
        super().__init__(IN, HIDDEN, OUT)
        self.gate_up_proj = nn.Linear(IN, 2 * HIDDEN)
        self.activation_fn = nn.SiLU()


class LinearSubclass(nn.Linear):
    pass


def _replaced_forward():
    block = _llama()
    block.up_proj.forward = lambda x: F.linear(x, block.up_proj.weight) * 2
    return block


def _hooked(register):
    block = T5StyleMLP(IN, HIDDEN, OUT, p=0.1)
    register(block)
    return block


BAD_BLOCKS = [
    (lambda: nn.Sequential(nn.Linear(IN, HIDDEN)), ["Sequential is not a gated MLP block",
                                                    "gate_proj, up_proj, down_proj (llama)",
                                                    "gate_up_proj, down_proj (phi3)",
                                                    "wi_0, wi_1, wo (t5)", "children are 0"]),
    (lambda: _with(Plain(), gate_proj=nn.Linear(IN, HIDDEN), down_proj=nn.Linear(HIDDEN, OUT)),
     ["not a gated MLP block"]),
    (lambda: BothLayouts(), ["several layouts (llama, phi3)"]),
    (lambda: _with(Plain(), gate_proj=nn.Linear(IN, HIDDEN), up_proj=nn.Linear(IN, HIDDEN),
                   down_proj=nn.Linear(HIDDEN, OUT)), ["its act_fn (None)", "silu"]),
    (lambda: _llama(act_fn=nn.ELU()), ["its act_fn (ELU(alpha=1.0))", "not an activation"]),
    (lambda: _llama(act_fn=nn.Softplus()), ["Softplus"]),
    (lambda: _llama(gate_proj=fastmlp.FusedLinear(IN, HIDDEN)),
     ["gate_proj is FusedLinear, not a plain nn.Linear"]),
    (lambda: _llama(down_proj=LinearSubclass(HIDDEN, OUT)), ["down_proj is LinearSubclass"]),
    (_replaced_forward, ["up_proj is nn.Linear with its forward replaced"]),
    (lambda: _llama(up_proj=nn.Linear(IN, HIDDEN + 1)),
     ["gate_proj.weight (24, 13) and up_proj.weight (25, 13) must have the same shape"]),
    (lambda: _llama(down_proj=nn.Linear(HIDDEN - 1, OUT)),
     ["down_proj.weight (7, 23) takes 23 inputs", "gated product has 24"]),
    (lambda: _with(Phi3StyleMLP(IN, HIDDEN, OUT), gate_up_proj=nn.Linear(IN, 2 * HIDDEN + 1)),
     ["layout 'phi3'", "gate_up_proj.weight (49, 13) must have an even number of rows"]),
    (lambda: _with(T5StyleMLP(IN, HIDDEN, OUT), dropout=nn.Identity()),
     ["its dropout is Identity()", "not an nn.Dropout"]),
    (lambda: _llama(norm=nn.LayerNorm(IN)), ["also has norm", "cannot know"]),
    (lambda: _llama(scale=nn.Parameter(torch.ones(1))), ["also has scale"]),
    (lambda: _hooked(lambda b: b.wo.register_forward_hook(lambda m, a, o: o)),
     ["'wo' has forward_hooks registered"]),
    (lambda: _hooked(lambda b: b.act.register_forward_pre_hook(lambda m, a: None)),
     ["'act' has forward_pre_hooks"]),
    (lambda: _hooked(lambda b: b.dropout.register_full_backward_hook(lambda m, gi, go: None)),
     ["'dropout' has backward_hooks"]),
    (lambda: _hooked(lambda b: b.wi_1.register_load_state_dict_post_hook(lambda m, k: None)),
     ["'wi_1' has load_state_dict_post_hooks"]),
    (lambda: _hooked(lambda b: b.register_forward_hook(lambda m, a, o: o)),
     ["the block itself has forward_hooks"]),
]


@pytest.mark.parametrize("make,words", BAD_BLOCKS, ids=[str(i) for i in range(len(BAD_BLOCKS))])
def test_from_module_names_what_it_does_not_recognise(make, words):
    block = make()
    with pytest.raises(ValueError) as info:
        GatedMLP.from_module(block)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_from_module_refuses_under_a_global_module_hook():
    def watch(m, a, o):
        return o

    handle = torch.nn.modules.module.register_module_forward_hook(watch)
    try:
        with pytest.raises(ValueError, match=r"a global forward hook .*watch"):
            GatedMLP.from_module(_llama())
    finally:
        handle.remove()
    assert type(GatedMLP.from_module(_llama())) is GatedMLP


def test_from_module_refuses_what_is_not_a_module():
    with pytest.raises(ValueError, match="expected an nn.Module, got dict"):
        GatedMLP.from_module({"gate_proj": None})


# ---- transformers' own blocks (optional) ---------------------------------------------------------
def _transformers_blocks():
    import_transformers()
    from transformers import LlamaConfig, Phi3Config, T5Config
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    torch.manual_seed(case_seed("transformers"))
    # one attention head of an even width (the configs check their attention and RoPE sizes)
    d, heads = 14, {"num_attention_heads": 1, "num_key_value_heads": 1}
    return [
        ("LlamaMLP silu", LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=HIDDEN,
                                               hidden_act="silu", **heads))),
        ("LlamaMLP bias gelu_pytorch_tanh", LlamaMLP(LlamaConfig(
            hidden_size=d, intermediate_size=HIDDEN, hidden_act="gelu_pytorch_tanh",
            mlp_bias=True, **heads))),
        ("Phi3MLP", Phi3MLP(Phi3Config(hidden_size=d, intermediate_size=HIDDEN, **heads))),
        ("T5 gated-relu", T5DenseGatedActDense(T5Config(d_model=d, d_ff=HIDDEN,
                                                        feed_forward_proj="gated-relu"))),
        ("T5 gated-gelu", T5DenseGatedActDense(T5Config(d_model=d, d_ff=HIDDEN,
                                                        feed_forward_proj="gated-gelu"))),
    ]


def test_from_transformers_blocks():
    """Tiny LlamaMLP (SiLU; GELUTanh with biases), Phi3MLP and T5DenseGatedActDense (ReLU;
    NewGELUActivation) from transformers' config classes: each activation recognised, the same
    state_dict keys and Parameters, and what the block computes (in eval mode: T5's dropout)."""
    expected_act = {"LlamaMLP silu": "silu", "LlamaMLP bias gelu_pytorch_tanh": "gelu_tanh",
                    "Phi3MLP": "silu", "T5 gated-relu": "relu", "T5 gated-gelu": "gelu_tanh"}
    for what, block in _transformers_blocks():
        block.eval()
        fast = GatedMLP.from_module(block)
        assert fast.activation == expected_act[what], (what, fast.activation)
        assert list(fast.state_dict()) == list(block.state_dict()), what
        assert all(p is q for p, q in zip(fast.parameters(), block.parameters())), what
        x = _input("cpu", FP32, what, features=fast.in_features)
        expected = copy.deepcopy(block).double()(x.double())
        own = block(x)
        assert_close(fast(x), expected, FP32, what, tolerance(FP32, rel_err(own, expected)))
