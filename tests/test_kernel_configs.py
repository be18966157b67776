"""Every shipped kernel config compiles for sm_80 and sm_90 (no GPU needed), without register
spills, within the shared-memory limit, and the Hopper fp16/bf16 (and 64-row TF32) configs use wgmma.

The compiles run once, in a subprocess without TRITON_INTERPRET (the interpreter cannot compile),
through ``python -m fastmlp.kernels.aot --json``; each case is then its own test.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from fastmlp.kernels import aot, tuning  # noqa: E402

CASES = list(aot.shipped_cases())


def _id(case):
    kernel, arch, dtype, precision, c = case
    return (f"{kernel}-sm{arch}-{dtype}-{precision}-{c.block_rows}x{c.block_cols}x{c.block_red}"
            f"-w{c.num_warps}-s{c.num_stages}")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-m", "fastmlp.kernels.aot", "--json", str(out)], env=env,
                   check=True, stdout=subprocess.DEVNULL, timeout=1200)
    reports = {}
    for r in json.loads(out.read_text()):
        if r["kernel"] == "sgd":
            reports[("sgd", r["arch"], r["dtype"], r["precision"] == "momentum")] = r
        else:
            reports[_id((r["kernel"], r["arch"], r["dtype"], r["precision"],
                         tuning.TileConfig(**r["config"])))] = r
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_shipped_config_compiles_cleanly(reports, case):
    report = reports[_id(case)]
    assert report["spill_bytes"] == 0, f"{report['spill_bytes']} bytes of spills at {report['registers']} registers"
    assert report["stack_bytes"] == 0, f"{report['stack_bytes']} bytes of stack frame"
    assert report["shared_bytes"] <= aot.SHARED_MEMORY_LIMIT[report["arch"]], report["shared_bytes"]
    # wgmma works on 64-row warpgroup tiles: every Hopper fp16/bf16 config has them; the TF32 list
    # also keeps a 32x32 tile for tiny shapes, which runs on mma.sync instead.
    big_tf32 = report["precision"] == "tf32" and report["config"]["block_rows"] >= 64
    if report["arch"] == 90 and (report["dtype"] in ("fp16", "bf16") or big_tf32):
        assert report["hgmma"] > 0, "no HGMMA (wgmma) instruction in the Hopper SASS"


def test_every_shipped_config_list_is_covered():
    listed = {(name, c) for name, configs in tuning.all_shipped_configs().items() for c in configs}
    covered = {c for _, _, _, _, c in CASES}
    assert {c for _, c in listed} <= covered
    assert {k for k, *_ in CASES} == {"forward", "grad_input", "grad_weight"}


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
