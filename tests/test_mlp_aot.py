"""Every shipped fused-MLP config compiles for sm_80 and sm_90 (no GPU needed) without register
spills or a stack frame, within the shared-memory limit, with the Hopper 16-bit and TF32 tiles of
64+ rows on wgmma (not serialised by ptxas) and no NaN-dropping max/min; and the tables say where
the fully fused limit is. The kernels take no hidden-width constexpr but the padded tile width
H, so what is compiled here at H is what every width that pads to H runs.

The compiles (~300: the heaviest activation of each kernel, each as launched on sizes that are
multiples of 16 and on sizes that are not; ``python -m fastmlp.kernels.mlp_aot --full`` compiles
every dtype and activation) run once, in a subprocess without TRITON_INTERPRET, and each case is
then its own test.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from fastmlp.kernels import aot, mlp, mlp_aot  # noqa: E402

CASES = list(mlp_aot.shipped_cases())


def _id(kernel, arch, dtype, precision, hidden, activation, config: dict, sizes):
    shape = "x".join(str(v) for k, v in config.items() if k not in ("num_warps", "num_stages", "group"))
    return (f"{kernel}-sm{arch}-{dtype}-{precision}-H{hidden}-{activation}-{shape}"
            f"-w{config['num_warps']}-s{config['num_stages']}-{sizes}")


def _case_id(case):
    kernel, arch, dtype, precision, hidden, activation, config, sizes = case
    from dataclasses import asdict

    return _id(kernel, arch, dtype, precision, hidden, activation, asdict(config), sizes)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp_aot") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-m", "fastmlp.kernels.mlp_aot", "--json", str(out)], env=env,
                   check=True, stdout=subprocess.DEVNULL, timeout=1200)
    return {_id(r["kernel"], r["arch"], r["dtype"], r["precision"], r["hidden"], r["activation"],
                r["config"], r["sizes"]): r for r in json.loads(out.read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_shipped_config_compiles_cleanly(reports, case):
    r = reports[_case_id(case)]
    assert r["registers"] > 0, "the compile failed (see the subprocess output)"
    assert r["spill_bytes"] == 0, f"{r['spill_bytes']} bytes of spills at {r['registers']} registers"
    assert r["stack_bytes"] == 0, f"{r['stack_bytes']} bytes of stack frame"
    assert r["shared_bytes"] <= aot.SHARED_MEMORY_LIMIT[r["arch"]], r["shared_bytes"]
    assert r["float_minmax"] == 0, "a NaN-dropping max/min in the PTX (relu(NaN) must stay NaN)"
    # wgmma works on 64-row warpgroup tiles: the 16-bit and TF32 tiles of >= 64 rows use it;
    # exact fp32 runs on FMA units, and 16/32-row fp32 tiles on mma.sync.
    rows = r["config"].get("block_m", r["config"].get("block_rows"))
    tensor_cores = r["dtype"] in ("fp16", "bf16") or r["precision"] == "tf32"
    if r["arch"] == 90 and tensor_cores and rows >= 64:
        assert r["hgmma"] > 0, "no HGMMA (wgmma) instruction in the Hopper SASS"
    if r["hgmma"] > 0:  # the TTGIR was read: every wgmma site has its wait
        assert r["wgmma_waits"], "HGMMA in the SASS but no warp_group_dot_wait in the TTGIR"
    assert not r["wgmma_serialised"], "ptxas serialised the wgmma"


def test_the_nan_and_wgmma_readers_see_what_they_look_for():
    """The readers behind the checks above, on known text: a NaN-dropping max/min is counted
    (f32, f16x2, with .ftz / .xorsign), its .NaN form and integer max are not; wgmma waits are
    read in order. (Taken by position from fastmlp.kernels.aot's report tuple, whose length
    changed between versions, the NaN count read a field that was not there and was always 0.)"""
    ptx = ("max.f32 %f1, %f2, %f3;\n min.ftz.f32 %f1, %f2, %f3;\n max.bf16x2 %r1, %r2, %r3;\n"
           "min.xorsign.abs.f32 %f1, %f2, %f3;\n max.NaN.f32 %f1, %f2, %f3;\n"
           "max.NaN.ftz.f32 %f1, %f2, %f3;\n max.s32 %r1, %r2, %r3;\n max.u64 %rd1, %rd2, %rd3;")
    assert mlp_aot.float_minmax_count(ptx) == 4
    ttgir = ("%1 = ttng.warp_group_dot_wait %0 {pendings = 1 : i32} : tensor<...>\n"
             "%2 = ttng.warp_group_dot_wait %1 {pendings = 0 : i32} : tensor<...>")
    assert mlp_aot.wgmma_waits(ttgir) == [1, 0]


def test_fused_limit_is_128_for_every_dtype_class_and_gpu():
    """The dispatcher's eligibility follows the tables: every power-of-two width up to 128 has
    configs (the first the default), nothing wider does."""
    for key, by_width in mlp.FUSED_CONFIGS.items():
        assert sorted(by_width) == [16, 32, 64, 128], key
        assert all(by_width[h] for h in by_width), key
    for key, by_width in mlp.MATH_CONFIGS.items():
        assert set(by_width) <= set(mlp.FUSED_CONFIGS[key]) and all(by_width.values()), key
    assert set(mlp.DW_CONFIGS) == set(mlp.FUSED_CONFIGS)
    widths = {h for by_width in mlp.FUSED_CONFIGS.values() for h in by_width}
    assert max(widths) == 128 and mlp.padded_width(100) == 128 and mlp.padded_width(3) == 16


@pytest.mark.parametrize("dtype,tf32,expected", [
    (torch.float16, False, "half"), (torch.bfloat16, False, "half"),
    (torch.float32, True, "tf32"), (torch.float32, False, "ieee"), (torch.float64, False, "fp64")])
def test_dtype_class(dtype, tf32, expected):
    assert mlp.dtype_class(dtype, tf32) == expected
