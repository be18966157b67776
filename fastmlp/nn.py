"""Drop-in modules: FusedLinear(activation=...), FusedLinearReLU, GatedMLP and FusedMLP.

FusedLinear and FusedLinearReLU subclass nn.Linear: same constructor, same parameters (weight
[out, in], bias [out]), same initialisation, so state_dicts load both ways between them and
nn.Linear. GatedMLP holds a whole gated MLP block (SwiGLU, GeGLU, ...) as plain nn.Linear
children named as the model family it stands in for names them, so its state_dict is that
block's. FusedMLP holds a whole narrow MLP (Linear, act, ..., Linear) with the children and
state_dict of the equivalent nn.Sequential; its operator is fastmlp/mlp_ops.py. The activation
is not state: it is a constructor argument, shown by repr.
"""

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from fastmlp import activations, backend, hooks, mlp_ops, ops, sharding
from fastmlp.gated import fused_gated, fused_gated_packed, split_packed
from fastmlp.ops import fused_linear


class FusedLinear(nn.Linear):
    """nn.Linear followed by an activation, computed by the fastmlp kernels: y = act(x Wᵀ + b).

    activation: None (no activation), a name from fastmlp.ACTIVATIONS, or an instance of the
    matching torch module (nn.ReLU(), nn.LeakyReLU(0.2), nn.GELU(), nn.GELU(approximate="tanh"),
    nn.SiLU(), nn.Sigmoid(), nn.Tanh()). Attributes ``activation`` (its name, "none" for none)
    and ``activation_alpha`` (leaky_relu's negative slope, 0 otherwise).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, activation=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation, self.activation_alpha = activations.resolve(activation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fused_linear(input, self.weight, self.bias, self.activation, self.activation_alpha)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, "
                f"activation={activations.describe(self.activation, self.activation_alpha)}")


class FusedLinearReLU(FusedLinear):
    """nn.Linear followed by nn.ReLU in one fused kernel: y = relu(x Wᵀ + b)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype, activation="relu")


def fused_from(linear: nn.Linear, activation=None, alpha=None) -> FusedLinear:
    """A FusedLinear that shares `linear`'s parameters (built on meta: no init, no copy).

    activation: what FusedLinear takes; alpha, if given, overrides the resolved parameter
    (a name plus the slope found in a traced call).
    """
    if activation == "relu":
        fused = FusedLinearReLU(linear.in_features, linear.out_features,
                                bias=linear.bias is not None, device="meta")
    else:
        fused = FusedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            device="meta", activation=activation)
        if alpha is not None:
            fused.activation_alpha = float(alpha)
    fused.weight = linear.weight
    fused.bias = linear.bias
    fused.train(linear.training)
    return fused


# --------------------------------------------------------------------------------------------
# GatedMLP: a whole gated MLP block
# --------------------------------------------------------------------------------------------
class GatedLayout(NamedTuple):
    """How one model family names a gated MLP block's parts (the attribute names of its module)."""

    gate: str                   # the gate projection; for a packed layout the [2H, in] Linear
    up: Optional[str]           # the up projection; None: packed with the gate, gate rows first
    down: str                   # the down projection [out, H]
    activation: str             # the activation module's attribute (read by from_module only)
    dropout: Optional[str]      # the dropout's attribute, applied before down (None: none)
    cast_to_down: bool          # the product is cast to the down weight's dtype first


GATED_LAYOUTS = {
    # Llama, Mistral, Qwen2, Gemma: down_proj(act_fn(gate_proj(x)) * up_proj(x))
    "llama": GatedLayout("gate_proj", "up_proj", "down_proj", "act_fn", None, False),
    # Phi-3: gate, up = gate_up_proj(x).chunk(2, -1); down_proj(up * activation_fn(gate))
    "phi3": GatedLayout("gate_up_proj", None, "down_proj", "activation_fn", None, False),
    # T5 v1.1 / mT5 T5DenseGatedActDense: wo(dropout(act(wi_0(x)) * wi_1(x))), the product cast
    # to wo's dtype first (the models keep wo in float32 when the rest is float16)
    "t5": GatedLayout("wi_0", "wi_1", "wo", "act", "dropout", True),
}


def _gated_layout(layout) -> GatedLayout:
    if not isinstance(layout, str) or layout not in GATED_LAYOUTS:
        raise ValueError(f"fastmlp GatedMLP: unknown layout {layout!r}; expected one of "
                         f"{', '.join(repr(k) for k in GATED_LAYOUTS)}")
    return GATED_LAYOUTS[layout]


def _to_down_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h in the down weight's dtype, as T5's block casts it. Under autocast, when the down
    projection would cast the weight to h's dtype anyway, h is left as it is: casting it up and
    the projection casting it back is the identity, one pass over h saved."""
    if h.dtype == weight.dtype:
        return h
    cast = ops.autocast_caster(h.device.type)
    if cast is not None and cast(weight).dtype == h.dtype:
        return h
    return h.to(weight.dtype)


class GatedMLP(nn.Module):
    """down(dropout(act(gate(x)) * up(x))): the SwiGLU / GeGLU / ReGLU / GLU MLP block of
    Llama-style models.

    The gate and up projections are one fused op (fastmlp.functional.gated_linear: both GEMMs
    over the same input tiles, act and product in the epilogue), the down projection fastmlp's
    linear; any leading dimensions, [..., in_features] -> [..., out_features].

    activation: what FusedLinear takes (a name from fastmlp.ACTIVATIONS or the torch module);
    silu gives SwiGLU, gelu / gelu_tanh GeGLU, relu ReGLU, sigmoid GLU. Attributes
    ``activation`` and ``activation_alpha`` as FusedLinear's.

    layout: the children's names (plain nn.Linear each, so state_dict keys, shapes and
    initialisation are those of the model family's own block, and either loads the other's):

    * ``"llama"`` (also Mistral, Qwen2, Gemma): ``gate_proj``, ``up_proj`` [hidden, in],
      ``down_proj`` [out, hidden];
    * ``"phi3"``: ``gate_up_proj`` [2 * hidden, in] (gate the first half of the rows, as
      Phi-3's ``.chunk(2, -1)`` gives ``gate, up``; the halves are passed as views, never
      copied), ``down_proj``;
    * ``"t5"`` (T5 v1.1 / mT5 ``T5DenseGatedActDense``): ``wi_0`` (gate), ``wi_1`` (up),
      ``wo`` (down); the product is cast to ``wo``'s dtype before it, as T5 does.

    dropout: the probability of the ``nn.Dropout`` child ``dropout`` (no state), applied to the
    product before the down projection as T5 applies it. bias: every projection has one or none;
    ``from_module`` takes each Linear's bias as it is.

    Hooks: while a child has a call hook, or torch has a global module hook
    (fastmlp.hooks), the block is computed by calling its children as the model's own block
    calls them (``_hooked``), so every hook runs and sees what it would see there.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 bias: bool = False, device=None, dtype=None, *, activation="silu",
                 layout: str = "llama", dropout: float = 0.0) -> None:
        super().__init__()
        spec = _gated_layout(layout)
        self.activation, self.activation_alpha = activations.resolve(activation)
        out_features = in_features if out_features is None else out_features
        self.in_features, self.hidden_features = in_features, hidden_features
        self.out_features, self.layout = out_features, layout
        factory = {"device": device, "dtype": dtype}
        if spec.up is None:
            self.add_module(spec.gate, nn.Linear(in_features, 2 * hidden_features, bias, **factory))
        else:
            self.add_module(spec.gate, nn.Linear(in_features, hidden_features, bias, **factory))
            self.add_module(spec.up, nn.Linear(in_features, hidden_features, bias, **factory))
        self.add_module(spec.down, nn.Linear(hidden_features, out_features, bias, **factory))
        self.dropout = nn.Dropout(dropout)

    @property
    def _spec(self) -> GatedLayout:
        return GATED_LAYOUTS[self.layout]

    def _gate_and_up(self):
        """(gate_weight, up_weight, gate_bias, up_bias); a packed weight's halves as views."""
        spec = self._spec
        gate = self._modules[spec.gate]
        if spec.up is None:
            return split_packed(gate.weight, gate.bias, True)
        up = self._modules[spec.up]
        return gate.weight, up.weight, gate.bias, up.bias

    def _hooked(self) -> bool:
        """Whether a child has a call hook or torch has a global module hook: the fused op would
        skip them, so the block then runs child by child (``_forward_by_children``)."""
        if hooks.global_module_hook() is not None:
            return True
        return any(getattr(m, name) for m in self._modules.values() for name in hooks.CALL_HOOKS)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self._hooked():
            return self._forward_by_children(input)
        spec = self._spec
        if spec.up is None:    # packed: the packed op, whose weight gradient is one [2H, K] tensor
            gate = self._modules[spec.gate]
            h = fused_gated_packed(input, gate.weight, gate.bias, self.activation,
                                   self.activation_alpha, True)
        else:
            h = fused_gated(input, *self._gate_and_up(), self.activation, self.activation_alpha)
        if self.dropout.p:
            # (p = 0 is the identity: the child is not called then, one pass over h saved)
            h = self.dropout(h)
        down = self._modules[self._spec.down]
        if self._spec.cast_to_down:
            h = _to_down_dtype(h, down.weight)
        return fused_linear(h, down.weight, down.bias, "none")

    def _forward_by_children(self, input: torch.Tensor) -> torch.Tensor:
        """The block as the model family's own module computes it: each child called in the
        same order, so every hook on them sees the same inputs and outputs."""
        spec = self._spec
        act = activations.get(self.activation)
        if spec.up is None:
            gate, up = self._modules[spec.gate](input).chunk(2, -1)
        else:
            gate = self._modules[spec.gate](input)
            up = self._modules[spec.up](input)
        h = self.dropout(act.torch_forward(gate, self.activation_alpha) * up)
        down = self._modules[spec.down]
        if spec.cast_to_down:
            h = _to_down_dtype(h, down.weight)
        return down(h)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.out_features}, "
                f"activation={activations.describe(self.activation, self.activation_alpha)}, "
                f"layout={self.layout}")

    @classmethod
    def from_module(cls, block: nn.Module) -> "GatedMLP":
        """A GatedMLP computing what `block` computes, sharing its Linears' Parameters (the very
        same objects: no copy, no initialisation), with the same state_dict keys.

        `block` is recognised by its attribute names: ``gate_proj``, ``up_proj``, ``down_proj``
        and ``act_fn`` (layout "llama"); ``gate_up_proj``, ``down_proj`` and ``activation_fn``
        ("phi3"); ``wi_0``, ``wi_1``, ``wo``, ``act`` and ``dropout`` ("t5", which takes the
        dropout's p). Its forward is not read: the names say which computation it is, so a
        block must have no other children, parameters or buffers (whose part in its forward is
        unknown). The Linears must be plain nn.Linear, the activation one fastmlp computes
        (fastmlp.activation_modules.module_activation: torch's modules and one-call wrappers such as Hugging
        Face's), the shapes consistent; each bias may be present or not. Hooks on the block or
        on those modules, and torch's global module hooks, are refused: the GatedMLP stands in
        for the block with new modules, which would not have them. Anything else is a
        ValueError naming what is wrong. The training flags are kept.
        """
        layout, spec = _recognise(block)
        where = f"fastmlp GatedMLP.from_module: {type(block).__name__} (layout {layout!r})"
        names = [n for n in (spec.gate, spec.up, spec.down) if n is not None]
        linears = {n: getattr(block, n) for n in names}
        for name, linear in linears.items():
            if type(linear) is not nn.Linear or "forward" in vars(linear):
                what = (type(linear).__name__ if type(linear) is not nn.Linear
                        else "nn.Linear with its forward replaced on the instance")
                raise ValueError(f"{where}: {name} is {what}, not a plain nn.Linear")
        act_module = getattr(block, spec.activation, None)
        name_alpha = _activation_of(act_module)
        if name_alpha is None:
            raise ValueError(f"{where}: its {spec.activation} ({act_module!r}) is not an "
                             f"activation fastmlp computes; expected a module computing one of "
                             f"{', '.join(activations.ACTIVATIONS)}")
        dropout = getattr(block, spec.dropout, None) if spec.dropout else None
        if dropout is not None and type(dropout) is not nn.Dropout:
            raise ValueError(f"{where}: its {spec.dropout} is {dropout!r}, not an nn.Dropout")
        in_features, hidden, out_features = _gated_shapes(where, spec, linears)
        kept = names + [spec.activation] + ([spec.dropout] if dropout is not None else [])
        _check_nothing_else(where, block, kept)
        _check_no_lost_hooks(where, block, kept)
        mlp = cls(in_features, hidden, out_features, bias=False, device="meta",
                  activation=name_alpha[0], layout=layout,
                  dropout=dropout.p if dropout is not None else 0.0)
        mlp.activation_alpha = float(name_alpha[1])
        if dropout is not None:
            mlp.dropout.inplace = dropout.inplace
        mlp.train(block.training)
        for name, linear in linears.items():
            new = mlp._modules[name]
            new.weight, new.bias = linear.weight, linear.bias
            new.train(linear.training)
        if dropout is not None:
            mlp.dropout.train(dropout.training)
        return mlp


def _recognise(block):
    """(layout name, GatedLayout) whose Linear attribute names `block` has; a ValueError naming
    what was looked for when none or several match."""
    if not isinstance(block, nn.Module):
        raise ValueError(f"fastmlp GatedMLP.from_module: expected an nn.Module, got "
                         f"{type(block).__name__}")
    found = [(k, spec) for k, spec in GATED_LAYOUTS.items()
             if all(hasattr(block, n) for n in (spec.gate, spec.up, spec.down) if n is not None)]
    if len(found) == 1:
        return found[0]
    looked = "; ".join(f"{', '.join(n for n in (s.gate, s.up, s.down) if n)} ({k})"
                       for k, s in GATED_LAYOUTS.items())
    if not found:
        children = ", ".join(block._modules) or "none"
        raise ValueError(f"fastmlp GatedMLP.from_module: {type(block).__name__} is not a gated "
                         f"MLP block fastmlp recognises: expected the Linears {looked}; its "
                         f"children are {children}")
    raise ValueError(f"fastmlp GatedMLP.from_module: {type(block).__name__} has the Linears of "
                     f"several layouts ({', '.join(k for k, _ in found)}): which one its forward "
                     f"computes is unknown")


def _activation_of(module):
    """(name, alpha) of the activation module `module` computes, or None."""
    if not isinstance(module, nn.Module):
        return None
    if type(module) is nn.Identity:
        return "none", 0.0
    from fastmlp.activation_modules import module_activation  # imports fastmlp.tracing: lazily

    return module_activation(module)


def _gated_shapes(where, spec, linears):
    """(in_features, hidden, out_features) from the Linears' weights; a ValueError naming the
    shapes where they do not make a gated block."""
    gate, down = linears[spec.gate].weight, linears[spec.down].weight
    if spec.up is None:
        if gate.shape[0] % 2:
            raise ValueError(f"{where}: {spec.gate}.weight {tuple(gate.shape)} must have an even "
                             f"number of rows (the gate and up halves)")
        hidden = gate.shape[0] // 2
    else:
        up = linears[spec.up].weight
        if up.shape != gate.shape:
            raise ValueError(f"{where}: {spec.gate}.weight {tuple(gate.shape)} and "
                             f"{spec.up}.weight {tuple(up.shape)} must have the same shape "
                             f"[hidden, in_features]")
        hidden = gate.shape[0]
    if down.shape[1] != hidden:
        raise ValueError(f"{where}: {spec.down}.weight {tuple(down.shape)} takes "
                         f"{down.shape[1]} inputs but the gated product has {hidden} "
                         f"({spec.gate}.weight {tuple(gate.shape)})")
    return gate.shape[1], hidden, down.shape[0]


def _check_nothing_else(where, block, kept):
    """A ValueError if `block` has children, parameters or buffers besides `kept`: the GatedMLP
    would compute without them, and its state_dict would lack their keys."""
    others = [n for n, m in block._modules.items() if n not in kept and m is not None]
    others += [n for n, t in block._parameters.items() if t is not None]
    others += [n for n, t in block._buffers.items() if t is not None]
    if others:
        raise ValueError(f"{where}: it also has {', '.join(others)}, whose part in its forward "
                         f"a GatedMLP cannot know")


def _check_no_lost_hooks(where, block, kept):
    """A ValueError for a hook the GatedMLP would not have: it stands in for `block`, with new
    Linear and dropout modules and no activation module (fastmlp.hooks)."""
    found = hooks.global_module_hook()
    if found is not None:
        raise ValueError(f"{where}: {found} is registered, and would no longer see the block's "
                         f"own modules")
    for name, module in [("the block itself", block)] + [(repr(n), getattr(block, n))
                                                         for n in kept]:
        registered = hooks.registered(module, hooks.ALL_HOOKS)
        if registered:
            raise ValueError(f"{where}: {name} has {', '.join(registered)} registered, which the "
                             f"GatedMLP standing in for it would not have; remove the hook or "
                             f"register it on the GatedMLP")


# --------------------------------------------------------------------------------------------
# FusedMLP: a whole narrow MLP
# --------------------------------------------------------------------------------------------
def _linear_of(module: nn.Module):
    """(the module as a linear layer, its built-in activation or None) or None if it is not one."""
    if type(module) is nn.Linear:
        return module, None
    if type(module) in (FusedLinear, FusedLinearReLU):
        name = getattr(module, "activation", "none")
        alpha = float(getattr(module, "activation_alpha", 0.0))
        return module, (None if name == "none" else (name, alpha))
    return None


def _parse(named: Sequence[Tuple[str, nn.Module]], where: str):
    """(linears, acts) from Sequential-ordered children: acts[i] = (name, alpha) after linears[i].

    nn.Identity is skipped anywhere; every other module must be a linear layer (nn.Linear or
    fastmlp's FusedLinear) or one supported activation directly after one.
    """
    linears: List[nn.Linear] = []
    acts: List[Tuple[str, float]] = []
    for name, module in named:
        if type(module) is nn.Identity:
            continue
        found = _linear_of(module)
        if found is not None:
            linears.append(found[0])
            acts.append(found[1] or ("none", 0.0))
            continue
        act = activations.from_module(module)
        if act is None:
            raise TypeError(
                f"fastmlp {where}: module {name!r} ({module!r}) is not nn.Linear, a supported "
                f"activation module ({', '.join(activations.ACTIVATIONS)}) or nn.Identity")
        if not linears:
            raise ValueError(f"fastmlp {where}: module {name!r} ({module!r}) is an activation "
                             f"before the first Linear")
        if acts[-1][0] != "none":
            raise ValueError(f"fastmlp {where}: module {name!r} ({module!r}) is a second "
                             f"activation after the same Linear")
        acts[-1] = act
    if not linears:
        raise ValueError(f"fastmlp {where}: no Linear layer")
    for prev, nxt in zip(linears, linears[1:]):
        if nxt.in_features != prev.out_features:
            raise ValueError(f"fastmlp {where}: a Linear with out_features={prev.out_features} is "
                             f"followed by one with in_features={nxt.in_features}")
    return linears, acts


def _module_for(name: str, alpha: float) -> nn.Module:
    """The torch module of an activation (name, alpha); nn.Identity for "none"."""
    return activations.get(name).new_module(alpha)


class FusedMLP(nn.Module):
    """Linear → act → … → Linear [→ output_activation], computed as one fused op where it can be.

    What it computes is exactly the equivalent ``nn.Sequential``; how, is decided per call
    (``path()``): "torch", the children's own forward in order, as nn.Sequential runs them (the
    torch backend: CPU by default, float64 on GPUs); on the Triton backend "fused", the whole
    stack as one autograd node (fastmlp::mlp and fastmlp::mlp_backward), or "per-layer", the
    fused Linear+activation kernels layer by layer. fastmlp/mlp_ops.py says when each is taken.

    Args:
        in_features, out_features: the first layer's input and the last layer's output width.
        hidden_features: the hidden widths, one per hidden layer. An empty list is one Linear
            (then ``output_activation``): ``nn.Sequential(nn.Linear)`` is an MLP too, and
            ``from_sequential`` takes it, so the constructor does. Every width may be 0, as
            nn.Linear's may (in_features=0: the output is the bias, through the activations).
        activation: after every hidden layer: None, a name from fastmlp.ACTIVATIONS, or a torch
            activation module (nn.ReLU(), nn.LeakyReLU(0.2), nn.GELU(), ...).
        bias: whether every Linear has a bias.
        output_activation: after the last Linear, the same choices (default None).
        device, dtype: of the parameters, as nn.Linear.

    Children and state_dict keys are those of ``nn.Sequential(nn.Linear, act, nn.Linear, act,
    ..., nn.Linear[, output act])``: "0.weight", "0.bias", "2.weight", ...; an activation slot
    is nn.Identity when activation is None. Parameters are initialised as nn.Linear does, in
    the same order, so a FusedMLP and that Sequential built after the same torch.manual_seed
    hold the same values. ``FusedMLP.from_sequential(seq)`` keeps seq's own child names and
    modules (parameters shared, not copied).

    Hooks registered on the children do not run on the Triton paths (the children are parameter
    holders there); hooks on the FusedMLP itself do. So ``from_sequential`` refuses a Sequential
    whose children (or itself, or torch's global module hooks) have hooks that would be skipped
    (``hook_blocker``), and ``fastmlp.fuse(mlp=True)`` leaves such a stack to the per-pair pass,
    which leaves a hooked Linear as it is. While a child has a call hook registered after the
    FusedMLP was built, or a global module hook is registered, the stack takes the torch path
    (its children called in turn), so the hooks run as in nn.Sequential (``_hooked``).
    """

    def __init__(self, in_features: int, hidden_features: Sequence[int], out_features: int, *,
                 activation="relu", bias: bool = True, output_activation=None, device=None,
                 dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_features, int) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hidden_features):
            raise TypeError(f"fastmlp FusedMLP: hidden_features must be a list of ints, got "
                            f"{hidden_features!r}")
        widths = [in_features, *hidden_features, out_features]
        got = (f"in_features={in_features!r}, hidden_features={list(hidden_features)!r}, "
               f"out_features={out_features!r}")
        if any(not isinstance(n, int) or isinstance(n, bool) for n in widths):
            raise TypeError(f"fastmlp FusedMLP: widths must be ints, got {got}")
        if any(n < 0 for n in widths):
            raise ValueError(f"fastmlp FusedMLP: widths must be non-negative (0 is allowed, as "
                             f"in nn.Linear), got {got}")
        act, out_act = activations.resolve(activation), activations.resolve(output_activation)
        modules: List[nn.Module] = []
        for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
            modules.append(nn.Linear(k, n, bias=bias, device=device, dtype=dtype))
            if i < len(widths) - 2:
                modules.append(_module_for(*act))
        if output_activation is not None:
            modules.append(_module_for(*out_act))
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "FusedMLP":
        """A FusedMLP over seq's own modules (parameters shared, not copied), same child names.

        seq may hold nn.Linear (or fastmlp.FusedLinear), supported activation modules (at most
        one after each Linear) and nn.Identity; anything else is an error naming the module. A
        single Linear (with or without an activation after it) is an MLP without hidden layers,
        as ``FusedMLP(in, [], out)`` is.

        Hooks: a hook the FusedMLP would not run (on a child, on seq itself, or one of torch's
        global module hooks; see ``hook_blocker``) is a ValueError naming the module and the
        hook, rather than a model that silently computes something else on the Triton backend.
        """
        if not isinstance(seq, nn.Sequential):
            raise TypeError(f"fastmlp FusedMLP.from_sequential: expected an nn.Sequential, got "
                            f"{type(seq).__name__}")
        _parse(list(seq.named_children()), "FusedMLP.from_sequential")
        why = hook_blocker(seq)
        if why is not None:
            raise ValueError(
                f"fastmlp FusedMLP.from_sequential: {why}: a FusedMLP stands in for the "
                f"nn.Sequential and computes the stack without calling its children on the Triton "
                f"backend. Remove the hook, register it on the FusedMLP, or keep the nn.Sequential")
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        for name, module in seq.named_children():
            mlp.add_module(name, module)
        mlp.train(seq.training)
        return mlp

    # Sequential-style access to the children
    def __getitem__(self, index: int) -> nn.Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def _plan(self):
        """(linears, acts) of the current children, parsed again whenever a child or an
        activation's parameter changed (the key, a few attribute reads per child, costs far
        less than the parse: bench/NOTES.md)."""
        key = tuple((m, getattr(m, "negative_slope", None), getattr(m, "approximate", None),
                     getattr(m, "activation", None), getattr(m, "activation_alpha", None))
                    for m in self._modules.values())
        cached = self.__dict__.get("_plan_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = _parse(list(self._modules.items()), "FusedMLP")
        if not torch.compiler.is_compiling():
            self.__dict__["_plan_cache"] = (key, plan)
        return plan

    @property
    def in_features(self) -> int:
        return self._plan()[0][0].in_features

    @property
    def out_features(self) -> int:
        return self._plan()[0][-1].out_features

    @property
    def hidden_features(self) -> List[int]:
        return [lin.out_features for lin in self._plan()[0][:-1]]

    def reset_parameters(self) -> None:
        for lin in self._plan()[0]:
            lin.reset_parameters()

    def _prepare(self, input):
        """(x, weights, biases, acts): the current layers and the input, checked and cast as
        the stack computes them (mlp_ops.prepare_inputs)."""
        linears, acts = self._plan()
        weights = [lin.weight for lin in linears]
        biases = [lin.bias for lin in linears]
        x, weights, biases = mlp_ops.prepare_inputs(input, weights, biases)
        return x, weights, biases, acts

    def _hooked(self) -> bool:
        """Whether a child has a call hook (registered after this FusedMLP was built: fuse and
        from_sequential leave hooked stacks alone) or torch has a global module hook. The
        kernels would skip them, so the stack then runs module by module, as nn.Sequential
        runs it, and every hook sees what it would see there."""
        if hooks.global_module_hook() is not None:
            return True
        return any(getattr(m, name) for m in self._modules.values() for name in hooks.CALL_HOOKS)

    def path(self, input: torch.Tensor) -> str:
        """Which computation forward(input) takes now: "torch", "fused" or "per-layer"."""
        x, weights, biases, acts = self._prepare(input)
        if self._hooked():
            return "torch"
        return mlp_ops.choose_path(ops._rows(x), weights, biases, acts)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and (
                not backend.uses_triton(input.device, input.dtype)
                or ops.composite_only() or self._hooked()):
            # The torch path is the children's own forward, as nn.Sequential runs it; the input
            # checks run only to turn a failure into fastmlp's error message. torch.func
            # transforms and forward-mode AD take it on the Triton backend too (see
            # fastmlp.ops.composite_only), and so does a stack with a hook (_hooked).
            sharding.check_fused_mlp_module(self)   # as on the Triton path (_prepare)
            try:
                h = input
                for module in self._modules.values():
                    h = module(h)
                return h
            except (RuntimeError, TypeError, ValueError):
                self._prepare(input)
                raise
        x, weights, biases, acts = self._prepare(input)
        return mlp_ops.fused_mlp(x, weights, biases, acts)


def hook_blocker(seq: nn.Sequential) -> Optional[str]:
    """Why a FusedMLP over seq's modules would not run a hook that seq runs, or None.

    A FusedMLP on the Triton backend computes the stack without calling its children, so their
    call hooks (forward pre-, forward, backward pre-, backward hooks: fastmlp.hooks.CALL_HOOKS)
    would not run, nor would torch's global module hooks see the layers; and it stands in for
    seq, so every hook on seq itself (its state_dict hooks too) would be gone. The children's
    state_dict hooks still run: the FusedMLP holds the very same child modules. The check is
    fastmlp.hooks', the one fastmlp.fuse applies to each Linear it fuses.
    """
    found = hooks.global_module_hook()
    if found is not None:
        return f"{found} is registered (a FusedMLP would hide the stack's layers from it)"
    found = hooks.registered(seq, hooks.ALL_HOOKS)
    if found:
        return (f"the nn.Sequential itself has {', '.join(found)} registered (a FusedMLP would "
                f"stand in for it without them)")
    for name, module in seq.named_children():
        found = hooks.registered(module, hooks.CALL_HOOKS)
        if found:
            return (f"module {name!r} ({type(module).__name__}) has {', '.join(found)} registered "
                    f"(a FusedMLP would not run them)")
    return None
