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

``fastmlp::gated_linear`` (X, W_g, W_u, b_g, b_u) -> Y = act(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u),
  and G, U (where saved): R -> R; S(0), R, R -> S(0) (rows); R, S(0), S(0) -> S(1)
  (column-parallel: gate and up weights and biases sharded alike on the hidden dimension, so
  each rank holds matching gate and up rows, and act(G) ⊙ U, elementwise in hidden, is computed
  locally). No strategy ever gives a Partial: with in_features sharded (W S(1), X S(1)) G and U
  would be partial sums, and neither act(G) nor a product of two partial sums is the partial
  sum of anything, so DTensor gathers instead (correct, not parallel), with a warning.
``fastmlp::gated_linear_grad_input`` (dY, G, U, W_g, W_u) -> dX = dG W_g + dU W_u:
  R -> R; S(0), S(0), S(0), R -> S(0); S(1), S(1), S(1), S(0) -> P (hidden sharded: the sum
  over it is split); R, R, R, S(1) -> S(1) (in_features sharded: dX's columns are local);
  P, R, R, R -> P (dG and dU are linear in dY for fixed G and U).
``fastmlp::gated_linear_grad_weight`` (dY, G, U, X) -> dW_g, db_g, dW_u, db_u:
  R -> R; S(0) everywhere -> P (the sum over rows is split); S(1), S(1), S(1), R -> S(0)
  (column-parallel); R, R, R, S(1) -> dW S(1), db R; P, R, R, R -> P.
``fastmlp::gated_linear_packed`` (X, W [2H, K], b [2H]) and
``fastmlp::gated_linear_packed_grad_weight`` (dY, G, U, X) -> dW [2H, K], db [2H]: the same
  rules without the column-parallel one. A packed weight sharded Shard(0) on its 2H rows puts
  the gate rows on some ranks and the up rows on others (two ranks: all gates on rank 0, all
  ups on rank 1), so no rank can form act(G) ⊙ U for its rows; and hidden-sharded G, U would
  give each rank [its gate rows; its up rows] of dW, which is no Shard(0) of the packed
  gradient. fastmlp.functional.gated_linear_packed therefore replicates such a weight (and
  bias) before the op, with a warning saying so and what shards instead
  (:func:`replicate_packed`: DTensor's differentiable redistribute, so the gradient comes back
  Shard(0) like the Parameter); called directly, the op offers no sharded-weight strategy and
  DTensor gathers. dX of the packed form is ``gated_linear_grad_input`` on the weight's halves.

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

__all__ = ["install", "check_mixed", "check_fused_mlp", "check_fused_mlp_module", "TP_PLAN_HINT",
           "GATED_PLAN_HINT", "check_gated_output", "replicate_packed"]

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


def _is_shard_of(placement, dims) -> bool:
    from torch.distributed.tensor import Shard

    return isinstance(placement, Shard) and placement.dim in dims


def _shards_dim(spec, dims) -> bool:
    """Whether a DTensor (or DTensor's spec of one) is sharded on one of `dims` (a dimension
    and its negative spelling) on some mesh dimension."""
    return spec is not None and any(_is_shard_of(p, dims) for p in spec.placements)


def _warn_gated_gathered(reason: str) -> None:
    """Say once per reason that DTensor is gathering a gated op's inputs (correct, not
    parallel), and what plan would be parallel."""
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"fastmlp gated_linear: {reason}, so DTensor gathers the inputs and the op "
                  f"runs unsharded. {GATED_PLAN_HINT}", RuntimeWarning, stacklevel=3)


GATED_PLAN_HINT = (
    "For tensor parallel, shard the gate and up weights (and biases) each Shard(0) on hidden "
    "with a replicated input (column-parallel: the output is Shard on its last dimension), and "
    "give the down projection after the product the row-parallel plan")

_IN_FEATURES_SHARDED = ("in_features is sharded (weights Shard(1)): the gate and up "
                        "projections would be partial sums, and the activation of a partial sum "
                        "is not the activation of the sum")
_PACKED_ROWS_SHARDED = ("the packed [2 * hidden, in_features] weight is sharded on its rows "
                        "(Shard(0)): each rank holds a contiguous block of the 2 * hidden rows, "
                        "so gate and up rows are not paired on any rank")


def _gated_rule(x, gate_weight, up_weight, gate_bias, up_bias, activation, alpha, save):
    R, S0, S1, P = _placements()
    n_biases = (gate_bias is not None) + (up_bias is not None)
    if _shards_dim(gate_weight, (1, -1)) or _shards_dim(up_weight, (1, -1)):
        _warn_gated_gathered(_IN_FEATURES_SHARDED)

    def rule(y, xp, wp, bp):
        saved = y if save else R
        return [y, saved, saved], [xp, wp, wp] + [bp] * n_biases

    return [rule(R, R, R, R), rule(S0, S0, R, R), rule(S1, R, S0, S0)]


def _gated_grad_input_rule(grad, g, u, gate_weight, up_weight, activation, alpha):
    R, S0, S1, P = _placements()

    def rule(dx, gp, wp):
        return [dx], [gp, gp, gp, wp, wp]

    return [rule(R, R, R), rule(S0, S0, R), rule(P, S1, S0), rule(S1, R, S1),
            ([P], [P, R, R, R, R])]


def _gated_grad_weight_rule(grad, g, u, x, activation, alpha, gate_weight, gate_bias, up_weight,
                            up_bias):
    R, S0, S1, P = _placements()

    def rule(dw, db, gp, xp, partial_grad=False):
        return ([dw if gate_weight else R, db if gate_bias else R, dw if up_weight else R,
                 db if up_bias else R], [P if partial_grad else gp, gp, gp, xp])

    return [rule(R, R, R, R), rule(P, P, S0, S0), rule(S0, S0, S1, R), rule(S1, R, R, S1),
            rule(P, P, R, R, partial_grad=True)]


def _gated_packed_rule(x, weight, bias, activation, alpha, gate_first, save):
    R, S0, S1, P = _placements()
    if _shards_dim(weight, (0, -2)) or _shards_dim(bias, (0, -1)):
        _warn_gated_gathered(_PACKED_ROWS_SHARDED)
    elif _shards_dim(weight, (1, -1)):
        _warn_gated_gathered(_IN_FEATURES_SHARDED)

    def rule(y, xp):
        saved = y if save else R
        return [y, saved, saved], [xp, R] + ([R] if bias is not None else [])

    return [rule(R, R), rule(S0, S0)]


def _gated_packed_grad_weight_rule(grad, g, u, x, activation, alpha, gate_first, weight, bias):
    R, S0, S1, P = _placements()

    def rule(dw, db, gp, xp, partial_grad=False):
        return ([dw if weight else R, db if bias else R], [P if partial_grad else gp, gp, gp, xp])

    return [rule(R, R, R, R), rule(P, P, S0, S0), rule(S1, R, R, S1),
            rule(P, P, R, R, partial_grad=True)]


def replicate_packed(weight, bias):
    """(weight, bias) of the packed gated form with any Shard(0) of their 2H rows replaced by
    Replicate (DTensor's redistribute: an all-gather, differentiable, so their gradients come
    back in the Parameters' own placements), warning once why (_PACKED_ROWS_SHARDED). Other
    placements are left to the op's rules."""
    from torch.distributed.tensor import Replicate

    def rows_replicated(t, dims):
        if t is None or not _shards_dim(t, dims):
            return t
        placements = [Replicate() if _is_shard_of(p, dims) else p for p in t.placements]
        return t.redistribute(t.device_mesh, placements)

    if _shards_dim(weight, (0, -2)) or _shards_dim(bias, (0, -1)):
        _warn_gated_gathered(_PACKED_ROWS_SHARDED)
    return rows_replicated(weight, (0, -2)), rows_replicated(bias, (0, -1))


def check_gated_output(y, where: str) -> None:
    """A RuntimeError if a gated op's DTensor output is a Partial sum (act(G) ⊙ U of partial
    sums: a wrong result). The rules never give one; this makes a torch in which the rules'
    cache key override did not take effect fail loudly instead."""
    if type(y) is torch.Tensor or not any(p.is_partial() for p in getattr(y, "placements", ())):
        return
    raise RuntimeError(f"fastmlp {where}: DTensor gave the gated op a Partial output "
                       f"{tuple(y.placements)}, which would be computed from partial sums; the "
                       f"sharding rules are not in effect in this torch. {GATED_PLAN_HINT}")


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

    import fastmlp.gated  # noqa: F401  (registers fastmlp::gated_linear, ...)
    import fastmlp.mlp  # noqa: F401  (registers fastmlp::mlp, mlp_backward)
    import fastmlp.ops  # noqa: F401  (registers fastmlp::linear_act, ...)

    ops = torch.ops.fastmlp
    rules = {ops.linear_act.default: _linear_act_rule,
             ops.linear_act_grad_input.default: _grad_input_rule,
             ops.linear_act_grad_weight.default: _grad_weight_rule,
             ops.mlp.default: _mlp_rule,
             ops.mlp_backward.default: _mlp_backward_rule,
             ops.gated_linear.default: _gated_rule,
             ops.gated_linear_grad_input.default: _gated_grad_input_rule,
             ops.gated_linear_grad_weight.default: _gated_grad_weight_rule,
             ops.gated_linear_packed.default: _gated_packed_rule,
             ops.gated_linear_packed_grad_weight.default: _gated_packed_grad_weight_rule}
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
