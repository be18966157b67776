"""Sharding rules for fastmlp's custom ops, so tensor parallel (DTensor) runs the fused kernels.

Why. ``parallelize_module`` (ColwiseParallel, RowwiseParallel, torchtitan's plans) turns a
layer's weight and its input into DTensors, and every op they meet must tell DTensor which
input placements it can compute on and what its outputs then are. torch's own ops have such
rules; a custom op has none until one is registered ("Operator fastmlp.linear_act.default does
not have a sharding strategy registered"). On the torch backend fastmlp calls torch's ops and
DTensor's rules apply; on the Triton backend (every GPU) the DTensors reach fastmlp's ops:
``fastmlp.ops._call`` takes the registered op for tensor subclasses, and the autograd Functions
(FusedLinearFunction, the FusedMLP op's autograd) get DTensors in forward and in backward.

The rules, per mesh dimension (``register_sharding`` expands them over every dimension of the
mesh; DTensor picks the one needing the least communication and redistributes the inputs to
it). Notation: R Replicate, S(d) Shard(d), P Partial (a sum still to be all-reduced). X [M, K]
rows, W [N, K] (nn.Linear layout), b [N], Y = act(X Wᵀ + b) [M, N], G = dL/dY.

``fastmlp::linear_act`` (X, W, b) -> Y (and Z, the pre-activation, where saved):
  * R, R, R -> R: replicated;
  * S(0), R, R -> S(0): the rows sharded (data parallel with DTensors, sequence parallel on
    2-D rows);
  * R, S(0), S(0) -> S(1): column-parallel; the activation is per output column, so it is
    applied locally;
  * S(1), S(1), P -> P: row-parallel, offered only for activation "none": an activation of a
    partial sum is not the activation of the sum (relu(a) + relu(b) != relu(a + b)), so it
    must come after the all-reduce. For any other activation DTensor gets no such rule and
    gathers what another rule needs instead: correct, but the layer is then not parallel, so
    a warning says how to fix the model. The bias enters the partial sum as b / n per rank
    (DTensor's Replicate -> Partial), as torch's addmm rule does.
``fastmlp::linear_act_grad_input`` (G, saved, W) -> dX = act'(G) W:
  R -> R; S(0), S(0), R -> S(0); S(1), S(1), S(0) -> P (column-parallel: the sum over N is
  split); R, R, S(1) -> S(1) (row-parallel); P, R, R -> P (act'(G) is linear in G for fixed
  saved). For "none" saved is G itself, unread, and follows G's placement.
``fastmlp::linear_act_grad_weight`` (G, saved, X) -> dW = act'(G)ᵀ X, db = Σ_rows act'(G):
  R -> R, R; S(0), S(0), S(0) -> P, P (the sum over rows is split); S(1), S(1), R -> S(0),
  S(0) (column-parallel); R, R, S(1) -> S(1), R (row-parallel); P, R, R -> P, P. A gradient
  not asked for is an empty (0,) tensor: replicated.
``fastmlp::mlp`` / ``fastmlp::mlp_backward`` (FusedMLP: the whole stack in one op): replicated,
  or the rows sharded with every weight and bias replicated (S(0) input: Y S(0), the saved
  activations [L, M, H] S(1), the weight gradients P). A weight sharded across ranks cannot be
  computed on by one op over the whole stack: that is an error naming the plan that works
  (:func:`check_fused_mlp`, also called by FusedMLP itself, whose layers' TP hooks would not run).

The ops take 2-D rows: FusedLinearFunction reshapes an [..., K] input with ``_rows`` before the
op and the output back after it, and DTensor's view rules carry the placements through: a
sharded leading (batch) dimension stays Shard(0) of the rows, a sharded last dimension stays
the last, but a sharded middle dimension ([batch, seq, dim] as Shard(1)) cannot be expressed
on the flattened rows, so DTensor gathers it there (correct, not parallel; tensor-parallel
plans gather it before a column-parallel layer anyway). A DTensor mixed with plain tensors is
refused before any kernel sees it (:func:`check_mixed`), as DTensor's own ops refuse it.

Registration happens once torch.distributed.tensor is imported (:func:`install`): importing it
costs ~0.7 s, which ``import fastmlp`` must not pay for processes that never use DTensor.

The non-tensor arguments (activation, alpha, the flags) decide the rule, so they are part of
DTensor's cache key here: ``register_sharding`` keys only on int arguments, which these ops do
not have, and would otherwise reuse the rule of the first call (a row-parallel "none" layer's
Partial output) for a later call with another activation.

torch versions: ``torch.distributed.tensor.experimental.register_sharding`` (public,
experimental) and ``ShardingPropagator.op_to_schema_info`` (private). Tested on torch 2.13
only (CPU, gloo); the GPU machine's 2.11 is untested. The FusedMLP ops take lists of weights,
whose strategies DTensor flattens only in torches where TupleStrategy is a pytree node (about
2.9 on); the per-layer ops do not need that. Should a torch lack either API, registration
warns instead of breaking the import of torch.distributed.tensor, and no rule is registered;
``check_activated_output`` refuses an activated Partial output should the cache key override
not take effect.
"""

import importlib.abc
import importlib.util
import sys
import threading
import warnings

import torch

__all__ = ["install", "check_mixed", "check_fused_mlp", "check_fused_mlp_module", "TP_PLAN_HINT"]

_DTENSOR = "torch.distributed.tensor"
_lock = threading.Lock()
_installed = False

TP_PLAN_HINT = (
    "FusedMLP computes its whole stack in one op, without calling its layers (so hooks that "
    "parallelize_module or fully_shard put on them never run), and takes replicated weights "
    "only, with a replicated or batch-sharded (Shard(0)) input: DDP, fully_shard on the FusedMLP "
    "as a whole (FSDP2 gathers its weights before the forward), or DTensors with replicated "
    "weights. For tensor parallel, fuse the layers pair by pair instead (fastmlp.fuse(model) "
    "without mlp=True, or FusedLinear modules) and give those layers the plan: ColwiseParallel "
    "on a Linear with an activation, RowwiseParallel on one without")


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------
def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Replicate(), Shard(0), Shard(1), Partial()


def _is_sharded(spec) -> bool:
    return spec is not None and any(not p.is_replicate() for p in spec.placements)


def _saved_by(activation: str, alpha: float) -> str:
    from fastmlp import activations

    return activations.get(activation).saves(alpha)


_warned = set()


def _warn_row_parallel_activation(x, weight, activation):
    """A row-parallel weight (S(1)) with a column-sharded input and an activation: say once
    that DTensor is gathering instead of computing in parallel, and what plan would."""
    from torch.distributed.tensor import Shard

    def shard1(spec):
        return any(isinstance(p, Shard) and p.dim in (1, -1) for p in spec.placements)

    if shard1(x) and shard1(weight) and activation not in _warned:
        _warned.add(activation)
        warnings.warn(
            f"fastmlp: a row-parallel layer (weight Shard(1)) with activation {activation!r}: "
            f"the activation of a partial sum is not the activation of the sum, so DTensor "
            f"gathers the inputs and the layer runs unsharded. Give RowwiseParallel to a layer "
            f"without an activation (fastmlp.fuse leaves the last Linear of a block as it is) "
            f"and apply the activation after it", RuntimeWarning, stacklevel=2)


def _linear_act_rule(x, weight, bias, activation, alpha, save_preact):
    R, S0, S1, P = _placements()
    has_bias = bias is not None

    def rule(y, xp, wp, bp):
        return [y, y if save_preact else R], [xp, wp] + ([bp] if has_bias else [])

    rules = [rule(R, R, R, R), rule(S0, S0, R, R), rule(S1, R, S0, S0)]
    if activation == "none":
        rules.append(rule(P, S1, S1, P))
    else:
        _warn_row_parallel_activation(x, weight, activation)
    return rules


def _grad_input_rule(grad, saved, weight, activation, alpha):
    R, S0, S1, P = _placements()
    unread = activation == "none"   # saved is G itself then (fastmlp.ops.linear_act_backward)

    def rule(dx, g, s, w):
        return [dx], [g, g if unread else s, w]

    return [rule(R, R, R, R), rule(S0, S0, S0, R), rule(P, S1, S1, S0), rule(S1, R, R, S1),
            rule(P, P, R, R)]


def _grad_weight_rule(grad, saved, x, activation, alpha, compute_weight, compute_bias):
    R, S0, S1, P = _placements()
    unread = activation == "none"

    def rule(dw, db, g, s, xp):
        return ([dw if compute_weight else R, db if compute_bias else R],
                [g, g if unread else s, xp])

    return [rule(R, R, R, R, R), rule(P, P, S0, S0, S0), rule(S0, S0, S1, S1, R),
            rule(S1, R, R, R, S1), rule(P, P, P, R, R)]


def _dtensor_class():
    """DTensor, or None while torch.distributed.tensor is not imported (then none can exist,
    and the checks below cost one dict lookup)."""
    module = sys.modules.get(_DTENSOR)
    return getattr(module, "DTensor", None)


def check_mixed(where: str, **tensors) -> None:
    """A TypeError if some of the tensors are DTensors and others plain tensors.

    DTensor's own ops refuse such a mix; fastmlp's kernels would be handed a DTensor (a
    wrapper without the whole tensor's storage) for a plain one, so the mix is refused first.
    """
    dtensor = _dtensor_class()
    if dtensor is None:
        return
    kinds = {name: isinstance(t, dtensor) for name, t in tensors.items() if t is not None}
    if len(set(kinds.values())) > 1:
        dist = [n for n, k in kinds.items() if k]
        plain = [n for n, k in kinds.items() if not k]
        are_dist = "is a DTensor" if len(dist) == 1 else "are DTensors"
        are_plain = "is a plain tensor" if len(plain) == 1 else "are plain tensors"
        raise TypeError(
            f"fastmlp {where}: {', '.join(dist)} {are_dist} but {', '.join(plain)} {are_plain}; "
            f"make them all DTensors (distribute_tensor, DTensor.from_local, or "
            f"parallelize_module, whose input hooks convert a layer's input)")


def check_activated_output(y, activation: str) -> None:
    """A RuntimeError if the DTensor output of an activated layer is a Partial sum: the
    activation was applied to partial sums, a wrong result. The rules never produce one (the
    Partial rule is for "none" only, and the cache key holds the activation); this guard makes
    a torch in which that key override did not take effect fail loudly instead."""
    if activation != "none" and any(p.is_partial() for p in y.placements):
        raise RuntimeError(
            f"fastmlp linear: DTensor gave an activated ({activation}) layer a Partial output "
            f"{tuple(y.placements)}, which would be the activation of partial sums; the "
            f"sharding rules are not in effect in this torch. {TP_PLAN_HINT}")


def check_fused_mlp(weights, biases, x=None) -> None:
    """Raise a ValueError naming the plan that works if a FusedMLP weight or bias is sharded
    (a DTensor with a non-Replicate placement, e.g. from a tensor-parallel plan on its layers:
    FusedMLP does not run its layers' forward, so their TP hooks never would), and check_mixed's
    TypeError for DTensor parameters with a plain input."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return
    for i, (w, b) in enumerate(zip(weights, list(biases) + [None] * len(weights))):
        for what, t in (("weight", w), ("bias", b)):
            if isinstance(t, dtensor) and any(not p.is_replicate() for p in t.placements):
                raise ValueError(
                    f"fastmlp FusedMLP: layer {i}'s {what} is a DTensor sharded as "
                    f"{tuple(t.placements)} (a tensor-parallel plan?). {TP_PLAN_HINT}")
    if x is not None:
        named = {f"layer {i}'s weight": w for i, w in enumerate(weights)}
        check_mixed("FusedMLP", input=x, **named)


def check_fused_mlp_module(mlp) -> None:
    """check_fused_mlp for a FusedMLP's current layers (what its torch path runs)."""
    if _dtensor_class() is None:
        return
    linears = mlp._plan()[0]
    check_fused_mlp([lin.weight for lin in linears], [lin.bias for lin in linears])


def _refuse_sharded_weights(weights, biases, op):
    for i, (w, b) in enumerate(zip(weights, list(biases) + [None] * len(weights))):
        for what, spec in (("weight", w), ("bias", b)):
            if _is_sharded(spec):
                raise ValueError(
                    f"fastmlp {op}: layer {i}'s {what} is sharded as {tuple(spec.placements)}. "
                    f"{TP_PLAN_HINT}")


def _mlp_rule(x, weights, biases, activation, alpha, out_activation, out_alpha, save):
    _refuse_sharded_weights(weights, biases, "FusedMLP (fastmlp::mlp)")
    R, S0, S1, P = _placements()
    params = len(weights) + len(biases)
    z_out = save and _saved_by(out_activation, out_alpha) == "preact"
    return [([R, R, R], [R] * (1 + params)),
            ([S0, S1 if save else R, S0 if z_out else R], [S0] + [R] * params)]


def _mlp_backward_rule(grad, x, weights, saved, s_out, activation, alpha, out_activation,
                       out_alpha, needs):
    _refuse_sharded_weights(weights, (), "FusedMLP (fastmlp::mlp_backward)")
    R, S0, S1, P = _placements()
    has_saved = saved.ndim == 3   # [L, M, H]: M is dim 1

    def inputs(rows):   # grad, x, weights..., saved, s_out (if any)
        return ([rows, rows] + [R] * len(weights) + [S1 if rows is S0 and has_saved else R]
                + ([] if s_out is None else [rows]))

    return [([R] * 7, inputs(R)),
            ([S0 if needs[0] else R] + [P if n else R for n in needs[1:]], inputs(S0))]


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
def _static_argnum(op) -> int:
    """Index of the op's first argument that is not a tensor (or list of tensors)."""
    for i, arg in enumerate(op._schema.arguments):
        t = arg.type
        if isinstance(t, torch.OptionalType):
            t = t.getElementType()
        if isinstance(t, torch.ListType):
            t = t.getElementType()
        if not isinstance(t, torch.TensorType):
            return i
    return len(op._schema.arguments)


def _register():
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    import fastmlp.mlp  # noqa: F401  (registers fastmlp::mlp, mlp_backward)
    import fastmlp.ops  # noqa: F401  (registers fastmlp::linear_act, ...)

    ops = torch.ops.fastmlp
    rules = {ops.linear_act.default: _linear_act_rule,
             ops.linear_act_grad_input.default: _grad_input_rule,
             ops.linear_act_grad_weight.default: _grad_weight_rule,
             ops.mlp.default: _mlp_rule,
             ops.mlp_backward.default: _mlp_backward_rule}
    # Every private piece is looked up before the first rule is registered: a torch without
    # one gets no rules at all (DTensor's clear "no sharding strategy" error), never rules
    # whose cache key ignores the activation.
    propagator = DTensor._op_dispatcher.sharding_propagator
    schema_info = propagator.op_to_schema_info
    static_argnums = {op: _static_argnum(op) for op in rules}
    for op, rule in rules.items():
        register_sharding(op)(rule)
        # key DTensor's sharding cache on the non-tensor arguments too (see module docstring)
        schema_info[op] = RuntimeSchemaInfo(static_argnums[op], needs_pytree=True)


def install() -> None:
    """Register the rules now if torch.distributed.tensor is imported, else when it is.

    Called by ``import fastmlp``. Does nothing where torch has no distributed support.
    """
    if not torch.distributed.is_available():
        return
    if _DTENSOR in sys.modules and getattr(sys.modules[_DTENSOR], "DTensor", None) is not None:
        _register_once()
        return
    with _lock:
        if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport())


def _register_once():
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    try:
        _register()
    except Exception as exc:  # noqa: BLE001 - a torch without these APIs must still import
        warnings.warn(f"fastmlp: could not register the sharding rules of its ops with DTensor "
                      f"({type(exc).__name__}: {exc}); tensor-parallel layers on the Triton "
                      f"backend will fail", RuntimeWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Registers the rules right after torch.distributed.tensor has been imported (its
    __init__ run to the end), then leaves sys.meta_path."""

    def find_spec(self, name, path=None, target=None):
        if name != _DTENSOR:
            return None
        try:
            sys.meta_path.remove(self)   # let the other finders find the real module
        except ValueError:
            return None                  # another thread's import got here first
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_once()

        spec.loader.exec_module = exec_then_register
        return spec
