"""Every shipped fused-MLP config compiles for sm_80 and sm_90 (no GPU needed) without register
spills or a stack frame, within the shared-memory limit, with the Hopper 16-bit and TF32 tiles of
64+ rows on wgmma and no NaN-dropping max/min; and the tables say where the fully fused limit is.

The compiles (~85, the heaviest activation of each kernel; ``python -m fastmlp.kernels.mlp_aot
--full`` compiles every dtype and activation) run once, in a subprocess without TRITON_INTERPRET,
and each case is then its own test.
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


def _id(kernel, arch, dtype, precision, hidden, activation, config: dict):
    shape = "x".join(str(v) for k, v in config.items() if k not in ("num_warps", "num_stages", "group"))
    return (f"{kernel}-sm{arch}-{dtype}-{precision}-H{hidden}-{activation}-{shape}"
            f"-w{config['num_warps']}-s{config['num_stages']}")


def _case_id(case):
    kernel, arch, dtype, precision, hidden, activation, config = case
    from dataclasses import asdict

    return _id(kernel, arch, dtype, precision, hidden, activation, asdict(config))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp_aot") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-m", "fastmlp.kernels.mlp_aot", "--json", str(out)], env=env,
                   check=True, stdout=subprocess.DEVNULL, timeout=1200)
    return {_id(r["kernel"], r["arch"], r["dtype"], r["precision"], r["hidden"], r["activation"],
                r["config"]): r for r in json.loads(out.read_text())}


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
