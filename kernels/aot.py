"""Ahead-of-time compile of the shipped kernel configs for NVIDIA GPUs, without a GPU.

Why: the tests run the kernels through Triton's interpreter, which says nothing about registers,
spills or tensor-core instructions. ``triton.compile`` with an explicit ``GPUTarget`` produces the
PTX and cubin for sm_80 / sm_90 on any machine; triton's wheel carries ptxas and cuobjdump, whose
reports show the register count, spill bytes, shared memory, and whether the SASS uses Hopper's
warpgroup MMA (HGMMA). The compile mirrors a real launch on contiguous, 16-byte-aligned tensors:
unit strides are constexpr 1 (Triton specialises them that way) and the rest divisible by 16.

Run ``python -m fastmlp.kernels.aot`` for a table of every shipped config.
"""

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmlp.kernels import linear_act, tuning

# Shared memory a block may use (bytes): A100 (sm_80) and H100 (sm_90).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}

_TL_TYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}


@dataclass
class CompileReport:
    kernel: str
    arch: int
    dtype: str
    precision: str
    config: Optional[tuning.TileConfig]  # None for the SGD kernel
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    hgmma: int
    wide_loads: int  # 16-byte global loads (ld.global.v4) in the PTX


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (newer Tritons emit PTX only their newer ptxas reads)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        return _tool("ptxas")


# Per kernel: which block-size constexprs take the config's (rows, cols, reduction), and which
# stride arguments are 1 for contiguous operands.
_KERNELS = {
    "forward": (linear_act.linear_act_fwd_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                ("stride_xk", "stride_wk", "stride_b", "stride_yn"),
                dict(HAS_BIAS=True, ACTIVATION="relu", ALPHA=0.0, SAVE_PREACT=False)),
    "grad_input": (linear_act.linear_act_grad_input_kernel, ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                   ("stride_gn", "stride_wk", "stride_dxk"), dict(ACTIVATION="relu", ALPHA=0.0)),
    "grad_weight": (linear_act.linear_act_grad_weight_kernel, ("BLOCK_N", "BLOCK_K", "BLOCK_M"),
                    ("stride_gn", "stride_xk", "stride_dwk"),
                    dict(ACTIVATION="relu", ALPHA=0.0, COMPUTE_DW=True, COMPUTE_DB=True)),
}


# Integer arguments the forward and dX kernels mark do_not_specialize (the batch dimension
# varies; there it is only an output edge). The dW kernel, whose reduction runs over M, keeps it.
_UNSPECIALIZED = {"forward": ("M",), "grad_input": ("M",), "grad_weight": ()}


def compile_config(kernel: str, arch: int, dtype: str, precision: str,
                   config: tuning.TileConfig) -> CompileReport:
    """Compile one kernel with one config for sm_<arch> and read the compiler's reports."""
    fn, block_names, unit_strides, flags = _KERNELS[kernel]
    constexprs = dict(flags, ACC_DTYPE=tl.float32, DOT_PRECISION=precision, UPCAST=False,
                      OFFSET_DTYPE=tl.int32, GROUP=config.group)
    constexprs.update(zip(block_names, (config.block_rows, config.block_cols, config.block_red)))
    constexprs.update({name: 1 for name in unit_strides})
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = f"*{dtype}" if name.endswith("_ptr") else "i32"
        if name not in _UNSPECIALIZED[kernel]:  # as a launch: Triton gives no hints for these
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    report = _read_reports(compiled, arch)
    return CompileReport(kernel, arch, dtype, precision, config, *report)


def _read_reports(compiled, arch: int):
    """(registers, spill bytes, stack bytes, shared bytes, HGMMA count, 16-byte global loads)
    from ptxas, cuobjdump and the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        gpu_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        ptxas = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu_name}", ptx, "-o",
                                os.path.join(tmp, "check.cubin")], capture_output=True, text=True,
                               check=True).stderr
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", ptxas).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas))
    stack = int(re.search(r"(\d+) bytes stack frame", ptxas).group(1))
    wide_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", compiled.asm["ptx"]))
    return (registers, spills, stack, compiled.metadata.shared, len(re.findall(r"\bHGMMA\b", sass)),
            wide_loads)


def shipped_cases():
    """(kernel, arch, dtype, precision, config) for every config a GPU launch may pick."""
    lists = tuning.all_shipped_configs()
    plans = [("tensor_core_sm90", 90, ("fp16", "bf16"), "ieee"),
             ("tensor_core_sm80", 80, ("fp16", "bf16"), "ieee"),
             ("tf32", 80, ("fp32",), "tf32"), ("tf32", 90, ("fp32",), "tf32"),
             ("ieee_fp32", 80, ("fp32",), "ieee"), ("ieee_fp32", 90, ("fp32",), "ieee")]
    for list_name, arch, dtypes, precision in plans:
        for config in lists[list_name]:
            for dtype in dtypes:
                for kernel in _KERNELS:
                    yield kernel, arch, dtype, precision, config


def compile_sgd(arch: int, dtype: str, momentum: bool) -> CompileReport:
    """Compile the multi-tensor SGD kernel (fastmlp.kernels.sgd) the way its launcher does."""
    from fastmlp.kernels import sgd

    fn = sgd._sgd_kernel
    constexprs = dict(DTYPE=_TL_TYPES[dtype], HAS_WEIGHT_DECAY=True, HAS_MOMENTUM=momentum,
                      NESTEROV=momentum, MAXIMIZE=False, ALIGNED=True, BLOCK=sgd.BLOCK)
    types = dict(tensor_table="*i64", block_table="*i64", lr_ptr="*fp32", weight_decay="fp32",
                 momentum="fp32", one_minus_dampening="fp32")
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if types.get(name, "").startswith("*")}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
    report = _read_reports(compiled, arch)
    return CompileReport("sgd", arch, dtype, "momentum" if momentum else "plain", None, *report)


def _compile_case(case):
    return compile_config(*case)


def _compile_sgd_case(case):
    return compile_sgd(*case)


SGD_CASES = [(arch, dtype, momentum) for arch in (80, 90) for dtype in ("fp32", "bf16")
             for momentum in (False, True)]


def compile_all(jobs: int = 1):
    """Reports for every shipped linear-kernel case and the SGD kernel, in `jobs` processes."""
    cases = list(shipped_cases())
    if jobs <= 1:
        return [compile_config(*case) for case in cases] + [compile_sgd(*c) for c in SGD_CASES]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_case, cases)) + list(pool.map(_compile_sgd_case, SGD_CASES))


def main(argv=None) -> None:
    import argparse
    import dataclasses
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--json", help="also write every report to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    reports = compile_all(args.jobs)
    print(f"{'kernel':12} {'sm':>3} {'dtype':5} {'prec':4} {'rows':>4} {'cols':>4} {'red':>4} "
          f"{'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'smem':>7} {'HGMMA':>5} {'ldv4':>5}")
    for r in reports:
        c = r.config or tuning.TileConfig(0, 0, 0, 0, 4, 0)
        print(f"{r.kernel:12} {r.arch:3} {r.dtype:5} {r.precision:4} {c.block_rows:4} {c.block_cols:4} "
              f"{c.block_red:4} {c.num_warps:5} {c.num_stages:6} {r.registers:4} {r.spill_bytes:5} "
              f"{r.shared_bytes:7} {r.hgmma:5} {r.wide_loads:5}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)


if __name__ == "__main__":
    main()
