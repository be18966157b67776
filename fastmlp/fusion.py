"""fuse(model): compute each Linear that is followed by a supported activation in one fused kernel.

Where it looks:

* ``nn.Sequential`` (and subclasses that keep its forward, such as torchvision's ``MLP``): a Linear
  slot directly followed by an activation module slot.
* every other module with a ``forward`` of its own: its forward is traced with ``torch.fx``, one
  module at a time and with every submodule kept as a single call (so a block that cannot be
  traced, or torch's own modules, do not stop their children from being fused). A Linear's call
  whose only user is an activation is a pair: an activation module (``self.act(self.fc1(x))``,
  also a parameterless wrapper module whose forward is one supported call, like Hugging Face's
  ``GELUActivation``) or a call that ``fastmlp.activations.from_call`` recognises (``F.gelu(h)``,
  ``torch.tanh(h)``, ``h.relu()``, ``F.leaky_relu(h, 0.2)``, ``F.relu(h, inplace=True)``, ...).

How a pair is rewritten (the Linear always becomes a ``FusedLinear`` built on the meta device
that holds the Linear's own weight and bias Parameters: never a copy):

* Sequential: the Linear slot becomes the FusedLinear and the activation slot ``nn.Identity``.
* activation module called only there: the same, in place, under the same attribute names; the
  module's forward is not touched (``Identity(fused(x))`` is what it already computes).
* functional activation, or an activation module that is also used elsewhere: the module's
  forward must change, so it is replaced, in its parent, by a ``torch.fx.GraphModule`` of its
  traced forward in which the activation's users read the fused call instead. That GraphModule
  keeps every submodule, parameter, buffer and public attribute of the module (also through
  deepcopy and pickle), in the same order, so ``state_dict`` keys and ``named_parameters()`` stay
  the same; an activation module that is used elsewhere stays as it was. When the model itself is
  rewritten, the returned object is a new module: always use ``fuse``'s return value.

What it leaves (each with its reason in the report): a Linear whose output has other users, a
Linear called more than once or reachable under several names (shared), a subclass of nn.Linear
(it may compute something else), a Linear or activation with hooks (every Linear while one of
torch's global module hooks is registered: it sees every module's output), a Linear under a
forward that torch.fx cannot trace or inside torch's own modules, a pair whose traced dataflow
differs between training and eval mode, with and without grad, or with optional forward
arguments left at their defaults (the trace could not stand for every call), and a pair that
needs a forward rewritten when that module cannot be rewritten faithfully (hooks, optional
arguments, custom state_dict methods, mode-dependent forward, shared).

The work is three passes over the model (analyse, decide, apply). ``mlp=True`` first turns
whole Sequential stacks into ``fastmlp.FusedMLP`` (fastmlp.mlp_stacks), except stacks
with hooks a FusedMLP would not run (the report's ``stacks`` name them); a FusedMLP is fused
already and is never traced (its Linears are reported "already fused").
"""

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from fastmlp import activations, functional, hooks, tracing
from fastmlp.gated_pattern import find_gated
from fastmlp.source_pairs import source_pairs
from fastmlp.activation_modules import has_own_forward as _has_own_forward
from fastmlp.activation_modules import is_torch_module as _is_torch_module
from fastmlp.activation_modules import module_activation, uses as _uses
from fastmlp.nn import FusedLinear, fused_from

__all__ = ["fuse", "FuseEntry", "FuseReport", "StackEntry", "module_activation"]

_LAST_IN_SEQUENTIAL = "last module of its nn.Sequential: nothing follows it there"
# nn.Module methods whose override means a rewritten GraphModule would not save/load the same state.
_STATE_METHODS = ("state_dict", "load_state_dict", "_save_to_state_dict", "_load_from_state_dict",
                  "get_extra_state", "set_extra_state", "__getstate__", "__setstate__")


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FuseEntry:
    """One Linear of the model: its qualified name, the activation after it (as repr shows it,
    None when none was found), the outcome: "fused", "already fused", or why it was left, and a
    note (what it was fused with in a gated op, or why a gated product it is part of was left)."""

    name: str
    activation: Optional[str]
    outcome: str
    note: str = ""

    @property
    def fused(self) -> bool:
        return self.outcome == "fused"

    def __str__(self) -> str:
        act = f" + {self.activation}" if self.activation else ""
        done = self.outcome in ("fused", "already fused")
        verdict = self.outcome if done else f"left: {self.outcome}"
        note = f" ({self.note})" if self.note else ""
        return f"{self.name or '(the model)'}{act}: {verdict}{note}"


@dataclass(frozen=True)
class StackEntry:
    """One stack that fuse(mlp=True) looked at: an nn.Sequential with two or more Linear
    children, or an MLP-looking module that is not one (a Sequential subclass; a module with two
    or more Linear children and an activation). Its qualified name and the outcome, "FusedMLP"
    or why it was not made one (its Linears then go through the per-pair pass, and have
    FuseEntries of their own)."""

    name: str
    outcome: str

    @property
    def fused(self) -> bool:
        return self.outcome == "FusedMLP"

    def __str__(self) -> str:
        verdict = "made a FusedMLP" if self.fused else f"not made a FusedMLP: {self.outcome}"
        return f"{self.name or '(the model)'} (MLP stack): {verdict}"


@dataclass(frozen=True)
class BlockEntry:
    """One module whose forward calls Linears of the model (an nn.Sequential, a traced forward,
    one fuse could not trace, torch's own module): its qualified name, its class, what was
    fused in it or why nothing was, and the names of the Linears it calls."""

    name: str
    type_name: str
    summary: str
    linears: Tuple[str, ...] = ()
    untraceable_outcome: str = ""     # its Linears' outcome when it could not be traced

    def __str__(self) -> str:
        return f"{self.name or '(the model)'} ({self.type_name}): {self.summary}"


class FuseReport(list):
    """The FuseEntry of every nn.Linear (and subclass) in the model, in module order; ``blocks``
    the BlockEntry of each module calling them (printed with its Linears under it); with
    mlp=True, ``stacks`` holds a StackEntry per Sequential stack (else it is empty)."""

    def __init__(self, entries=(), stacks=(), blocks=()):
        super().__init__(entries)
        self.stacks: List[StackEntry] = list(stacks)
        self.blocks: List[BlockEntry] = list(blocks)

    @property
    def fused(self) -> List[FuseEntry]:
        return [e for e in self if e.fused]

    def __str__(self) -> str:
        lines = [f"fastmlp.fuse: fused {len(self.fused)} of {len(self)} Linear layers"]
        if self.stacks:
            made = sum(e.fused for e in self.stacks)
            lines[0] += f"; {made} of {len(self.stacks)} MLP stacks made a FusedMLP"
        lines += [f"  {e}" for e in self.stacks]
        by_name = {e.name: e for e in self}
        shown = set()
        for block in self.blocks:
            lines.append(f"  {block}")
            for name in block.linears:
                if name in by_name and name not in shown:
                    entry = by_name[name]
                    if block.untraceable_outcome and entry.outcome == block.untraceable_outcome:
                        entry = FuseEntry(entry.name, entry.activation,
                                          "its block could not be traced (above)", entry.note)
                    lines.append(f"    {entry}")
                    shown.add(name)
        lines += [f"  {e}" for e in self if e.name not in shown]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# What is an activation, what is a Linear fuse may replace
# --------------------------------------------------------------------------------------------
def _is_candidate_linear(m) -> bool:
    """Exact nn.Linear, or a FusedLinear without activation; never a subclass (it may compute
    something else)."""
    return type(m) is nn.Linear or (type(m) is FusedLinear and m.activation == "none")


def _hooks(m: nn.Module) -> List[str]:
    """m's hooks of every kind (fastmlp.hooks.ALL_HOOKS): fuse replaces the Linear it fuses (and
    a module whose forward it rewrites), so even its state_dict hooks would be gone."""
    return hooks.registered(m, hooks.ALL_HOOKS)


# --------------------------------------------------------------------------------------------
# Analysis records
# --------------------------------------------------------------------------------------------
@dataclass
class _Block:
    """One module of the model as fuse sees it.

    kind: "sequential" (slots), "traced" (graph), "untraceable" (error), "torch" (torch's own
    module with children: its forward is not fuse's to change), "container" (no forward of its
    own: ModuleList, ModuleDict), "skipped" (custom forward, no Linear below: not traced).
    """

    module: nn.Module
    name: str
    kind: str
    graph: Optional[fx.Graph] = None
    variants: List[Tuple[str, fx.Graph]] = field(default_factory=list)
    error: str = ""
    rewrite: list = field(default_factory=list)    # pairs fused by rewriting the forward
    in_place: list = field(default_factory=list)   # pairs fused by swapping modules in place
    gated: list = field(default_factory=list)      # GatedMatches fused by rewriting the forward

    @property
    def label(self) -> str:
        return self.name or "the model"


@dataclass
class _Pair:
    linear_path: str                   # inside the block (a slot key for Sequentials)
    linear: nn.Module
    act: Tuple[str, float]
    act_path: Optional[str]            # None for a functional activation
    act_module: Optional[nn.Module]
    nodes: Optional[Tuple[fx.Node, fx.Node]] = None   # (Linear call, activation call)


class _Fuser:
    """One fuse call: the model's module tree (names, owners, call sites), the analysis of each
    block, the decisions, and the report entries."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names: Dict[int, List[str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(m), []).append(name)
        self.owners: Dict[int, List[Tuple[nn.Module, str]]] = {}
        self.order: List[Tuple[str, nn.Module]] = []     # unique modules, children first
        self._post_order(model, "", set())
        for _, m in self.order:
            for attr, child in m._modules.items():
                if child is not None:
                    self.owners.setdefault(id(child), []).append((m, attr))
        self.calls: Counter = Counter()     # call sites of each module seen in forwards fuse read
        self.blocks: Dict[int, _Block] = {}
        self.entries: Dict[int, FuseEntry] = {}
        self.entries_final = set()          # Linears a gated product took: no other decision
        self.deciding: Optional[_Block] = None   # the block whose forward is being decided
        self.decided_by: Dict[int, _Block] = {}  # Linear -> that block (the report's grouping)
        self._wrappers: Dict[int, Optional[Tuple[str, float]]] = {}
        # torch's global module hooks see every Linear's output and every activation's input:
        # a fused pair would show them other values, so with one registered nothing is fused.
        self.global_hook = hooks.global_module_hook()

    def _post_order(self, m, name, seen):
        if id(m) in seen:
            return
        seen.add(id(m))
        for attr, child in m._modules.items():
            if child is not None:
                self._post_order(child, f"{name}.{attr}" if name else attr, seen)
        self.order.append((name, m))

    def name_of(self, m) -> str:
        return self.names[id(m)][0]

    def module_activation(self, m) -> Optional[Tuple[str, float]]:
        if m is None:
            return None
        if id(m) not in self._wrappers:
            self._wrappers[id(m)] = module_activation(m)
        return self._wrappers[id(m)]

    # ---------------------------------------------------------------- pass 1: analyse
    def analyse(self):
        from fastmlp.nn import FusedMLP

        for name, m in self.order:
            if isinstance(m, FusedMLP):
                block = _Block(m, name, "fused-mlp")   # fused already: its forward is one kernel
            elif isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
                block = _Block(m, name, "sequential")
                for child in m._modules.values():
                    if child is not None:
                        self.calls[id(child)] += 1
            elif not m._modules:
                continue  # a leaf: nothing to fuse inside
            elif not _has_own_forward(m):
                block = _Block(m, name, "container")
            elif _is_torch_module(m):
                block = _Block(m, name, "torch")
                self._unknown_callers(m)
            elif not any(_is_candidate_linear(d) for d in m.modules()):
                block = _Block(m, name, "skipped")
            else:
                block = self._trace_block(m, name)
            self.blocks[id(m)] = block

    def _unknown_callers(self, m):
        """m's forward is not read: count one unknown call of each module it can reach directly
        (its children, and through ModuleList/ModuleDict containers their items)."""
        for child in m._modules.values():
            if child is None:
                continue
            self.calls[id(child)] += 1
            if not _has_own_forward(child):
                self._unknown_callers(child)

    def _trace_block(self, m, name) -> _Block:
        defaults, varargs = tracing.forward_optionals(m)
        plans = [("in training mode", True, True, None),
                 ("in eval mode without grad", False, False, None)]
        if defaults:
            plans.append(("with its optional arguments at their defaults", True, True, defaults))
        variants = []
        try:
            for label, training, grad, concrete in plans:
                variants.append((label, tracing.trace(m, training, grad, concrete)))
        except Exception as exc:  # noqa: BLE001 - any failure means: fuse cannot read this forward
            self._unknown_callers(m)
            if not variants:
                return _Block(m, name, "untraceable", error=tracing.untraceable_reason(exc))
            # The main trace worked, a variant did not: its calls are unknown, and the block's
            # pairs are refused (_agree_across_variants), but what the main trace saw still
            # counts.
        # Call sites: the most any one variant makes of each module.
        most = Counter()
        for _, g in variants:
            here = Counter(id(m.get_submodule(n.target)) for n in g.nodes if n.op == "call_module")
            most |= here
        self.calls.update(most)
        if len(variants) < len(plans):
            variants.append((plans[len(variants)][0], None))   # a variant fuse could not trace
        main = variants[0][1]
        return _Block(m, name, "traced", graph=main, variants=variants)

    # ---------------------------------------------------------------- pass 2: decide
    def decide(self):
        for _, m in self.order:
            if _is_linear_like(m) and id(m) not in self.entries:
                self.entries[id(m)] = self._default_entry(m)
        for block in self.blocks.values():
            self.deciding = block
            if block.kind == "sequential":
                self._decide_sequential(block)
            elif block.kind == "traced":
                self._decide_traced(block)
            elif block.kind == "untraceable":
                self._decide_from_source(block)

    def _default_entry(self, lin) -> FuseEntry:
        name = self.name_of(lin)
        if not _is_candidate_linear(lin):
            if isinstance(lin, FusedLinear):
                return FuseEntry(name, activations.describe(lin.activation, lin.activation_alpha),
                                 "already fused")
            return FuseEntry(name, None, f"a subclass of nn.Linear ({type(lin).__name__}): it may "
                                         f"compute something else")
        caller = self._caller_block(lin)
        if caller is not None and caller.kind == "fused-mlp":
            return FuseEntry(name, None, "already fused")   # a layer of a FusedMLP
        if caller is None:
            why = "not called from any forward fuse could trace"
        elif caller.kind == "untraceable":
            why = self._untraceable_outcome(caller)
        elif caller.kind == "torch":
            why = (f"inside {type(caller.module).__name__} ({caller.label}), torch's own module, "
                   f"whose forward fuse does not change")
        elif caller.kind == "sequential":
            why = _LAST_IN_SEQUENTIAL
        else:
            why = f"not called in {caller.label}'s traced forward"
        return FuseEntry(name, None, why)

    def _untraceable_outcome(self, block) -> str:
        return f"{block.label} could not be traced: {block.error}; {self._lost(block)}"

    def _lost(self, block) -> str:
        """Whether an untraceable block likely cost a fusion: it holds an activation module (its
        Linears may feed it), or it holds none (a functional activation would be unseen)."""
        taken = {id(pair.act_module) for pair in block.in_place}
        acts = [f"{attr} ({type(child).__name__})" for attr, child in _own_children(block.module)
                if id(child) not in taken and self.module_activation(child) is not None]
        if acts:
            return (f"a fusion is likely lost: it holds the activation module"
                    f"{'s' if len(acts) > 1 else ''} {', '.join(acts)}")
        if taken:
            return "its activation modules are all fused, so most likely no fusion is lost"
        return "it holds no activation module, so most likely no fusion is lost"

    def _caller_block(self, m) -> Optional[_Block]:
        """The nearest ancestor with a forward of its own (ModuleList/ModuleDict skipped)."""
        while id(m) in self.owners:
            m = self.owners[id(m)][0][0]
            block = self.blocks.get(id(m))
            if block is not None and block.kind != "container":
                return block
        return None

    def _linear_blocker(self, lin) -> Optional[str]:
        if self.global_hook is not None:
            return f"{self.global_hook} (fusing would change what it sees)"
        owners = self.names[id(lin)]
        if len(self.owners.get(id(lin), ())) > 1:
            return f"shared: the same module is also {', '.join(owners[1:])}"
        if self.calls[id(lin)] > 1:
            return f"shared: called at {self.calls[id(lin)]} places"
        found = _hooks(lin)
        if found:
            return f"has {', '.join(found)} registered (fusing would change what they see)"
        if not isinstance(lin._parameters.get("weight"), nn.Parameter):
            return "its weight is not an nn.Parameter"
        if "forward" in vars(lin):
            return "its forward is replaced on the instance (as accelerate's hooks do)"
        return None

    def _act_blocker(self, act_module, act_label) -> Optional[str]:
        found = _hooks(act_module) if act_module is not None else []
        if found:
            return f"its activation {act_label} has {', '.join(found)} registered"
        return None

    def _record(self, lin, act, outcome, note="", final=False):
        desc = activations.describe(*act) if act is not None else None
        self.entries[id(lin)] = FuseEntry(self.name_of(lin), desc, outcome, note)
        if self.deciding is not None:
            self.decided_by[id(lin)] = self.deciding
        if final:
            self.entries_final.add(id(lin))

    def _decide_sequential(self, block):
        seq = block.module
        keys = list(seq._modules)
        for first, second in zip(keys, keys[1:] + [None]):
            lin = seq._modules[first]
            if not _is_candidate_linear(lin):
                continue
            if second is None:
                self._record(lin, None, _LAST_IN_SEQUENTIAL)
                continue
            nxt = seq._modules[second]
            act = self.module_activation(nxt)
            why = self._linear_blocker(lin)
            if why is None and act is None:
                why = f"followed by {type(nxt).__name__}, not a supported activation"
            if why is None:
                why = self._act_blocker(nxt, f"{type(nxt).__name__} ({self.name_of(nxt)})")
            if why is not None:
                self._record(lin, act, why)
                continue
            block.in_place.append(_Pair(first, lin, act, second, nxt))
            self._record(lin, act, "fused")

    def _decide_traced(self, block):
        m, graph = block.module, block.graph
        gated_notes = self._decide_gated(block)
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            lin = m.get_submodule(node.target)
            if not _is_candidate_linear(lin) or id(lin) in self.entries_final:
                continue
            why = self._linear_blocker(lin)
            pair, shape = self._pair_at(m, node)
            act = pair.act if pair is not None else None
            why = why or shape
            if why is None:
                why = self._agree_across_variants(block, pair)
            if why is None and pair.act_module is not None:
                why = self._act_blocker(pair.act_module, pair.act_path)
            if why is None and not self._swappable_path(m, node.target):
                why = f"called through {node.target}, a path that passes a shared module"
            if why is None:
                if self._act_in_place(m, pair):
                    block.in_place.append(pair)
                else:
                    blocker = self._rewrite_blocker(block)
                    if blocker is not None:
                        kind = ("is a function call" if pair.act_module is None
                                else f"module {pair.act_path} is also used elsewhere")
                        why = (f"its activation {kind}, so {block.label}'s forward would have "
                               f"to be rewritten, and it cannot be: {blocker}")
                    else:
                        block.rewrite.append(pair)
            self._record(lin, act, why or "fused", note=gated_notes.get(node.target, ""))

    def _decide_from_source(self, block):
        """Pairs of an untraceable block that its forward's source fixes (fastmlp.source_pairs),
        fused in place; its other Linears keep their default entries."""
        m = block.module
        for lin_attr, act_attr in source_pairs(m):
            lin, act_module = m._modules.get(lin_attr), m._modules.get(act_attr)
            if lin is None or act_module is None or not _is_candidate_linear(lin):
                continue
            act = self.module_activation(act_module)
            if act is None:
                continue
            why = self._linear_blocker(lin) or self._act_blocker(act_module, act_attr)
            if why is None and (self.calls[id(act_module)] != 1
                                or len(self.owners.get(id(act_module), ())) != 1):
                why = f"its activation module {act_attr} is also used elsewhere"
            if why is None:
                block.in_place.append(_Pair(lin_attr, lin, act, act_attr, act_module))
            note = f"read from {block.label}'s source: its forward could not be traced"
            self._record(lin, act, why or "fused", note=note)
        if block.in_place:      # the other Linears' "fusion lost?" now leaves the taken ones out
            for _, child in _own_children(m):
                entry = self.entries.get(id(child))
                if entry is not None and not entry.note and not entry.fused:
                    self.entries[id(child)] = self._default_entry(child)

    # ---------------------------------------------------------------- gated products
    def _activation_of(self, m):
        """fastmlp.gated_pattern's activation_of for block module m."""
        def activation_of(node):
            if node.op == "call_module" and len(node.args) == 1 and not node.kwargs \
                    and isinstance(node.args[0], fx.Node):
                act = self.module_activation(m.get_submodule(node.target))
                return (act, node.target, node.args[0]) if act is not None else None
            if node.op in ("call_function", "call_method") and node.args \
                    and isinstance(node.args[0], fx.Node) \
                    and not _uses(node.args[1:], node.kwargs, node.args[0]):
                act = activations.from_call(node.op, node.target, tuple(node.args[1:]),
                                            dict(node.kwargs))
                return (act, None, node.args[0]) if act is not None else None
            return None
        return activation_of

    def _gated_matches(self, m, graph):
        return find_gated(m, graph, self._activation_of(m), _is_candidate_linear)

    def _decide_gated(self, block) -> Dict[str, str]:
        """Decide each gated product of a traced block: fused (its Linears' entries final), or
        left with the reason noted on its gate Linear, which then goes through the pair pass
        (act(gate(x)) alone may still fuse)."""
        m = block.module
        notes = {}
        for match in self._gated_matches(m, block.graph):
            gate = m.get_submodule(match.gate)
            up = m.get_submodule(match.up) if match.up is not None else None
            why = None
            for lin in (gate, up):
                if lin is not None and why is None:
                    blocker = self._linear_blocker(lin)
                    if blocker is not None:
                        why = f"{self.name_of(lin)} {blocker}"
            if why is None and up is not None and (gate.weight.dtype, gate.weight.device) != \
                    (up.weight.dtype, up.weight.device):
                why = (f"the gate and up weights differ in dtype or device ({gate.weight.dtype} "
                       f"on {gate.weight.device}, {up.weight.dtype} on {up.weight.device})")
            if why is None and match.act_path is not None:
                why = self._act_blocker(m.get_submodule(match.act_path), match.act_path)
            if why is None:
                for label, g in block.variants[1:]:
                    if g is None or match.signature not in {
                            other.signature for other in self._gated_matches(m, g)}:
                        why = (f"{block.label}'s forward takes another path {label} (the trace "
                               f"would not hold for every call)")
                        break
            if why is None:
                blocker = self._rewrite_blocker(block)
                if blocker is not None:
                    why = (f"{block.label}'s forward would have to be rewritten, and it cannot "
                           f"be: {blocker}")
            desc = activations.describe(*match.act)
            if why is not None:
                notes[match.gate] = f"the gated product it feeds was left: {why}"
                if match.up is not None:
                    notes[match.up] = notes[match.gate]
                continue
            block.gated.append(match)
            if up is None:
                half = "first" if match.gate_first else "second"
                self._record(gate, match.act, "fused", final=True,
                             note=f"packed gate and up projections (the gate is the {half} "
                                  f"half), {desc}(gate) * up in one op")
            else:
                self._record(gate, match.act, "fused", final=True,
                             note=f"gate of {desc}(gate) * up, with {self.name_of(up)}, in one op")
                self._record(up, None, "fused", final=True,
                             note=f"up projection of the gated op with {self.name_of(gate)}")
        return notes

    def _pair_at(self, m, node) -> Tuple[Optional[_Pair], Optional[str]]:
        """The activation fed by the Linear call `node`, if it is its only user."""
        users = list(node.users)
        lin = m.get_submodule(node.target)
        if not users:
            return None, "its output is not used"
        if len(users) > 1:
            return None, (f"its output has {len(users)} users "
                          f"({', '.join(_describe_node(m, u) for u in users)})")
        user = users[0]
        act, act_module, act_path = None, None, None
        if user.op == "call_module":
            act_module = m.get_submodule(user.target)
            if user.args == (node,) and not user.kwargs:
                act, act_path = self.module_activation(act_module), user.target
        elif user.op in ("call_function", "call_method") and user.args and user.args[0] is node \
                and not _uses(user.args[1:], user.kwargs, node):
            act = activations.from_call(user.op, user.target, tuple(user.args[1:]),
                                        dict(user.kwargs))
        if act is None and user.op == "output":
            return None, "its output is the forward's result: no activation follows it there"
        if act is None:
            return None, f"its output goes to {_describe_node(m, user)}, not a supported activation"
        return _Pair(node.target, lin, act, act_path, act_module if act_path else None,
                     (node, user)), None

    def _agree_across_variants(self, block, pair) -> Optional[str]:
        """The same pair, the same way, in every traced variant of the forward."""
        target = pair.linear_path
        for label, g in block.variants[1:]:
            if g is None:
                return f"{block.label}'s forward could not be traced {label}"
            nodes = [n for n in g.nodes if n.op == "call_module" and n.target == target]
            other = self._pair_at(block.module, nodes[0])[0] if len(nodes) == 1 else None
            same = other is not None and (other.act, other.act_path, other.nodes[1].op,
                                          other.nodes[1].target) == \
                (pair.act, pair.act_path, pair.nodes[1].op, pair.nodes[1].target)
            if not same:
                return (f"{block.label}'s forward takes another path {label} "
                        f"(the trace would not hold for every call)")
        return None

    def _swappable_path(self, m, path) -> bool:
        """Every module between m and path's end has one owner (so a swap changes only this)."""
        *prefix, _ = path.split(".")
        for i in range(len(prefix)):
            if len(self.owners.get(id(m.get_submodule(".".join(prefix[:i + 1]))), ())) != 1:
                return False
        return True

    def _act_in_place(self, m, pair) -> bool:
        """Whether the activation module can become nn.Identity where it is: called only here and
        owned only by one module (then the forward stays as it is)."""
        act = pair.act_module
        return (act is not None and self.calls[id(act)] == 1
                and len(self.owners.get(id(act), ())) == 1
                and self._swappable_path(m, pair.act_path))

    def _rewrite_blocker(self, block) -> Optional[str]:
        m = block.module
        if len(self.owners.get(id(m), ())) > 1:
            return f"it is shared (also {', '.join(self.names[id(m)][1:])})"
        found = _hooks(m)
        if found:
            return f"it has {', '.join(found)} registered"
        custom = [meth for meth in _STATE_METHODS
                  if getattr(type(m), meth, None) is not getattr(nn.Module, meth, None)
                  and not isinstance(m, fx.GraphModule)]
        if custom:
            return f"{type(m).__name__} defines its own {', '.join(custom)}"
        hazard = tracing.rewrite_hazard(m)
        if hazard is not None:
            return hazard
        if any(getattr(g, "sets_modes", False) for _, g in block.variants if g is not None):
            return ("its forward sets grad or autocast mode (torch.no_grad, torch.autocast, ...), "
                    "which torch.fx does not record")
        defaults, varargs = tracing.forward_optionals(m)
        if defaults or varargs:
            names = [f"{k}={v!r}" for k, v in defaults.items()] + [f"*{v}" for v in varargs]
            return f"its forward takes optional arguments ({', '.join(names)}), which a trace fixes"
        codes = {tracing.code(g) for _, g in block.variants if g is not None}
        if len(codes) > 1:
            return "its traced forward differs between training and eval mode or with/without grad"
        return None

    # ---------------------------------------------------------------- the report's blocks
    def block_entries(self) -> List[BlockEntry]:
        """A BlockEntry for every block that calls Linears, in module order."""
        members: Dict[int, List[str]] = {}
        for _, m in self.order:
            if id(m) in self.entries:
                caller = self.decided_by.get(id(m)) or self._caller_block(m)
                if caller is not None:
                    members.setdefault(id(caller.module), []).append(self.name_of(m))
        found = []
        for name, m in _tree_order(self.model):
            block = self.blocks.get(id(m))
            if block is None or id(m) not in members:
                continue
            untraceable = (self._untraceable_outcome(block) if block.kind == "untraceable"
                           else "")
            found.append(BlockEntry(name, type(m).__name__, self._block_summary(block),
                                    tuple(members[id(m)]), untraceable))
        return found

    def _block_summary(self, block) -> str:
        fused = [f"{activations.describe(*g.act)}(half of {g.gate}) * the other half, one "
                 f"gated op" if g.packed else
                 f"{activations.describe(*g.act)}({g.gate}) * {g.up}, one gated op"
                 for g in block.gated]
        fused += [f"{p.linear_path} + {activations.describe(*p.act)}"
                  for p in block.in_place + block.rewrite]
        done = f"fused {'; '.join(fused)}" if fused else "nothing fused"
        if block.kind == "untraceable":
            return f"could not be traced: {block.error}; {self._lost(block)}; {done}"
        if block.kind == "torch":
            return "torch's own module: its forward is not changed"
        if block.kind == "fused-mlp":
            return "a FusedMLP: fused already"
        return done

    # ---------------------------------------------------------------- pass 3: apply
    def apply(self) -> nn.Module:
        result = self.model
        for _, m in self.order:
            block = self.blocks.get(id(m))
            if block is None:
                continue
            for pair in block.in_place:
                _set_path(m, pair.linear_path, fused_from(pair.linear, *pair.act))
                _set_path(m, pair.act_path, _identity_like(pair.act_module))
            if block.rewrite or block.gated:
                new = self._rewritten(block)
                owners = self.owners.get(id(m), ())
                if owners:
                    owner, attr = owners[0]
                    owner._modules[attr] = new
                else:
                    result = new
        return result

    def _rewritten(self, block) -> "_FusedGraphModule":
        """block's module as a GraphModule of its traced forward with each rewrite pair's
        activation call removed (its users read the fused Linear call) and the Linear swapped."""
        m, graph = block.module, block.graph
        state = dict(m.__dict__)
        state["_modules"] = dict(m._modules)
        for pair in block.rewrite:
            lin_node, act_node = pair.nodes
            act_node.replace_all_uses_with(lin_node)
            graph.erase_node(act_node)
            _set_path_copying(state["_modules"], pair.linear_path,
                              fused_from(pair.linear, *pair.act))
        for match in block.gated:
            _replace_gated(m, graph, match)
        graph.lint()
        return _build_graph_module(state, graph, type(m).__name__)


def _own_children(m):
    """(name, module) of m's children, through ModuleList/ModuleDict containers."""
    for attr, child in m._modules.items():
        if child is None:
            continue
        if not _has_own_forward(child) and child._modules:
            yield from ((f"{attr}.{a}", c) for a, c in _own_children(child))
        else:
            yield attr, child


def _calls_hooked(*modules) -> bool:
    """Whether a call of these modules would run hooks (their own, or torch's global ones)."""
    return hooks.global_module_hook() is not None or any(
        hooks.registered(mod, hooks.CALL_HOOKS) for mod in modules)


def gated_projections(x, gate: nn.Module, up: nn.Module, activation) -> torch.Tensor:
    """What a rewritten forward computes for ``act(gate(x)) * up(x)``: the gated op on the two
    Linears' weights, or, while a call of them would run hooks (registered after fuse, such as
    tensor parallelism's input and output hooks, or torch's global module hooks), the Linears
    called as the original forward called them, so the hooks run and see what they saw."""
    if _calls_hooked(gate, up):
        name, alpha = activation
        return activations.get(name).torch_forward(gate(x), alpha) * up(x)
    return functional.gated_linear(x, gate.weight, up.weight, gate.bias, up.bias, activation)


def packed_gated_projection(x, proj: nn.Module, activation, gate_first: bool) -> torch.Tensor:
    """The same for ``g, u = proj(x).chunk(2, -1)`` and ``act(g) * u`` (gate_first) or
    ``act(u) * g``."""
    if _calls_hooked(proj):
        name, alpha = activation
        first, second = proj(x).chunk(2, -1)
        gate, up = (first, second) if gate_first else (second, first)
        return activations.get(name).torch_forward(gate, alpha) * up
    return functional.gated_linear_packed(x, proj.weight, proj.bias, activation, gate_first)


def _replace_gated(m, graph, match) -> None:
    """The gated product's nodes replaced by one call of gated_projections (or its packed form)
    on the Linear modules themselves (get_attr): the Linears stay in the module (state_dict
    unchanged), and are called only while they have hooks."""
    with graph.inserting_before(match.product):
        if match.packed:
            call = graph.call_function(packed_gated_projection, (
                match.input, graph.get_attr(match.gate), match.act, match.gate_first))
        else:
            call = graph.call_function(gated_projections, (
                match.input, graph.get_attr(match.gate), graph.get_attr(match.up), match.act))
    # fx's generated code then wraps the call (torch.fx.wrap): a re-trace of the rewritten
    # forward (unpickling re-traces it) keeps it one node instead of tracing into the op.
    call.meta["is_wrapped"] = True
    match.product.replace_all_uses_with(call)
    for node in match.nodes:
        graph.erase_node(node)


def _is_linear_like(m) -> bool:
    return isinstance(m, nn.Linear)


def _describe_node(m, node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(m.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the forward's result"  # among several users
    return node.op


def _identity_like(act: nn.Module) -> nn.Identity:
    ident = nn.Identity()
    ident.training = act.training
    return ident


def _set_path(root: nn.Module, path: str, new: nn.Module) -> None:
    *prefix, last = path.split(".")
    owner = root.get_submodule(".".join(prefix)) if prefix else root
    owner._modules[last] = new


def _set_path_copying(modules: dict, path: str, new: nn.Module) -> None:
    """Set path inside a copied _modules dict, copying each module on the way (their _modules
    dicts), so the original module tree is not changed."""
    first, *rest = path.split(".")
    if not rest:
        modules[first] = new
        return
    holder = _shallow_copy(modules[first])
    modules[first] = holder
    _set_path_copying(holder._modules, ".".join(rest), new)


def _shallow_copy(m: nn.Module) -> nn.Module:
    """Same type, same children, parameters and attributes, in dicts of its own (copy.copy would
    share them, and runs a GraphModule's pickling path)."""
    new = object.__new__(type(m))
    new.__dict__ = dict(m.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        new.__dict__[key] = dict(m.__dict__[key])
    return new


# --------------------------------------------------------------------------------------------
# The GraphModule that replaces a rewritten module
# --------------------------------------------------------------------------------------------
class _StateHolder(nn.Module):
    """An nn.Module whose __dict__ is given state: the root a GraphModule copies targets from."""

    def __init__(self, state):  # noqa: D107 - deliberately skips nn.Module.__init__'s fields
        self.__dict__ = state


def _build_graph_module(state: dict, graph: fx.Graph, class_name: str,
                        gm: Optional["_FusedGraphModule"] = None) -> "_FusedGraphModule":
    """A _FusedGraphModule running `graph` over the module state `state` (a module's __dict__);
    `gm` is a blank instance to initialise (deepcopy creates it first, for its memo)."""
    if gm is None:
        gm = _FusedGraphModule.__new__(_FusedGraphModule)
    fx.GraphModule.__init__(gm, _StateHolder(state), graph, class_name)
    d = gm.__dict__
    # fx.GraphModule keeps only what its graph references (and makes holder modules for dotted
    # targets): put back the module's own submodules, parameters and buffers, in their order.
    d["_modules"] = dict(state["_modules"])
    d["_parameters"] = dict(state["_parameters"])
    d["_buffers"] = dict(state["_buffers"])
    d["_non_persistent_buffers_set"] = set(state.get("_non_persistent_buffers_set", ()))
    d["training"] = state.get("training", True)
    for key, value in state.items():
        if not key.startswith("_") and key not in d and not hasattr(type(gm), key):
            d[key] = value
    return gm


class _FusedGraphModule(fx.GraphModule):
    """A module whose forward fuse rewrote. Unlike a plain fx.GraphModule it keeps all of the
    original module's state (not only what the graph references) through deepcopy and pickle,
    so a fused model's state_dict keys survive ``copy.deepcopy`` and ``torch.save``."""

    def __deepcopy__(self, memo):
        new = _FusedGraphModule.__new__(_FusedGraphModule)
        memo[id(self)] = new
        state = copy.deepcopy(self.__dict__, memo)
        return _build_graph_module(state, state["_graph"], type(self).__name__, new)

    def __reduce__(self):
        fn, args = super().__reduce__()
        return _unpickle_fused, (fn, args, type(self).__name__)


def _unpickle_fused(fn, args, class_name):
    plain = fn(*args)      # fx's own unpickling: re-traces the saved code
    state = dict(args[0])
    return _build_graph_module(state, plain.graph, class_name)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
def fuse(model: nn.Module, *, mlp: bool = False, verbose: bool = False,
         return_report: bool = False):
    """Fuse every Linear followed by a supported activation in `model`; return the fused model.

    Finds the pairs in nn.Sequentials and, by tracing with torch.fx, in custom forwards (activation
    modules and functional calls alike); see this module's docstring for what it rewrites and
    what it leaves. Parameters are shared with `model`, never copied; state_dict keys and
    ``named_parameters()`` are unchanged. Modules are changed in place where that suffices, but a
    module whose forward had to be rewritten is replaced by a torch.fx.GraphModule (also the model
    itself): always use the return value. The model passed in stays correct either way.

    mlp: first replace every nn.Sequential of Linear / supported activation / Identity modules
        with two or more Linears by a ``fastmlp.FusedMLP`` over the same modules (the whole stack
        in one autograd node; parameters shared, state_dict keys unchanged; see
        ``fastmlp.mlp_stacks.fuse_sequentials``), then fuse what is left pair by pair. A stack with a
        hook the FusedMLP would not run (on a layer, on the Sequential, or torch's global module
        hooks: ``fastmlp.nn.hook_blocker``) is left to the pair pass, which leaves a hooked
        Linear or activation as it is; the report's ``stacks`` say which stacks became FusedMLPs
        and why the others did not. Opt-in.
    verbose: print the report (every Linear, what it was fused with, or why it was left).
    return_report: return ``(fused_model, FuseReport)`` instead of the model alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastmlp.fuse: expected an nn.Module, got {type(model).__name__}")
    stacks = []
    if mlp:
        from fastmlp.mlp_stacks import stacks_to_fused_mlps

        model, outcomes = stacks_to_fused_mlps(model)
        stacks = [StackEntry(name, outcome) for name, outcome in outcomes]
    fuser = _Fuser(model)
    fuser.analyse()
    fuser.decide()
    report = FuseReport((fuser.entries[id(m)] for _, m in _tree_order(model)
                         if id(m) in fuser.entries), stacks, fuser.block_entries())
    result = fuser.apply()
    if verbose:
        print(report)
    return (result, report) if return_report else result


def _tree_order(model):
    seen = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) not in seen:
            seen.add(id(m))
            yield name, m
