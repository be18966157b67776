"""Ahead-of-time compile of the fused-MLP kernels' shipped configs for sm_80 / sm_90, without a GPU.

The same method as fastmlp.kernels.aot (triton.compile with an explicit GPUTarget, ptxas -v and
cuobjdump from Triton's wheel) applied to fastmlp/kernels/mlp.py: every (dtype class, arch,
padded hidden width) entry of FUSED_CONFIGS and DW_CONFIGS, for the activations with the
heaviest forward (gelu: erf) and derivative (gelu_tanh), and relu. The fully fused width limit
of each dtype class is the widest H whose configs compile with 0 spills here.

Each config is compiled twice, as two launches on contiguous tensors specialise it: sizes
"x16", every integer argument a multiple of 16 (Triton's divisibility-by-16 hint on each, except
the batch M of the forward and dX kernels: do_not_specialize there), and sizes "odd", none of
them (the seed's K_IN = 1000, N_OUT = 10, widths like 100: rows that do not start 16-aligned,
narrower loads, more registers), the stride between saved layers (M * H, always a multiple of
16) excepted; unit strides are constexpr 1 in both. The hidden width is no
constexpr of the fused kernels (only its padded tile width H is; the true widths are runtime
arguments), so the kernel compiled here for H is the one every width that pads to H runs.

What is read from the compile: ptxas's registers, spills, stack frame; shared memory; HGMMA count
(sm_90 SASS); the TTGIR's wgmma waits; ptxas's wgmma serialisation advisory; NaN-dropping float
min/max in the PTX. The last three are read here from the compiled text (the PTX, the TTGIR)
rather than taken by position from fastmlp.kernels.aot's report tuple, whose length differs
between versions of that module (read by position, the NaN check silently read nothing).

Run ``python -m fastmlp.kernels.mlp_aot`` for a table; ``--json FILE`` writes every report, and
``--sweep`` compiles a grid of candidate configs (how the shipped ones were chosen).
"""

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from typing import List

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmlp.kernels import aot, mlp

_KERNELS = {
    "mlp_forward": (mlp.mlp_fwd_kernel, ("stride_xk", "stride_w_in_k", "stride_w_out_k", "stride_yn")),
    "mlp_backward": (mlp.mlp_bwd_kernel, ("stride_gn", "stride_w_in_k", "stride_w_out_k", "stride_dxk")),
    "mlp_grad_weight": (mlp.mlp_grad_weight_kernel, ("stride_an", "stride_bk")),
}
_PRECISION = {"half": "ieee", "tf32": "tf32", "ieee": "ieee"}
_DTYPES = {"half": ("fp16", "bf16"), "tf32": ("fp32",), "ieee": ("fp32",)}


@dataclass
class MLPCompileReport:
    kernel: str
    arch: int
    dtype: str
    precision: str
    hidden: int          # padded hidden width H (0 for the dW kernel)
    activation: str
    config: dict         # FusedConfig or TileConfig fields
    num_warps: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    hgmma: int
    wide_loads: int
    wgmma_serialised: bool   # ptxas had to serialise wgmma (registers it could not keep live)
    float_minmax: int        # NaN-dropping max/min instructions in the PTX (want 0)
    wgmma_waits: List[int] = field(default_factory=list)  # TTGIR warp_group_dot_wait pendings
    sizes: str = "x16"       # "x16": integer arguments with the divisibility-by-16 hint; "odd": without


# max.f32 / min.f32 (any .ftz/.xorsign; f16, f64, packed f16x2/bf16x2 too) return the other
# operand for NaN: a ReLU written as max(z, 0) maps NaN to 0. Their .NaN forms propagate NaN.
_FLOAT_MINMAX = re.compile(r"\b(?:max|min)(?!\.NaN)(?:\.(?!NaN)\w+)*\.(?:f16x2|bf16x2|f16|bf16|f32|f64)\b")
_WGMMA_WAIT = re.compile(r"warp_group_dot_wait\b[^\n]*pendings = (\d+)")


def float_minmax_count(ptx: str) -> int:
    """NaN-dropping float min/max instructions in a PTX text."""
    return len(_FLOAT_MINMAX.findall(ptx))


def wgmma_waits(ttgir: str) -> List[int]:
    """Each wgmma wait in the TTGIR, in program order: how many wgmma groups may stay in flight
    (0 right after a wgmma: it runs synchronously)."""
    return [int(n) for n in _WGMMA_WAIT.findall(ttgir)]


def _wgmma_serialised(ptx: str, arch: int) -> bool:
    """ptxas's advisory that it serialised wgmma (sm_90 only)."""
    if arch != 90:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        err = subprocess.run([aot._ptxas(arch), "-v", "--gpu-name=sm_90a", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                             check=True).stderr
    return "wgmma.mma_async instructions are serialized" in err


SIZES = ("x16", "odd")
# Integer arguments a multiple of 16 whatever the sizes: M * H, and the dW kernel's row chunk
# (a multiple of its block_red).
_ALWAYS_X16 = ("stride_saved_layer", "rows_per_split")


def compile_case(kernel: str, arch: int, dtype: str, precision: str, hidden: int,
                 activation: str, config, sizes: str = "x16") -> MLPCompileReport:
    """Compile one kernel with one config for sm_<arch> and read ptxas's and cuobjdump's reports."""
    fn, unit_strides = _KERNELS[kernel]
    preact = activation in ("gelu", "gelu_tanh", "silu")
    c = dict(ACC_DTYPE=tl.float32, DOT_PRECISION=precision, UPCAST=False, OFFSET_DTYPE=tl.int32)
    if kernel == "mlp_grad_weight":
        c.update(B_ACTIVATION=activation if preact else "none", B_ALPHA=0.0, COMPUTE_DW=True,
                 COMPUTE_DB=True, BLOCK_N=config.block_rows, BLOCK_K=config.block_cols,
                 BLOCK_M=config.block_red)
    else:
        c.update(ACTIVATION=activation, ALPHA=0.0, OUT_ACTIVATION="none", OUT_ALPHA=0.0,
                 H=hidden, BLOCK_M=config.block_m, BLOCK_K=config.block_k,
                 BLOCK_N=config.block_n)
        if kernel == "mlp_forward":
            c.update(HAS_BIAS=True, SAVE=True, SAVE_PREACT=preact, SAVE_OUT_PREACT=False)
        else:
            c.update(COMPUTE_DX=True)
    c.update({name: 1 for name in unit_strides})
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in c:
            signature[name] = "constexpr"
            continue
        if name == "widths_ptr":
            signature[name] = "*i32"
        else:
            signature[name] = f"*{dtype}" if name.endswith("_ptr") else "i32"
        if name == "M" and kernel != "mlp_grad_weight":
            continue  # do_not_specialize
        if name.endswith("_ptr") or sizes == "x16" or name in _ALWAYS_X16:
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, c, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    found = aot._read_reports(compiled, arch)
    registers, spills, stack, shared, hgmma, wide_loads = found[:6]  # the same in every version
    ptx = compiled.asm["ptx"]
    # aot's report carries ptxas's serialisation advisory in newer versions (a bool after the
    # waits list); else ptxas runs once more here.
    serialised = (found[7] if len(found) >= 9 and isinstance(found[7], bool)
                  else _wgmma_serialised(ptx, arch))
    return MLPCompileReport(kernel, arch, dtype, precision,
                            hidden if kernel != "mlp_grad_weight" else 0, activation,
                            asdict(config), config.num_warps, registers, spills, stack, shared,
                            hgmma, wide_loads, serialised, float_minmax_count(ptx),
                            wgmma_waits(compiled.asm["ttgir"]), sizes)


# Which activations a config must compile cleanly for: the default tiles (FUSED_CONFIGS) serve
# every activation unless MATH_CONFIGS overrides the width, in which case they serve the select
# derivatives only. Compiled in CI per kernel: one of each group (relu / leaky_relu for the
# selects; gelu's erf and saved pre-activation in the forward, gelu_tanh's derivative in the
# backward, gelu's recomputed Y in the weight gradient; near the register limit a lighter
# activation is not guaranteed to allocate better, so both groups are compiled where a tile
# serves both); --full compiles every activation.
SELECT = {"mlp_forward": ("relu",), "mlp_backward": ("leaky_relu",)}
MATH = {"mlp_forward": ("gelu",), "mlp_backward": ("gelu_tanh",)}
SELECT_FULL = ("relu", "leaky_relu")
MATH_FULL = ("gelu", "gelu_tanh", "silu", "sigmoid", "tanh")


def shipped_cases(full: bool = False):
    """(kernel, arch, dtype, precision, H, activation, config, sizes) for every config a launch
    may pick, each with the activations it may run (the heaviest per group, or all with `full`),
    bf16 for the 16-bit class unless `full`, both SIZES."""
    for case in _shipped(full):
        for sizes in SIZES:
            yield case + (sizes,)


def _shipped(full: bool):
    for (cls, arch), by_width in mlp.FUSED_CONFIGS.items():
        dtypes = _DTYPES[cls] if full else _DTYPES[cls][-1:]
        math = mlp.MATH_CONFIGS.get((cls, arch), {})
        for hidden, configs in by_width.items():
            plans = [(configs, SELECT, SELECT_FULL)]
            plans.append((math[hidden], MATH, MATH_FULL) if hidden in math
                         else (configs, MATH, MATH_FULL))
            for plan_configs, heaviest, every in plans:
                for config, dtype, kernel in itertools.product(plan_configs, dtypes,
                                                               ("mlp_forward", "mlp_backward")):
                    for activation in (every if full else heaviest[kernel]):
                        yield kernel, arch, dtype, _PRECISION[cls], hidden, activation, config
    for (cls, arch), configs in mlp.DW_CONFIGS.items():
        dtypes = _DTYPES[cls] if full else _DTYPES[cls][-1:]
        for config, dtype in itertools.product(configs, dtypes):
            for activation in (("relu", "gelu") if full else ("gelu",)):
                yield "mlp_grad_weight", arch, dtype, _PRECISION[cls], 0, activation, config


def sweep_cases():
    """A grid of fused configs per dtype class, arch and width (what FUSED_CONFIGS was chosen from)."""
    for cls, arch, hidden in itertools.product(("half", "tf32", "ieee"), (90, 80), (16, 32, 64, 128)):
        for block_m, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2)):
            config = mlp.FusedConfig(block_m, 32, 32, warps, stages)
            for kernel in ("mlp_forward", "mlp_backward"):
                for sizes in SIZES:
                    yield kernel, arch, _DTYPES[cls][-1], _PRECISION[cls], hidden, "relu", config, sizes


def _compile(case):
    try:
        return compile_case(*case)
    except Exception as error:  # a config the compiler rejects: report it as such
        kernel, arch, dtype, precision, hidden, activation, config, sizes = case
        print(f"failed: {case}: {type(error).__name__}: {str(error)[:200]}")
        return MLPCompileReport(kernel, arch, dtype, precision, hidden, activation, asdict(config),
                                config.num_warps, -1, -1, -1, -1, -1, -1, False, -1, [], sizes)


def compile_all(cases, jobs: int = 1):
    cases = list(cases)
    if jobs <= 1:
        return [_compile(case) for case in cases]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile, cases))


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--json", help="also write every report to this JSON file")
    parser.add_argument("--sweep", action="store_true", help="compile the candidate grid instead")
    parser.add_argument("--full", action="store_true",
                        help="every dtype and activation of the shipped configs (not only the heaviest)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    reports = compile_all(sweep_cases() if args.sweep else shipped_cases(args.full), args.jobs)
    print(f"{'kernel':15} {'sm':>3} {'dtype':5} {'prec':4} {'H':>4} {'act':9} {'sizes':5} {'config':24} "
          f"{'regs':>4} {'spill':>5} {'smem':>7} {'HGMMA':>5} {'serial':>6} waits")
    for r in reports:
        c = r.config
        shape = (f"{c['block_m']}x{c['block_k']}x{c['block_n']}" if "block_m" in c
                 else f"{c['block_rows']}x{c['block_cols']}x{c['block_red']}")
        shape += f" w{c['num_warps']} s{c['num_stages']}"
        print(f"{r.kernel:15} {r.arch:3} {r.dtype:5} {r.precision:4} {r.hidden:4} {r.activation:9} {r.sizes:5} "
              f"{shape:24} {r.registers:4} {r.spill_bytes:5} {r.shared_bytes:7} {r.hgmma:5} "
              f"{'yes' if r.wgmma_serialised else 'no':>6} {','.join(map(str, r.wgmma_waits)) or '-'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)


if __name__ == "__main__":
    main()
