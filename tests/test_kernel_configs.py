"""The shipped kernel configs compile for sm_80 and sm_90 (no GPU needed), for every activation:
no register spills, within the shared-memory limit, wgmma on the Hopper fp16/bf16 (and 64-row
TF32) configs, kept asynchronous inside the loops, and no NaN-dropping float min/max anywhere.

The compiles run once, in a subprocess without TRITON_INTERPRET (the interpreter cannot compile),
through ``python -m fastmlp.kernels.aot --ci --json``: the CI part of the matrix (every config for
relu and for gelu_tanh, the heaviest epilogue; the default and the largest config of each list
for the other activations: aot.ci_cases). ``python -m fastmlp.kernels.aot`` compiles all of it.
Each case is then its own test.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from fastmlp import activations  # noqa: E402
from fastmlp.kernels import aot, tuning  # noqa: E402

CASES = aot.ci_cases()


def _id(case):
    kernel, arch, dtype, precision, c, activation = case
    return (f"{kernel}-{activation}-sm{arch}-{dtype}-{precision}-{c.block_rows}x{c.block_cols}x{c.block_red}"
            f"-w{c.num_warps}-s{c.num_stages}")


def _relu_twin(case):
    """The same kernel and config with ReLU (the forward without Z: relu never saves it)."""
    kernel, arch, dtype, precision, config, _ = case
    return ("forward" if kernel == "forward_z" else kernel, arch, dtype, precision, config, "relu")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-m", "fastmlp.kernels.aot", "--ci", "--json", str(out)], env=env,
                   check=True, stdout=subprocess.DEVNULL, timeout=1200)
    reports = {}
    for r in json.loads(out.read_text()):
        if r["kernel"] == "sgd":
            reports[("sgd", r["arch"], r["dtype"], r["precision"] == "momentum")] = r
        elif r["kernel"] == "reduce":
            reports[("reduce", r["arch"], r["dtype"])] = r
        else:
            reports[_id((r["kernel"], r["arch"], r["dtype"], r["precision"],
                         tuning.TileConfig(**r["config"]), r["activation"]))] = r
    return reports


# sm_80 backward kernels of the activations whose derivative is transcendental in Z (erf-GELU,
# tanh-GELU, SiLU) needed more than 255 registers on nearly every config: they are not shipped
# (tuning.TORCH_BACKWARD_BEFORE_SM90: TORCH_GEMM runs those backward GEMMs), so no case here.
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_shipped_config_compiles_cleanly(reports, case):
    report = reports[_id(case)]
    # Every shipped kernel compiles without spills, on triton 3.6 and 3.9.
    assert report["spill_bytes"] == 0, \
        f"{report['spill_bytes']} bytes of spills at {report['registers']} registers"
    assert report["stack_bytes"] == 0, f"{report['stack_bytes']} bytes of stack frame"
    assert report["shared_bytes"] <= aot.SHARED_MEMORY_LIMIT[report["arch"]], report["shared_bytes"]
    # wgmma works on 64-row warpgroup tiles: every Hopper fp16/bf16 config has them; the TF32 list
    # also keeps a 32x32 tile for tiny shapes, which runs on mma.sync instead.
    big_tf32 = report["precision"] == "tf32" and report["config"]["block_rows"] >= 64
    if report["arch"] == 90 and (report["dtype"] in ("fp16", "bf16") or big_tf32):
        assert report["hgmma"] > 0, "no HGMMA (wgmma) instruction in the Hopper SASS"
    if report["hgmma"]:
        # The activation's derivative runs on the G tile in registers before each MMA: it must
        # not make the wgmma synchronous. Every wait inside the loop leaves MMAs in flight (the
        # one wait at 0 is after the loop; a synchronous loop has a single wait at 0).
        waits = report["wgmma_waits"]
        assert len(waits) >= 2 and waits[-1] == 0 and all(p > 0 for p in waits[:-1]), waits
        # ptxas's C7515 ("wgmma serialized due to non wgmma instructions defining accumulator
        # registers") hits some configs already with ReLU (bench/NOTES.md lists them): the
        # activation must not add to that list.
        if report["wgmma_serialised"]:
            assert reports[_id(_relu_twin(case))]["wgmma_serialised"], \
                "ptxas serialised the wgmma with this activation, not with relu"
    # NaN-safety the interpreter cannot show: a float max/min (max.f32, min.f32) drops NaN on the
    # GPU (relu written as maximum(z, 0) would turn NaN into 0; torch keeps it).
    assert report["float_minmax"] == 0, f"{report['float_minmax']} NaN-dropping float min/max in the PTX"


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype", aot.REDUCE_CASES)
def test_split_reduction_kernel_compiles_cleanly(reports, arch, dtype):
    report = reports[("reduce", arch, dtype)]
    assert report["spill_bytes"] == 0 and report["stack_bytes"] == 0, report
    assert report["wide_loads"] >= 2, report  # fp32 partials read 16 bytes at a time (padded rows)


def test_the_ci_matrix_covers_every_config_activation_and_kernel():
    listed = {c for configs in tuning.all_shipped_configs().values() for c in configs}
    assert listed <= {c for *_, c, _ in CASES}
    assert {k for k, *_ in CASES} == {"forward", "forward_z", "grad_input", "grad_weight"}
    for name in activations.ACTIVATIONS:  # each activation: a forward and both backward kernels
        kernels = {k for k, *_, a in CASES if a == name}
        assert {"grad_input", "grad_weight"} <= kernels and kernels & {"forward", "forward_z"}, name
    for name in ("relu", "gelu_tanh"):  # every config
        assert {c for *_, c, a in CASES if a == name} == listed
    full = list(aot.shipped_cases())  # what the CLI compiles: everything, once
    assert set(CASES) <= set(full) and len(full) == len(set(full))
    per_activation_and_kernel = {(k, a) for k, *_, a in full}
    assert len(per_activation_and_kernel) == 4 * len(activations.ACTIVATIONS)
    combos = {(arch, d, p, c) for _, arch, d, p, c, _ in full}
    not_shipped = sum(1 for k, a in per_activation_and_kernel for arch, *_ in combos
                      if arch < 90 and k in ("grad_input", "grad_weight")
                      and a in tuning.TORCH_BACKWARD_BEFORE_SM90)   # TORCH_GEMM runs those
    assert len(full) == len(per_activation_and_kernel) * len(combos) - not_shipped


def test_aot_knows_every_activation():
    """aot reads the activation names from kernels/activations.py (kernels never import fastmlp):
    they are fastmlp's whole table."""
    assert set(aot.ACTIVATIONS) == set(activations.ACTIVATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype,momentum", aot.SGD_CASES)
def test_sgd_kernel_compiles_cleanly(reports, arch, dtype, momentum):
    report = reports[("sgd", arch, dtype, momentum)]
    assert report["spill_bytes"] == 0 and report["stack_bytes"] == 0, report
    # full blocks stream p, g (and the momentum buffer) with 16-byte loads, 128 bytes per thread
    # and array when BLOCK=2048 and 4 warps: 4 (bf16: 2) such loads per array
    per_array = 4 if dtype == "fp32" else 2
    arrays = 3 if momentum else 2
    assert report["wide_loads"] >= per_array * arrays, report


def test_sm80_backward_of_heavy_derivatives_is_torch_and_not_compiled(monkeypatch):
    """Before Hopper, gelu/gelu_tanh/silu backward GEMMs are TORCH_GEMM alone (their kernels
    spill there); their forward, every other activation and Hopper keep the Triton configs."""
    monkeypatch.setattr(tuning, "_INTERPRET", False)
    for activation in tuning.TORCH_BACKWARD_BEFORE_SM90:
        for kernel in ("dx", "dw"):
            assert tuning.candidate_configs(torch.bfloat16, "ieee", (8, 0), kernel, activation) == \
                [tuning.TORCH_GEMM]
            assert len(tuning.candidate_configs(torch.bfloat16, "ieee", (9, 0), kernel, activation)) > 1
        assert len(tuning.candidate_configs(torch.bfloat16, "ieee", (8, 0), "fwd", activation)) > 1
    assert len(tuning.candidate_configs(torch.bfloat16, "ieee", (8, 0), "dw", "relu")) > 1
    shipped = {(c[0], c[1], c[5]) for c in aot.shipped_cases()}
    assert ("grad_weight", 80, "gelu") not in shipped and ("grad_weight", 90, "gelu") in shipped
    assert ("forward_z", 80, "gelu") in shipped
