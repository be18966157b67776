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

A Runnable's fn is one timed call with no synchronisation (the timer owns that); reset and grads
say what must be cleared outside the timed region (gradients, so that no variant pays for
accumulating into a previous call's .grad).
"""

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

import fastmlp
from bench.cases import Case
from fastmlp import activations

TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}
LAYER_VARIANTS = ("fastmlp", "fastmlp-mlp", "fastmlp-per-layer", "fastmlp-fused", "eager",
                  "cublaslt-epilogue", "compile", "compile-max-autotune")
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
    fastmlp.fuse's per-layer kernels; the seed model also times FusedMLP, as fastmlp-mlp."""
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


def reference_model(case: Case, device: torch.device) -> nn.Sequential:
    """The case's network in nn.Linear + activation form: Linear+activation per layer, none after
    a model's last."""
    torch.manual_seed(0)
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
    """The timed call of variant `name` for a layer or model case."""
    model = _fastmlp_model(case, name, reference)
    model = build_model(name, reference) if model is None else model
    params = [p for p in model.parameters()]
    if case.pass_ != "fwd" and case.kind == "model":
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

        return Runnable(forward, output=lambda: last["y"], notes=note)

    if case.kind == "layer":
        # A hidden layer: its input needs a gradient; the upstream gradient is a fixed tensor.
        x = data.x.detach().clone().requires_grad_(True)
        grad_out = data.target

        def forward_backward():
            model(x).backward(grad_out)

        grads = [x] + params
        return Runnable(forward_backward, reset=lambda: _clear(grads), grads=grads)

    loss_fn = nn.MSELoss(reduction="sum")  # the seed's MSELoss(size_average=False)
    x, target = data.x, data.target
    if case.pass_ == "fwd+bwd":
        def forward_backward():
            loss_fn(model(x), target).backward()

        return Runnable(forward_backward, reset=lambda: _clear(params), grads=params, notes=note)

    optimizer, opt_name = make_optimizer(name, params)

    def step():
        # Gradients zeroed in place, not set to None: the same memory every call, which a
        # CUDA-graph replay of several calls needs (fastmlp.SGD's pointer table cannot follow
        # gradients re-allocated inside a capture), and the same for every variant.
        optimizer.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()

    return Runnable(step, notes=f"optimizer {opt_name}" + (f", {note}" if note else ""))


def _clear(tensors):
    for t in tensors:
        t.grad = None
