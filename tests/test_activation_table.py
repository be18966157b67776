"""The activation tables are the one place an activation is defined: a throwaway activation made
only of the two tables' mechanisms (a row in kernels/activations.py, a row in
fastmlp/activations.py, and its jit forward and derivative, here instead of
kernels/activation_jit.py) runs through FusedLinear, FusedMLP (both paths), fuse() and the
ahead-of-time compile lists, with nothing else edited. The rows are registered from the test
(``register`` / ``unregister`` in both tables), so the package stays as shipped.

The throwaway is softsign, z / (1 + |z|): its derivative 1 / (1 + |z|)^2 reads the
pre-activation ("preact"), is "math", and is declared fused from sm_90 on only, so each column
the kernels' side reads has a value the shipped rows' defaults would not give. The reference is
torch's own F.softsign in float64, differentiated by autograd (not the row's torch functions).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp import activations
from reference import assert_close

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastmlp.kernels import activations as kernel_table  # noqa: E402
from fastmlp.kernels.activation_jit import opmath  # noqa: E402

NAME = "softsign"


@triton.jit
def softsign(z, ALPHA: tl.constexpr):
    return z / (1.0 + tl.abs(z))


@triton.jit
def softsign_grad(g, z, ALPHA: tl.constexpr):
    gf = opmath(g)
    zf = opmath(z)
    d = 1.0 + tl.abs(zf)
    return (gf / (d * d)).to(g.dtype)


def register():
    """Both rows of the throwaway; returns fastmlp's row. (Also called by the AOT subprocess.)"""
    kernel_table.register(kernel_table.KernelActivation(
        NAME, saves=lambda alpha: "preact", derivative=kernel_table.MATH, fused_backward_from=90,
        jit_module=__name__))
    return activations.register(activations.Activation(
        name=NAME,
        torch_forward=lambda z, a: F.softsign(z),
        torch_backward=lambda g, z, a: g / (1 + z.abs()) ** 2,
        module=nn.Softsign,
        functions=(F.softsign,),
        doc="z / (1 + |z|)"))


def unregister():
    activations.unregister(NAME)
    kernel_table.unregister(NAME)


@pytest.fixture
def throwaway():
    row = register()
    try:
        yield row
    finally:
        unregister()
    assert NAME not in activations.TABLE and NAME not in kernel_table.TABLE


def _reference(x, w, b, g):
    """(y, dx, dw, db) of softsign(x Wᵀ + b) in float64 by torch's autograd."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w)]
    b64 = b.detach().double().cpu().requires_grad_() if b is not None else None
    y = F.softsign(F.linear(leaves[0], leaves[1], b64))
    y.backward(g.double().cpu())
    return y.detach(), leaves[0].grad, leaves[1].grad, (b64.grad if b64 is not None else None)


@pytest.mark.parametrize("shape,bias,dtype", [
    ((7, 13), True, torch.float32), ((1, 5), False, torch.float32),
    ((2, 3, 17), True, torch.float32), ((7, 13), True, torch.bfloat16)])
def test_fused_linear_runs_a_registered_activation(throwaway, impl, shape, bias, dtype):
    """FusedLinear by name and by its torch module: forward, dX, dW, db against float64 torch,
    on the kernels (interpreter) and on the torch path; the forward saves Z for backward."""
    *lead, K = shape
    N = 11
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(*lead, K, generator=gen).to(impl, dtype).requires_grad_()
    for activation in (NAME, nn.Softsign()):
        layer = fastmlp.FusedLinear(K, N, bias=bias, activation=activation).to(impl, dtype)
        assert layer.activation == NAME and "activation=softsign" in repr(layer)
        g = torch.randn(*lead, N, generator=gen).to(impl, dtype)
        x.grad = None
        y = layer(x)
        y.backward(g)
        ry, rdx, rdw, rdb = _reference(x, layer.weight, layer.bias, g)
        assert_close(y, ry, dtype, "y")
        assert_close(x.grad, rdx, dtype, "dX")
        assert_close(layer.weight.grad, rdw, dtype, "dW")
        if bias:
            assert_close(layer.bias.grad, rdb, dtype, "db")
    assert throwaway.saves(0.0) == "preact"


def test_fuse_finds_the_registered_module_and_call(throwaway, triton_backend):
    """fuse() rewrites Linear -> nn.Softsign() and Linear -> F.softsign(...) (a traced call)."""
    class CallsIt(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 9), nn.Linear(9, 4)

        def forward(self, x):
            return self.fc2(F.softsign(self.fc1(x)))

    for model in (nn.Sequential(nn.Linear(6, 9), nn.Softsign(), nn.Linear(9, 4)), CallsIt()):
        x = torch.randn(5, 6)
        want = model(x)
        fused, report = fastmlp.fuse(model, return_report=True)
        assert [(e.activation, e.outcome) for e in report if e.outcome == "fused"] == \
            [(NAME, "fused")], report
        layers = [m for m in fused.modules() if isinstance(m, fastmlp.FusedLinear)]
        assert [m.activation for m in layers] == [NAME]
        assert_close(fused(x), want, torch.float32, "fused model")


@pytest.mark.parametrize("path", ["fused", "per-layer"])
def test_fused_mlp_runs_a_registered_activation(throwaway, triton_backend, path):
    """FusedMLP with the throwaway between its hidden layers and as its output activation, on the
    fully fused kernels (which save Z and recompute Y in the weight-gradient kernel) and on the
    per-layer path; its children are the row's module, so from_sequential round-trips."""
    gen = torch.Generator().manual_seed(3)
    mlp = fastmlp.FusedMLP(5, [16, 12], 3, activation=NAME, output_activation=nn.Softsign())
    assert [type(m) for m in mlp.children()].count(nn.Softsign) == 3
    seq = nn.Sequential(*mlp.children())
    x = torch.randn(9, 5, generator=gen).requires_grad_()
    g = torch.randn(9, 3, generator=gen)
    with fastmlp.mlp.use_path(path):
        y = mlp(x)
        y.backward(g)
    ref = [p.detach().double().requires_grad_() for p in seq.parameters()]
    x64 = x.detach().double().requires_grad_()
    h = x64
    for i in range(0, len(ref), 2):
        h = F.softsign(F.linear(h, ref[i], ref[i + 1]))
    h.backward(g.double())
    assert_close(y, h.detach(), torch.float32, "y")
    assert_close(x.grad, x64.grad, torch.float32, "dX")
    for p, r in zip(mlp.parameters(), ref):
        assert_close(p.grad, r.grad, torch.float32, "parameter gradient")
    with fastmlp.mlp.use_path(path), torch.no_grad():
        assert_close(fastmlp.FusedMLP.from_sequential(seq)(x), y, torch.float32, "from_sequential")


def test_kernel_side_columns_are_read(throwaway, monkeypatch):
    """What the kernels' side derives from the row: the per-layer backward is TORCH_GEMM before
    its fused_backward_from, the fused MLP takes the "math" tiles, and the AOT lists hold it
    (forward, forward with Z, and the backward kernels only where it is fused)."""
    from fastmlp.kernels import aot, configs, mlp_aot, tuning

    monkeypatch.setattr(tuning, "_INTERPRET", False)  # the lists a compiled (GPU) run gets
    for kernel in ("dx", "dw"):
        assert tuning.candidate_configs(torch.bfloat16, "ieee", (8, 0), kernel, NAME) == \
            [tuning.TORCH_GEMM]
        assert len(tuning.candidate_configs(torch.bfloat16, "ieee", (9, 0), kernel, NAME)) > 1
    assert len(tuning.candidate_configs(torch.bfloat16, "ieee", (8, 0), "fwd", NAME)) > 1
    for arch in (80, 90):
        shared = configs.SHARED_MEMORY_LIMIT[arch]
        got = configs.fused_configs(torch.bfloat16, False, 64, NAME, (arch // 10, 0), shared, False)
        assert got == configs.MATH_CONFIGS[("half", arch)][64] != \
            configs.fused_configs(torch.bfloat16, False, 64, "relu", (arch // 10, 0), shared, False)
    cases = {(k, arch) for k, arch, *_, a in aot.shipped_cases() if a == NAME}
    assert cases == {("forward", 80), ("forward_z", 80), ("forward", 90), ("forward_z", 90),
                     ("grad_input", 90), ("grad_weight", 90)}
    assert {k for k, *_, a in aot.ci_cases() if a == NAME} == {"forward_z", "grad_input", "grad_weight"}
    full = {(k, c) for k, arch, d, p, h, a, c, s in mlp_aot.shipped_cases(full=True) if a == NAME}
    assert {k for k, _ in full} == {"mlp_forward", "mlp_backward", "mlp_grad_weight"}
    assert {c for k, c in full if k == "mlp_backward"} >= set(configs.MATH_CONFIGS[("half", 90)][64])


def test_registration_errors(throwaway):
    with pytest.raises(ValueError, match="already in the table"):
        register()
    with pytest.raises(ValueError, match="unknown activation 'nowhere'"):
        activations.Activation(name="nowhere", torch_forward=None, torch_backward=None)
    with pytest.raises(ValueError, match="shipped activation"):
        kernel_table.unregister("relu")
    kernel_table.register(kernel_table.KernelActivation(
        "missing_jit", saves=lambda a: "output", derivative=kernel_table.SELECT, jit_module=__name__))
    try:
        from fastmlp.kernels.activation_jit import functions

        with pytest.raises(ValueError, match="no jit functions missing_jit"):
            functions("missing_jit")
    finally:
        kernel_table.unregister("missing_jit")
    with pytest.raises(ValueError, match="derivative must be"):
        kernel_table.KernelActivation("bad", saves=lambda a: "output", derivative="cheap")


@pytest.mark.slow  # three compiles for sm_90 in a subprocess without the interpreter
def test_registered_activation_compiles_for_sm90_without_spills():
    """The throwaway's kernels compile ahead of time as the shipped ones do (kernels/aot.py,
    kernels/mlp_aot.py): per-layer forward with Z and dX, and the fused MLP's backward."""
    here = os.path.dirname(os.path.abspath(__file__))
    script = f"""
import sys
sys.path.insert(0, {here!r})
import test_activation_table as t
t.register()
from fastmlp.kernels import aot, configs, mlp_aot, tuning
cfg = tuning.all_shipped_configs()["tensor_core_sm90"][0]
reports = [aot.compile_config(k, 90, "bf16", "ieee", cfg, t.NAME) for k in ("forward_z", "grad_input")]
mlp = mlp_aot.compile_case("mlp_backward", 90, "bf16", "ieee", 64, t.NAME,
                           configs.MATH_CONFIGS[("half", 90)][64][0], "odd")
for r in reports + [mlp]:
    print(r.kernel, r.registers, r.spill_bytes, r.float_minmax)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(here)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.strip().splitlines()]
    assert [r[0] for r in rows] == ["forward_z", "grad_input", "mlp_backward"], proc.stdout
    for kernel, registers, spills, minmax in rows:
        assert int(registers) > 0 and int(spills) == 0 and int(minmax) == 0, (kernel, registers, spills)
