"""fastmlp.fuse on the MLP blocks of today's transformers: gated products (separate and packed
gate/up projections, either operand order, module and functional activations), GELU written out
as a formula, forwards that pass **kwargs on or are decorated, and the report's words.

The blocks are written here the way Llama, Phi-3, T5, OPT and timm write theirs (look-alikes:
these tests do not need those packages; tests/test_fuse_models.py runs the real ones when
transformers is installed). Each fused model is checked against a copy of the stock one: outputs,
input and parameter gradients, state_dict keys and the very same Parameters (_fuse_checked)."""

import copy
import functools
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp.activation_modules import module_activation
from reference import assert_close
from test_fuse import _assert_same_function, _fuse_checked, _outcomes, _x

D, H = 12, 20


# ------------------------------------------------------------------------------------------------
# Activations written as formulas (transformers' gelu_new / gelu_python, minGPT's NewGELU)
# ------------------------------------------------------------------------------------------------
class TanhGeluFormula(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class ErfGeluFormula(nn.Module):
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class AlmostTanhGelu(nn.Module):
    """Off by 0.3% in its constant: not gelu_tanh, and must not be taken for it."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.8 * (x + 0.044715 * torch.pow(x, 3.0))))


class QuickGelu(nn.Module):
    """x * sigmoid(1.702 x): no fastmlp activation computes it."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class NoisyGelu(nn.Module):
    """GELU plus a random op (zero here, but randn is not a pointwise function of the input):
    not a formula fuse may replace."""

    def forward(self, x):
        return F.gelu(x) + torch.randn_like(x) * 0.0


@pytest.mark.parametrize("module,expected", [
    (TanhGeluFormula(), ("gelu_tanh", 0.0)), (ErfGeluFormula(), ("gelu", 0.0)),
    (AlmostTanhGelu(), None), (QuickGelu(), None), (NoisyGelu(), None),
], ids=["tanh-formula", "erf-formula", "almost-tanh", "quick-gelu", "random-op"])
def test_formula_activations_are_measured(module, expected):
    assert module_activation(module) == expected


def test_formula_gelu_fuses_in_a_sequential():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, H), TanhGeluFormula(), nn.Linear(H, D))
    fused, report = _fuse_checked(model, _x(5, D))
    assert type(fused[0]) is fastmlp.FusedLinear and fused[0].activation == "gelu_tanh"
    assert type(fused[1]) is nn.Identity


# ------------------------------------------------------------------------------------------------
# Gated blocks
# ------------------------------------------------------------------------------------------------
class LlamaLikeMLP(nn.Module):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)), the product in either order."""

    def __init__(self, act=None, bias=False, up_first=False):
        super().__init__()
        self.gate_proj = nn.Linear(D, H, bias=bias)
        self.up_proj = nn.Linear(D, H, bias=bias)
        self.down_proj = nn.Linear(H, D, bias=bias)
        self.act_fn = act if act is not None else nn.SiLU()
        self.up_first = up_first

    def forward(self, x):
        if self.up_first:
            return self.down_proj(self.up_proj(x) * self.act_fn(self.gate_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FunctionalGateMLP(nn.Module):
    """timm SwiGLU's shape: separate statements, a functional activation, dropout after."""

    def __init__(self, fn=F.silu, bias=True):
        super().__init__()
        self.fc1_g = nn.Linear(D, H, bias=bias)
        self.fc1_x = nn.Linear(D, H, bias=bias)
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(H, D)
        self.fn = fn

    def forward(self, x):
        x_gate = self.fc1_g(x)
        x = self.fc1_x(x)
        x = self.fn(x_gate) * x
        return self.fc2(self.drop(x))


class PackedMLP(nn.Module):
    """Phi-3's gate_up_proj + chunk, or timm GluMlp with the gate last, or torch.chunk."""

    def __init__(self, act=None, gate_first=True, spelling="method", bias=False):
        super().__init__()
        self.gate_up_proj = nn.Linear(D, 2 * H, bias=bias)
        self.down_proj = nn.Linear(H, D, bias=bias)
        self.activation_fn = act if act is not None else nn.SiLU()
        self.gate_first = gate_first
        self.spelling = spelling

    def forward(self, x):
        h = self.gate_up_proj(x)
        if self.spelling == "method":
            first, second = h.chunk(2, dim=-1)
        else:
            first, second = torch.chunk(h, 2, -1)
        if self.gate_first:
            return self.down_proj(second * self.activation_fn(first))
        return self.down_proj(first * self.activation_fn(second))


class T5LikeDense(nn.Module):
    """T5 v1.1's DenseGatedActDense: wi_0 gate with gelu_new, wi_1 up, dropout, wo."""

    def __init__(self):
        super().__init__()
        self.wi_0 = nn.Linear(D, H, bias=False)
        self.wi_1 = nn.Linear(D, H, bias=False)
        self.wo = nn.Linear(H, D, bias=False)
        self.dropout = nn.Dropout(0.0)
        self.act = TanhGeluFormula()

    def forward(self, hidden_states):
        hidden_gelu = self.act(self.wi_0(hidden_states))
        hidden_linear = self.wi_1(hidden_states)
        hidden_states = hidden_gelu * hidden_linear
        hidden_states = self.dropout(hidden_states)
        return self.wo(hidden_states)


def _gated_calls(module):
    """The gated-op calls in a rewritten module's forward."""
    targets = (fastmlp.fusion.gated_projections, fastmlp.fusion.packed_gated_projection)
    return [n for n in module.graph.nodes if n.op == "call_function" and n.target in targets]


GATED_BLOCKS = {
    "llama-silu": lambda: LlamaLikeMLP(),
    "llama-up-first": lambda: LlamaLikeMLP(up_first=True),
    "llama-gelu-bias": lambda: LlamaLikeMLP(nn.GELU(), bias=True),
    "llama-relu": lambda: LlamaLikeMLP(nn.ReLU()),
    "llama-sigmoid": lambda: LlamaLikeMLP(nn.Sigmoid()),
    "timm-swiglu": lambda: FunctionalGateMLP(),
    "functional-leaky": lambda: FunctionalGateMLP(lambda h: F.leaky_relu(h, 0.2)),
    "t5-gelu-new": lambda: T5LikeDense(),
}
EXPECTED_ACT = {"llama-silu": "silu", "llama-up-first": "silu", "llama-gelu-bias": "gelu",
                "llama-relu": "relu", "llama-sigmoid": "sigmoid", "timm-swiglu": "silu",
                "functional-leaky": "leaky_relu(negative_slope=0.2)", "t5-gelu-new": "gelu_tanh"}


@pytest.mark.parametrize("kind", list(GATED_BLOCKS))
def test_gated_block_is_one_gated_op(kind):
    torch.manual_seed(2)
    model = nn.Sequential(GATED_BLOCKS[kind]())
    fused, report = _fuse_checked(model, _x(2, 3, D))
    block = fused[0]
    (call,) = _gated_calls(block)
    gate, up = [e for e in report if e.fused]
    assert gate.activation == EXPECTED_ACT[kind]
    assert "gate of" in gate.note and up.name in gate.note
    assert "up projection of the gated op" in up.note
    assert call.args[-1][0] == EXPECTED_ACT[kind].split("(")[0]


@pytest.mark.parametrize("gate_first", [True, False], ids=["gate-first", "gate-second"])
@pytest.mark.parametrize("spelling", ["method", "torch.chunk"])
def test_packed_gated_block(gate_first, spelling):
    torch.manual_seed(3)
    model = nn.Sequential(PackedMLP(gate_first=gate_first, spelling=spelling, bias=True))
    fused, report = _fuse_checked(model, _x(7, D))
    (call,) = _gated_calls(fused[0])
    assert call.target is fastmlp.fusion.packed_gated_projection
    assert call.args[-1] is gate_first
    (entry,) = [e for e in report if e.fused]
    assert entry.name == "0.gate_up_proj" and entry.activation == "silu"
    half = "first" if gate_first else "second"
    assert f"the gate is the {half} half" in entry.note


def test_packed_leaky_relu_keeps_its_slope():
    torch.manual_seed(4)
    model = nn.Sequential(PackedMLP(act=nn.LeakyReLU(0.3)))
    fused, report = _fuse_checked(model, _x(5, D))
    (call,) = _gated_calls(fused[0])
    assert call.args[2] == ("leaky_relu", 0.3)


class UpAlsoReturned(LlamaLikeMLP):
    def forward(self, x):
        up = self.up_proj(x)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * up), up


class OptionalScale(LlamaLikeMLP):
    def forward(self, x, scale=None):
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h if scale is None else h * scale)


def test_gated_product_left_with_its_reason_and_the_gate_still_fused():
    torch.manual_seed(5)
    model = nn.ModuleDict({"returned": UpAlsoReturned(), "optional": OptionalScale()})

    class Both(nn.Module):
        def __init__(self, members):
            super().__init__()
            self.members = members

        def forward(self, x):
            a, b = self.members["returned"](x)
            return a + b.sum() + self.members["optional"](x)

    fused, report = _fuse_checked(Both(model), _x(3, D))
    entries = {e.name: e for e in report}
    up = entries["members.returned.up_proj"]
    assert up.outcome.startswith("its output has 2 users")
    assert entries["members.returned.gate_proj"].outcome == "fused"   # act(gate) alone
    gate = entries["members.optional.gate_proj"]
    assert gate.outcome == "fused"
    assert gate.note == ("the gated product it feeds was left: members.optional's forward would "
                         "have to be rewritten, and it cannot be: its forward takes optional "
                         "arguments (scale=None), which a trace fixes")
    assert entries["members.optional.up_proj"].note == gate.note


def test_hooked_up_projection_stops_the_gated_op():
    torch.manual_seed(6)
    model = nn.Sequential(LlamaLikeMLP())
    seen = []
    model[0].up_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    fused, report = _fuse_checked(model, _x(4, D))
    gate = next(e for e in report if e.name == "0.gate_proj")
    assert "0.up_proj has forward_hooks registered" in gate.note
    seen.clear()
    fused(_x(4, D))
    assert seen == [torch.Size([4, H])]


def test_fused_gated_block_survives_deepcopy_and_pickle():
    torch.manual_seed(7)
    fused = fastmlp.fuse(nn.Sequential(LlamaLikeMLP(), PackedMLP()))
    keys = list(fused.state_dict())
    for copied in (copy.deepcopy(fused), _pickled(fused)):
        assert list(copied.state_dict()) == keys
        assert len(_gated_calls(copied[0])) == 1 and len(_gated_calls(copied[1])) == 1
        _assert_same_function(fused, copied, _x(3, D))


def _pickled(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_gated_blocks_on_the_triton_backend(triton_backend, device):
    torch.manual_seed(8)
    model = nn.Sequential(LlamaLikeMLP(bias=True), PackedMLP(gate_first=False)).to(device)
    reference = copy.deepcopy(model)
    fused = fastmlp.fuse(model)
    assert len(_gated_calls(fused[0])) == 1 and len(_gated_calls(fused[1])) == 1
    _assert_same_function(reference, fused, _x(5, D).to(device))


def test_compile_fullgraph_fused_gated_blocks():
    torch._dynamo.reset()
    torch.manual_seed(9)
    model = nn.Sequential(LlamaLikeMLP(), PackedMLP())
    reference = copy.deepcopy(model)
    fused = fastmlp.fuse(model)
    compiled = torch.compile(fused, fullgraph=True)
    _assert_same_function(reference, fused, _x(4, D), call=compiled)


# ------------------------------------------------------------------------------------------------
# Forwards torch.fx cannot trace as written
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Returns a tuple, as transformers' attention modules do; takes keyword extras."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x, mask=None, **kwargs):
        return self.proj(x), None


class OptLikeLayer(nn.Module):
    """OPT's decoder layer: unpacks the attention's tuple, passes **kwargs on, fc1 -> act."""

    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.fc1 = nn.Linear(D, H)
        self.activation_fn = nn.ReLU()
        self.fc2 = nn.Linear(H, D)

    def forward(self, hidden_states, attention_mask=None, use_cache=False, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states, mask=attention_mask, **kwargs)
        hidden_states = residual + hidden_states
        hidden_states = self.fc1(hidden_states)
        hidden_states = self.activation_fn(hidden_states)
        return self.fc2(hidden_states)


class ReadsKwargs(OptLikeLayer):
    def forward(self, hidden_states, **kwargs):
        if kwargs.get("skip_mlp"):
            return hidden_states
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


def _renaming(forward):
    """A decorator in the style of transformers' deprecate_kwarg: (*args, **kwargs) wrapper."""
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if "old_mask" in kwargs:
            kwargs["attention_mask"] = kwargs.pop("old_mask")
        return forward(*args, **kwargs)
    return wrapper


class UnknownDecoratorLayer(OptLikeLayer):
    @_renaming
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class DecoratedLayer(OptLikeLayer):
    """torch's autocast decorator (a known one: it sets a mode, the dataflow is the forward's)."""

    @torch.autocast("cpu", enabled=False)
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class KwargsToAMethod(OptLikeLayer):
    """Passes its **kwargs to a method, which the trace would run with none."""

    def forward(self, hidden_states, **kwargs):
        return self.tail(self.fc1(hidden_states), **kwargs)

    def tail(self, h, skip_act=False):
        return self.fc2(h if skip_act else self.activation_fn(h))


class SourceCallsAMethod(OptLikeLayer):
    """Untraceable; its own text says fc1 -> act, but a method it calls uses act again."""

    def forward(self, x):
        h = self.activation_fn(self.fc1(x))
        if x.sum() > 0:
            return self.twice(h)
        return self.fc2(h)

    def twice(self, h):
        return self.fc2(self.activation_fn(h))


class NoGradGated(LlamaLikeMLP):
    @torch.no_grad()
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class WithAutocast(LlamaLikeMLP):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_forward_passing_kwargs_on_is_traced_and_fused():
    torch.manual_seed(10)
    fused, report = _fuse_checked(nn.Sequential(OptLikeLayer()), _x(2, 5, D))
    assert _outcomes(report)["0.fc1"] == "fused"
    assert isinstance(fused[0].fc1, fastmlp.FusedLinear) and fused[0].fc1.activation == "relu"
    out = fused[0](_x(2, 5, D), attention_mask=None, extra="passed on")   # still takes kwargs
    assert out.shape == (2, 5, D)


def test_decorated_forward_is_traced_and_fused():
    torch.manual_seed(11)
    fused, report = _fuse_checked(nn.Sequential(DecoratedLayer()), _x(3, D))
    assert _outcomes(report)["0.fc1"] == "fused"


def test_unknown_decorator_is_not_traced():
    _, report = fastmlp.fuse(nn.Sequential(UnknownDecoratorLayer()), return_report=True)
    assert not report.fused
    assert {b.name: b for b in report.blocks}["0"].summary.startswith(
        "could not be traced: its forward is wrapped by a decorator (wrapper) whose effect fuse "
        "cannot know")


def test_kwargs_passed_to_a_method_are_not_traced_as_empty():
    torch.manual_seed(16)
    model = nn.Sequential(KwargsToAMethod())
    stock = copy.deepcopy(model)
    fused, report = fastmlp.fuse(model, return_report=True)
    assert not report.fused
    x = _x(3, D)
    assert torch.equal(fused[0](x, skip_act=True), stock[0](x, skip_act=True))


def test_source_pair_refused_when_a_method_could_use_the_activation():
    torch.manual_seed(17)
    fused, report = _fuse_checked(nn.Sequential(SourceCallsAMethod()), _x(3, D).abs())
    assert not report.fused


@pytest.mark.parametrize("block", [NoGradGated, WithAutocast])
def test_forward_setting_grad_or_autocast_mode_is_not_rewritten(block):
    torch.manual_seed(18)
    model = nn.Sequential(block())
    stock = copy.deepcopy(model)
    fused, report = fastmlp.fuse(model, return_report=True)
    gate = {e.name: e for e in report}["0.gate_proj"]
    assert "forward would have to be rewritten, and it cannot be" in gate.note
    x = _x(3, D)
    out, want = fused(x), stock(x)
    assert out.dtype == want.dtype and out.requires_grad == want.requires_grad
    assert_close(out, want, want.dtype, "output")


def test_instance_level_forward_is_respected():
    torch.manual_seed(19)
    model = nn.Sequential(LlamaLikeMLP())
    original = model[0].forward
    model[0].forward = lambda x: original(x) * 2          # as accelerate's hooks replace it
    seq = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))
    seq[1].forward = lambda h: F.gelu(h) + 1.0
    x = _x(3, D)
    stock = [copy.deepcopy(model)(x), seq(x)]
    fused_model, report = fastmlp.fuse(model, return_report=True)
    fused_seq, report_seq = fastmlp.fuse(seq, return_report=True)
    assert not report.fused and not report_seq.fused
    assert torch.equal(fused_model(x), stock[0]) and torch.equal(fused_seq(x), stock[1])


def test_formula_probe_does_not_call_the_module():
    calls = []
    act = TanhGeluFormula()
    act.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    assert module_activation(act) == ("gelu_tanh", 0.0)
    assert calls == []


def test_forward_reading_kwargs_is_not_traced_and_its_source_fixes_the_pair():
    torch.manual_seed(12)
    fused, report = _fuse_checked(nn.Sequential(ReadsKwargs()), _x(3, D))
    entries = {e.name: e for e in report}
    assert entries["0.fc1"].outcome == "fused"
    assert entries["0.fc1"].note == "read from 0's source: its forward could not be traced"
    assert {b.name: b for b in report.blocks}["0"].summary.startswith(
        "could not be traced: its forward reads its **kwargs, or passes them to something other "
        "than its child modules, so one trace would not stand for every call")
    assert fused[0](_x(3, D), skip_mlp=True).shape == (3, D)


class BranchyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)

    def forward(self, x):
        if x.sum() > 0:
            return self.q(x)
        return -self.q(x)


def test_untraceable_block_without_activation_says_nothing_is_lost():
    _, report = fastmlp.fuse(nn.Sequential(BranchyAttention()), return_report=True)
    assert _outcomes(report)["0.q"] == (
        "0 could not be traced: its forward branches on a value computed from its inputs (an if "
        "or while on a tensor or an argument) (torch.fx: TraceError: symbolically traced "
        "variables cannot be used as inputs to control flow); it holds no activation module, so "
        "most likely no fusion is lost")


# ------------------------------------------------------------------------------------------------
# Untraceable blocks: pairs read from the forward's source
# ------------------------------------------------------------------------------------------------
class BartLikeEncoderLayer(nn.Module):
    """BART's encoder layer in transformers 5: a dtype branch after the MLP stops torch.fx; the
    MLP is written as one nested call."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, H)
        self.activation_fn = nn.GELU()
        self.fc2 = nn.Linear(H, D)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = residual + self.fc2(hidden_states)
        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            hidden_states = hidden_states.clamp(-1000, 1000)
        return hidden_states


class WhisperLikeEncoderLayer(BartLikeEncoderLayer):
    """The same with the MLP in two statements on one name."""

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.fc1(hidden_states)
        hidden_states = self.activation_fn(hidden_states)
        hidden_states = residual + self.fc2(hidden_states)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clamp(-1000, 1000)
        return hidden_states


class UsesActTwice(BartLikeEncoderLayer):
    def forward(self, x):
        h = self.activation_fn(self.fc1(x))
        if x.sum() > 0:
            h = self.activation_fn(h)
        return self.fc2(h)


class PassesSelfOn(BartLikeEncoderLayer):
    def forward(self, x):
        if x.sum() > 0:
            return _call_fc1_twice(self, x)
        return self.fc2(self.activation_fn(self.fc1(x)))


def _call_fc1_twice(layer, x):
    return layer.fc2(layer.fc1(x) + layer.fc1(x))


@pytest.mark.parametrize("block", [BartLikeEncoderLayer, WhisperLikeEncoderLayer])
def test_untraceable_block_pair_read_from_source(block):
    torch.manual_seed(13)
    fused, report = _fuse_checked(nn.Sequential(block()), _x(2, 4, D))
    entries = {e.name: e for e in report}
    assert entries["0.fc1"].outcome == "fused"
    assert entries["0.fc1"].note == "read from 0's source: its forward could not be traced"
    (block,) = [b for b in report.blocks if b.name == "0"]
    assert block.summary.startswith("could not be traced: its forward branches on a value")
    assert block.summary.endswith("; fused fc1 + gelu")
    assert type(fused[0].activation_fn) is nn.Identity
    assert entries["0.fc2"].outcome.endswith(
        "its activation modules are all fused, so most likely no fusion is lost")


@pytest.mark.parametrize("block", [UsesActTwice, PassesSelfOn])
def test_source_that_does_not_fix_the_pair_is_left(block):
    torch.manual_seed(14)
    fused, report = _fuse_checked(nn.Sequential(block()), _x(3, D).abs())
    assert not report.fused
    assert _outcomes(report)["0.fc1"].endswith(
        "a fusion is likely lost: it holds the activation module activation_fn (GELU)")


# ------------------------------------------------------------------------------------------------
# mlp=True: why an MLP-looking module is not made a FusedMLP
# ------------------------------------------------------------------------------------------------
class SequentialSubclass(nn.Sequential):
    pass


class QueryKey(nn.Module):
    """Two Linears and no activation: not an MLP, so nothing is said about it."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        return self.q(x) @ self.k(x).transpose(-1, -2)


def test_mlp_option_says_why_mlp_looking_modules_are_not_stacks():
    torch.manual_seed(15)
    model = nn.ModuleDict({
        "timm": nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)),
        "sub": SequentialSubclass(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D)),
        "llama": LlamaLikeMLP(),
        "attention": QueryKey(),
    })
    _, report = fastmlp.fuse(model, mlp=True, return_report=True)
    stacks = {e.name: e for e in report.stacks}
    assert stacks["timm"].fused
    assert stacks["sub"].outcome == (
        "a subclass of nn.Sequential (SequentialSubclass): only nn.Sequential itself becomes a "
        "FusedMLP (a subclass may compute something else)")
    assert stacks["llama"].outcome == (
        "not an nn.Sequential (LlamaLikeMLP, a forward of its own): FusedMLP takes only "
        "nn.Sequential stacks, so its layers go through the pair pass")
    assert "attention" not in stacks
    assert "llama (MLP stack): not made a FusedMLP: not an nn.Sequential" in str(report)


@pytest.mark.parametrize("kernels", [False, True], ids=["default-backend", "kernels"])
@pytest.mark.parametrize("block", [LlamaLikeMLP, PackedMLP])
def test_hooks_registered_after_fuse_run_and_see_the_linears(block, kernels, request, device):
    """Tensor parallelism's ColwiseParallel, for one, hooks the gate and up Linears after a model
    is built: the fused product then calls them as written, so the hooks run (on the kernels'
    path too: without the hook the gated kernels compute it)."""
    if kernels:
        request.getfixturevalue("triton_backend")
    torch.manual_seed(20)
    model = nn.Sequential(block()).to(device)
    stock = copy.deepcopy(model)
    fused = fastmlp.fuse(model)
    assert len(_gated_calls(fused[0])) == 1
    proj = fused[0].gate_proj if block is LlamaLikeMLP else fused[0].gate_up_proj
    seen = []
    handle = proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape) or out * 2)
    stock_proj = stock[0].gate_proj if block is LlamaLikeMLP else stock[0].gate_up_proj
    stock_proj.register_forward_hook(lambda mod, args, out: out * 2)
    x = _x(3, D).to(device)
    assert_close(fused(x), stock(x), torch.float32, "hooked output")
    assert len(seen) == 1
    handle.remove()
    seen.clear()
    stock_proj._forward_hooks.clear()
    assert_close(fused(x), stock(x), torch.float32, "output without the hook")
    assert seen == []          # no hook: the gated op again, the Linear not called
