"""Drop-in modules: FusedLinear(activation=...), FusedLinearReLU, and GatedMLP.

FusedLinear and FusedLinearReLU subclass nn.Linear: same constructor, same parameters (weight
[out, in], bias [out]), same initialisation, so state_dicts load both ways between them and
nn.Linear. GatedMLP holds a whole gated MLP block (SwiGLU, GeGLU, ...) as plain nn.Linear
children named as the model family it stands in for names them, so its state_dict is that
block's. The activation is not state: it is a constructor argument, shown by repr.
"""

from typing import NamedTuple, Optional

import torch
from torch import nn

from fastmlp import activations, hooks, ops
from fastmlp.gated import fused_gated, split_packed
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
