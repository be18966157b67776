"""Stage 1 of the GPU check: every fused kernel on this device against float64 torch.

    python -m bench.gpucheck.correctness --out OUT/correctness.json [--tiny] [--workers N]

What is checked, through the public API only (the kernel files are being refactored, their
launchers change; what users call must keep working):

* forward, dX and dW+db of one fused layer, for every activation in fastmlp.ACTIVATIONS and
  fp32, TF32 (fp32 with torch.backends.cuda.matmul.allow_tf32), fp16 and bf16, on the seed's
  shapes, primes, M = 1, a transposed and a strided input, one large shape and a skinny one that
  makes dW split its rows; through fastmlp.functional.linear_act, with the Triton backend
  forced;
* fastmlp.SGD (plain, and momentum + weight decay + nesterov, two steps) on the seed model's
  parameters and odd sizes;
* fastmlp.fit on the seed model, CUDA graph on against off (same losses and weights);
* whole modules (MODULES: fastmlp.fuse of the seed model; fastmlp.FusedMLP, by its dispatcher's
  pick and on each path).

The reference is float64 torch on the same device, from the same (rounded) inputs; the error is
the relative norm error of tests/reference.py, under its TOLERANCE (TF32: TF32_TOLERANCE). Kernel
outputs are poisoned with NaN before each launch (fastmlp.kernels.debug.POISON_OUTPUTS), so an
element a kernel forgot to write fails instead of passing on leftover memory.

Why worker processes: on a cold Triton cache this stage is compile-bound (one compile per
activation x dtype class x kernel x specialisation) and compiles are single-threaded per
process, so jobs (one per activation x dtype) run in a spawn pool of --workers processes. A job
that breaks its worker's CUDA context (an illegal address is sticky) makes that worker refuse
later jobs, which are re-run once in a fresh pool; a worker that dies does the same for the jobs
it took down. Results are written after every job, and on SIGINT (the stage's timeout) what is
done so far is written with "complete": false.

Exit status: 0 when every row passed (or was skipped with a reason), 1 otherwise, 130 on SIGINT.
"""

import argparse
import concurrent.futures as cf
import copy
import datetime
import functools
import importlib.util
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("fp32", "tf32", "fp16", "bf16")
LAYER_KERNELS = ("forward", "dX", "dW+db")
# fp32 through TF32 keeps 10 mantissa bits: ~3e-4 relative norm error at every size here; the
# tests (tests/test_linear_act.py, the matrix-unit layouts) allow 2e-3.
TF32_TOLERANCE = 2e-3
SGD_LR = 0.1   # updates ~10 % of the parameters' size, so a wrong update cannot hide in rounding


@dataclass(frozen=True)
class Shape:
    """One layer case: X [m, k], W [n, k]; layout of X: contiguous, transposed or strided."""

    name: str
    m: int
    k: int
    n: int
    bias: bool = True
    layout: str = "contiguous"


# Seed shapes first: a stage cut short still has them.
GPU_SHAPES = (
    Shape("seed-layer1", 64, 1000, 100),
    Shape("seed-layer2", 64, 100, 10),
    Shape("primes", 37, 61, 53),
    Shape("primes-no-bias", 37, 61, 53, bias=False),
    Shape("m1", 1, 1000, 100),
    Shape("transposed-x", 64, 1000, 100, layout="transposed"),
    Shape("strided-x", 37, 61, 53, layout="strided"),
    Shape("large", 2048, 2048, 1024),
    Shape("skinny-split-dw", 16384, 256, 64),   # 1-2 output tiles: dW splits its rows
)
# The same structure at interpreter sizes (the interpreter's tiles are 32 wide).
TINY_SHAPES = (
    Shape("seed-layer1", 8, 16, 12),
    Shape("seed-layer2", 8, 12, 4),
    Shape("primes", 37, 41, 31),
    Shape("primes-no-bias", 37, 41, 31, bias=False),
    Shape("m1", 1, 16, 12),
    Shape("transposed-x", 8, 16, 12, layout="transposed"),
    Shape("strided-x", 13, 29, 11, layout="strided"),
    Shape("large", 72, 40, 36),
    Shape("skinny-split-dw", 300, 8, 4),   # the interpreter's dW splits it in 3 chunks
)
# A dry run (interpreter, two shared cores) gives the activations other than relu and none only
# the shapes where an epilogue differs most: the seed layer, edges in every dimension, split dW.
TINY_OTHER_ACTIVATIONS = ("seed-layer1", "primes", "skinny-split-dw")
SEED = {"batch": 64, "dims": (1000, 100, 10), "steps": 100, "epochs": 3}
TINY_SEED = {"batch": 8, "dims": (16, 12, 4), "steps": 4, "epochs": 2}
SGD_SHAPES = ((100, 1000), (100,), (10, 100), (10,), (4097,), (1,), (17, 33))
TINY_SGD_SHAPES = ((12, 16), (12,), (4, 12), (4,), (1,), (33,), (5, 7))
SGD_CONFIGS = (("plain", {"lr": SGD_LR}),
               ("momentum+wd+nesterov", {"lr": SGD_LR, "momentum": 0.9, "weight_decay": 0.01,
                                         "nesterov": True}))


class Skip(Exception):
    """A row that cannot run here, with the reason (recorded, never a pass)."""


# ---------------------------------------------------------------------------------------------
# References and errors
# ---------------------------------------------------------------------------------------------
def _torch():
    import torch
    return torch


def reference_activation(name: str) -> Callable:
    """The torch function of an activation name (run in float64 here), with the parameter a name
    alone means (leaky_relu's slope: nn.LeakyReLU's default, what fused() gets by name): its row's
    torch_forward in fastmlp/activations.py."""
    from fastmlp import activations

    if name not in activations.TABLE:
        raise LookupError(f"no float64 reference for activation {name!r}: fastmlp/activations.py "
                          f"has no row for it")
    row = activations.get(name)
    return lambda z: row.torch_forward(z, row.default_alpha)


@functools.lru_cache(maxsize=None)
def project_tolerances() -> Dict[str, float]:
    """TOLERANCE of tests/reference.py (loaded by path: a package named `tests` installed on the
    machine would shadow the checkout's) by dtype name, TF32 from TF32_TOLERANCE."""
    torch = _torch()
    path = os.path.join(REPO_ROOT, "tests", "reference.py")
    spec = importlib.util.spec_from_file_location("_fastmlp_tests_reference", path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the check needs the checkout's tests/")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tol = module.TOLERANCE
    return {"fp32": tol[torch.float32], "tf32": TF32_TOLERANCE, "fp16": tol[torch.float16],
            "bf16": tol[torch.bfloat16]}


def measure(actual, expected) -> dict:
    """Relative norm error ‖a − e‖ / ‖e‖ in float64 (tests/reference.py's measure, computed on
    the device), and the count of NaN elements in `actual`."""
    torch = _torch()
    if actual is None:
        return {"err": None, "nan": 0, "missing": True}
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(e.shape)}")
    nan = int(torch.isnan(a).sum().item())
    scale = e.norm().item()
    diff = (a - e).norm().item()
    return {"err": diff / scale if scale > 0 else diff, "nan": nan}


def judge(parts: Dict[str, dict], tol: float) -> tuple:
    """(status, worst error, reason) of one row from its parts' measurements."""
    problems, worst = [], 0.0
    for name, m in parts.items():
        if m.get("missing"):
            problems.append(f"{name}: not computed")
            continue
        if m["nan"]:
            problems.append(f"{name}: {m['nan']} NaN element(s) (an unwritten, poisoned output?)")
        err = m["err"]
        if err is None or not math.isfinite(err):
            problems.append(f"{name}: error {err}")
        else:
            worst = max(worst, err)
            if not err < tol:
                problems.append(f"{name}: relative error {err:.3e} >= {tol:.0e}")
    return ("fail" if problems else "pass"), worst, "; ".join(problems) or None


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:400] if lines else ''}"


# ---------------------------------------------------------------------------------------------
# The fused call, through the public entry point
# ---------------------------------------------------------------------------------------------
def fused(x, w, b, activation: str):
    """act(x Wᵀ + b) by fastmlp.functional.linear_act (activation by name)."""
    import fastmlp

    return fastmlp.functional.linear_act(x, w, b, activation=activation)


def entry_point() -> str:
    return "fastmlp.functional.linear_act"


class _TF32:
    """torch.backends.cuda.matmul.allow_tf32 on for the block, restored after."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        torch = _torch()
        self.previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on
        return self

    def __exit__(self, *exc):
        _torch().backends.cuda.matmul.allow_tf32 = self.previous
        return False


def torch_dtype(name: str):
    torch = _torch()
    return {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
            "bf16": torch.bfloat16}[name]


# ---------------------------------------------------------------------------------------------
# Row kinds
# ---------------------------------------------------------------------------------------------
def _layer_inputs(shape: Shape, dtype, device, gen):
    torch = _torch()
    m, k, n = shape.m, shape.k, shape.n
    if shape.layout == "transposed":      # X's storage is [k, m]: strides (1, m)
        x = torch.randn(k, m, generator=gen).to(device, dtype).t()
    elif shape.layout == "strided":       # every second column of a [m, 2k] tensor
        x = torch.randn(m, 2 * k, generator=gen).to(device, dtype)[:, ::2]
    else:
        x = torch.randn(m, k, generator=gen).to(device, dtype)
    x = x.detach().requires_grad_(True)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype).requires_grad_(True)
    b = torch.randn(n, generator=gen).to(device, dtype).requires_grad_(True) if shape.bias else None
    g = torch.randn(m, n, generator=gen).to(device, dtype)
    return x, w, b, g


def _reference64(x, w, b, act, g):
    torch = _torch()
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True) if b is not None else None
    y = act(torch.nn.functional.linear(x64, w64, b64))
    y.backward(g.double())
    return y.detach(), x64.grad, w64.grad, (b64.grad if b64 is not None else None)


def check_layer(shape: Shape, dtype_name: str, activation: str, device, tol: float) -> List[dict]:
    """forward, dX and dW+db rows of one layer case."""
    torch = _torch()
    base = {"dtype": dtype_name, "case": shape.name, "shape": f"{shape.m}x{shape.k}->{shape.n}",
            "activation": activation, "bias": shape.bias, "layout": shape.layout, "tol": tol}
    try:
        act = reference_activation(activation)
        gen = torch.Generator().manual_seed(shape.m * 1_000_003 + shape.k * 1009 + shape.n)
        x, w, b, g = _layer_inputs(shape, torch_dtype(dtype_name), device, gen)
        y = fused(x, w, b, activation)
        y.backward(g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        y64, dx64, dw64, db64 = _reference64(x, w, b, act, g)
        parts = {"forward": {"y": measure(y, y64)},
                 "dX": {"dx": measure(x.grad, dx64)},
                 "dW+db": {"dw": measure(w.grad, dw64),
                           **({"db": measure(b.grad, db64)} if b is not None else {})}}
    except Exception as exc:  # one failing case must not cost the others: a fail row each
        reason = _describe(exc)
        return [dict(base, kernel=k, status="fail", err=None, reason=reason,
                     traceback=traceback.format_exc(limit=4)[-1500:]) for k in LAYER_KERNELS]
    rows = []
    for kernel, measured in parts.items():
        status, worst, reason = judge(measured, tol)
        rows.append(dict(base, kernel=kernel, status=status, err=worst, reason=reason,
                         parts={k: v["err"] for k, v in measured.items()}))
    return rows


def _sgd_reference(p64, g64, buf64, lr, momentum=0.0, weight_decay=0.0, nesterov=False,
                   dampening=0.0):
    """torch.optim.SGD's update in float64 (documented algorithm); returns (p, buf)."""
    d = g64 + weight_decay * p64 if weight_decay else g64
    if momentum:
        buf64 = d.clone() if buf64 is None else momentum * buf64 + (1 - dampening) * d
        d = d + momentum * buf64 if nesterov else buf64
    return p64 - lr * d, buf64


def check_sgd(dtype_name: str, device, tol: float, tiny: bool) -> List[dict]:
    """fastmlp.SGD, two steps per config, against the float64 update from the same values."""
    import fastmlp

    torch = _torch()
    shapes = TINY_SGD_SHAPES if tiny else SGD_SHAPES
    rows = []
    for config, kwargs in SGD_CONFIGS:
        base = {"kernel": "SGD", "dtype": dtype_name, "case": config,
                "shape": " ".join("x".join(map(str, s)) for s in shapes), "activation": "-",
                "tol": tol, "notes": "no matmul: TF32 changes nothing" if dtype_name == "tf32" else None}
        try:
            gen = torch.Generator().manual_seed(7)
            dtype = torch_dtype(dtype_name)
            params = [torch.randn(*s, generator=gen).to(device, dtype).requires_grad_(True)
                      for s in shapes]
            opt = fastmlp.SGD(params, **kwargs)
            ref = [p.detach().double() for p in params]
            bufs = [None] * len(params)
            for _ in range(2):
                grads = [torch.randn(*s, generator=gen).to(device, dtype) for s in shapes]
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                for i, g in enumerate(grads):
                    ref[i], bufs[i] = _sgd_reference(ref[i], g.double(), bufs[i], **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            measured = {"params": measure(torch.cat([p.detach().flatten() for p in params]),
                                          torch.cat([r.flatten() for r in ref]))}
            if kwargs.get("momentum"):
                got = [opt.state[p].get("momentum_buffer") for p in params]
                if any(b is None for b in got):
                    measured["momentum_buffer"] = {"err": None, "nan": 0, "missing": True}
                else:
                    measured["momentum_buffer"] = measure(
                        torch.cat([b.flatten() for b in got]), torch.cat([b.flatten() for b in bufs]))
            status, worst, reason = judge(measured, tol)
            rows.append(dict(base, status=status, err=worst, reason=reason,
                             parts={k: v["err"] for k, v in measured.items()}))
        except Exception as exc:
            rows.append(dict(base, status="fail", err=None, reason=_describe(exc),
                             traceback=traceback.format_exc(limit=4)[-1500:]))
    return rows


def _seed_model(dims, device):
    torch = _torch()
    layers = []
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(torch.nn.Linear(k, n))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(device)


def check_fit(device, tol: float, tiny: bool) -> List[dict]:
    """fit(cuda_graph=True) against fit(cuda_graph=False): same per-epoch losses and weights.

    A short last batch in every epoch (samples not a multiple of the batch) takes fit's eager
    path next to the graph; several epochs exercise the graph's re-validation at epoch starts.
    """
    import fastmlp

    torch = _torch()
    seed = TINY_SEED if tiny else SEED
    batch, dims = seed["batch"], seed["dims"]
    samples = batch * seed["steps"] + batch // 2 + 1
    base = {"kernel": "fit", "dtype": "fp32", "case": "seed-model graph vs eager",
            "shape": f"{batch}x" + "->".join(map(str, dims)), "activation": "relu", "tol": tol,
            "notes": (f"{seed['epochs']} epochs x {samples} samples (batch {batch}, short last "
                      f"batch), MSE sum, fastmlp.SGD lr 1e-4"
                      + ("" if device.type == "cuda" else "; on CPU fit takes no CUDA graph "
                         "(cuda_graph='auto' against False): both runs are eager, this row "
                         "checks the harness only"))}
    try:
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(samples, dims[0], generator=gen)
        y = torch.randn(samples, dims[-1], generator=gen)

        def train(cuda_graph):
            torch.manual_seed(0)
            model = fastmlp.fuse(_seed_model(dims, device))
            loader = fastmlp.TensorLoader(x, y, batch_size=batch, shuffle=True, device=device,
                                          generator=torch.Generator().manual_seed(1))
            opt = fastmlp.SGD(model.parameters(), lr=1e-4)
            history = fastmlp.fit(model, loader, torch.nn.MSELoss(reduction="sum"), opt,
                                  epochs=seed["epochs"], cuda_graph=cuda_graph, progress=False)
            return history["loss"], torch.cat([p.detach().flatten() for p in model.parameters()])

        eager_loss, eager_w = train(False)
        # fit refuses cuda_graph=True off CUDA; "auto" there is the eager path
        graph_loss, graph_w = train(True if device.type == "cuda" else "auto")
        measured = {"losses": measure(torch.tensor(graph_loss, dtype=torch.float64),
                                      torch.tensor(eager_loss, dtype=torch.float64)),
                    "weights": measure(graph_w, eager_w)}
        status, worst, reason = judge(measured, tol)
        return [dict(base, status=status, err=worst, reason=reason,
                     parts={k: v["err"] for k, v in measured.items()},
                     losses={"graph": graph_loss, "eager": eager_loss})]
    except Exception as exc:
        return [dict(base, status="fail", err=None, reason=_describe(exc),
                     traceback=traceback.format_exc(limit=6)[-2000:])]


def _fuse(model):
    import fastmlp

    return fastmlp.fuse(model)


def _fused_mlp(model):
    import fastmlp

    return fastmlp.FusedMLP.from_sequential(model)


def _fused_mlp_on_path(path: str):
    """FusedMLP with its dispatcher forced to one path (fastmlp.mlp.use_path): the auto path may
    time both and keep either, so each path gets its own row."""
    def build(model):
        mlp = _fused_mlp(model)
        from fastmlp.mlp import use_path

        torch = _torch()

        class OnPath(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = mlp

            def forward(self, x):
                with use_path(path):
                    return self.inner(x)

        return OnPath()
    return build


# Whole modules against the same nn.Sequential in float64: name -> builder(nn.Sequential on the
# device, in the row's dtype) returning the fastmlp module (it may share the parameters), or
# raising Skip with the reason it cannot run here. A new module is one entry here.
MODULES: Dict[str, Callable] = {
    "fuse(seed model)": _fuse,
    "FusedMLP": _fused_mlp,
    "FusedMLP fused path": _fused_mlp_on_path("fused"),
    "FusedMLP per-layer path": _fused_mlp_on_path("per-layer"),
}


def check_module(name: str, dtype_name: str, device, tol: float, tiny: bool) -> List[dict]:
    """Forward and every gradient (input included) of MODULES[name] on the seed network."""
    torch = _torch()
    seed = TINY_SEED if tiny else SEED
    batch, dims = seed["batch"], seed["dims"]
    base = {"kernel": name, "dtype": dtype_name, "case": "seed network fwd+bwd",
            "shape": f"{batch}x" + "->".join(map(str, dims)), "activation": "relu", "tol": tol}
    try:
        torch.manual_seed(0)
        dtype = torch_dtype(dtype_name)
        model = _seed_model(dims, device).to(dtype)
        reference = copy.deepcopy(model).to(torch.float64)  # from the same rounded parameters
        module = MODULES[name](model)
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(batch, dims[0], generator=gen).to(device, dtype).requires_grad_(True)
        g = torch.randn(batch, dims[-1], generator=gen).to(device, dtype)
        out = module(x)
        out.backward(g)
        x64 = x.detach().double().requires_grad_(True)
        out64 = reference(x64)
        out64.backward(g.double())
        grads = [p.grad for p in module.parameters()]
        grads64 = [p.grad for p in reference.parameters()]
        if len(grads) != len(grads64) or any(gr is None for gr in grads):
            raise ValueError(f"{name}: {len(grads)} parameter gradients, reference has {len(grads64)}")
        measured = {"y": measure(out, out64.detach()), "dx": measure(x.grad, x64.grad),
                    "param grads": measure(torch.cat([gr.flatten() for gr in grads]),
                                           torch.cat([gr.flatten() for gr in grads64]))}
    except Skip as why:
        return [dict(base, status="skipped", err=None, reason=str(why))]
    except Exception as exc:
        return [dict(base, status="fail", err=None, reason=_describe(exc),
                     traceback=traceback.format_exc(limit=4)[-1500:])]
    status, worst, reason = judge(measured, tol)
    return [dict(base, status=status, err=worst, reason=reason,
                 parts={k: v["err"] for k, v in measured.items()})]


# ---------------------------------------------------------------------------------------------
# Jobs: the unit a worker runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One worker task: `kind` ("layer", "sgd", "fit", "module"), its dtype, an activation or
    module name, and for a layer the shape's name."""

    kind: str
    dtype: str
    name: str = ""
    shape: str = ""

    @property
    def label(self) -> str:
        return "/".join(filter(None, (self.kind, self.name, self.dtype, self.shape)))


def layer_shapes(activation: str, tiny: bool):
    if not tiny:
        return GPU_SHAPES
    if activation in ("relu", "none"):
        return TINY_SHAPES
    return tuple(s for s in TINY_SHAPES if s.name in TINY_OTHER_ACTIVATIONS)


def plan_jobs(activations, tiny: bool) -> List[Job]:
    """In order of value, since a stage cut short keeps only finished jobs: fit (the longest
    job) first, the seed layer for every activation x dtype, SGD, the modules, then the other
    shapes one at a time across all activations x dtypes (one job per layer case, so that the
    pool balances compile-heavy cases and a timeout loses little)."""
    def layers(shape_names):
        return [Job("layer", d, a, s.name) for s in (TINY_SHAPES if tiny else GPU_SHAPES)
                if s.name in shape_names for a in activations for d in DTYPES
                if s in layer_shapes(a, tiny)]

    shapes = [s.name for s in (TINY_SHAPES if tiny else GPU_SHAPES)]
    jobs = [Job("fit", "fp32")] + layers(shapes[:1])
    jobs += [Job("sgd", d) for d in DTYPES]
    jobs += [Job("module", d, m) for m in MODULES for d in DTYPES]
    return jobs + layers(shapes[1:])


def _run(job: Job, device, tol: float, tiny: bool) -> List[dict]:
    if job.kind == "layer":
        shape = next(s for s in (TINY_SHAPES if tiny else GPU_SHAPES) if s.name == job.shape)
        return check_layer(shape, job.dtype, job.name, device, tol)
    if job.kind == "sgd":
        return check_sgd(job.dtype, device, tol, tiny)
    if job.kind == "fit":
        return check_fit(device, tol, tiny)
    if job.kind == "module":
        return check_module(job.name, job.dtype, device, tol, tiny)
    raise ValueError(f"unknown job kind {job.kind!r}")


_WORKER = {"broken": None, "poison": None}


def _init_worker(threads: int) -> None:
    """Per worker: threads, NaN-poisoned kernel outputs (module switch and environment)."""
    torch = _torch()
    torch.set_num_threads(max(1, threads))
    os.environ["FASTMLP_POISON_OUTPUTS"] = "1"
    try:
        from fastmlp.kernels import debug

        debug.POISON_OUTPUTS = True
        _WORKER["poison"] = "on (fastmlp.kernels.debug.POISON_OUTPUTS and FASTMLP_POISON_OUTPUTS=1)"
    except Exception as exc:  # the module moved: the environment variable still asks for it
        _WORKER["poison"] = f"FASTMLP_POISON_OUTPUTS=1 only (fastmlp.kernels.debug: {_describe(exc)})"


def _context_broken(device) -> Optional[str]:
    """Why this process's CUDA context is unusable (a sticky error), or None."""
    if device.type != "cuda":
        return None
    torch = _torch()
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
        return None
    except Exception as exc:
        return _describe(exc)


def run_job(job: Job, device_name: str, tiny: bool) -> dict:
    """One job in a worker: its rows, or {"not_run": reason} when the worker is unusable."""
    import fastmlp

    torch = _torch()
    if _WORKER["broken"]:
        return {"not_run": f"worker's CUDA context broken earlier ({_WORKER['broken']})"}
    device = torch.device(device_name)
    started = time.perf_counter()
    tol = project_tolerances()[job.dtype]
    with _TF32(job.dtype == "tf32"), fastmlp.use_backend("triton"):
        rows = _run(job, device, tol, tiny)
    broken = _context_broken(device)
    if broken:
        _WORKER["broken"] = f"{job.label}: {broken}"
    return {"rows": rows, "seconds": time.perf_counter() - started, "poison": _WORKER["poison"],
            "pid": os.getpid(), "broke_context": broken}


def _not_run_rows(job: Job, reason: str) -> List[dict]:
    kernels = {"layer": LAYER_KERNELS, "sgd": ("SGD",), "fit": ("fit",)}.get(job.kind, (job.name,))
    return [{"kernel": k, "dtype": job.dtype, "case": f"job {job.label}", "shape": None,
             "activation": job.name if job.kind == "layer" else "-", "status": "fail",
             "err": None, "tol": None, "reason": f"not run: {reason}"} for k in kernels]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
KERNEL_ORDER = {k: i for i, k in enumerate(LAYER_KERNELS + ("SGD", "fit"))}


def _sort_key(row: dict):
    return (KERNEL_ORDER.get(row["kernel"], 99), row["kernel"], DTYPES.index(row["dtype"])
            if row["dtype"] in DTYPES else 9, str(row.get("activation")), str(row.get("case")))


class Stage:
    """Collects rows and writes the stage's JSON (atomically) after every job."""

    def __init__(self, out: str, meta: dict, jobs: List[Job]):
        self.out, self.meta, self.jobs = out, meta, jobs
        self.rows: List[dict] = []
        self.done: List[dict] = []
        self.poison = set()
        self.started = time.perf_counter()

    def write(self, complete: bool, interrupted: Optional[str] = None) -> dict:
        from bench.gpucheck import report

        rows = sorted(self.rows, key=_sort_key)
        finished = {d["job"] for d in self.done}
        result = dict(self.meta, complete=complete, interrupted=interrupted,
                      unfinished=[j.label for j in self.jobs if j.label not in finished],
                      seconds=time.perf_counter() - self.started,
                      jobs_total=len(self.jobs), jobs_done=len(self.done),
                      poison_outputs=sorted(self.poison) or None,
                      jobs=self.done, matrix=report.correctness_matrix(rows), rows=rows)
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, self.out)
        return result


def run_all(stage: Stage, device_name: str, tiny: bool, workers: int, threads: int,
            log=print) -> None:
    """Run stage.jobs in spawn pools (a second, fresh pool for jobs a broken worker refused)."""
    pending, retried = list(stage.jobs), set()
    context = multiprocessing.get_context("spawn")
    while pending:
        retry = []
        pool = cf.ProcessPoolExecutor(max_workers=max(1, min(workers, len(pending))),
                                      mp_context=context, initializer=_init_worker,
                                      initargs=(threads,))
        stage.pool = pool
        futures = {pool.submit(run_job, job, device_name, tiny): job for job in pending}
        for fut in cf.as_completed(futures):
            job = futures[fut]
            try:
                result = fut.result()
            except cf.process.BrokenProcessPool as exc:
                result = {"not_run": f"a worker process died ({exc or 'BrokenProcessPool'})"}
            except Exception as exc:  # the job machinery itself failed (pickling, import)
                result = {"rows": _not_run_rows(job, _describe(exc)), "seconds": None}
            if "not_run" in result:
                if job in retried:
                    stage.rows += _not_run_rows(job, result["not_run"])
                    stage.done.append({"job": job.label, "status": "not run",
                                       "reason": result["not_run"]})
                else:
                    retried.add(job)
                    retry.append(job)
                    log(f"  {job.label}: not run ({result['not_run']}); retrying in a fresh pool")
                    continue
            else:
                stage.rows += result["rows"]
                if result.get("poison"):
                    stage.poison.add(result["poison"])
                bad = sum(r["status"] == "fail" for r in result["rows"])
                stage.done.append({"job": job.label, "seconds": result.get("seconds"),
                                   "rows": len(result["rows"]), "failed": bad,
                                   "broke_context": result.get("broke_context")})
                took = result.get("seconds") or 0.0
                done = len(stage.done)
                if bad or took > 10 or done % 25 == 0 or done == len(stage.jobs):
                    log(f"  [{done}/{len(stage.jobs)}] {job.label}: {len(result['rows'])} rows, "
                        f"{bad} failed, {took:.1f} s")
            stage.write(complete=False)
        pool.shutdown(wait=True)
        pending = retry


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpucheck.correctness",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the stage's JSON (written after every job)")
    p.add_argument("--tiny", action="store_true", help="interpreter-sized shapes (dry run)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: CPUs - 2, at most 14; all CPUs below 4)")
    p.add_argument("--activations", default=None,
                   help="comma list (default: fastmlp.ACTIVATIONS)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = _torch()
    device_name = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # The Triton backend on CPU tensors needs the interpreter, switched on before the
        # workers import triton (they inherit this environment).
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FASTMLP_POISON_OUTPUTS"] = "1"
    import fastmlp

    activations = args.activations.split(",") if args.activations else list(fastmlp.ACTIVATIONS)
    cpus = os.cpu_count() or 1
    # Compile-bound: as many workers as CPUs but two (for the parent and the GPU's driver
    # threads), at most 14; every worker holds a CUDA context (~0.5 GiB).
    workers = args.workers or (min(14, cpus - 2) if cpus >= 4 else max(1, cpus))
    jobs = plan_jobs(activations, args.tiny)
    meta = {"stage": "correctness", "device": device_name,
            "device_name": torch.cuda.get_device_name(0) if device_name == "cuda" else "cpu",
            "tiny": args.tiny, "started_at": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"),
            "entry_point": entry_point(), "backend": "triton (forced)",
            "autotune": os.environ.get("FASTMLP_AUTOTUNE", "1"),
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
            "activations": activations, "dtypes": list(DTYPES), "tolerances": project_tolerances(),
            "shapes": [asdict(s) for s in (TINY_SHAPES if args.tiny else GPU_SHAPES)],
            "workers": workers, "measure": "relative norm error vs float64 torch on the device "
                                          "(tests/reference.py), strict <"}
    stage = Stage(args.out, meta, jobs)
    stage.write(complete=False)
    print(f"correctness: {len(jobs)} jobs on {device_name} in {workers} worker(s); "
          f"{meta['entry_point']}, activations {activations}", flush=True)
    try:
        run_all(stage, device_name, args.tiny, workers, max(1, cpus // workers),
                log=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        result = stage.write(complete=False, interrupted="SIGINT (the stage's timeout)")
        print(f"correctness: interrupted after {result['jobs_done']}/{len(jobs)} jobs", flush=True)
        pool = getattr(stage, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        sys.stdout.flush()
        os._exit(130)  # no joining of busy workers: the orchestrator kills the group
    result = stage.write(complete=True)
    failed = [r for r in result["rows"] if r["status"] == "fail"]
    for r in failed[:30]:
        print(f"FAIL {r['kernel']} {r['dtype']} {r.get('activation')} {r.get('case')}: {r['reason']}")
    counts = {s: sum(r["status"] == s for r in result["rows"]) for s in ("pass", "fail", "skipped")}
    print(f"correctness: {counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped "
          f"in {result['seconds']:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
