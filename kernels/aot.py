"""Ahead-of-time compile of the shipped kernel configs for NVIDIA GPUs, without a GPU.

Why: the tests run the kernels through Triton's interpreter, which says nothing about registers,
spills or tensor-core instructions. ``triton.compile`` with an explicit ``GPUTarget`` produces the
PTX and cubin for sm_80 / sm_90 on any machine; triton's wheel carries ptxas and cuobjdump, whose
reports show the register count, spill bytes, shared memory, and whether the SASS uses Hopper's
warpgroup MMA (HGMMA). The compile mirrors a real launch on contiguous, 16-byte-aligned tensors:
unit strides are constexpr 1 (Triton specialises them that way) and the rest divisible by 16.

The matrix is every activation (the rows of kernels/activations.py, each compiled with its
``default_alpha``) x kernel (forward, forward storing Z, dX, dW + db) x shipped config
(kernels/configs.py), less the backward kernels a row does not fuse on a GPU generation
(``fused_backward_from``), plus the split dW's reduction and the SGD kernel.
Besides registers and spills, each report carries what only the compiled code shows: the
pending counts of the wgmma waits in the TTGIR (a 0 inside a K loop makes the MMAs synchronous),
ptxas's C7515 advisory (wgmma serialised), and the number of NaN-dropping float min/max
instructions in the PTX (a ReLU written as max(z, 0) maps NaN to 0 on the GPU).

Run ``python -m fastmlp.kernels.aot`` for a table of all of it (``--ci``: the part the tests
compile; ``--activations relu,gelu``: a subset).
"""

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmlp.kernels import activations, linear_act, tuning
from fastmlp.kernels.activation_jit import forward_of, grad_of
from fastmlp.kernels.configs import SHARED_MEMORY_LIMIT  # noqa: F401  (the tests' limit)

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
    wgmma_waits: List[int] = field(default_factory=list)  # TTGIR warp_group_dot_wait pendings
    wgmma_serialised: bool = False  # ptxas: "wgmma.mma_async instructions are serialized"
    float_minmax: int = 0  # NaN-dropping f32/f16/f64 min/max instructions in the PTX
    activation: str = ""


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (newer Tritons emit PTX only their newer ptxas reads)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):
        return _tool("ptxas")


# The shipped activations (kernels/activations.py); rows registered at run time join the
# matrix too (shipped_cases reads the table when called).
ACTIVATIONS = activations.ACTIVATIONS

# Per kernel: which block-size constexprs take the config's (rows, cols, reduction), which
# stride arguments are 1 for contiguous operands, and which constexpr takes the activation's jit
# forward (ACTIVATION) or derivative (ACTIVATION_GRAD). "forward_z" is the training forward of
# the activations whose backward reads the pre-activation (it stores Z as well: the heavier
# epilogue).
_FORWARD = (linear_act.linear_act_fwd_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
            ("stride_xk", "stride_wk", "stride_b", "stride_yn"))
_KERNELS = {
    "forward": _FORWARD + (dict(HAS_BIAS=True, SAVE_PREACT=False), ("ACTIVATION", forward_of)),
    "forward_z": _FORWARD + (dict(HAS_BIAS=True, SAVE_PREACT=True), ("ACTIVATION", forward_of)),
    "grad_input": (linear_act.linear_act_grad_input_kernel, ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
                   ("stride_gn", "stride_wk", "stride_dxk"), dict(), ("ACTIVATION_GRAD", grad_of)),
    "grad_weight": (linear_act.linear_act_grad_weight_kernel, ("BLOCK_N", "BLOCK_K", "BLOCK_M"),
                    ("stride_gn", "stride_xk", "stride_dwk"), dict(COMPUTE_DW=True, COMPUTE_DB=True),
                    ("ACTIVATION_GRAD", grad_of)),
}


# Integer arguments the forward and dX kernels mark do_not_specialize (the batch dimension
# varies; there it is only an output edge). The dW kernel, whose reduction runs over M, keeps it.
_UNSPECIALIZED = {"forward": ("M",), "forward_z": ("M",), "grad_input": ("M",), "grad_weight": ()}


def compile_config(kernel: str, arch: int, dtype: str, precision: str,
                   config: tuning.TileConfig, activation: str = "relu") -> CompileReport:
    """Compile one kernel with one config and activation for sm_<arch>; read the compiler's reports."""
    fn, block_names, unit_strides, flags, (activation_arg, jit_function) = _KERNELS[kernel]
    constexprs = dict(flags, ALPHA=activations.get(activation).default_alpha,
                      ACC_DTYPE=tl.float32, DOT_PRECISION=precision, UPCAST=False,
                      OFFSET_DTYPE=tl.int32, GROUP=config.group)
    constexprs[activation_arg] = jit_function(activation)
    constexprs.update(zip(block_names, (config.block_rows, config.block_cols, config.block_red)))
    constexprs.update({name: 1 for name in unit_strides})
    report = compile_and_read(fn, constexprs, dtype, arch, config, _UNSPECIALIZED[kernel])
    return CompileReport(kernel, arch, dtype, precision, config, *report, activation=activation)


def compile_and_read(fn, constexprs: dict, dtype: str, arch: int, config, unspecialized):
    """Compile `fn` for sm_<arch> as a launch on contiguous, 16-byte-aligned tensors of `dtype`
    would (every pointer `*dtype`, other arguments i32 divisible by 16 except `unspecialized`,
    to which Triton gives no hints), and read the compiler's reports (_read_reports)."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = f"*{dtype}" if name.endswith("_ptr") else "i32"
        if name not in unspecialized:
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return _read_reports(compiled, arch)


# max.f32 / min.f32 (any .ftz/.xorsign; f16, f64, packed f16x2/bf16x2 too) return the other
# operand for NaN: a ReLU written as max(z, 0) maps NaN to 0. Their .NaN forms propagate NaN.
_FLOAT_MINMAX = re.compile(r"\b(?:max|min)(?!\.NaN)(?:\.(?!NaN)\w+)*\.(?:f16x2|bf16x2|f16|bf16|f32|f64)\b")
_WGMMA_WAIT = re.compile(r"warp_group_dot_wait\b[^\n]*pendings = (\d+)")


def float_minmax_count(ptx: str) -> int:
    """NaN-dropping float min/max instructions in a PTX text."""
    return len(_FLOAT_MINMAX.findall(ptx))


def wgmma_waits(ttgir: str) -> List[int]:
    """Each wgmma wait in the TTGIR, in program order: how many wgmma groups may stay in flight
    (inside a K loop a 0 makes every MMA wait for the previous one: synchronous)."""
    return [int(n) for n in _WGMMA_WAIT.findall(ttgir)]


def _read_reports(compiled, arch: int):
    """What the compilers say about one kernel: (registers, spill bytes, stack bytes, shared
    bytes, HGMMA count, 16-byte global loads, wgmma waits, wgmma serialised, NaN-dropping
    float min/max), from ptxas, cuobjdump (sm_90 only: HGMMA exists only there), the TTGIR and
    the PTX."""
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
                              check=True).stdout if arch == 90 else ""
    registers = int(re.search(r"Used (\d+) registers", ptxas).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas))
    stack = int(re.search(r"(\d+) bytes stack frame", ptxas).group(1))
    ptx_text = compiled.asm["ptx"]
    wide_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx_text))
    waits = wgmma_waits(compiled.asm["ttgir"])
    # ptxas's advisory when it had to serialise wgmma (e.g. registers it could not keep live).
    serialised = "wgmma.mma_async instructions are serialized" in ptxas
    float_minmax = float_minmax_count(ptx_text)
    return (registers, spills, stack, compiled.metadata.shared, len(re.findall(r"\bHGMMA\b", sass)),
            wide_loads, waits, serialised, float_minmax)


_PLANS = [("tensor_core_sm90", 90, ("fp16", "bf16"), "ieee"),
          ("tensor_core_sm80", 80, ("fp16", "bf16"), "ieee"),
          ("tf32", 80, ("fp32",), "tf32"), ("tf32", 90, ("fp32",), "tf32"),
          ("ieee_fp32", 80, ("fp32",), "ieee"), ("ieee_fp32", 90, ("fp32",), "ieee")]


def _largest(configs):
    """The config with the biggest tile (then the most stages): the most registers and smem."""
    return max(configs, key=lambda c: (c.block_rows * c.block_cols * c.block_red, c.num_warps, c.num_stages))


def shipped_cases(activation_names=None, kernels=tuple(_KERNELS), configs="all",
                  dtypes=("fp16", "bf16", "fp32")):
    """(kernel, arch, dtype, precision, config, activation) for every config a GPU launch may
    pick, for `activation_names` (default: every row of the table); configs="ends" keeps only
    the default and the largest config of each list."""
    if activation_names is None:
        activation_names = activations.names()
    lists = tuning.all_shipped_configs()
    for list_name, arch, plan_dtypes, precision in _PLANS:
        chosen = lists[list_name]
        if configs == "ends":
            chosen = list(dict.fromkeys([chosen[0], _largest(chosen)]))
        for config in chosen:
            for dtype in (d for d in plan_dtypes if d in dtypes):
                for activation in activation_names:
                    row = activations.get(activation)
                    for kernel in kernels:
                        if kernel in ("grad_input", "grad_weight") and \
                                not row.fuses_backward_on((arch // 10, arch % 10)):
                            continue   # not shipped: TORCH_GEMM runs these (kernels/configs.py)
                        yield kernel, arch, dtype, precision, config, activation


def ci_cases():
    """The part of the matrix the test suite compiles (tests/test_kernel_configs.py), about two
    minutes on two cores; ``python -m fastmlp.kernels.aot`` compiles all of it.

    relu: every config (its forward without Z is the hot inference and training path); gelu_tanh,
    the heaviest epilogue and prologue: every config, forward with Z; every other activation: the
    default and the largest config of each list (bf16 for the tensor-core lists; fp16 is the same
    code on another MMA type), forward with Z (the forward without Z is the same code less one
    store).
    """
    backward = ("grad_input", "grad_weight")
    others = tuple(a for a in activations.names() if a not in ("relu", "gelu_tanh"))
    return (list(shipped_cases(("relu",), ("forward",) + backward))
            + list(shipped_cases(("gelu_tanh",), ("forward_z",) + backward))
            + list(shipped_cases(others, ("forward_z",) + backward, configs="ends", dtypes=("bf16", "fp32"))))


def compile_reduce(arch: int, dtype: str) -> CompileReport:
    """Compile the split dW's reduction of fp32 partials into `dtype` dW and db."""
    fn = linear_act.reduce_partials_kernel
    constexprs = dict(BLOCK=linear_act._REDUCE_BLOCK)
    types = dict(part_ptr="*fp32", dw_ptr=f"*{dtype}", db_ptr=f"*{dtype}")
    signature = {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in fn.arg_names}
    # As launched: aligned buffers, row_length a multiple of 16 (the launcher pads it).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in types or name == "row_length"}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
    report = _read_reports(compiled, arch)
    return CompileReport("reduce", arch, dtype, "fp32", None, *report)


REDUCE_CASES = [(arch, dtype) for arch in (80, 90) for dtype in ("fp16", "bf16", "fp32")]


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


def _compile_reduce_case(case):
    return compile_reduce(*case)


SGD_CASES = [(arch, dtype, momentum) for arch in (80, 90) for dtype in ("fp32", "bf16")
             for momentum in (False, True)]


def compile_all(jobs: int = 1, cases=None):
    """Reports for the linear-kernel cases (default: all shipped ones), the split dW's reduction
    and the SGD kernel, in `jobs` processes."""
    cases = list(shipped_cases()) if cases is None else list(cases)
    work = ([(_compile_case, c) for c in cases] + [(_compile_reduce_case, c) for c in REDUCE_CASES]
            + [(_compile_sgd_case, c) for c in SGD_CASES])
    if jobs <= 1:
        return [fn(case) for fn, case in work]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, case) for fn, case in work]
        return [f.result() for f in futures]


def main(argv=None) -> None:
    import argparse
    import dataclasses
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--json", help="also write every report to this JSON file")
    parser.add_argument("--ci", action="store_true", help="only the test suite's part of the matrix")
    parser.add_argument("--activations", help=f"comma-separated subset of {','.join(ACTIVATIONS)}")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    cases = ci_cases() if args.ci else list(shipped_cases())
    if args.activations:
        wanted = args.activations.split(",")
        unknown = set(wanted) - set(activations.names())
        if unknown:
            raise SystemExit(f"unknown activations {sorted(unknown)}; known: {activations.names()}")
        cases = [c for c in cases if c[-1] in wanted]
    reports = compile_all(args.jobs, cases)
    print(f"{'kernel':11} {'activation':10} {'sm':>3} {'dtype':5} {'prec':4} {'rows':>4} {'cols':>4} "
          f"{'red':>4} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'smem':>7} {'HGMMA':>5} "
          f"{'ldv4':>5} {'waits':>10} {'fminmax':>7}")
    for r in reports:
        c = r.config or tuning.TileConfig(0, 0, 0, 0, 4, 0)
        waits = ",".join(map(str, r.wgmma_waits)) + ("!serialised" if r.wgmma_serialised else "")
        print(f"{r.kernel:11} {r.activation or '-':10} {r.arch:3} {r.dtype:5} {r.precision:4} "
              f"{c.block_rows:4} {c.block_cols:4} {c.block_red:4} {c.num_warps:5} {c.num_stages:6} "
              f"{r.registers:4} {r.spill_bytes:5} {r.shared_bytes:7} {r.hgmma:5} {r.wide_loads:5} "
              f"{waits or '-':>10} {r.float_minmax:7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)


if __name__ == "__main__":
    main()
