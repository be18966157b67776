"""Fused modules on PyTorch's scale-out engines, in processes on gloo (CPU): tensor parallel
(DTensor, through the sharding rules of fastmlp/sharding.py), FSDP2 (``fully_shard``) with
fastmlp.fit, and both on a 2-D mesh. DDP is tests/test_distributed.py.

Both backends: the kernels' path (Triton's interpreter; FASTMLP_BACKEND=triton and
FASTMLP_POISON_OUTPUTS=1 in the children, so an output element a kernel leaves unwritten is NaN)
and the torch path (FASTMLP_BACKEND=torch: torch's ops, which DTensor has rules for).

Starting processes and importing torch, DTensor and triton in them costs seconds, a case on these
shapes a fraction of one, so one process group per backend (two ranks; four for the 2-D mesh)
runs every case of this file: each case catches its own error, the ranks save what they computed
(the initial state, the inputs, outputs and gradients as whole tensors), and the tests here
compare that, rank by rank, with the same model unsharded in one process in float64.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp.cpu_step import python_hooks
from reference import assert_close, autograd_nodes, case_seed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed"),
]

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = [
    pytest.param("triton", id="triton-interpreter",
                 marks=pytest.mark.skipif(not INTERPRETER, reason="Triton interpreter is off")),
    pytest.param("torch", id="torch"),
]
F32 = torch.float32
LAUNCH_TIMEOUT_S = 900


# --------------------------------------------------------------------------------------------
# The models (built the same way in the workers and for the references here)
# --------------------------------------------------------------------------------------------
# Hidden widths are even: tensor parallel's module hooks rebuild a DTensor from each rank's
# local activation (DTensor.from_local) assuming even shards.
def _mlp():
    """Linear + GELU (fuse makes it one FusedLinear: column-parallel) then a FusedLinear without
    activation (row-parallel)."""
    return nn.Sequential(nn.Linear(6, 10), nn.GELU(), fastmlp.FusedLinear(10, 5))


def _mlp_no_bias():
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), fastmlp.FusedLinear(10, 5, bias=False))


class Llama(nn.Module):
    """Llama's feed-forward, w2(silu(w1(x)) * w3(x)): fuse makes silu(w1(x)) * w3(x) one call
    (fastmlp.fusion.gated_projections: the gated op on w1's and w3's weights, or, while they
    have hooks, w1 and w3 called as written); w2 is a FusedLinear without activation."""

    def __init__(self, dim=6, hidden=10, fused=True):
        super().__init__()
        linear = fastmlp.FusedLinear if fused else nn.Linear
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = linear(dim, hidden, bias=False)
        self.w2 = linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _fused_mlp():
    return fastmlp.FusedMLP(6, [8, 8], 3, activation="relu")


def _train_model():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


def _tp_train_model(fused=True):
    """For the 2-D mesh: a column-parallel Linear + ReLU, a row-parallel FusedLinear."""
    last = fastmlp.FusedLinear if fused else nn.Linear
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), last(8, 3))


def _train_data():
    g = torch.Generator().manual_seed(case_seed("sharding", "train data"))
    return torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)


TRAIN = dict(batch=4, epochs=2, seed=3, lr=0.1, momentum=0.9)


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
def _whole(t):
    """A plain tensor holding the whole value: DTensors gathered (Partial ones reduced)."""
    if t is None:
        return None
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().clone() * 1   # * 1: an AsyncCollectiveTensor waits and becomes plain


def _grads(model):
    return {n: _whole(p.grad) for n, p in model.named_parameters()}


def _state(model):
    return {k: _whole(v) for k, v in model.state_dict().items()}


def _forward_backward(model, x, g):
    y = model(x)
    (y * g).sum().backward()
    return y


def _plans():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return ColwiseParallel, RowwiseParallel


def case_tp_mlp(mesh, rank):
    """ColwiseParallel on the fused Linear+GELU, RowwiseParallel on the FusedLinear; 3-D
    input that needs its gradient."""
    from torch.distributed.tensor.parallel import parallelize_module

    Col, Row = _plans()
    torch.manual_seed(case_seed("tp", "mlp"))
    model = _mlp()
    init = _state(model)
    x = torch.randn(2, 3, 6, requires_grad=True)
    g = torch.randn(2, 3, 5)
    fused = fastmlp.fuse(model)
    parallelize_module(fused, mesh, {"0": Col(), "2": Row()})
    y = _forward_backward(fused, x, g)
    return dict(init=init, x=x.detach(), g=g, y=_whole(y), dx=_whole(x.grad), grads=_grads(fused),
                layers=[repr(m) for m in fused], hook=python_hooks(fused))


def case_sp_mlp_frozen(mesh, rank):
    """Sequence parallel on 2-D rows (each rank holds 4 of the 8 rows: Shard(0) in, Shard(0)
    out), layer 0's weight frozen, no bias on the row-parallel layer, input without grad."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import parallelize_module

    Col, Row = _plans()
    torch.manual_seed(case_seed("sp", "mlp frozen"))
    model = _mlp_no_bias()
    model[0].weight.requires_grad_(False)
    init = _state(model)
    x, g = torch.randn(8, 6), torch.randn(8, 5)
    fused = fastmlp.fuse(model)
    parallelize_module(fused, mesh, {"0": Col(input_layouts=Shard(0)),
                                     "2": Row(output_layouts=Shard(0))})
    rows = slice(4 * rank, 4 * rank + 4)
    y = _forward_backward(fused, x[rows], g[rows])
    return dict(init=init, x=x, g=g, y=_whole(y), rows=(rows.start, rows.stop), grads=_grads(fused),
                layers=[repr(m) for m in fused])


def _llama_plan(sequence_parallel):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    Col, Row = _plans()
    plan = {"w1": Col(), "w3": Col(), "w2": Row(output_layouts=Shard(1)) if sequence_parallel
            else Row()}
    if sequence_parallel:   # torchtitan's: the block takes sequence shards, gathers them first
        plan[""] = PrepareModuleInput(input_layouts=(Shard(1),),
                                      desired_input_layouts=(Replicate(),))
    return plan


def _case_llama(mesh, rank, sequence_parallel):
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(case_seed("tp", "llama", sequence_parallel))
    block = Llama()
    init = _state(block)
    x = torch.randn(2, 4, 6)
    g = torch.randn(2, 4, 6)
    fused = fastmlp.fuse(block)
    plan = _llama_plan(sequence_parallel)
    prepare = plan.pop("", None)
    if prepare is not None:
        parallelize_module(fused, mesh, prepare)
    parallelize_module(fused, mesh, plan)
    seq = slice(2 * rank, 2 * rank + 2) if sequence_parallel else slice(0, 4)
    xin = x[:, seq].clone().requires_grad_()
    y = _forward_backward(fused, xin, g[:, seq])
    return dict(init=init, x=x, g=g, y=_whole(y), dx=_whole(xin.grad), seq=(seq.start, seq.stop),
                grads=_grads(fused), code=fused.code)


def case_tp_llama(mesh, rank):
    """gate and up column-parallel, down row-parallel, the block's input replicated."""
    return _case_llama(mesh, rank, sequence_parallel=False)


def case_sp_llama(mesh, rank):
    """The same with torchtitan's sequence parallel: [batch, seq, dim] inputs and outputs
    sharded on the sequence (Shard(1))."""
    return _case_llama(mesh, rank, sequence_parallel=True)


def case_rowwise_activation(mesh, rank):
    """RowwiseParallel on FusedLinears with and without an activation, same shapes, one after
    the other: "none" computes a Partial output; relu must not (DTensor gathers instead, with
    a warning), also when the "none" call's sharding decision is in DTensor's cache."""
    from torch.distributed.tensor.parallel import parallelize_module

    _, Row = _plans()
    torch.manual_seed(case_seed("tp", "rowwise activation"))
    layers = {act: fastmlp.FusedLinear(10, 5, activation=act) for act in ("none", "relu")}
    init = {act: _state(m) for act, m in layers.items()}
    x = torch.randn(4, 10)
    g = torch.randn(4, 5)
    out = {}
    for act, layer in layers.items():
        parallelize_module(layer, mesh, Row())
        local = x[:, 5 * rank:5 * rank + 5]   # the input's Shard(1)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            y = _forward_backward(layer, local, g)
        out[act] = dict(y=_whole(y), grads=_grads(layer),
                        warned=[str(w.message) for w in seen if "row-parallel" in str(w.message)])
    return dict(init=init, x=x, g=g, out=out)


def case_partial_grad(mesh, rank):
    """Fused layers (replicated weights and input) whose output meets a weight sharded on its
    columns: the gradient arriving at the fused layer is Partial, and the backward rules take
    it as it is (the activation's derivative is linear in G), leaving the weight gradients
    Partial. "none" too, where the gradient stands in for the unread saved tensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    out = {}
    for act in ("gelu", "none"):
        torch.manual_seed(case_seed("partial grad", act))
        layer = fastmlp.FusedLinear(6, 8, activation=act)
        init = _state(layer)
        x, w, g = torch.randn(5, 6), torch.randn(8, 4), torch.randn(5, 4)
        distribute_module(layer, mesh)
        xd = distribute_tensor(x, mesh, [Replicate()]).requires_grad_()
        wd = distribute_tensor(w, mesh, [Shard(1)])
        y = layer(xd) @ wd
        (y * distribute_tensor(g, mesh, y.placements)).sum().backward()
        out[act] = dict(init=init, x=x, w=w, g=g, y=_whole(y), dx=_whole(xd.grad),
                        grads=_grads(layer),
                        grad_placements=repr(layer.weight.grad.placements))
    return out


def _rows_model():
    return nn.Sequential(fastmlp.FusedLinear(6, 8, activation="gelu"),
                         fastmlp.FusedLinear(8, 3, bias=False, activation="sigmoid"))


def case_linear_rows(mesh, rank):
    """Fused layers with replicated DTensor weights and 3-D DTensor inputs: the batch sharded
    (Shard(0): the rows stay sharded through the layers' [..., K] -> rows reshape, the weight
    gradients are Partial) and the sequence sharded (Shard(1): that reshape gathers it;
    correct, not parallel)."""
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

    out = {}
    for dim in (0, 1):
        torch.manual_seed(case_seed("rows", dim))
        model = _rows_model()
        init = _state(model)
        x, g = torch.randn(4, 6, 6), torch.randn(4, 6, 3)
        distribute_module(model, mesh)
        xd = distribute_tensor(x, mesh, [Shard(dim)]).requires_grad_()
        y = model(xd)
        (y * distribute_tensor(g, mesh, y.placements)).sum().backward()
        out[dim] = dict(init=init, x=x, g=g, y=_whole(y), dx=_whole(xd.grad), grads=_grads(model),
                        y_placements=repr(y.placements),
                        grad_placements=repr(model[0].weight.grad.placements))
    return out


def _fused_mlp_dtensor(mesh, placement_name):
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    placement = {"replicate": Replicate(), "rows": Shard(0)}[placement_name]
    torch.manual_seed(case_seed("fused mlp", placement_name))
    model = _fused_mlp()
    init = _state(model)
    x, g = torch.randn(6, 6), torch.randn(6, 3)
    distribute_module(model, mesh)   # every parameter a replicated DTensor
    xd = distribute_tensor(x, mesh, [placement]).requires_grad_()
    path = model.path(xd)
    y = model(xd)
    (y * distribute_tensor(g, mesh, [placement])).sum().backward()
    return dict(init=init, x=x, g=g, y=_whole(y), y_placements=repr(y.placements),
                dx=_whole(xd.grad), grads=_grads(model), path=path)


def case_fused_mlp_replicated(mesh, rank):
    """FusedMLP with replicated DTensor weights and a replicated DTensor input."""
    return _fused_mlp_dtensor(mesh, "replicate")


def case_fused_mlp_rows(mesh, rank):
    """FusedMLP with replicated weights and the batch sharded (Shard(0) input)."""
    return _fused_mlp_dtensor(mesh, "rows")


def _error_of(fn):
    try:
        fn()
    except Exception as exc:   # noqa: BLE001 - the test reads which error it was
        return f"{type(exc).__name__}: {exc}"
    return None


def case_fused_mlp_tp_plan(mesh, rank):
    """A TP plan on a FusedMLP's layers: a clear error on both backends."""
    from torch.distributed.tensor.parallel import parallelize_module

    Col, Row = _plans()
    from torch.distributed.fsdp import fully_shard

    model = _fused_mlp()
    parallelize_module(model, mesh, {"0": Col(), "2": Row(), "4": Col()})
    layers_sharded = _fused_mlp()
    for i in (0, 2, 4):   # FSDP2 on the layers: their hooks would not run either
        fully_shard(layers_sharded[i])
    return dict(error=_error_of(lambda: model(torch.randn(4, 6))),
                fsdp_error=_error_of(lambda: layers_sharded(torch.randn(4, 6))))


def case_mixed_inputs(mesh, rank):
    """Replicated DTensor weights with a plain input: a clear error, not a kernel fed a DTensor."""
    from torch.distributed.tensor import distribute_module

    layer = fastmlp.FusedLinear(6, 4, activation="relu")
    distribute_module(layer, mesh)
    mlp = _fused_mlp()
    distribute_module(mlp, mesh)
    return dict(linear=_error_of(lambda: layer(torch.randn(3, 6))),
                mlp=_error_of(lambda: mlp(torch.randn(3, 6))))


def _fit(model, rank, world_size):
    x, y = _train_data()
    loader = fastmlp.TensorLoader(x, y, batch_size=TRAIN["batch"], shuffle=True,
                                  seed=TRAIN["seed"], rank=rank, world_size=world_size)
    optimizer = fastmlp.SGD(model.parameters(), lr=TRAIN["lr"], momentum=TRAIN["momentum"])
    return fastmlp.fit(model, loader, nn.MSELoss(), optimizer, epochs=TRAIN["epochs"],
                       progress=False)["loss"]


def _case_fsdp(mlp):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(case_seed("fsdp", mlp))
    model = _train_model()
    init = _state(model)
    model = fastmlp.fuse(model, mlp=mlp)
    if not mlp:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
    fully_shard(model)
    losses = _fit(model, torch.distributed.get_rank(), torch.distributed.get_world_size())
    return dict(init=init, losses=losses, state=_state(model), kind=type(model).__name__,
                hook=python_hooks(model))


def case_fsdp_fit_layers(mesh, rank):
    """fully_shard on each fused layer and the root, trained by fit."""
    return _case_fsdp(mlp=False)


def case_fsdp_fit_fused_mlp(mesh, rank):
    """fully_shard on a FusedMLP (the whole stack one op), trained by fit."""
    return _case_fsdp(mlp=True)


def case_fsdp_tp_fit(mesh, rank):
    """FSDP2 over "dp" and tensor parallel over "tp" on a 2 x 2 mesh (four ranks), trained by
    fit: the two ranks of a tp group read the same batches."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    Col, Row = _plans()
    torch.manual_seed(case_seed("fsdp", "tp"))
    model = _tp_train_model()
    init = _state(model)
    model = fastmlp.fuse(model)
    parallelize_module(model, mesh["tp"], {"0": Col(), "2": Row()})
    fully_shard(model, mesh=mesh["dp"])
    losses = _fit(model, mesh["dp"].get_local_rank(), mesh["dp"].size())
    return dict(init=init, losses=losses, state=_state(model), layers=[repr(m) for m in model])


# ---- the gated op (fastmlp::gated_linear and its packed form) on DTensors -------------------
GATED = dict(rows=4, seq=3, dim=6, hidden=10)


def _gated_tensors(name):
    g = torch.Generator().manual_seed(case_seed("gated", name))
    n, k, h = GATED["rows"], GATED["dim"], GATED["hidden"]
    return dict(x=torch.randn(n, GATED["seq"], k, generator=g),
                gate_weight=torch.randn(h, k, generator=g) * k ** -0.5,
                up_weight=torch.randn(h, k, generator=g) * k ** -0.5,
                gate_bias=torch.randn(h, generator=g), up_bias=torch.randn(h, generator=g),
                g=torch.randn(n, GATED["seq"], h, generator=g))


def _packed(t, gate_first):
    """The packed weight (and bias) of the gate and up tensors, in the gate_first order."""
    halves = [t["gate_weight"], t["up_weight"]], [t["gate_bias"], t["up_bias"]]
    if not gate_first:
        halves = [w[::-1] for w in halves]
    return torch.cat(halves[0]), torch.cat(halves[1])


@contextlib.contextmanager
def _kernel_launches():
    """A count of the gated kernels' launches, by launcher, while the block runs (every launch
    of the Triton path, whether the op was reached with plain tensors or through DTensor's
    dispatch); None on the torch backend, which runs torch's ops."""
    if fastmlp.get_backend() != "triton":
        yield None
        return
    from fastmlp.kernels import gated as kernels

    counts, originals = {}, {}
    for name in ("gated_forward", "gated_grad_input", "gated_grad_weight",
                 "gated_grad_weight_packed"):
        originals[name] = getattr(kernels, name)

        def counted(*args, _original=originals[name], _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)
        setattr(kernels, name, counted)
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(kernels, name, original)


def _node_names(y):
    return [type(node).__name__ for node, _ in autograd_nodes(y)]


# (x, weights, biases) placements: replicated; the batch sharded; column-parallel (gate and up
# rows sharded alike on hidden); in_features sharded, which the rules gather (a warning)
GATED_PLACEMENTS = {"replicated": ("R", "R", "R"), "rows": ("S0", "R", "R"),
                    "column-parallel": ("R", "S0", "S0"), "in-features": ("S2", "S1", "R")}
PACKED_PLACEMENTS = {"replicated": ("R", "R", "R"), "rows": ("S0", "R", "R"),
                     "rows-of-packed": ("R", "S0", "S0"), "in-features": ("S2", "S1", "R")}


def _placement(code):
    from torch.distributed.tensor import Replicate, Shard

    return Replicate() if code == "R" else Shard(int(code[1]))


def _gated_dtensor_run(mesh, name, placements, packed, gate_first=True, bias=True,
                       activation="silu"):
    from torch.distributed.tensor import distribute_tensor

    t = _gated_tensors(name)
    xp, wp, bp = (_placement(c) for c in placements)
    x = distribute_tensor(t["x"], mesh, [xp]).requires_grad_()
    if packed:
        w, b = _packed(t, gate_first)
        params = {"weight": distribute_tensor(w, mesh, [wp]).requires_grad_(),
                  "bias": distribute_tensor(b, mesh, [bp]).requires_grad_() if bias else None}
    else:
        params = {k: distribute_tensor(t[k], mesh, [wp if "weight" in k else bp]).requires_grad_()
                  for k in ("gate_weight", "up_weight", "gate_bias", "up_bias")}
        if not bias:
            params["gate_bias"] = params["up_bias"] = None
    with _kernel_launches() as launches, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if packed:
            y = fastmlp.functional.gated_linear_packed(x, params["weight"], params["bias"],
                                                       activation, gate_first)
        else:
            y = fastmlp.functional.gated_linear(x, *params.values(), activation)
        (y * distribute_tensor(t["g"], mesh, y.placements)).sum().backward()
    return dict(tensors=t, y=_whole(y), y_placements=repr(y.placements), dx=_whole(x.grad),
                dx_placements=repr(x.grad.placements), nodes=_node_names(y), launches=launches,
                grads={k: _whole(p.grad) for k, p in params.items() if p is not None},
                grad_placements={k: repr(p.grad.placements) for k, p in params.items()
                                 if p is not None},
                warned=[str(w.message) for w in seen if "fastmlp gated_linear" in str(w.message)])


def case_gated_dtensors(mesh, rank):
    """fastmlp.functional.gated_linear on DTensors in each placement of GATED_PLACEMENTS,
    biases on and (column-parallel) off, [batch, seq, dim] inputs that need their gradient."""
    out = {}
    for name, placements in GATED_PLACEMENTS.items():
        act = {"rows": "gelu", "in-features": "sigmoid"}.get(name, "silu")
        out[name] = _gated_dtensor_run(mesh, name, placements, packed=False, activation=act)
    out["column-parallel no bias"] = _gated_dtensor_run(
        mesh, "column-parallel no bias", GATED_PLACEMENTS["column-parallel"], packed=False,
        bias=False, activation="relu")
    return out


def case_gated_packed_dtensors(mesh, rank):
    """fastmlp.functional.gated_linear_packed on DTensors in each placement of
    PACKED_PLACEMENTS, both halves' orders."""
    out = {}
    for i, (name, placements) in enumerate(PACKED_PLACEMENTS.items()):
        out[name] = _gated_dtensor_run(mesh, "packed " + name, placements, packed=True,
                                       gate_first=bool(i % 2), activation="gelu_tanh")
    return out


class GatedBlock(nn.Module):
    """A Llama-style feed-forward written with fastmlp's gated op, down(silu(x W_gᵀ) ⊙ x W_uᵀ):
    the gate and up weights held by Linears that the forward does not call (fastmlp.fuse's
    rewrite reads them so), or one packed Linear; the down projection a FusedLinear."""

    def __init__(self, dim=6, hidden=10, packed=False, bias=True):
        super().__init__()
        self.packed = packed
        if packed:
            self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        else:
            self.gate = nn.Linear(dim, hidden, bias=bias)
            self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = fastmlp.FusedLinear(hidden, dim, bias=bias)

    def forward(self, x):
        if self.packed:
            h = fastmlp.functional.gated_linear_packed(x, self.gate_up.weight, self.gate_up.bias)
        else:
            h = fastmlp.functional.gated_linear(x, self.gate.weight, self.up.weight,
                                                self.gate.bias, self.up.bias)
        return self.down(h)


def _reference_gated_block(packed):
    """GatedBlock computed with torch's ops (its state_dict keys and shapes)."""
    class Reference(GatedBlock):
        def forward(self, x):
            if self.packed:
                gate, up = self.gate_up(x).chunk(2, -1)
            else:
                gate, up = self.gate(x), self.up(x)
            return F.linear(F.silu(gate) * up, self.down.weight, self.down.bias)
    return Reference(packed=packed)


def case_gated_tp_block(mesh, rank):
    """Tensor parallel on GatedBlock: the block's input made a replicated DTensor
    (PrepareModuleInput, as the plan of a block whose projections are not called as modules
    must), gate and up ColwiseParallel (their weights Shard(0): the gated op column-parallel,
    its output Shard on hidden), down RowwiseParallel; the block's output all-reduced."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import PrepareModuleInput, parallelize_module

    Col, Row = _plans()
    torch.manual_seed(case_seed("gated", "tp block"))
    block = GatedBlock()
    init = _state(block)
    x = torch.randn(2, 3, 6, requires_grad=True)
    g = torch.randn(2, 3, 6)
    parallelize_module(block, mesh, PrepareModuleInput(input_layouts=(Replicate(),),
                                                       desired_input_layouts=(Replicate(),)))
    parallelize_module(block, mesh, {"gate": Col(), "up": Col(), "down": Row()})
    with _kernel_launches() as launches:
        y = _forward_backward(block, x, g)
    return dict(init=init, x=x.detach(), g=g, y=_whole(y), dx=_whole(x.grad), grads=_grads(block),
                launches=launches,
                grad_placements={n: repr(p.grad.placements) for n, p in block.named_parameters()})


def case_gated_fsdp(mesh, rank):
    """FSDP2 (fully_shard) on a GatedBlock with a packed gate/up Linear and on the root:
    inside the forward and backward the parameters are whole plain tensors, so the kernels run
    as on one GPU, on each rank's own rows; the gradients are reduce-scattered (averaged)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(case_seed("gated", "fsdp"))
    model = nn.Sequential(GatedBlock(packed=True), nn.Tanh(),
                          GatedBlock(packed=True))
    init = _state(model)
    x, g = torch.randn(8, 6), torch.randn(8, 6)
    for block in (model[0], model[2]):
        fully_shard(block)
    fully_shard(model)
    rows = slice(4 * rank, 4 * rank + 4)
    with _kernel_launches() as launches:
        y = _forward_backward(model, x[rows], g[rows])
    return dict(init=init, x=x, g=g, rows=(rows.start, rows.stop), y=_whole(y),
                grads=_grads(model), launches=launches)


CASES = {
    2: [case_tp_mlp, case_sp_mlp_frozen, case_tp_llama, case_sp_llama, case_rowwise_activation,
        case_partial_grad, case_linear_rows, case_fused_mlp_replicated, case_fused_mlp_rows,
        case_fused_mlp_tp_plan, case_mixed_inputs,
        case_fsdp_fit_layers, case_fsdp_fit_fused_mlp,
        case_gated_dtensors, case_gated_packed_dtensors, case_gated_tp_block, case_gated_fsdp],
    4: [case_fsdp_tp_fit],
}


def _worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    shape, names = ((2,), None) if world_size == 2 else ((2, 2), ("dp", "tp"))
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    results = {}
    for case in CASES[world_size]:
        t0 = time.perf_counter()
        try:
            results[case.__name__] = case(mesh, rank)
        except Exception:   # noqa: BLE001 - saved for the test of this case to report
            results[case.__name__] = {"worker error": traceback.format_exc()}
        results[case.__name__ + " s"] = time.perf_counter() - t0
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # As tests/test_distributed.py: leave without interpreter finalization (torch 2.13's gloo
    # threads can abort a process that tears down Python after its work is done).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------------------------
# Launching (one process group per backend and world size, shared by the tests)
# --------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world_size, backend, out_dir):
    import torch.multiprocessing as mp

    env = {"FASTMLP_BACKEND": backend, "OMP_NUM_THREADS": "1",
           "FASTMLP_POISON_OUTPUTS": "1" if backend == "triton" else "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # the children inherit it (and read it when they import fastmlp)
    try:
        ctx = mp.start_processes(_worker, args=(world_size, _free_port(), str(out_dir)),
                                 nprocs=world_size, join=False, start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world_size} ranks on the {backend} backend: no result after "
                        f"{LAUNCH_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


_runs = {}


def _results(world_size, backend, tmp_path_factory):
    """The ranks' results, from one launch per (world size, backend) for the whole module; a
    launch that failed fails every test that reads it, without launching again."""
    key = (world_size, backend)
    if key not in _runs:
        try:
            _runs[key] = _launch(world_size, backend,
                                 tmp_path_factory.mktemp(f"sharding-{backend}-{world_size}"))
        except (Exception, pytest.fail.Exception) as exc:   # a failed launch, a timeout
            _runs[key] = f"{type(exc).__name__}: {exc}"
    if isinstance(_runs[key], str):
        pytest.fail(f"{world_size} ranks on the {backend} backend: {_runs[key]}")
    return _runs[key]


def _case(tmp_path_factory, backend, case, world_size=2):
    """Each rank's result of `case` (a worker error fails the test with its traceback)."""
    out = []
    for rank, results in enumerate(_results(world_size, backend, tmp_path_factory)):
        result = results[case.__name__]
        if "worker error" in result:
            pytest.fail(f"rank {rank}:\n{result['worker error']}")
        out.append(result)
    return out


# --------------------------------------------------------------------------------------------
# Registration (in a fresh interpreter each: what is imported first matters)
# --------------------------------------------------------------------------------------------
_REGISTERED = (
    "from torch.distributed.tensor import DTensor; "
    "funcs = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs; "
    "ops = torch.ops.fastmlp; "
    "print(all(op.default in funcs for op in (ops.linear_act, ops.linear_act_grad_input, "
    "ops.linear_act_grad_weight, ops.mlp, ops.mlp_backward, ops.gated_linear, "
    "ops.gated_linear_grad_input, ops.gated_linear_grad_weight, ops.gated_linear_packed, "
    "ops.gated_linear_packed_grad_weight)))")


def _python(code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, FASTMLP_BACKEND="torch"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_rules_register_when_dtensor_is_imported_after_fastmlp():
    """import fastmlp leaves torch.distributed.tensor unimported (~0.7 s), and the rules are
    there as soon as something imports it."""
    out = _python("import sys, torch, fastmlp; print('torch.distributed.tensor' in sys.modules); "
                  "import torch.distributed.tensor.parallel; " + _REGISTERED)
    assert out == ["False", "True"], out


def test_rules_register_when_dtensor_was_imported_first():
    out = _python("import torch, torch.distributed.tensor; import fastmlp; " + _REGISTERED)
    assert out == ["True"], out


# --------------------------------------------------------------------------------------------
# References and comparisons
# --------------------------------------------------------------------------------------------
def _reference(build, init, x, g, frozen=(), x_grad=True, after=None):
    """(y, dx, {name: grad}) of the model unsharded (then `after`, if given), in float64."""
    model = build().double()
    model.load_state_dict({k: v.double() for k, v in init.items()})
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    x64 = x.double().requires_grad_(x_grad)
    y = model(x64)
    if after is not None:
        y = after(y)
    (y * g.double()).sum().backward()
    return y.detach(), x64.grad, {n: p.grad for n, p in model.named_parameters()}


def _compare_grads(got, want, what):
    assert got.keys() == want.keys(), (what, got.keys(), want.keys())
    for name, expected in want.items():
        if expected is None:
            assert got[name] is None, f"{what} {name}: a gradient for a frozen parameter"
        else:
            assert_close(got[name], expected, F32, f"{what} grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_parallel_mlp(tmp_path_factory, backend):
    for rank, r in enumerate(_case(tmp_path_factory, backend, case_tp_mlp)):
        assert "activation=gelu" in r["layers"][0] and "FusedLinear" in r["layers"][2], r["layers"]
        # what makes fit train a TP model eagerly on CUDA: a replay would not run TP's hooks
        assert r["hook"].startswith("a forward pre-hook on submodule '0'"), r["hook"]
        y, dx, grads = _reference(_mlp, r["init"], r["x"], r["g"])
        assert_close(r["y"], y, F32, f"rank {rank} y")
        assert_close(r["dx"], dx, F32, f"rank {rank} dx")
        _compare_grads(r["grads"], grads, f"rank {rank}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_parallel_rows_frozen_weight_no_bias(tmp_path_factory, backend):
    for rank, r in enumerate(_case(tmp_path_factory, backend, case_sp_mlp_frozen)):
        assert "activation=relu" in r["layers"][0], r["layers"]
        y, _, grads = _reference(_mlp_no_bias, r["init"], r["x"], r["g"], frozen=("0.weight",),
                                 x_grad=False)
        start, stop = r["rows"]
        assert_close(r["y"], y[start:stop], F32, f"rank {rank} y (its rows)")
        _compare_grads(r["grads"], grads, f"rank {rank}")


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sequence-parallel"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_block(tmp_path_factory, backend, sequence_parallel):
    case = case_sp_llama if sequence_parallel else case_tp_llama
    for rank, r in enumerate(_case(tmp_path_factory, backend, case)):
        # fuse made the gated product one call, which runs w1 and w3 as written while they
        # carry tensor parallelism's hooks (ColwiseParallel's input/output hooks)
        assert "gated_projections" in r["code"], r["code"]
        y, dx, grads = _reference(lambda: Llama(fused=False), r["init"], r["x"], r["g"])
        start, stop = r["seq"]
        assert_close(r["y"], y[:, start:stop], F32, f"rank {rank} y")
        # the input's gradient: of the whole loss, for this rank's part of the sequence
        assert_close(r["dx"], dx[:, start:stop], F32, f"rank {rank} dx")
        _compare_grads(r["grads"], grads, f"rank {rank}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_parallel_activation_is_applied_after_the_sum(tmp_path_factory, backend):
    for rank, r in enumerate(_case(tmp_path_factory, backend, case_rowwise_activation)):
        for act in ("none", "relu"):
            y, _, grads = _reference(lambda: fastmlp.FusedLinear(10, 5, activation=act),
                                     r["init"][act], r["x"], r["g"], x_grad=False)
            got = r["out"][act]
            assert_close(got["y"], y, F32, f"rank {rank} {act} y")
            _compare_grads(got["grads"], grads, f"rank {rank} {act}")
        assert not r["out"]["none"]["warned"]
        if backend == "triton":   # the torch path runs torch's addmm and relu: DTensor's rules
            assert len(r["out"]["relu"]["warned"]) == 1, r["out"]["relu"]["warned"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_upstream_gradient(tmp_path_factory, backend):
    for rank, r in enumerate(_case(tmp_path_factory, backend, case_partial_grad)):
        for act, got in r.items():
            if backend == "triton":   # fastmlp's rules; the torch path shows DTensor's own
                assert got["grad_placements"] == "(Partial(sum),)", (act, got["grad_placements"])
            y, dx, grads = _reference(lambda: fastmlp.FusedLinear(6, 8, activation=act),
                                      got["init"], got["x"], got["g"],
                                      after=lambda h: h @ got["w"].double())
            assert_close(got["y"], y, F32, f"rank {rank} {act} y")
            assert_close(got["dx"], dx, F32, f"rank {rank} {act} dx")
            _compare_grads(got["grads"], grads, f"rank {rank} {act}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_layers_with_sharded_rows(tmp_path_factory, backend):
    for rank, r in enumerate(_case(tmp_path_factory, backend, case_linear_rows)):
        assert r[0]["y_placements"] == "(Shard(dim=0),)", r[0]["y_placements"]
        assert r[0]["grad_placements"] == "(Partial(sum),)", r[0]["grad_placements"]
        for dim, got in r.items():
            y, dx, grads = _reference(_rows_model, got["init"], got["x"], got["g"])
            assert_close(got["y"], y, F32, f"rank {rank} Shard({dim}) y")
            assert_close(got["dx"], dx, F32, f"rank {rank} Shard({dim}) dx")
            _compare_grads(got["grads"], grads, f"rank {rank} Shard({dim})")


@pytest.mark.parametrize("placement", ["replicate", "rows"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_mlp_replicated_weights(tmp_path_factory, backend, placement):
    case = case_fused_mlp_replicated if placement == "replicate" else case_fused_mlp_rows
    for rank, r in enumerate(_case(tmp_path_factory, backend, case)):
        assert r["path"] == ("fused" if backend == "triton" else "torch"), r["path"]
        assert r["y_placements"] == ("(Replicate(),)" if placement == "replicate"
                                     else "(Shard(dim=0),)"), r["y_placements"]
        y, dx, grads = _reference(_fused_mlp, r["init"], r["x"], r["g"])
        assert_close(r["y"], y, F32, f"rank {rank} y")
        assert_close(r["dx"], dx, F32, f"rank {rank} dx")
        _compare_grads(r["grads"], grads, f"rank {rank}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_mlp_tensor_parallel_or_per_layer_fsdp_is_a_clear_error(tmp_path_factory, backend):
    for r in _case(tmp_path_factory, backend, case_fused_mlp_tp_plan):
        error = r["error"] or ""
        assert error.startswith("ValueError: fastmlp FusedMLP: layer 0's weight is a DTensor "
                                "sharded as (Shard(dim=0),) (a tensor-parallel plan?)"), error
        assert "fastmlp.fuse(model) without mlp=True" in error, error
        assert "fully_shard on the FusedMLP as a whole" in error, error
        # fully_shard changes a layer's class (FSDPLinear), which FusedMLP does not take as a layer
        assert (r["fsdp_error"] or "").startswith(
            "TypeError: fastmlp FusedMLP: module '0' (FSDPLinear("), r["fsdp_error"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_weights_with_a_plain_input_are_a_clear_error(tmp_path_factory, backend):
    for r in _case(tmp_path_factory, backend, case_mixed_inputs):
        assert (r["linear"] or "").startswith(
            "TypeError: fastmlp linear: weight, bias are DTensors but input is a plain tensor"), r
        assert (r["mlp"] or "").startswith(
            "TypeError: fastmlp FusedMLP: layer 0's weight, layer 1's weight, layer 2's weight are "
            "DTensors but input is a plain tensor"), r


def _reference_training(init, build, dp_world=2):
    """One process, float64, torch's loop and SGD, on the dp ranks' batches put together
    (rank 0's batch i with rank 1's batch i: FSDP2 averages the ranks' gradients)."""
    x, y = _train_data()
    x, y = x.double(), y.double()
    model = build().double()
    model.load_state_dict({k: v.double() for k, v in init.items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN["lr"], momentum=TRAIN["momentum"])
    losses = []
    for epoch in range(TRAIN["epochs"]):
        g = torch.Generator().manual_seed(TRAIN["seed"] + epoch)   # TensorLoader's draw
        perm = torch.randperm(len(x), generator=g)
        shards = [perm[r::dp_world] for r in range(dp_world)]
        steps = []
        for i in range(len(x) // dp_world // TRAIN["batch"]):
            idx = torch.cat([s[i * TRAIN["batch"]:(i + 1) * TRAIN["batch"]] for s in shards])
            loss = F.mse_loss(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append(loss.item())
        losses.append(sum(steps) / len(steps))
    return model.state_dict(), losses


def _compare_training(results, build=_train_model):
    want_state, want_losses = _reference_training(results[0]["init"], build)
    for rank, r in enumerate(results):
        assert r["losses"] == pytest.approx(want_losses, rel=1e-5), f"rank {rank} losses"
        for k, want in want_state.items():
            assert_close(r["state"][k], want, F32, f"rank {rank} {k}")


@pytest.mark.parametrize("mlp", [False, True], ids=["fused-layers", "FusedMLP"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_fit_matches_one_process(tmp_path_factory, backend, mlp):
    case = case_fsdp_fit_fused_mlp if mlp else case_fsdp_fit_layers
    results = _case(tmp_path_factory, backend, case)
    assert results[0]["kind"] == ("FSDPFusedMLP" if mlp else "FSDPSequential")
    # what makes fit train FSDP2 eagerly on CUDA: a replay would not run its hooks
    hook = results[0]["hook"]
    assert hook.startswith("a forward pre-hook on the model (FSDP"), hook
    _compare_training(results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_with_tensor_parallel_on_a_2d_mesh(tmp_path_factory, backend):
    results = _case(tmp_path_factory, backend, case_fsdp_tp_fit, world_size=4)
    layers = results[0]["layers"]
    assert "activation=relu" in layers[0] and "FusedLinear" in layers[2], layers
    _compare_training(results, lambda: _tp_train_model(fused=False))


# --------------------------------------------------------------------------------------------
# The gated op on DTensors
# --------------------------------------------------------------------------------------------
def _gated_reference(t, activation, bias=True, packed=False, gate_first=True):
    """(y, dx, {name: grad}) of the gated op unsharded in float64 with torch's ops (a packed
    weight as models apply it: one F.linear, then chunk)."""
    from fastmlp import activations

    name, alpha = activations.resolve(activation)
    act = activations.get(name)
    x = t["x"].double().requires_grad_()
    if packed:
        w, b = (p.double().requires_grad_() for p in _packed(t, gate_first))
        params = {"weight": w, "bias": b if bias else None}
        first, second = F.linear(x, w, params["bias"]).chunk(2, -1)
        gate, up = (first, second) if gate_first else (second, first)
    else:
        params = {k: t[k].double().requires_grad_() for k in ("gate_weight", "up_weight",
                                                              "gate_bias", "up_bias")}
        if not bias:
            params["gate_bias"] = params["up_bias"] = None
        gate = F.linear(x, params["gate_weight"], params["gate_bias"])
        up = F.linear(x, params["up_weight"], params["up_bias"])
    y = act.torch_forward(gate, alpha) * up
    (y * t["g"].double()).sum().backward()
    return y.detach(), x.grad, {k: p.grad for k, p in params.items() if p is not None}


def _check_gated_run(got, rank, what, activation, backend, **reference):
    y, dx, grads = _gated_reference(got["tensors"], activation, **reference)
    assert_close(got["y"], y, F32, f"rank {rank} {what} y")
    assert_close(got["dx"], dx, F32, f"rank {rank} {what} dx")
    _compare_grads(got["grads"], grads, f"rank {rank} {what}")
    packed = reference.get("packed", False)
    if backend == "triton":   # the op and its kernels ran (the torch path: torch's ops)
        node = "_GatedPackedFunctionBackward" if packed else "_GatedFunctionBackward"
        assert node in got["nodes"], (what, got["nodes"])
        dw = "gated_grad_weight_packed" if packed else "gated_grad_weight"
        assert got["launches"].get("gated_forward") and got["launches"].get(dw), got["launches"]
    else:
        assert not [n for n in got["nodes"] if "Gated" in n], got["nodes"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_op_on_dtensors(tmp_path_factory, backend):
    """Forward and every gradient against float64 torch, unsharded; on the kernels' path the
    placements the rules give: rows stay Shard(0) (weight gradients Partial), column-parallel
    gives Shard on hidden (dX Partial, the weight and bias gradients Shard(0) as the
    Parameters), in_features sharded is gathered with a warning (never a Partial into the
    activation)."""
    for rank, r in enumerate(_case(tmp_path_factory, backend, case_gated_dtensors)):
        for what, got in r.items():
            act = {"rows": "gelu", "in-features": "sigmoid",
                   "column-parallel no bias": "relu"}.get(what, "silu")
            _check_gated_run(got, rank, what, act, backend, bias=what != "column-parallel no bias")
            if backend != "triton":
                continue
            placements = {"replicated": ("(Replicate(),)", "(Replicate(),)", "(Replicate(),)"),
                          "rows": ("(Shard(dim=0),)", "(Shard(dim=0),)", "(Partial(sum),)"),
                          "column-parallel": ("(Shard(dim=2),)", "(Partial(sum),)",
                                              "(Shard(dim=0),)"),
                          "in-features": ("(Replicate(),)", "(Shard(dim=2),)", None)}
            y_p, dx_p, w_p = placements[what.replace(" no bias", "")]
            assert (got["y_placements"], got["dx_placements"]) == (y_p, dx_p), (what, got)
            if w_p is not None:
                assert set(got["grad_placements"].values()) == {w_p}, (what, got)
            else:   # weights Shard(1): their gradients Shard(1), the biases' (replicated) R
                assert got["grad_placements"] == {
                    "gate_weight": "(Shard(dim=1),)", "up_weight": "(Shard(dim=1),)",
                    "gate_bias": "(Replicate(),)", "up_bias": "(Replicate(),)"}, got
            if what == "in-features":   # once per process, from the rule DTensor asked
                assert len(got["warned"]) == 1 and "in_features is sharded" in got["warned"][0]
            elif what != "in-features":
                assert not got["warned"], (what, got["warned"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_packed_op_on_dtensors(tmp_path_factory, backend):
    """The packed form: rows sharded stay sharded; a packed weight sharded on its 2H rows
    (which pairs no gate row with its up row on a rank) is replicated first, with a warning,
    and its gradient comes back Shard(0) like the Parameter; in_features sharded is gathered."""
    for rank, r in enumerate(_case(tmp_path_factory, backend, case_gated_packed_dtensors)):
        for i, (what, got) in enumerate(r.items()):
            _check_gated_run(got, rank, what, "gelu_tanh", backend, packed=True,
                             gate_first=bool(i % 2))
            if backend != "triton":
                continue
            placements = {"replicated": ("(Replicate(),)", "(Replicate(),)"),
                          "rows": ("(Shard(dim=0),)", "(Partial(sum),)"),
                          "rows-of-packed": ("(Replicate(),)", "(Shard(dim=0),)"),
                          "in-features": ("(Replicate(),)", None)}
            y_p, w_p = placements[what]
            assert got["y_placements"] == y_p, (what, got["y_placements"])
            if w_p is not None:
                assert set(got["grad_placements"].values()) == {w_p}, (what, got)
            else:
                assert got["grad_placements"] == {"weight": "(Shard(dim=1),)",
                                                  "bias": "(Replicate(),)"}, got
        if backend == "triton":
            warned = r["rows-of-packed"]["warned"]
            assert len(warned) == 1 and "not paired on any rank" in warned[0], warned
            assert not r["rows"]["warned"] and not r["replicated"]["warned"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_block_tensor_parallel(tmp_path_factory, backend):
    for rank, r in enumerate(_case(tmp_path_factory, backend, case_gated_tp_block)):
        y, dx, grads = _reference(lambda: _reference_gated_block(packed=False), r["init"],
                                  r["x"], r["g"])
        assert_close(r["y"], y, F32, f"rank {rank} y")
        assert_close(r["dx"], dx, F32, f"rank {rank} dx")
        _compare_grads(r["grads"], grads, f"rank {rank}")
        if backend == "triton":   # column-parallel on the shards: gradients Shard(0) as the weights
            assert r["launches"].get("gated_forward") and r["launches"].get("gated_grad_weight")
            for name in ("gate.weight", "gate.bias", "up.weight", "up.bias"):
                assert r["grad_placements"][name] == "(Shard(dim=0),)", r["grad_placements"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_block_fsdp2(tmp_path_factory, backend):
    for rank, r in enumerate(_case(tmp_path_factory, backend, case_gated_fsdp)):
        start, stop = r["rows"]
        world = 2
        # FSDP2 averages the ranks' gradients: those of the whole batch's loss over world
        y, _, grads = _reference(lambda: nn.Sequential(_reference_gated_block(True), nn.Tanh(),
                                                       _reference_gated_block(True)),
                                 r["init"], r["x"], r["g"] / world, x_grad=False)
        assert_close(r["y"], y[start:stop], F32, f"rank {rank} y (its rows)")
        _compare_grads(r["grads"], grads, f"rank {rank}")
        if backend == "triton":   # plain tensors inside: the kernels, packed dW launch included
            assert r["launches"].get("gated_forward", 0) >= 2, r["launches"]
            assert r["launches"].get("gated_grad_weight_packed", 0) >= 2, r["launches"]
