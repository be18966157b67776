"""fastmlp and its baselines as runnable calls, for the layer and model cases.

Every variant starts from the same reference nn.Sequential (same seed, same parameters, same
inputs) and differs only in how it computes:

  eager                 nn.Linear + the activation module (nn.ReLU, ...), as users write it
  fastmlp               fastmlp.fuse(...) of that model: FusedLinear layers
  cublaslt-epilogue     torch._addmm_activation: cuBLASLt's bias + activation epilogue, for the
                        activations whose row in fastmlp/activations.py names one (``epilogue``:
                        ReLU; tanh-GELU, use_gelu=True). It has no autograd formula: ReLU, which
                        saves its output, trains with plain torch ops for the backward (mask,
                        2 mm, sum); tanh-GELU runs forward only (it saves no pre-activation, so it
                        cannot train). (On CPU torch computes erf-GELU there: its parity mark
                        against tanh-GELU shows it.)
  compile               torch.compile(model, fullgraph=True, dynamic=False)
  compile-max-autotune  the same with mode="max-autotune" (long compiles: opt-in)

The gated cases (kind "gated") start from a look-alike of the model family's own block instead
(GatedProjection, LlamaStyleMLP, Phi3StyleMLP: nn.Linear children named as the models name
them), and time:

  eager                 that block as it is
  fastmlp               fastmlp.GatedMLP.from_module of it where fastmlp has GatedMLP (the
                        blocks), else fastmlp.functional (gated_linear / gated_linear_packed,
                        then linear for the down projection) on the block's own Linears
  liger                 Liger-Kernel's LigerSwiGLUMLP (Llama layout, SwiGLU), where
                        liger_kernel imports and a CUDA device is there (else recorded as
                        skipped, with why: ``unavailable``)
  compile               torch.compile of the block, as above

A Runnable's fn is one timed call with no synchronisation (the timer owns that); reset and grads
say what must be cleared outside the timed region (gradients, so that no variant pays for
accumulating into a previous call's .grad).
"""

import contextlib
import copy
import functools
import types
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

import fastmlp
from bench.cases import Case
from fastmlp import activations

TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}
LAYER_VARIANTS = ("fastmlp", "fastmlp-mlp", "fastmlp-per-layer", "fastmlp-fused", "eager",
                  "cublaslt-epilogue", "liger", "compile", "compile-max-autotune")
GATED_VARIANTS = ("fastmlp", "eager", "liger", "compile", "compile-max-autotune")
COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune"}
SEED_LR = 1e-4


@dataclass
class Runnable:
    """One variant of one case, ready to time."""

    fn: Callable[[], object]
    reset: Optional[Callable[[], None]] = None
    grads: List[torch.Tensor] = field(default_factory=list)
    output: Optional[Callable[[], torch.Tensor]] = None  # the fwd output, for the parity check
    notes: str = ""
    model: Optional[nn.Module] = None  # the module timed (tests check what it computes)


@contextlib.contextmanager
def precision(dtype: str):
    """fp32 matmuls exact ("highest", torch's default) unless the case is tf32; restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class _AddmmReLUFunction(torch.autograd.Function):
    """relu(b + X Wᵀ) by torch._addmm_activation, with the backward a torch user would write."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = torch._addmm_activation(bias, x, weight.t())
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        g = grad.masked_fill(y <= 0, 0)
        dx = g @ weight if ctx.needs_input_grad[0] else None
        dw = g.t() @ x if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


class EpilogueLinearReLU(nn.Linear):
    """nn.Linear + ReLU through the cuBLASLt epilogue (torch._addmm_activation)."""

    def forward(self, input):
        return _AddmmReLUFunction.apply(input, self.weight, self.bias)


class EpilogueLinearGELUTanh(nn.Linear):
    """nn.Linear + GELU(approximate="tanh") through the cuBLASLt epilogue, inference only."""

    def forward(self, input):
        if torch.is_grad_enabled():
            raise RuntimeError("torch._addmm_activation has no backward: forward (no_grad) only")
        return torch._addmm_activation(self.bias, input, self.weight.t(), use_gelu=True)


# One module per cuBLASLt epilogue kind (an activation row's ``epilogue``).
_EPILOGUE_MODULES = {"relu": EpilogueLinearReLU, "gelu": EpilogueLinearGELUTanh}


def _epilogue_for(act: nn.Module):
    found = activations.from_module(act)
    return _EPILOGUE_MODULES.get(activations.get(found[0]).epilogue) if found else None


def activation_module(name: str) -> nn.Module:
    """The torch module a user writes for one of the bench's activations (its default
    parameter)."""
    row = activations.get(name)
    return row.new_module(row.default_alpha)


def _epilogue_runs(case: Case) -> bool:
    """Whether the cuBLASLt epilogue can run the case: the activation has one, and trains with it
    only if its backward reads the output (the epilogue keeps nothing else)."""
    row = activations.get(case.activation)
    return row.epilogue is not None and (case.pass_ == "fwd"
                                         or row.saves(row.default_alpha) == "output")


def applies(case: Case, name: str) -> bool:
    """Whether variant `name` can run `case`: the cuBLASLt epilogue exists for the activations
    whose row names one (_epilogue_runs). Narrow-MLP rows ("narrow" tag): fastmlp is
    FusedMLP (its dispatcher's pick), fastmlp-fused its fully fused path forced, fastmlp-per-layer
    fastmlp.fuse's per-layer kernels; the seed model also times FusedMLP, as fastmlp-mlp.
    Gated rows: GATED_VARIANTS, liger for the Llama-layout SwiGLU block only."""
    if case.kind == "gated":
        if name == "liger":  # LigerSwiGLUMLP: the Llama layout, SwiGLU only
            return case.workload == "gated-mlp" and case.activation == "silu"
        return name in GATED_VARIANTS
    if name == "liger":
        return False
    narrow = "narrow" in case.tags
    if name in ("fastmlp-per-layer", "fastmlp-fused"):
        return narrow
    if name == "fastmlp-mlp":
        return case.kind == "model" and not narrow
    if name == "cublaslt-epilogue":
        return _epilogue_runs(case)
    return True


def epilogue_fuse(model: nn.Sequential) -> nn.Sequential:
    """Replace each nn.Linear → activation pair whose activation has a cuBLASLt epilogue (nn.ReLU,
    nn.GELU(approximate="tanh")) with its epilogue module (shared parameters)."""
    mods = list(model)
    out, i = [], 0
    while i < len(mods):
        epilogue = _epilogue_for(mods[i + 1]) if i + 1 < len(mods) else None
        if isinstance(mods[i], nn.Linear) and epilogue is not None:
            lin = mods[i]
            fused = epilogue(lin.in_features, lin.out_features, device="meta")
            fused.weight, fused.bias = lin.weight, lin.bias
            out.append(fused)
            i += 2
        else:
            out.append(mods[i])
            i += 1
    return nn.Sequential(*out)


class GatedProjection(nn.Module):
    """act(gate_proj(x)) * up_proj(x): the gated op alone as torch users write it (F.linear
    twice, the activation, the product), no biases, as in Llama."""

    def __init__(self, in_features: int, hidden: int, activation: str = "silu", device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(in_features, hidden, bias=False, **factory)
        self.up_proj = nn.Linear(in_features, hidden, bias=False, **factory)
        self.act_fn = activation_module(activation)

    def forward(self, x):
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)


class LlamaStyleMLP(GatedProjection):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)): the MLP block of Llama-style models, with
    their attribute names (so fastmlp.GatedMLP.from_module and LigerSwiGLUMLP take it)."""

    def __init__(self, in_features: int, hidden: int, out_features: int,
                 activation: str = "silu", device=None, dtype=None):
        super().__init__(in_features, hidden, activation, device, dtype)
        self.down_proj = nn.Linear(hidden, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        return self.down_proj(super().forward(x))


class Phi3StyleMLP(nn.Module):
    """The same block with the gate and up weights packed in one Linear, as Phi-3 holds them:
    gate, up = gate_up_proj(x).chunk(2, -1) (gate first), down_proj(up * act(gate))."""

    def __init__(self, in_features: int, hidden: int, out_features: int,
                 activation: str = "silu", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Linear(in_features, 2 * hidden, bias=False, **factory)
        self.down_proj = nn.Linear(hidden, out_features, bias=False, **factory)
        self.activation_fn = activation_module(activation)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


def gated_block(workload: str, dims, activation: str = "silu") -> nn.Module:
    """The eager block of a gated workload (bench.cases.GATED_WORKLOADS) at `dims`: (K, H) for
    the gated op alone, (K, H, N) for the MLP blocks."""
    if workload == "gated-linear":
        return GatedProjection(dims[0], dims[1], activation)
    if workload == "gated-mlp":
        return LlamaStyleMLP(*dims, activation=activation)
    if workload == "gated-mlp-packed":
        return Phi3StyleMLP(*dims, activation=activation)
    raise ValueError(f"unknown gated workload {workload!r}")


class FunctionalGatedBlock(nn.Module):
    """A gated block's own Linears (same names, so the same state_dict keys) computed by
    fastmlp.functional: gated_linear, or gated_linear_packed for a packed ``gate_up_proj``
    (gate rows first), then linear for ``down_proj`` when the block has one."""

    def __init__(self, block: nn.Module, activation: str):
        super().__init__()
        for name, child in block.named_children():
            if isinstance(child, nn.Linear):
                self.add_module(name, child)
        self.activation = activation

    def forward(self, x):
        from fastmlp import functional

        if "gate_up_proj" in self._modules:
            packed = self.gate_up_proj
            h = functional.gated_linear_packed(x, packed.weight, packed.bias, self.activation,
                                               gate_first=True)
        else:
            h = functional.gated_linear(x, self.gate_proj.weight, self.up_proj.weight,
                                        self.gate_proj.bias, self.up_proj.bias, self.activation)
        if "down_proj" not in self._modules:
            return h
        return functional.linear(h, self.down_proj.weight, self.down_proj.bias)


@functools.lru_cache(maxsize=None)
def liger_import_error() -> Optional[str]:
    """None when Liger-Kernel's LigerSwiGLUMLP imports, else why not (it is optional: the bench
    neither needs nor installs it)."""
    try:
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton/torch it cannot work with
        return f"liger_kernel is not importable ({type(exc).__name__}: {exc})"
    return None


def unavailable(case: Case, name: str, device: torch.device) -> Optional[str]:
    """Why variant `name` cannot run `case` on `device` here (recorded as skipped with this
    reason), or None when it can."""
    if name == "liger":
        why = liger_import_error()
        if why is not None:
            return why
        if device.type != "cuda":
            return "Liger-Kernel's Triton kernels run on CUDA devices only"
    return None


def liger_mlp(reference: nn.Module) -> nn.Module:
    """LigerSwiGLUMLP with a copy of a LlamaStyleMLP's parameters (the same keys)."""
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    k, h = reference.gate_proj.in_features, reference.gate_proj.out_features
    if reference.down_proj.out_features != k:
        raise ValueError(f"LigerSwiGLUMLP maps hidden_size back to itself: the block is "
                         f"{k} -> {h} -> {reference.down_proj.out_features}")
    config = types.SimpleNamespace(hidden_size=k, intermediate_size=h, hidden_act="silu")
    weight = reference.gate_proj.weight
    mlp = LigerSwiGLUMLP(config).to(device=weight.device, dtype=weight.dtype)
    mlp.load_state_dict(reference.state_dict())
    return mlp


def fastmlp_block(block: nn.Module, activation: str) -> Tuple[nn.Module, str]:
    """(module, note): fastmlp computing `block` (a gated_block) with its very parameters:
    fastmlp.GatedMLP.from_module for the MLP blocks where fastmlp has GatedMLP, else
    FunctionalGatedBlock; the note says which."""
    if "down_proj" in block._modules and hasattr(fastmlp, "GatedMLP"):
        mlp = fastmlp.GatedMLP.from_module(block)
        return mlp, f"fastmlp.GatedMLP (layout {mlp.layout!r})"
    packed = "_packed" if "gate_up_proj" in block._modules else ""
    down = " + linear" if "down_proj" in block._modules else ""
    return (FunctionalGatedBlock(block, activation),
            f"fastmlp.functional.gated_linear{packed}{down}")


def gated_model(case: Case, name: str, reference: nn.Module) -> Tuple[nn.Module, str]:
    """(module, note) of variant `name` for a gated case: a private copy of the reference
    block's parameters, computed the variant's way; the note says which fastmlp form ran."""
    if name == "fastmlp":
        return fastmlp_block(copy.deepcopy(reference), case.activation)
    if name == "liger":
        return liger_mlp(reference), "liger_kernel LigerSwiGLUMLP"
    return build_model(name, reference), ""


def reference_model(case: Case, device: torch.device) -> nn.Module:
    """The case's network in nn.Linear + activation form: Linear+activation per layer, none after
    a model's last; for a gated case, its eager block (gated_block)."""
    torch.manual_seed(0)
    if case.kind == "gated":
        block = gated_block(case.workload, case.dims, case.activation)
        return block.to(device=device, dtype=TORCH_DTYPES[case.dtype])
    layers: List[nn.Module] = []
    pairs = list(zip(case.dims[:-1], case.dims[1:]))
    for i, (k, n) in enumerate(pairs):
        layers.append(nn.Linear(k, n))
        if case.kind == "layer" or i < len(pairs) - 1:
            layers.append(activation_module(case.activation))
    return nn.Sequential(*layers).to(device=device, dtype=TORCH_DTYPES[case.dtype])


@dataclass
class CaseData:
    """Inputs shared by every variant of a case: X, the target (model) or upstream grad (layer)."""

    x: torch.Tensor
    target: torch.Tensor


def case_data(case: Case, device: torch.device) -> CaseData:
    gen = torch.Generator(device="cpu").manual_seed(1)
    dtype = TORCH_DTYPES[case.dtype]
    x = torch.randn(case.batch, case.dims[0], generator=gen).to(device=device, dtype=dtype)
    target = torch.randn(case.batch, case.dims[-1], generator=gen).to(device=device, dtype=dtype)
    return CaseData(x, target)


def build_model(name: str, reference: nn.Sequential) -> nn.Module:
    """The variant's module: a private copy of the reference parameters, computed its own way."""
    model = copy.deepcopy(reference)
    if name == "eager":
        return model
    if name == "fastmlp":
        return fastmlp.fuse(model)
    if name == "cublaslt-epilogue":
        return epilogue_fuse(model)
    if name in COMPILE_MODES:
        torch._dynamo.reset()  # a fresh cache per case: no silent fallback at the recompile limit
        kwargs = {} if COMPILE_MODES[name] == "default" else {"mode": COMPILE_MODES[name]}
        return torch.compile(model, fullgraph=True, dynamic=False, **kwargs)
    raise ValueError(f"unknown variant {name!r}")


def make_optimizer(name: str, params):
    """fastmlp.SGD for the fastmlp variants, torch.optim.SGD for the baselines."""
    if name.startswith("fastmlp"):
        return fastmlp.SGD(params, lr=SEED_LR), "fastmlp.SGD"
    return torch.optim.SGD(params, lr=SEED_LR), "torch.optim.SGD"


class _ForcedPath(nn.Module):
    """A FusedMLP run by one path (fastmlp.mlp.use_path) whatever its dispatcher would pick."""

    def __init__(self, mlp: nn.Module, path: str):
        super().__init__()
        self.mlp, self.path = mlp, path

    def forward(self, x):
        from fastmlp.mlp import use_path

        with use_path(self.path):
            return self.mlp(x)


def _fastmlp_model(case: Case, name: str, reference: nn.Sequential) -> Optional[nn.Module]:
    """The FusedMLP-based variants (None for the others)."""
    narrow = "narrow" in case.tags
    if (name == "fastmlp" and narrow) or name == "fastmlp-mlp":
        return fastmlp.FusedMLP.from_sequential(copy.deepcopy(reference))
    if name == "fastmlp-fused":
        return _ForcedPath(fastmlp.FusedMLP.from_sequential(copy.deepcopy(reference)), "fused")
    if name == "fastmlp-per-layer":
        return fastmlp.fuse(copy.deepcopy(reference))
    return None


def _path_note(model: nn.Module, x: torch.Tensor) -> str:
    """Which computation a FusedMLP variant runs (its dispatcher times the candidates here, on
    the first call of the shape, outside the timed region)."""
    mlp = getattr(model, "mlp", model)
    if not isinstance(mlp, fastmlp.FusedMLP):
        return ""
    if isinstance(model, _ForcedPath):
        from fastmlp.mlp import use_path

        with use_path(model.path):
            return f"path {mlp.path(x)}"
    return f"path {mlp.path(x)}"


def build(case: Case, name: str, reference: nn.Sequential, data: CaseData) -> Runnable:
    """The timed call of variant `name` for a layer, model or gated case."""
    if case.kind == "gated":
        model, gated_note = gated_model(case, name, reference)
    else:
        model, gated_note = _fastmlp_model(case, name, reference), ""
        model = build_model(name, reference) if model is None else model
    params = [p for p in model.parameters()]
    if gated_note:
        note = gated_note
    elif case.pass_ != "fwd" and case.kind == "model":
        with torch.enable_grad():
            note = _path_note(model, data.x)
    else:
        with torch.no_grad():
            note = _path_note(model, data.x)
    if case.pass_ == "fwd":
        x = data.x
        last = {}

        def forward():
            with torch.no_grad():
                last["y"] = model(x)
            return last["y"]

        return Runnable(forward, output=lambda: last["y"], notes=note, model=model)

    if case.kind in ("layer", "gated"):
        # A hidden layer (or block): its input needs a gradient; the upstream gradient is a
        # fixed tensor.
        x = data.x.detach().clone().requires_grad_(True)
        grad_out = data.target

        def forward_backward():
            model(x).backward(grad_out)

        grads = [x] + params
        return Runnable(forward_backward, reset=lambda: _clear(grads), grads=grads, notes=note,
                        model=model)

    loss_fn = nn.MSELoss(reduction="sum")  # the seed's MSELoss(size_average=False)
    x, target = data.x, data.target
    if case.pass_ == "fwd+bwd":
        def forward_backward():
            loss_fn(model(x), target).backward()

        return Runnable(forward_backward, reset=lambda: _clear(params), grads=params, notes=note,
                        model=model)

    optimizer, opt_name = make_optimizer(name, params)

    def step():
        # Gradients zeroed in place, not set to None: the same memory every call, which a
        # CUDA-graph replay of several calls needs (fastmlp.SGD's pointer table cannot follow
        # gradients re-allocated inside a capture), and the same for every variant.
        optimizer.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()

    return Runnable(step, notes=f"optimizer {opt_name}" + (f", {note}" if note else ""),
                    model=model)


def _clear(tensors):
    for t in tensors:
        t.grad = None
