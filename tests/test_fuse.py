"""fastmlp.fuse on real model shapes: what it fuses, what it leaves (and says why), and that the
fused model computes what the stock one does: outputs, every gradient, state_dict keys, shared
Parameters, deepcopy and pickle.

The blocks are rebuilt the way timm, Hugging Face transformers and torchvision write them (these
tests do not depend on those packages)."""

import copy
import io

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp.fusion import FuseEntry, FuseReport
from reference import assert_close, case_seed

D, H = 12, 20


# ------------------------------------------------------------------------------------------------
# Blocks written the way the libraries write them
# ------------------------------------------------------------------------------------------------
class TimmMlp(nn.Module):
    """timm.layers.Mlp: fc1 -> act -> drop1 -> norm -> fc2 -> drop2."""

    def __init__(self, in_features=D, hidden_features=H, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class GELUActivation(nn.Module):
    """transformers.activations.GELUActivation: a parameterless module around F.gelu."""

    def __init__(self):
        super().__init__()
        self.act = nn.functional.gelu

    def forward(self, input):
        return self.act(input)


class BertIntermediate(nn.Module):
    """transformers' BertIntermediate with the activation given as a function (ACT2FN style)."""

    def __init__(self, act_fn=F.gelu):
        super().__init__()
        self.dense = nn.Linear(D, H)
        self.intermediate_act_fn = act_fn

    def forward(self, hidden_states):
        hidden_states = self.dense(hidden_states)
        hidden_states = self.intermediate_act_fn(hidden_states)
        return hidden_states


class BertOutput(nn.Module):
    """transformers' BertOutput: dense -> dropout -> LayerNorm(h + residual): nothing to fuse."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(H, D)
        self.LayerNorm = nn.LayerNorm(D, eps=1e-12)
        self.dropout = nn.Dropout(0.0)

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.LayerNorm(hidden_states + input_tensor)
        return hidden_states


class BertLayerMlp(nn.Module):
    def __init__(self, act_fn=F.gelu):
        super().__init__()
        self.intermediate = BertIntermediate(act_fn)
        self.output = BertOutput()

    def forward(self, x):
        return self.output(self.intermediate(x), x)


class TorchvisionMLP(nn.Sequential):
    """torchvision.ops.MLP: an nn.Sequential subclass built from Linear/activation/Dropout."""

    def __init__(self, in_channels=D, hidden_channels=(H, D), activation_layer=nn.ReLU,
                 inplace=True, bias=True, dropout=0.0):
        params = {} if inplace is None else {"inplace": inplace}
        layers = []
        in_dim = in_channels
        for hidden_dim in hidden_channels[:-1]:
            layers.append(nn.Linear(in_dim, hidden_dim, bias=bias))
            layers.append(activation_layer(**params))
            layers.append(nn.Dropout(dropout, **params))
            in_dim = hidden_dim
        layers.append(nn.Linear(in_dim, hidden_channels[-1], bias=bias))
        layers.append(nn.Dropout(dropout, **params))
        super().__init__(*layers)


class Functional(nn.Module):
    """One Linear and an activation written as a call (a function given to the constructor)."""

    def __init__(self, act, bias=True):
        super().__init__()
        self.dense = nn.Linear(D, H, bias=bias)
        self.out = nn.Linear(H, D)
        self.act = act

    def forward(self, x):
        return self.out(self.act(self.dense(x)))


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _fuse_checked(model, *inputs, **kwargs):
    """fuse(model) against a deepcopy taken before: same outputs, input and parameter gradients,
    state_dict keys and parameter names, and the fused model holds the original Parameters."""
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    fused, report = fastmlp.fuse(model, return_report=True, **kwargs)
    assert list(fused.state_dict()) == keys
    assert [n for n, _ in fused.named_parameters()] == list(params)
    for name, p in fused.named_parameters():
        assert p is params[name] and p.data_ptr() == params[name].data_ptr(), name
    _assert_same_function(reference, fused, *inputs)
    return fused, report


def _assert_same_function(reference, fused, *inputs, call=None):
    """Same output, input gradients and parameter gradients (None where the reference has None:
    a parameter the forward does not use). call: what to run instead of fused (compiled)."""
    ins_ref = [t.detach().clone().requires_grad_() for t in inputs]
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out_ref, out = reference(*ins_ref), (call or fused)(*ins)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out.backward(grad)
    assert_close(out, out_ref, torch.float32, "output")
    for i, (a, b) in enumerate(zip(ins, ins_ref)):
        assert_close(a.grad, b.grad, torch.float32, f"input {i} grad")
    ref_params = dict(reference.named_parameters())
    assert [n for n, _ in fused.named_parameters()] == list(ref_params)
    for name, p in fused.named_parameters():
        expected = ref_params[name].grad
        if expected is None:
            assert p.grad is None, f"{name}: a gradient where the reference has none"
        else:
            assert p.grad is not None, f"{name}: no gradient"
            assert_close(p.grad, expected, torch.float32, f"{name} grad")
    for p in list(fused.parameters()) + list(reference.parameters()):
        p.grad = None


def _outcomes(report: FuseReport):
    return {e.name: e.outcome for e in report}


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# nn.Sequential
# ------------------------------------------------------------------------------------------------
SEQUENTIAL_ACTS = [
    (nn.ReLU(), "relu", 0.0), (nn.ReLU(inplace=True), "relu", 0.0),
    (nn.LeakyReLU(0.2), "leaky_relu", 0.2), (nn.LeakyReLU(), "leaky_relu", 0.01),
    (nn.GELU(), "gelu", 0.0), (nn.GELU(approximate="tanh"), "gelu_tanh", 0.0),
    (nn.SiLU(), "silu", 0.0), (nn.Sigmoid(), "sigmoid", 0.0), (nn.Tanh(), "tanh", 0.0),
]


@pytest.mark.parametrize("act,name,alpha", SEQUENTIAL_ACTS,
                         ids=lambda v: repr(v) if isinstance(v, nn.Module) else None)
def test_sequential_each_activation(act, name, alpha):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), copy.deepcopy(act), nn.Linear(H, D))
    fused, report = _fuse_checked(model, _x(5, D))
    assert fused is model
    assert type(fused[0]) in (fastmlp.FusedLinear, fastmlp.FusedLinearReLU)
    assert (fused[0].activation, fused[0].activation_alpha) == (name, pytest.approx(alpha))
    assert type(fused[1]) is nn.Identity and type(fused[2]) is nn.Linear
    assert [(e.name, e.outcome) for e in report] == [
        ("0", "fused"), ("2", "last module of its nn.Sequential: nothing follows it there")]


def test_torchvision_mlp_sequential_subclass():
    torch.manual_seed(1)
    model = TorchvisionMLP()
    fused, report = _fuse_checked(model, _x(4, 3, D))
    assert type(fused) is TorchvisionMLP and fused is model
    assert isinstance(fused[0], fastmlp.FusedLinearReLU) and type(fused[1]) is nn.Identity
    assert type(fused[3]) is nn.Linear
    assert _outcomes(report) == {"0": "fused",
                                 "3": "followed by Dropout, not a supported activation"}


# ------------------------------------------------------------------------------------------------
# Custom forwards
# ------------------------------------------------------------------------------------------------
def test_timm_mlp_fused_in_place_forward_untouched():
    """self.act(self.fc1(x)) with the act module used only there: the Linear is swapped for a
    FusedLinear and the act becomes Identity under the same names; the block keeps its class."""
    torch.manual_seed(2)
    model = nn.Sequential(TimmMlp(), TimmMlp(act_layer=nn.SiLU))
    fused, report = _fuse_checked(model, _x(6, D))
    assert fused is model and type(fused[0]) is TimmMlp and type(fused[1]) is TimmMlp
    assert fused[0].fc1.activation == "gelu" and fused[1].fc1.activation == "silu"
    assert type(fused[0].act) is nn.Identity and type(fused[0].fc2) is nn.Linear
    assert _outcomes(report) == {
        "0.fc1": "fused", "1.fc1": "fused",
        "0.fc2": "its output goes to drop2 (Dropout), not a supported activation",
        "1.fc2": "its output goes to drop2 (Dropout), not a supported activation"}


def test_bert_intermediate_function_rewrites_forward_and_bert_output_is_left():
    torch.manual_seed(3)
    model = BertLayerMlp()
    fused, report = _fuse_checked(model, _x(2, 5, D))
    assert fused is model and type(fused.output) is BertOutput
    inter = fused.intermediate
    assert isinstance(inter, fx.GraphModule) and type(inter).__name__ == "BertIntermediate"
    assert inter.dense.activation == "gelu" and "gelu" not in inter.code
    assert _outcomes(report) == {
        "intermediate.dense": "fused",
        "output.dense": "its output goes to dropout (Dropout), not a supported activation"}


def test_hugging_face_activation_module_is_seen_through():
    """ACT2FN's GELUActivation (a parameterless module calling F.gelu) counts as an activation."""
    torch.manual_seed(4)
    model = BertIntermediate(GELUActivation())
    model.intermediate_act_fn = GELUActivation()  # a registered submodule, as in transformers
    fused, report = _fuse_checked(model, _x(3, D))
    assert fused is model and type(fused) is BertIntermediate
    assert fused.dense.activation == "gelu" and type(fused.intermediate_act_fn) is nn.Identity
    assert report[0].outcome == "fused"


FUNCTIONAL = [
    (lambda h: F.silu(h), "silu", 0.0),
    (torch.tanh, "tanh", 0.0),
    (torch.sigmoid, "sigmoid", 0.0),
    (lambda h: h.relu(), "relu", 0.0),
    (torch.relu, "relu", 0.0),
    (lambda h: F.relu(h, inplace=True), "relu", 0.0),
    (lambda h: F.leaky_relu(h, 0.2), "leaky_relu", 0.2),
    (lambda h: F.leaky_relu(h, negative_slope=-0.5), "leaky_relu", -0.5),
    (lambda h: F.gelu(h), "gelu", 0.0),
    (lambda h: F.gelu(h, approximate="tanh"), "gelu_tanh", 0.0),
]


@pytest.mark.parametrize("act,name,alpha", FUNCTIONAL)
def test_functional_activations_in_custom_forward(act, name, alpha):
    torch.manual_seed(5)
    model = Functional(act)
    fused, report = _fuse_checked(model, _x(7, D))
    assert fused is not model and isinstance(fused, fx.GraphModule)
    assert type(fused).__name__ == "Functional"
    assert (fused.dense.activation, fused.dense.activation_alpha) == (name, pytest.approx(alpha))
    assert type(fused.out) is nn.Linear
    assert report[0].outcome == "fused"
    assert report[0].activation == fastmlp.activations.describe(name, alpha)
    # The model passed in is unchanged at its own level and still computes the same function.
    assert type(model.dense) is nn.Linear
    _assert_same_function(fused, model, _x(2, D, seed=1))


def test_linear_without_bias_and_modulelist_loop():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(D, D, bias=False) for _ in range(3)])
            self.register_buffer("scale", torch.linspace(0.5, 1.5, D))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x)) * self.scale
            return x

    torch.manual_seed(6)
    model = Stack()
    fused, report = _fuse_checked(model, _x(4, D))
    assert [layer.activation for layer in fused.layers] == ["tanh"] * 3
    assert fused.layers is not model.layers  # copied on the way: the original stays as it was
    assert [type(layer) for layer in model.layers] == [nn.Linear] * 3
    assert [e.outcome for e in report] == ["fused"] * 3


def test_deepcopy_and_pickle_keep_every_key():
    """A rewritten module keeps state its graph does not reference (an unused submodule, a buffer),
    through deepcopy and torch.save / torch.load as well (a plain fx.GraphModule would drop it)."""

    class Block(Functional):
        def __init__(self):
            super().__init__(F.gelu)
            self.spare = nn.Linear(3, 3)
            self.register_buffer("steps", torch.zeros(()))
            self.hidden = H

    torch.manual_seed(7)
    model = Block()
    keys = list(model.state_dict())
    fused, _ = _fuse_checked(model, _x(3, D))
    assert fused.hidden == H
    copied = copy.deepcopy(fused)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        assert list(other.state_dict()) == keys
        assert other.dense.activation == "gelu" and "gelu" not in other.code
        assert other.dense.weight is not fused.dense.weight
        _assert_same_function(fused, other, _x(2, D, seed=2))
    stock = Block()
    stock.load_state_dict(fused.state_dict())
    _assert_same_function(stock, fused, _x(2, D, seed=3))


def test_fusing_twice_changes_nothing():
    torch.manual_seed(8)
    model = nn.Sequential(TimmMlp(), Functional(torch.tanh), nn.Linear(D, D), nn.ReLU())
    once = fastmlp.fuse(model)
    structure = repr(once)
    twice, report = fastmlp.fuse(once, return_report=True)
    assert twice is once and repr(twice) == structure
    assert _outcomes(report)["0.fc1"] == "already fused" and report[0].activation == "gelu"
    assert _outcomes(report)["1.dense"] == "already fused"
    assert _outcomes(report)["2"] == "already fused"


# ------------------------------------------------------------------------------------------------
# What fuse leaves, and why
# ------------------------------------------------------------------------------------------------
class OtherUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        h = self.fc(x)
        return F.relu(h) + h


class SharedAct(nn.Module):
    """One act module for two calls: fc1 is fused by rewriting the forward; act stays in place."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.fc1(x)) + self.act(x * 2)


class SharedActOptional(SharedAct):
    def forward(self, x, scale=None):
        return self.act(self.fc1(x)) + self.act(x if scale is None else x * scale)


class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return F.relu(self.fc(x)) + self.fc(x * 2)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; its children are still fused, and
    so is its own fc -> act, which its source fixes (fastmlp/source_pairs.py)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.act = nn.ReLU()
        self.mlp = TimmMlp()

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.mlp(self.act(self.fc(x)))


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class PostProcess(nn.Module):
    def forward(self, x):
        return F.gelu(x) * 2


class Hidden(nn.Module):
    """The activation happens inside a child module that is more than an activation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.post = PostProcess()
        self.sub = ScaledLinear(D, D)
        self.sub_act = nn.ReLU()

    def forward(self, x):
        return self.sub_act(self.sub(self.post(self.fc(x))))


class EvalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.act = nn.GELU()

    def forward(self, x):
        h = self.fc(x)
        if not self.training:
            h = h * 0.5
        return self.act(h)


class OptionalBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.act = nn.GELU()

    def forward(self, x, mask=None):
        h = self.fc(x)
        if mask is None:
            h = h * 2
        return self.act(h)


def test_left_alone_each_with_its_reason():
    torch.manual_seed(9)
    lin = nn.Linear(D, D)
    model = nn.ModuleDict({
        "other_users": OtherUsers(), "shared_act": SharedAct(),
        "shared_act_optional": SharedActOptional(), "shared_linear": SharedLinear(),
        "untraceable": Untraceable(), "hidden": Hidden(), "eval_scale": EvalScale(),
        "optional_branch": OptionalBranch(),
        "torch_layer": nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0),
        "shared_slots": nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU()),
        "subclass": nn.Sequential(ScaledLinear(D, D), nn.ReLU()),
    })
    hooked = nn.Sequential(nn.Linear(D, D), nn.ReLU())
    hooked[0].register_forward_hook(lambda mod, args, out: None)
    model["hooked"] = hooked

    class Runner(nn.Module):
        """Calls every member with one input, so one function covers them all."""

        def __init__(self, members):
            super().__init__()
            self.members = members

        def forward(self, x):
            return torch.stack([m(x) for m in self.members.values()])

    runner = Runner(model)
    shared_act = model["shared_act"].act
    stock = copy.deepcopy(runner)
    fused, report = _fuse_checked(runner, _x(3, D))
    outcomes = _outcomes(report)
    m = "members."
    assert outcomes[m + "other_users.fc"] == "its output has 2 users (relu, add)"
    assert outcomes[m + "shared_act.fc1"] == "fused"
    assert fused.members["shared_act"].act is shared_act  # kept as it was: used elsewhere
    assert type(fused.members["shared_act"].act) is nn.Tanh
    assert outcomes[m + "shared_act_optional.fc1"] == (
        "its activation module act is also used elsewhere, so members.shared_act_optional's "
        "forward would have to be rewritten, and it cannot be: its forward takes optional "
        "arguments (scale=None), which a trace fixes")
    assert outcomes[m + "shared_linear.fc"] == "shared: called at 2 places"
    # untraceable (a branch on a tensor), but its source fixes fc -> act: fused in place
    assert outcomes[m + "untraceable.fc"] == "fused"
    assert {e.name: e for e in report}[m + "untraceable.fc"].note == (
        "read from members.untraceable's source: its forward could not be traced")
    assert outcomes[m + "untraceable.mlp.fc1"] == "fused"  # the children of an untraceable block
    subclass = "a subclass of nn.Linear (ScaledLinear): it may compute something else"
    assert outcomes[m + "hidden.fc"] == (
        "its output goes to post (PostProcess), not a supported activation")
    assert outcomes[m + "hidden.sub"] == subclass
    assert outcomes[m + "eval_scale.fc"] == (
        "members.eval_scale's forward takes another path in eval mode without grad "
        "(the trace would not hold for every call)")
    assert outcomes[m + "optional_branch.fc"] == (
        "members.optional_branch's forward takes another path with its optional arguments at "
        "their defaults (the trace would not hold for every call)")
    assert outcomes[m + "torch_layer.linear1"] == (
        "inside TransformerEncoderLayer (members.torch_layer), torch's own module, whose forward "
        "fuse does not change")
    assert outcomes[m + "shared_slots.0"] == (
        "shared: the same module is also members.shared_slots.2")
    assert outcomes[m + "subclass.0"] == subclass
    assert outcomes[m + "hooked.0"] == (
        "has forward_hooks registered (fusing would change what they see)")
    assert [e.name for e in report if e.fused] == [
        m + "shared_act.fc1", m + "untraceable.fc", m + "untraceable.mlp.fc1"]
    # The mode-dependent blocks are right in eval mode as well.
    _assert_same_function(stock.eval(), fused.eval(), _x(3, D, seed=4))


def test_mode_dependent_block_is_correct_in_both_modes():
    """A trace of EvalScale in training mode alone says fc -> act; fusing that would be wrong in
    eval mode. It is left, and stays right in both modes."""
    torch.manual_seed(10)
    model = EvalScale()
    reference = copy.deepcopy(model)
    fused = fastmlp.fuse(model)
    for mode in (False, True):
        fused.train(mode)
        reference.train(mode)
        _assert_same_function(reference, fused, _x(3, D))
    assert type(fused.fc) is nn.Linear


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def test_verbose_prints_the_report(capsys):
    model = nn.Sequential(TimmMlp(), nn.Linear(D, D), nn.Tanh(), ScaledLinear(D, D))
    result = fastmlp.fuse(model, verbose=True)
    assert result is model
    assert capsys.readouterr().out.splitlines() == [
        "fastmlp.fuse: fused 2 of 4 Linear layers",
        "  (the model) (Sequential): fused 1 + tanh",
        "    1 + tanh: fused",
        "    3: left: a subclass of nn.Linear (ScaledLinear): it may compute something else",
        "  0 (TimmMlp): fused fc1 + gelu",
        "    0.fc1 + gelu: fused",
        "    0.fc2: left: its output goes to drop2 (Dropout), not a supported activation",
    ]
    assert fastmlp.fuse(nn.Linear(2, 2), return_report=True)[1] == [
        FuseEntry("", None, "not called from any forward fuse could trace")]


def test_bad_argument():
    with pytest.raises(TypeError, match="fastmlp.fuse: expected an nn.Module, got function"):
        fastmlp.fuse(F.relu)


# ------------------------------------------------------------------------------------------------
# Backends and compile
# ------------------------------------------------------------------------------------------------
def test_fused_blocks_on_the_triton_backend(triton_backend, device):
    """One small model with both rewrite kinds through the Triton kernels (interpreter on CPU)."""
    torch.manual_seed(11)
    model = nn.Sequential(TimmMlp(D, 16), BertIntermediate(lambda h: F.leaky_relu(h, 0.2)))
    model = model.to(device)
    reference = copy.deepcopy(model)
    fused = fastmlp.fuse(model)
    assert fused[0].fc1.activation == "gelu" and fused[1].dense.activation == "leaky_relu"
    _assert_same_function(reference, fused, _x(9, D).to(device))


def test_compile_fullgraph_fused_custom_blocks():
    torch._dynamo.reset()
    torch.manual_seed(12)
    model = nn.Sequential(TimmMlp(), BertIntermediate(), nn.Linear(H, D))
    reference = copy.deepcopy(model)
    fused = fastmlp.fuse(model)
    compiled = torch.compile(fused, fullgraph=True)  # raises on any graph break
    _assert_same_function(reference, fused, _x(4, D), call=compiled)


# ------------------------------------------------------------------------------------------------
# mlp=True: whole Sequential stacks become FusedMLP
# ------------------------------------------------------------------------------------------------
class _Encoder(nn.Module):
    """A model with a Sequential MLP inside and a functional GELU head."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                 nn.Linear(16, 6))
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return F.gelu(self.head(self.mlp(x)))


def test_mlp_option_turns_sequential_stacks_into_fused_mlp():
    torch.manual_seed(0)
    model = _Encoder()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = list(model.parameters())
    fused, report = fastmlp.fuse(model, mlp=True, return_report=True)
    assert isinstance(fused.mlp, fastmlp.FusedMLP)
    assert list(fused.state_dict()) == keys
    assert all(p is q for p, q in zip(fused.parameters(), params))   # shared, never copied
    outcomes = _outcomes(report)
    assert outcomes["mlp.0"] == outcomes["mlp.2"] == outcomes["mlp.4"] == "already fused"
    assert outcomes["head"] == "fused"            # the pair pass still runs after the MLP pass
    _assert_same_function(reference, fused, _x(7, 8))


def test_mlp_option_on_a_root_sequential_returns_the_fused_mlp():
    seq = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 3))
    reference = copy.deepcopy(seq)
    fused = fastmlp.fuse(seq, mlp=True)
    assert isinstance(fused, fastmlp.FusedMLP)
    assert list(fused.state_dict()) == list(reference.state_dict())
    _assert_same_function(reference, fused, _x(5, 4))


def test_a_fused_mlp_is_left_as_it_is_and_reported_fused():
    """Without mlp=True a FusedMLP already in the model is never traced or rewritten."""
    model = nn.Sequential(fastmlp.FusedMLP(6, [8, 8], 2), nn.Linear(2, 2), nn.Tanh())
    inner = model[0]
    fused, report = fastmlp.fuse(model, return_report=True)
    assert fused[0] is inner and type(inner.get_submodule("0")) is nn.Linear
    outcomes = _outcomes(report)
    assert [outcomes[f"0.{i}"] for i in (0, 2, 4)] == ["already fused"] * 3
    assert outcomes["1"] == "fused"


# Hooks a FusedMLP would skip (it computes the stack without calling its children on the Triton
# path): each changes what the stock stack computes, so a stack fused anyway gives other values.
# (id, register(seq), the words the report and from_sequential's error name)
STACK_HOOKS = [
    ("linear-forward", lambda s: s[0].register_forward_hook(lambda m, a, o: o * 2),
     "module '0' (Linear) has forward_hooks registered"),
    ("linear-forward-pre", lambda s: s[2].register_forward_pre_hook(lambda m, a: (a[0] + 1,)),
     "module '2' (Linear) has forward_pre_hooks registered"),
    ("linear-backward", lambda s: s[0].register_full_backward_hook(lambda m, gi, go: (gi[0] * 3,)),
     "module '0' (Linear) has backward_hooks registered"),
    ("activation-forward", lambda s: s[1].register_forward_hook(lambda m, a, o: o + 0.5),
     "module '1' (ReLU) has forward_hooks registered"),
    ("sequential-forward", lambda s: s.register_forward_hook(lambda m, a, o: o * 3),
     "the nn.Sequential itself has forward_hooks registered"),
    ("sequential-load-state", lambda s: s.register_load_state_dict_post_hook(lambda m, k: None),
     "the nn.Sequential itself has load_state_dict_post_hooks registered"),
]


def _stack():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 6))


@pytest.mark.parametrize("hook", STACK_HOOKS, ids=[h[0] for h in STACK_HOOKS])
def test_mlp_option_leaves_a_stack_with_hooks_and_names_them(impl, hook):
    """fuse(mlp=True) leaves a hooked stack an nn.Sequential (the report's stacks say why), the
    pair pass leaves the hooked Linear or activation, and the model computes what the stock one
    does, hooks included, on the kernels' path too (where a FusedMLP would skip them)."""
    name, register, words = hook
    torch.manual_seed(case_seed("hooked stack", name))
    model = _Encoder()
    model.mlp = _stack()
    model.to(impl)
    register(model.mlp)
    reference = copy.deepcopy(model)
    fused, report = fastmlp.fuse(model, mlp=True, return_report=True)
    assert type(fused.mlp) is nn.Sequential
    assert not any(isinstance(m, fastmlp.FusedMLP) for m in fused.modules())
    assert [(e.name, e.fused) for e in report.stacks] == [("mlp", False)]
    assert words in report.stacks[0].outcome and words in str(report)
    outcomes = _outcomes(report)
    if name.startswith("linear"):
        hooked = "mlp.0" if "'0'" in words else "mlp.2"
        assert outcomes[hooked].startswith("has ") and "registered" in outcomes[hooked]
    elif name.startswith("activation"):
        assert outcomes["mlp.0"] == "its activation ReLU (mlp.1) has forward_hooks registered"
    else:   # a hook on the Sequential: its pairs are fused in place, its forward kept
        assert outcomes["mlp.0"] == outcomes["mlp.2"] == "fused"
    _assert_same_function(reference, fused, _x(7, 8, seed=case_seed("x", name)).to(impl))


def test_mlp_option_reports_each_stack():
    """report.stacks: one entry per Sequential with two or more Linears, made a FusedMLP or
    left with the reason (here: a Dropout, which FusedMLP does not compute)."""
    model = nn.ModuleDict({"a": _stack(), "b": nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0),
                                                              nn.Linear(4, 4)),
                           "single": nn.Sequential(nn.Linear(4, 4), nn.ReLU())})
    fused, report = fastmlp.fuse(model, mlp=True, return_report=True)
    assert type(fused["a"]) is fastmlp.FusedMLP and type(fused["b"]) is nn.Sequential
    assert [(e.name, e.fused) for e in report.stacks] == [("a", True), ("b", False)]
    assert "module '1' (Dropout(p=0.0, inplace=False)) is not nn.Linear" in report.stacks[1].outcome
    text = str(report)
    assert "1 of 2 MLP stacks made a FusedMLP" in text
    assert "a (MLP stack): made a FusedMLP" in text
    assert fastmlp.fuse(model, return_report=True)[1].stacks == []   # only with mlp=True


def test_a_childs_state_dict_hook_does_not_stop_the_stack():
    """A FusedMLP holds the very same child modules, so their state_dict hooks still run: such a
    stack is still made a FusedMLP."""
    seq = _stack()
    calls = []
    seq[2].register_load_state_dict_post_hook(lambda m, keys: calls.append(m))
    fused, report = fastmlp.fuse(seq, mlp=True, return_report=True)
    assert type(fused) is fastmlp.FusedMLP and report.stacks[0].fused
    fused.load_state_dict(_stack().state_dict())
    assert calls == [seq[2]]


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_a_global_module_hook_stops_all_fusion(impl, kind):
    """torch's global module hooks see every Linear's output (or input): with one registered,
    fuse fuses nothing, mlp=True included, and says so (the check fit's steps use too)."""
    from torch.nn.modules import module as torch_module

    def hook(m, *args):
        if isinstance(m, nn.Linear) and kind == "forward":
            return args[-1] + 0.25
        return None

    register = getattr(torch_module, f"register_module_{kind}_hook")
    torch.manual_seed(case_seed("global hook", kind))
    model = _Encoder().to(impl)
    reference = copy.deepcopy(model)
    handle = register(hook)
    try:
        fused, report = fastmlp.fuse(model, mlp=True, return_report=True)
        assert type(fused.mlp) is nn.Sequential and not report.fused
        expected = f"a global {kind.replace('_', ' ').replace('full ', '')}"
        left = [e for e in report if e.name != "mlp.4"]   # mlp.4: last in its Sequential
        assert left and all(e.outcome.startswith(expected) and "hook" in e.outcome for e in left)
        assert report.stacks[0].outcome.startswith(expected)
        _assert_same_function(reference, fused, _x(5, 8, seed=3).to(impl))
    finally:
        handle.remove()
    assert fastmlp.fuse(copy.deepcopy(model), mlp=True, return_report=True)[1].stacks[0].fused
