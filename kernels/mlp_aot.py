"""Ahead-of-time compile of the fused-MLP kernels' shipped configs for sm_80 / sm_90, without a GPU.

The same method as fastmlp.kernels.aot (triton.compile with an explicit GPUTarget, ptxas -v and
cuobjdump from Triton's wheel, the same report reader) applied to kernels/mlp_kernels.py: every
(dtype class, arch, padded hidden width) entry of FUSED_CONFIGS, MATH_CONFIGS and DW_CONFIGS
(kernels/configs.py), for the activations each entry serves (a row's ``derivative`` in
kernels/activations.py: the "math" tiles for "math" derivatives where MATH_CONFIGS has the
width), each compiled with its ``default_alpha`` and storing what its row ``saves``. CI compiles
the heaviest of each group (gelu's erf forward, gelu_tanh's derivative; relu, leaky_relu);
``--full`` every activation and dtype. The fully fused width limit of each dtype class is the
widest H whose configs compile with 0 spills here.

Each config is compiled twice, as two launches on contiguous tensors specialise it: sizes
"x16", every integer argument a multiple of 16 (Triton's divisibility-by-16 hint on each, except
the batch M of the forward and dX kernels: do_not_specialize there), and sizes "odd", none of
them (the seed's K_IN = 1000, N_OUT = 10, widths like 100: rows that do not start 16-aligned,
narrower loads, more registers), the stride between saved layers (M * H, always a multiple of
16) excepted; unit strides are constexpr 1 in both. The hidden width is no
constexpr of the fused kernels (only its padded tile width H is; the true widths are runtime
arguments), so the kernel compiled here for H is the one every width that pads to H runs.

What is read from the compile (fastmlp.kernels.aot's reader): ptxas's registers, spills, stack
frame; shared memory; HGMMA count (sm_90 SASS); the TTGIR's wgmma waits; ptxas's wgmma
serialisation advisory; NaN-dropping float min/max in the PTX.

Run ``python -m fastmlp.kernels.mlp_aot`` for a table; ``--json FILE`` writes every report, and
``--sweep`` compiles a grid of candidate configs (how the shipped ones were chosen).
"""

import itertools
import os
from dataclasses import asdict, dataclass, field
from typing import List

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmlp.kernels import activations, aot, configs, mlp_kernels
from fastmlp.kernels.activation_jit import forward_of, grad_of
from fastmlp.kernels.aot import float_minmax_count, wgmma_waits  # noqa: F401  (the readers, tested)

_KERNELS = {
    "mlp_forward": (mlp_kernels.mlp_fwd_kernel,
                    ("stride_xk", "stride_w_in_k", "stride_w_out_k", "stride_yn")),
    "mlp_backward": (mlp_kernels.mlp_bwd_kernel,
                     ("stride_gn", "stride_w_in_k", "stride_w_out_k", "stride_dxk")),
    "mlp_grad_weight": (mlp_kernels.mlp_grad_weight_kernel, ("stride_an", "stride_bk")),
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


SIZES = ("x16", "odd")
# Integer arguments a multiple of 16 whatever the sizes: M * H, and the dW kernel's row chunk
# (a multiple of its block_red).
_ALWAYS_X16 = ("stride_saved_layer", "rows_per_split")


def compile_case(kernel: str, arch: int, dtype: str, precision: str, hidden: int,
                 activation: str, config, sizes: str = "x16") -> MLPCompileReport:
    """Compile one kernel with one config for sm_<arch> and read ptxas's and cuobjdump's reports."""
    fn, unit_strides = _KERNELS[kernel]
    alpha = activations.get(activation).default_alpha
    preact = activations.get(activation).saves(alpha) == "preact"
    c = dict(ACC_DTYPE=tl.float32, DOT_PRECISION=precision, UPCAST=False, OFFSET_DTYPE=tl.int32)
    if kernel == "mlp_grad_weight":
        # B is the saved pre-activation, its activation recomputed, when the row saves Z
        c.update(B_ACTIVATION=forward_of(activation) if preact else None, B_ALPHA=alpha,
                 COMPUTE_DW=True, COMPUTE_DB=True, BLOCK_N=config.block_rows,
                 BLOCK_K=config.block_cols, BLOCK_M=config.block_red)
    else:
        c.update(ALPHA=alpha, OUT_ALPHA=0.0, H=hidden, BLOCK_M=config.block_m,
                 BLOCK_K=config.block_k, BLOCK_N=config.block_n)
        if kernel == "mlp_forward":
            c.update(ACTIVATION=forward_of(activation), OUT_ACTIVATION=None, HAS_BIAS=True,
                     SAVE=True, SAVE_PREACT=preact, SAVE_OUT_PREACT=False)
        else:
            c.update(ACTIVATION_GRAD=grad_of(activation), OUT_ACTIVATION_GRAD=None,
                     COMPUTE_DX=True)
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
    (registers, spills, stack, shared, hgmma, wide_loads, waits, serialised,
     float_minmax) = aot._read_reports(compiled, arch)
    return MLPCompileReport(kernel, arch, dtype, precision,
                            hidden if kernel != "mlp_grad_weight" else 0, activation,
                            asdict(config), config.num_warps, registers, spills, stack, shared,
                            hgmma, wide_loads, serialised, float_minmax, waits, sizes)


# Which activations a config must compile cleanly for: the default tiles (FUSED_CONFIGS) serve
# every activation unless MATH_CONFIGS overrides the width, in which case they serve the select
# derivatives only. Compiled in CI per kernel: the heaviest of each group (relu / leaky_relu for
# the selects; gelu's erf and saved pre-activation in the forward, gelu_tanh's derivative in the
# backward, gelu's recomputed Y in the weight gradient; near the register limit a lighter
# activation is not guaranteed to allocate better, so both groups are compiled where a tile
# serves both); --full compiles every row of the table with its group.
SELECT = {"mlp_forward": ("relu",), "mlp_backward": ("leaky_relu",)}
MATH = {"mlp_forward": ("gelu",), "mlp_backward": ("gelu_tanh",)}


def _group(derivative: str):
    """Every row of the table that applies something and whose derivative is `derivative`."""
    return tuple(name for name in activations.names()
                 if activations.get(name).derivative == derivative
                 and activations.get(name).jit_module is not None)


def _saves_preact(name: str) -> bool:
    row = activations.get(name)
    return row.saves(row.default_alpha) == "preact"


def shipped_cases(full: bool = False):
    """(kernel, arch, dtype, precision, H, activation, config, sizes) for every config a launch
    may pick, each with the activations it may run (the heaviest per group, or all with `full`),
    bf16 for the 16-bit class unless `full`, both SIZES."""
    for case in _shipped(full):
        for sizes in SIZES:
            yield case + (sizes,)


def _shipped(full: bool):
    select_full, math_full = _group(activations.SELECT), _group(activations.MATH)
    for (cls, arch), by_width in configs.FUSED_CONFIGS.items():
        dtypes = _DTYPES[cls] if full else _DTYPES[cls][-1:]
        math = configs.MATH_CONFIGS.get((cls, arch), {})
        for hidden, default in by_width.items():
            plans = [(default, SELECT, select_full)]
            plans.append((math[hidden], MATH, math_full) if hidden in math
                         else (default, MATH, math_full))
            for plan_configs, heaviest, every in plans:
                for config, dtype, kernel in itertools.product(plan_configs, dtypes,
                                                               ("mlp_forward", "mlp_backward")):
                    for activation in (every if full else heaviest[kernel]):
                        yield kernel, arch, dtype, _PRECISION[cls], hidden, activation, config
    # The weight-gradient kernel: relu reads Y as stored; a row saving Z recomputes its forward
    # into the MMA operand (CI: gelu's erf, the heaviest).
    recomputed = tuple(name for name in activations.names() if _saves_preact(name))
    for (cls, arch), dw_configs in configs.DW_CONFIGS.items():
        dtypes = _DTYPES[cls] if full else _DTYPES[cls][-1:]
        for config, dtype in itertools.product(dw_configs, dtypes):
            for activation in (("relu",) + recomputed if full else ("gelu",)):
                yield "mlp_grad_weight", arch, dtype, _PRECISION[cls], 0, activation, config


def sweep_cases():
    """A grid of fused configs per dtype class, arch and width (what FUSED_CONFIGS was chosen from)."""
    for cls, arch, hidden in itertools.product(("half", "tf32", "ieee"), (90, 80), (16, 32, 64, 128)):
        for block_m, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2)):
            config = configs.FusedConfig(block_m, 32, 32, warps, stages)
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


def __getattr__(name: str):
    """SELECT_FULL / MATH_FULL, the --full groups (a view of the table, which may gain rows at run
    time; they were constants before the table had a derivative column)."""
    if name in ("SELECT_FULL", "MATH_FULL"):
        return _group(activations.SELECT if name == "SELECT_FULL" else activations.MATH)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
